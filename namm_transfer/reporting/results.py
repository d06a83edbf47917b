"""Readers for the result folders of the three harnesses, into one shape.

    read_results("runs/eval_language")      # folder, or its summary.json / records.jsonl / episodes.jsonl
    -> [ResultSet(domain="language", benchmark="passkey (~1024 tokens)", metric=answer p, methods={...}), ...]

Harness formats (what each script writes into its --out folder):
  language  scripts/eval_language.py: records.jsonl (one row per policy x sample), summary.json (a list of rows
            task, policy, n, em, char_acc, answer_prob, realised_cache_pct, ...), run.json (every argparse flag).
  video     scripts/run_video.py: records.jsonl, summary.json {"settings", "notes", "policies": {policy: {headline,
            n, realised_cache_pct, budget_source, mean_budget, ...}}}, summary.md, run.json (its SETTINGS only).
  dt        scripts/run_dt.py: see `DT_FORMAT` (the reader is versioned: that script is newer than the others).

summary.json is read when present (it is what the harness printed); with only the per-sample records, the
harness's own `summarise` rebuilds it. The command comes from <folder>/command.json (exact argv, written by
scripts/sweep_budgets.py), else it is rebuilt from run.json (and says so), else "command unknown".
Nothing here knows any number from the NAMM paper: every score is read from a result file.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import load_script
from ..records import REPO_ROOT, in_repo

DOMAINS = ("language", "video", "dt")
DOMAIN_TITLES = {"language": "language", "video": "video", "dt": "decision transformer"}
RENORM = "namm-renorm"


def is_namm(method: str) -> bool:
    """'namm' and its named variants ('namm-renorm', 'namm-c50', ...): methods whose cache size is emergent."""
    return method == "namm" or method.startswith("namm-")
COMMAND_FILE = "command.json"


class ResultFormatError(ValueError):
    """A result file that is missing or not what its harness writes; names the file and what was expected."""

    def __init__(self, path: str | Path, expected: str, got: str = ""):
        self.path, self.expected = str(path), expected
        super().__init__(f"{path}: expected {expected}" + (f" (got {got})" if got else ""))


@dataclass(frozen=True)
class Metric:
    name: str  # short column label, e.g. "answer p"
    meaning: str  # one line for the table's legend
    fmt: str = "{:.1f}"

    def format(self, x: float | None) -> str:
        return "-" if x is None else self.fmt.format(x)


ANSWER_P = Metric("answer p", "mean teacher-forced probability of the gold answer tokens (0-1)", "{:.3g}")
EM = Metric("EM %", "exact match of the greedy answer, %")
ACCURACY = Metric("accuracy %", "multiple-choice accuracy, % (unparsed replies and errors count as wrong)")
M_AVG = Metric("M-Avg %", "MLVU M-Avg: mean of per-task accuracies, %")


def dt_metric(scale: str) -> Metric:
    if scale == "success":
        return Metric("success %", "episodes that reached their goal (return > 0), %")
    what = "D4RL reference returns" if scale == "d4rl" else f"the {scale!r} reference returns"
    return Metric(f"{scale}-normalised x100", f"episode return normalised with {what} (x100), mean over episodes")


@dataclass
class MethodScore:
    method: str  # full, namm, namm-renorm, h2o, l2, recency, snapkv, random, window
    score: float | None
    cache_pct: float | None  # realised cache %, as the harness measured it
    n: int | None = None  # samples / episodes
    budget: str = "-"  # where a baseline's budget came from

    def __post_init__(self):
        for name in ("score", "cache_pct"):
            x = getattr(self, name)
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
                raise TypeError(f"{self.method}'s {name} is {x!r:.60}, not a number")


@dataclass
class Provenance:
    result_file: str
    command: str  # a shell command line, or "command unknown"
    how: str  # "recorded argv (command.json)" / "rebuilt from run.json ..." / "no run.json"


@dataclass
class ResultSet:
    """One benchmark x metric from one result file: every method's score and realised cache %."""

    domain: str
    model: str
    benchmark: str
    metric: Metric
    methods: dict[str, MethodScore]
    source: Provenance
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.domain, self.model, self.benchmark, self.metric.name


# ---------------------------------------------------------------------------------------------- DT format


@dataclass(frozen=True)
class DTFormat:
    """What scripts/run_dt.py writes (format version 1, the script as of its first version). Only `*_required`
    fields are needed; the rest is used when present. Rollout names are normalised through `rollout_aliases`. A
    summary.json with a `format_version` other than `version` is still read, with a note in the table."""

    version: int = 1
    episodes_file: str = "episodes.jsonl"
    summary_file: str = "summary.json"  # {"settings": {...}, "notes": [...], "rows": [...]}
    table_file: str = "table.md"
    episode_required: tuple[str, ...] = ("rollout", "policy", "ret", "scores", "realised_fraction")
    row_required: tuple[str, ...] = ("rollout", "policy", "realised_cache_pct")
    row_score: str = "score_{scale}_mean"  # one per normalisation scale: d4rl, local
    row_optional: tuple[str, ...] = ("episodes", "budget", "budget_source", "eviction_cache_pct", "return_mean")
    settings: tuple[str, ...] = ("env", "checkpoint", "target_return", "delay", "namm", "budget", "max_steps",
                                 "device")
    rollout_aliases: tuple[tuple[str, str], ...] = (("recompute", "recompute-last-K"), ("kv", "kv-cache"),
                                                    ("recompute-last-K", "recompute-last-K"),
                                                    ("kv-cache", "kv-cache"))


DT_FORMAT = DTFormat()


# ------------------------------------------------------------------------------------------------ helpers


def _load_json(path: Path, expected: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultFormatError(path, expected, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultFormatError(path, expected, f"invalid JSON: {err}") from None


def _load_run(folder: Path) -> dict | None:
    """<folder>/run.json (a JSON object) when there is one."""
    if not (folder / "run.json").is_file():
        return None
    run = _load_json(folder / "run.json", "run.json")
    if not isinstance(run, dict):
        raise ResultFormatError(folder / "run.json", "a JSON object of the run's settings", type(run).__name__)
    return run


def _read_text(path: Path, expected: str) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError as err:
        raise ResultFormatError(path, expected, f"not text: {err}") from None


def _load_jsonl(path: Path, expected: str) -> list[dict]:
    rows = []
    lines = _read_text(path, expected).splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # a line torn by a killed run: the harness drops it too
                continue
            raise ResultFormatError(path, expected, f"line {i + 1} is not JSON: {err}") from None
        if not isinstance(row, dict):
            raise ResultFormatError(path, expected, f"line {i + 1} is {type(row).__name__}, not an object")
        rows.append(row)
    if not rows:
        raise ResultFormatError(path, expected, "no records")
    return rows


def _need(row: dict, keys, path: Path, expected: str, numbers=()) -> None:
    """`row` has every one of `keys`, and a number (not null) in each of `numbers`."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise ResultFormatError(path, expected, f"a row without {missing}: {json.dumps(row)[:160]}")
    bad = [k for k in numbers if isinstance(row[k], bool) or not isinstance(row[k], (int, float))]
    if bad:
        raise ResultFormatError(path, expected, f"a row whose {bad} are not numbers: {json.dumps(row)[:160]}")


def command_line(script: str, settings: dict, skip: tuple[str, ...] = ()) -> str:
    """`python scripts/<script> --flag value ...` from argparse-style settings (True -> bare flag)."""
    argv = ["python", f"scripts/{script}"]
    for key, value in settings.items():
        if key in skip or value is None or value is False:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return shlex.join(argv)


def provenance(result_file: Path, folder: Path, script: str, run: dict | None, extra: dict | None = None,
               skip: tuple[str, ...] = (), partial: bool = True) -> Provenance:
    """Exact argv from command.json, else a command rebuilt from run.json (+ `extra` flags read from the
    results), else "command unknown"."""
    recorded = folder / COMMAND_FILE
    if recorded.is_file():
        try:
            argv = json.loads(recorded.read_text())["argv"]
            return Provenance(str(result_file), shlex.join(map(str, argv)), f"recorded argv ({COMMAND_FILE})")
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    if run is None:
        return Provenance(str(result_file), "command unknown", f"no run.json in {folder}")
    how = "rebuilt from run.json" + ("; flags it does not record are at their defaults" if partial else "")
    return Provenance(str(result_file), command_line(script, {**run, **(extra or {})}, skip), how)


def namm_variant(checkpoint: str | None) -> str:
    """The variant a NAMM checkpoint names in its meta ('namm-renorm' from `calibration.save_renormalised`,
    'namm-c50' from a search toward a 50% cache target, ...), with the search's generation when the meta records
    it ('namm-c50-g60': one search ships several means), else 'namm'."""
    if not checkpoint:
        return "namm"
    cfg = REPO_ROOT / checkpoint / "config.json"  # harnesses record paths inside the checkout relative to it
    if cfg.is_file():
        try:
            info = json.loads(cfg.read_text())
        except json.JSONDecodeError:
            return "namm"
        meta = info.get("meta") if isinstance(info, dict) else None
        if not isinstance(meta, dict):
            return "namm"
        variant, generation = meta.get("variant"), meta.get("generation")
        if isinstance(variant, str) and is_namm(variant) and variant != "namm":
            if isinstance(generation, int) and not isinstance(generation, bool) and variant != RENORM:
                return f"{variant}-g{generation}"
            return variant
    return "namm"


def _rename_namm(methods: dict[str, MethodScore], variant: str) -> dict[str, MethodScore]:
    if variant == "namm" or "namm" not in methods:
        return methods
    methods[variant] = methods.pop("namm")
    methods[variant].method = variant
    return methods


# ---------------------------------------------------------------------------------------------- language


LANGUAGE_ROW = ("task", "policy", "em", "answer_prob", "realised_cache_pct")
LANGUAGE_SUMMARY = "a JSON list of rows with " + ", ".join(LANGUAGE_ROW) + " (scripts/eval_language.py summary.json)"
LANGUAGE_RECORD = ("policy", "task", "key", "em", "answer_prob", "realised_fraction")
LANGUAGE_RECORDS = "JSON lines with " + ", ".join(LANGUAGE_RECORD) + " (scripts/eval_language.py records.jsonl)"


def read_language(folder: Path, file: Path) -> list[ResultSet]:
    run = _load_run(folder)
    if file.name.endswith(".jsonl"):
        records = _load_jsonl(file, LANGUAGE_RECORDS)
        for r in records:
            _need(r, LANGUAGE_RECORD, file, LANGUAGE_RECORDS, numbers=("em", "answer_prob", "realised_fraction"))
        from ..language.benchmark import summarise
        rows, _ = summarise(records, list(dict.fromkeys(r["policy"] for r in records)))
    else:
        rows = _load_json(file, LANGUAGE_SUMMARY)
        if not isinstance(rows, list) or not rows:
            raise ResultFormatError(file, LANGUAGE_SUMMARY, f"a {type(rows).__name__}")
        for r in rows:
            if not isinstance(r, dict):
                raise ResultFormatError(file, LANGUAGE_SUMMARY, f"a {type(r).__name__} row")
            _need(r, LANGUAGE_ROW, file, LANGUAGE_SUMMARY, numbers=("em", "answer_prob", "realised_cache_pct"))
    run = run or {}
    policies = str(run.get("policies", "")).split(",")
    matched = "namm" in policies
    budget = "NAMM's kept fraction, per sample" if matched else (
        f"--budget {run['budget']}" if "budget" in run else "-")
    source = provenance(file, folder, "eval_language.py", run or None, skip=("namm_source",), partial=False)
    variant = namm_variant(run.get("namm_source") or run.get("namm"))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if len(tasks) == 2 and "all" in tasks:  # one task: "all" repeats it
        tasks = [t for t in tasks if t != "all"]
    tokens = f" (~{run['tokens']} tokens)" if "tokens" in run else ""
    if run.get("split", "test") != "test":  # e.g. a validation-split run: never in the same row as test results
        tokens += f" [{run['split']} split]"
    out = []
    for task in tasks:
        sel = [r for r in rows if r["task"] == task]
        for metric, key, scale in ((ANSWER_P, "answer_prob", 1.0), (EM, "em", 100.0)):
            methods = {r["policy"]: MethodScore(r["policy"], scale * r[key], r["realised_cache_pct"], r.get("n"),
                                                budget if r["policy"] not in ("full", "namm") else "-")
                       for r in sel}
            out.append(ResultSet("language", in_repo(run.get("model", "model unknown")), f"{task}{tokens}", metric,
                                 _rename_namm(methods, variant), source))
    return out


# ------------------------------------------------------------------------------------------------- video


VIDEO_POLICY = ("headline", "realised_cache_pct")
VIDEO_SUMMARY = ('a JSON object {"settings", "policies": {policy: {' + ", ".join(VIDEO_POLICY) +
                 ", n, budget_source}}} (scripts/run_video.py summary.json)")
VIDEO_RECORD = ("policy", "id", "dataset", "answer", "prediction", "realised_fraction")
VIDEO_RECORDS = "JSON lines with " + ", ".join(VIDEO_RECORD) + " (scripts/run_video.py records.jsonl)"


def read_video(folder: Path, file: Path) -> list[ResultSet]:
    run = _load_run(folder)
    if file.name.endswith(".jsonl"):
        records = _load_jsonl(file, VIDEO_RECORDS)
        for r in records:
            _need(r, VIDEO_RECORD, file, VIDEO_RECORDS)
        dataset = records[0]["dataset"]
        summary = {"settings": run or {"dataset": dataset},
                   "policies": load_script("run_video").summarise(
                       records, list(dict.fromkeys(r["policy"] for r in records)), dataset)}
    else:
        summary = _load_json(file, VIDEO_SUMMARY)
        if not isinstance(summary, dict) or not isinstance(summary.get("policies"), dict):
            raise ResultFormatError(file, VIDEO_SUMMARY, "no 'policies' object")
        for p, s in summary["policies"].items():
            if not isinstance(s, dict):
                raise ResultFormatError(file, VIDEO_SUMMARY, f"policy {p!r} is a {type(s).__name__}")
            _need(s, VIDEO_POLICY, file, VIDEO_SUMMARY)
    settings = run or summary.get("settings") or {}
    dataset = settings.get("dataset", "video dataset")
    metric = M_AVG if dataset == "mlvu" else ACCURACY
    methods = {}
    for p, s in summary["policies"].items():
        budget = s.get("budget_source") or "-"
        if s.get("mean_budget") is not None:
            budget += f" (mean {s['mean_budget']:.3g})"
        methods[p] = MethodScore(p, None if s["headline"] is None else 100 * s["headline"], s["realised_cache_pct"],
                                 s.get("n"), budget)
    extra = {"policies": ",".join(summary["policies"]), "out": str(folder)}
    source = provenance(file, folder, "run_video.py", settings or None, extra)
    bench = f"{dataset} ({settings.get('split', '?')}, {settings.get('frames', '?')} frames)"
    notes = [n for n in summary.get("notes", []) if n.startswith("WARNING")]
    return [ResultSet("video", in_repo(settings.get("model", "model unknown")), bench, metric,
                      _rename_namm(methods, namm_variant(settings.get("namm"))), source, notes)]


# ---------------------------------------------------------------------------------------------------- DT


DT_SUMMARY = (f'a JSON object {{"settings", "notes", "rows": [...]}} whose rows have '
              f"{', '.join(DT_FORMAT.row_required)}, {DT_FORMAT.row_score} (scripts/run_dt.py summary.json, "
              f"format v{DT_FORMAT.version})")
DT_EPISODES = (f"JSON lines with {', '.join(DT_FORMAT.episode_required)} (scripts/run_dt.py "
               f"{DT_FORMAT.episodes_file}, format v{DT_FORMAT.version})")


DT_NOTE = ("DT rollouts: [recompute-last-K] is the standard DT rollout (no cache policy: 'full' is the model "
           "re-run on its last K timesteps, its cache % the tokens attended); [kv-cache] feeds each token once into a "
           "MemoryCache managed by the named policy ('full' = the whole episode)")


def _rollout(name: str) -> str:
    return dict(DT_FORMAT.rollout_aliases).get(name, name)


def read_dt(folder: Path, file: Path) -> list[ResultSet]:
    run = _load_run(folder)
    if file.name.endswith(".jsonl"):
        episodes = _load_jsonl(file, DT_EPISODES)
        for e in episodes:
            _need(e, DT_FORMAT.episode_required, file, DT_EPISODES, numbers=("ret", "realised_fraction"))
        summary = {"settings": run or {}, "rows": load_script("run_dt").summarise(episodes)}
    else:
        summary = _load_json(file, DT_SUMMARY)
        if not isinstance(summary, dict) or not isinstance(summary.get("rows"), list) or not summary["rows"]:
            raise ResultFormatError(file, DT_SUMMARY, "no non-empty 'rows' list")
        for r in summary["rows"]:
            if not isinstance(r, dict):
                raise ResultFormatError(file, DT_SUMMARY, f"a {type(r).__name__} row")
            _need(r, DT_FORMAT.row_required, file, DT_SUMMARY)
    rows = summary["rows"]
    settings = run or summary.get("settings") or {}
    notes = [DT_NOTE]
    version = summary.get("format_version", DT_FORMAT.version)
    if version != DT_FORMAT.version:
        notes.append(f"{file} declares DT format version {version}; this reader knows version {DT_FORMAT.version}")
    prefix, suffix = DT_FORMAT.row_score.split("{scale}")
    scales = list(dict.fromkeys(k[len(prefix):-len(suffix)] for r in rows for k in r
                                if k.startswith(prefix) and k.endswith(suffix)))
    if not scales:
        raise ResultFormatError(file, DT_SUMMARY, "no score_<scale>_mean field in any row")
    extra = {"policies": ",".join(dict.fromkeys(r["policy"] for r in rows if _rollout(r["rollout"]) == "kv-cache")),
             "out": str(folder)}
    source = provenance(file, folder, "run_dt.py", settings or None, extra)
    model = in_repo(settings.get("checkpoint") or "checkpoint unknown")
    variant = namm_variant(settings.get("namm"))
    out = []
    for rollout in dict.fromkeys(_rollout(r["rollout"]) for r in rows):
        sel = [r for r in rows if _rollout(r["rollout"]) == rollout]
        for scale in scales:
            key = DT_FORMAT.row_score.format(scale=scale)
            methods = {}
            for r in sel:
                budget = "-" if r.get("budget") is None else f"{r['budget']:.3g}"
                if r.get("budget_source"):
                    budget = f"{r['budget_source']} ({budget})"
                methods[r["policy"]] = MethodScore(r["policy"], r.get(key), r["realised_cache_pct"],
                                                   r.get("episodes"), budget)
            out.append(ResultSet("dt", model, f"{settings.get('env', 'env unknown')} [{rollout}]", dt_metric(scale),
                                 _rename_namm(methods, variant), source, notes))
    return out


# ------------------------------------------------------------------------------------------------ dispatch


EXPECTED = ("a result folder of scripts/eval_language.py, run_video.py or run_dt.py (holding summary.json, "
            "records.jsonl or episodes.jsonl), or one of those files")


def _first_record(path: Path) -> dict:
    for line in _read_text(path, "JSON lines of a harness").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ResultFormatError(path, "JSON lines of a harness", f"not JSON: {err}") from None
            if isinstance(row, dict):
                return row
            raise ResultFormatError(path, "JSON lines of a harness", f"a {type(row).__name__}")
    raise ResultFormatError(path, "JSON lines of a harness", "an empty file")


def detect(file: Path) -> str:
    """The domain of one result file, from its name and content."""
    if file.name == DT_FORMAT.episodes_file:
        return "dt"
    if file.suffix == ".jsonl":
        row = _first_record(file)
        if "rollout" in row:
            return "dt"
        if "task" in row:
            return "language"
        if "dataset" in row or "id" in row:
            return "video"
        raise ResultFormatError(file, f"{LANGUAGE_RECORDS}, or {VIDEO_RECORDS}, or {DT_EPISODES}",
                                f"a record with keys {sorted(row)[:10]}")
    data = _load_json(file, "a harness summary.json")
    if isinstance(data, list):
        return "language"
    if isinstance(data, dict) and "rows" in data:
        return "dt"
    if isinstance(data, dict) and "policies" in data:
        return "video"
    got = f"keys {sorted(data)[:10]}" if isinstance(data, dict) else type(data).__name__
    raise ResultFormatError(file, f"{LANGUAGE_SUMMARY}, or {VIDEO_SUMMARY}, or {DT_SUMMARY}", got)


def result_file(path: Path) -> Path:
    """The file to read in a folder: summary.json, else records.jsonl / episodes.jsonl."""
    if path.is_file():
        return path
    if not path.exists():
        raise ResultFormatError(path, EXPECTED, "nothing at this path")
    for name in ("summary.json", "records.jsonl", DT_FORMAT.episodes_file):
        if (path / name).is_file():
            return path / name
    raise ResultFormatError(path, EXPECTED, f"a folder with {sorted(p.name for p in path.iterdir())[:10]}")


READERS = {"language": read_language, "video": read_video, "dt": read_dt}


def read_results(path: str | Path) -> list[ResultSet]:
    """Every ResultSet in one result folder or file; raises ResultFormatError naming the file."""
    file = result_file(Path(path))
    domain = detect(file)
    try:
        return READERS[domain](file.parent, file)
    except ResultFormatError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as err:  # a field of the wrong type
        raise ResultFormatError(file, f"a {DOMAIN_TITLES[domain]} result as its harness writes it",
                                f"{type(err).__name__}: {err}") from None
