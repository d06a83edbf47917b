"""The cross-dataset Decision Transformer table: one row per task (and checkpoint), every method with a 95% interval,
and NAMM's paired differences to the others.

    grid = build_grid(read_results(...) for each run_dt folder)   # None unless >= 2 tasks have kv-cache results
    print(grid_markdown(grid)); grid_csv(grid, "dt_grid.csv")

Input: the ResultSets that scripts/run_dt.py folders give (kv-cache rollout, D4RL scale). The numbers are read from
the folder's episodes.jsonl (every kv-cache episode there, one per (policy, seed, episode)): per method the mean
D4RL-normalised score with mean ± 1.96 standard errors (`intervals.interval95`) and the realised cache %; per
baseline the difference NAMM − baseline paired by (seed, episode) — run_dt resets episode e of seed s with seed
1000*s + e for every policy, so the two episodes of a pair start from the same state — with the same rule on the
per-pair differences (`paired_difference`). A folder without episodes.jsonl shows the summary's unpaired intervals
and says that pairing was unavailable.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..records import in_repo
from .intervals import interval95
from .results import DT_FORMAT, ResultSet, is_namm
from .tables import _escape

POLICIES = ("full", "namm", "h2o", "l2", "recency")
LABELS = {"full": "full", "namm": "NAMM", "h2o": "H2O", "l2": "L2", "recency": "recency"}
VERSUS = ("full", "h2o", "l2", "recency")  # NAMM − each
SCALE = "d4rl"
NS = "n.s."  # marks a difference whose 95% interval contains 0
TITLE = "Decision Transformer grid"
_ENV_ORDER = ("hopper", "walker2d", "halfcheetah")
_QUALITY_ORDER = ("expert", "medium", "medium-replay", "medium-expert")
GRID_TASKS = tuple(f"{e}-{q}" for e in _ENV_ORDER for q in _QUALITY_ORDER[:3])  # the paper's nine, in order


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval (lo, hi None when fewer than 2 values) over n values."""

    mean: float
    lo: float | None
    hi: float | None
    n: int

    @property
    def contains_zero(self) -> bool | None:
        return None if self.lo is None else self.lo <= 0.0 <= self.hi

    def cell(self, mark: bool = False) -> str:
        """'2.0 [0.9, 3.1]' (+ ' n.s.' with `mark` when the interval contains 0; 2 significant digits where one
        decimal would print a non-zero bound as 0.0)."""
        if self.lo is None:
            return f"{fmt(self.mean)} [n={self.n}, no interval]"
        text = f"{fmt(self.mean)} [{fmt(self.lo)}, {fmt(self.hi)}]"
        return f"{text} {NS}" if mark and self.contains_zero else text


def fmt(x: float) -> str:
    """One decimal; two significant digits for 0 < |x| < 0.05 (so a tiny non-zero value never reads as 0.0)."""
    return f"{x:.2g}" if 0 < abs(x) < 0.05 else f"{x:.1f}"


def mean_interval(values: Iterable[float]) -> Estimate:
    """Mean and 95% interval (mean ± 1.96 standard errors, sample std) of the values."""
    x = np.asarray(list(values), dtype=np.float64)
    if len(x) == 0:
        raise ValueError("no values")
    if len(x) < 2:
        return Estimate(float(x.mean()), None, None, len(x))
    lo, hi = interval95(x)
    return Estimate(float(x.mean()), lo, hi, len(x))


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> Estimate | None:
    """a − b paired by key (e.g. (seed, episode)): mean and 95% interval (mean ± 1.96 standard errors of the
    per-pair differences) over the keys both hold; None when they share none."""
    keys = [k for k in a if k in b]
    if not keys:
        return None
    return mean_interval(a[k] - b[k] for k in keys)


@dataclass
class GridRow:
    task: str
    checkpoint: str
    variant: str  # the NAMM's name: namm, namm-renorm, namm-c50, ...
    folder: str
    methods: dict[str, Estimate]  # policy (POLICIES) -> D4RL score estimate
    cache_pct: dict[str, float]
    diffs: dict[str, Estimate | None] = field(default_factory=dict)  # baseline -> NAMM − baseline
    paired: bool = True
    note: str = ""

    @property
    def episodes(self) -> str:
        ns = sorted({e.n for e in self.methods.values()})
        return "-" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"

    def order(self) -> tuple:
        env, _, quality = self.task.partition("-")
        return (_ENV_ORDER.index(env) if env in _ENV_ORDER else len(_ENV_ORDER),
                _QUALITY_ORDER.index(quality) if quality in _QUALITY_ORDER else len(_QUALITY_ORDER),
                self.task, self.checkpoint)


def _folder_of(result: ResultSet) -> Path:
    return Path(result.source.result_file).parent


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _episodes(folder: Path) -> dict[str, dict[tuple, dict]] | None:
    """policy -> {(seed, episode): record} of the kv-cache episodes in folder/episodes.jsonl (None when absent)."""
    path = folder / DT_FORMAT.episodes_file
    if not path.is_file():
        return None
    kv = {k for k, v in DT_FORMAT.rollout_aliases if v == "kv-cache"}
    out: dict[str, dict[tuple, dict]] = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a killed run
            continue
        if isinstance(r, dict) and r.get("rollout") in kv and SCALE in (r.get("scores") or {}):
            out.setdefault(r["policy"], {})[(r.get("seed", 0), r["episode"])] = r
    return out


def _row(result: ResultSet) -> GridRow | None:
    folder = _folder_of(result)
    summary = _read_json(folder / DT_FORMAT.summary_file)
    settings = _read_json(folder / "run.json") or summary.get("settings") or {}
    task = str(settings.get("env") or result.benchmark.split(" [")[0]).strip().lower()
    variant = next((m for m in result.methods if is_namm(m)), "namm")
    row = GridRow(task, result.model, variant, in_repo(folder), {}, {})
    eps = _episodes(folder)
    if eps is not None:
        scores = {p: {k: float(r["scores"][SCALE]) for k, r in eps.get(p, {}).items()} for p in POLICIES}
        for p in POLICIES:
            if scores[p]:
                row.methods[p] = mean_interval(scores[p].values())
                row.cache_pct[p] = 100 * float(np.mean([r["realised_fraction"] for r in eps[p].values()]))
        if scores["namm"]:
            row.diffs = {b: paired_difference(scores["namm"], scores[b]) for b in VERSUS}
    else:
        row.paired = False
        row.note = f"pairing unavailable: no {DT_FORMAT.episodes_file} in {row.folder} (unpaired intervals)"
        for r in summary.get("rows", []):
            p = r.get("policy")
            if (dict(DT_FORMAT.rollout_aliases).get(r.get("rollout")) != "kv-cache" or p not in POLICIES
                    or r.get(f"score_{SCALE}_mean") is None):
                continue
            ci = r.get(f"score_{SCALE}_ci95")
            n = int(r.get("episodes") or 0)
            lo, hi = (ci if ci and n >= 2 else (None, None))
            row.methods[p] = Estimate(float(r[f"score_{SCALE}_mean"]), lo, hi, n)
            row.cache_pct[p] = float(r["realised_cache_pct"])
    return row if row.methods else None


def build_grid(results: Iterable[ResultSet]) -> list[GridRow] | None:
    """One GridRow per run_dt folder with kv-cache results on the D4RL scale, in task order (hopper, walker2d,
    halfcheetah x expert, medium, medium-replay, then others); None unless two or more tasks are present."""
    rows, seen = [], set()
    for r in results:
        if r.domain != "dt" or not r.benchmark.endswith("[kv-cache]") or not r.metric.name.startswith(f"{SCALE}-"):
            continue
        folder = _folder_of(r).resolve()
        if folder in seen:
            continue
        seen.add(folder)
        row = _row(r)
        if row is not None:
            rows.append(row)
    if len({row.task for row in rows}) < 2:
        return None
    return sorted(rows, key=GridRow.order)


def grid_markdown(rows: list[GridRow]) -> str:
    """The section: '## Decision Transformer grid', the scores table, the paired-differences table, notes."""
    head = ["task", "checkpoint", "NAMM variant", "episodes",
            *[c for p in POLICIES for c in (LABELS[p], f"{LABELS[p]} cache %")], "results"]
    lines = [f"## {TITLE}", "",
             "kv-cache rollout (each token fed once into a cache managed by the policy), D4RL-normalised score ×100: "
             "mean [95% CI] over episodes (mean ± 1.96 standard errors); cache %: realised cache (stored / seen "
             "tokens). Baselines run at NAMM's realised cache fraction of the same run.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.task, r.checkpoint, r.variant, r.episodes]
        for p in POLICIES:
            cells += [r.methods[p].cell(), f"{r.cache_pct[p]:.1f}"] if p in r.methods else ["-", "-"]
        cells.append(f"`{r.folder}`")
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    head = ["task", "checkpoint", "pairs", *[f"NAMM − {LABELS[b]}" for b in VERSUS]]
    lines += ["", f"Paired differences NAMM − method (D4RL-normalised ×100), per (seed, episode): every policy resets "
              f"episode e of seed s with seed 1000*s + e, so a pair starts from the same state; mean [95% CI] over the "
              f"pairs (mean ± 1.96 standard errors of the differences). {NS}: the interval contains 0 — the difference "
              "is inside the noise.", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r.paired:
            cells = [r.task, r.checkpoint, "-", *["pairing unavailable"] * len(VERSUS)]
        else:
            ds = [r.diffs.get(b) for b in VERSUS]
            pairs = sorted({d.n for d in ds if d is not None})
            cells = [r.task, r.checkpoint, "-" if not pairs else str(pairs[0]) if len(pairs) == 1
                     else f"{pairs[0]}-{pairs[-1]}",
                     *[d.cell(mark=True) if d is not None else "-" for d in ds]]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    notes = [r.note for r in rows if r.note]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


CSV_HEADER = ["task", "checkpoint", "namm_variant", "episodes",
              *[f"{p}_{c}" for p in POLICIES for c in ("mean", "ci_lo", "ci_hi", "n", "cache_pct")],
              *[f"namm_minus_{b}_{c}" for b in VERSUS for c in ("mean", "ci_lo", "ci_hi", "pairs", "contains_zero")],
              "paired", "results"]


def _num(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(x) if isinstance(x, float) else str(x)


def grid_csv(rows: list[GridRow], path: str | Path | None = None) -> str:
    """The same numbers unrounded, one row per GridRow (empty cells where a method or interval is missing)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_HEADER)
    for r in rows:
        cells = [r.task, r.checkpoint, r.variant, r.episodes]
        for p in POLICIES:
            e = r.methods.get(p)
            cells += ([e.mean, e.lo, e.hi, e.n, r.cache_pct[p]] if e else [None] * 5)
        for b in VERSUS:
            d = r.diffs.get(b) if r.paired else None
            cells += ([d.mean, d.lo, d.hi, d.n, d.contains_zero] if d else [None] * 5)
        cells += [r.paired, r.folder]
        w.writerow([_num(c) for c in cells])
    text = buf.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text
