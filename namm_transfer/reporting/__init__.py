"""Reporting: cross-domain tables, budget-sweep plots, retention maps and the renormalisation ablation.

    from namm_transfer.reporting import read_results, build_rows, to_markdown
    results = read_results("runs/eval_language")          # list[ResultSet], provenance attached
    print(to_markdown(build_rows(results)))

Modules: `results` (readers of the three harnesses' result folders), `tables` (markdown / CSV), `plots`
(sweep and retention figures), `retention` (kept-token maps from a MemoryCache), `calibration` (namm-renorm).
"""
from .results import (DOMAINS, DT_FORMAT, MethodScore, Metric, Provenance, ResultFormatError, ResultSet,
                      read_results)
from .tables import TableRow, build_rows, to_csv, to_markdown

__all__ = ["DOMAINS", "DT_FORMAT", "MethodScore", "Metric", "Provenance", "ResultFormatError", "ResultSet",
           "read_results", "TableRow", "build_rows", "to_csv", "to_markdown"]
