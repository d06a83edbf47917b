"""The cross-domain table: one row per (result file, benchmark, metric), as markdown and CSV.

Columns: domain, model, benchmark, metric, NAMM variant, full-cache score, NAMM score and realised cache %,
H2O / L2 / recency score and realised cache %, where the baselines' budget came from, other methods, and the
source (result file + command). The markdown lists sources as footnotes; the CSV carries them per row. Cells are
formatted once (`TableRow.cells`), so the two agree by construction.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from .results import DOMAIN_TITLES, DOMAINS, RENORM, MethodScore, ResultSet, is_namm

BASELINES = ("h2o", "l2", "recency")
LABELS = {"h2o": "H2O", "l2": "L2", "recency": "recency"}
HEADER = ["domain", "model", "benchmark", "metric", "NAMM variant", "full", "full cache %", "NAMM", "NAMM cache %",
          *[c for b in BASELINES for c in (LABELS[b], f"{LABELS[b]} cache %")], "baselines at", "other methods"]
CSV_EXTRA = ["result file", "command", "command source"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


@dataclass
class TableRow:
    result: ResultSet

    @property
    def namm(self) -> MethodScore | None:
        return next((v for k, v in self.result.methods.items() if is_namm(k)), None)

    def cells(self) -> list[str]:
        """The formatted cells of HEADER, shared by markdown and CSV."""
        r, fmt = self.result, self.result.metric.format
        m = r.methods
        namm = self.namm
        full = m.get("full")
        cells = [DOMAIN_TITLES[r.domain], r.model, r.benchmark, r.metric.name,
                 (namm.method if namm else "-"), fmt(full.score if full else None),
                 _pct(full.cache_pct if full else None), fmt(namm.score if namm else None), _pct(namm.cache_pct if namm else None)]
        for b in BASELINES:
            cells += [fmt(m[b].score), _pct(m[b].cache_pct)] if b in m else ["-", "-"]
        budgets = sorted({m[b].budget for b in BASELINES if b in m and m[b].budget != "-"})
        cells.append("; ".join(budgets) or "-")
        others = [f"{k} {fmt(v.score)} @ {_pct(v.cache_pct)}%" for k, v in m.items()
                  if k not in ("full", *BASELINES) and not is_namm(k)]
        cells.append("; ".join(others) or "-")
        return cells


def build_rows(results: list[ResultSet]) -> list[TableRow]:
    """Rows ordered by domain (language, video, dt), then as read."""
    order = {d: i for i, d in enumerate(DOMAINS)}
    return [TableRow(r) for r in sorted(results, key=lambda r: order.get(r.domain, len(order)))]


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def sources(rows: list[TableRow]) -> list[tuple[str, str, str]]:
    """Distinct (result file, command, how) in first-use order; footnote n is index n-1."""
    return list(dict.fromkeys((r.result.source.result_file, r.result.source.command, r.result.source.how)
                              for r in rows))


def to_markdown(rows: list[TableRow], missing: list[str] | None = None, errors: list[str] | None = None) -> str:
    """The table, footnoted sources, metric legend, then one line per missing domain and per unreadable input."""
    refs = {s: i + 1 for i, s in enumerate(sources(rows))}
    lines = []
    if rows:
        lines += ["| " + " | ".join(HEADER + ["source"]) + " |", "|" + "---|" * (len(HEADER) + 1)]
        for row in rows:
            s = row.result.source
            ref = refs[(s.result_file, s.command, s.how)]
            lines.append("| " + " | ".join(_escape(c) for c in row.cells()) + f" | [{ref}] |")
        lines += ["", "Scores are read from the result files below (none is a number from the NAMM paper). "
                  "Cache %: each method's realised cache size (stored / seen tokens) as its harness measured it; "
                  "NAMM's is emergent, baselines run at the budget in 'baselines at'.", "", "Metrics:"]
        metrics = {row.result.metric.name: row.result.metric.meaning for row in rows}
        lines += [f"- {name}: {meaning}" for name, meaning in metrics.items()]
        if any(r.namm and r.namm.method == RENORM for r in rows):
            lines.append(f"- NAMM variant {RENORM}: the language NAMM with normalisation statistics re-estimated on "
                         "the target model (keep-all pass); an ablation, reported separately from the default.")
        searched = sorted({r.namm.method for r in rows if r.namm and r.namm.method.startswith("namm-c")})
        lines += [searched_variant_note(v) for v in searched]
        notes = list(dict.fromkeys(n for row in rows for n in row.result.notes))
        lines += [f"- note: {n}" for n in notes]
        lines += ["", "Sources:"]
        lines += [f"[{i}] `{file}` — `{cmd}` ({how})" for (file, cmd, how), i in refs.items()]
    else:
        lines.append("No results could be read.")
    if missing:
        lines += [""] + [f"{d}: no results given" for d in missing]
    if errors:
        lines += ["", "Unreadable inputs:"] + [f"- error: {e}" for e in errors]
    return "\n".join(lines) + "\n"


def missing_domains(results: list[ResultSet]) -> list[str]:
    present = {r.domain for r in results}
    return [DOMAIN_TITLES[d] for d in DOMAINS if d not in present]


def to_csv(rows: list[TableRow], path: str | Path | None = None) -> str:
    """CSV of the same cells plus result file, command and its source; written to `path` when given."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(HEADER + CSV_EXTRA)
    for row in rows:
        s = row.result.source
        w.writerow(row.cells() + [s.result_file, s.command, s.how])
    text = buf.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text


def searched_variant_note(variant: str) -> str:
    """The metric note of a NAMM from a search with a cache target: 'namm-c50' or 'namm-c50-g100' (the variant
    names the target the search had when the checkpoint was written, and the generation when its meta has one)."""
    match = re.fullmatch(r"namm-c(\d+)(?:-g(\d+))?", variant)
    if not match:
        return f"- NAMM variant {variant}: evolved on language (see its checkpoint's meta)."
    target, generation = match.groups()
    when = f"; the CMA-ES mean at generation {generation}" if generation else ""
    return f"- NAMM variant {variant}: evolved on language toward a realised cache of {target}% (hinge term{when})."
