"""Cross-domain table (markdown + CSV) and budget-sweep plots from the harnesses' result folders.

    python scripts/make_tables.py runs/eval_language runs/video/synthetic_tiny_32f runs/dt/hopper-medium --out runs/tables
    python scripts/make_tables.py runs/sweep/language/*            # a sweep: also sweep_*.png (score vs cache %)

RESULTS: folders written by scripts/eval_language.py, run_video.py or run_dt.py (or their summary.json /
records.jsonl / episodes.jsonl). Every row names its result file and the command that produced it. A domain
without results gets a line saying so; an unreadable input is reported with what was expected, and the others
are still tabulated (exit code 1 only when nothing could be read). Writes <out>/table.md, table.csv and, for
groups where a baseline was run at two or more budgets, sweep_<domain>_<model>_<metric>.png.

Decision Transformer grid: when the results hold kv-cache run_dt results of two or more tasks (e.g. the folders of
scripts/eval_grid.py), table.md gets a section "Decision Transformer grid" and <out>/dt_grid.csv: one row per task
(and checkpoint) on the D4RL scale — episodes, then full / NAMM / H2O / L2 / recency as "mean [95% CI]" (mean ± 1.96
standard errors over episodes) with their realised cache % — and a table of the differences NAMM − full, NAMM − H2O,
NAMM − L2, NAMM − recency per task, paired by (seed, episode) (every policy resets episode e of seed s with seed
1000*s + e): mean [95% CI] of the per-pair differences, marked "n.s." when the interval contains 0. The numbers come
from each folder's episodes.jsonl (all its kv-cache episodes); without it the summary's unpaired intervals are shown
and the row says pairing was unavailable (namm_transfer/reporting/dt_grid.py).

--points FOLDER...: more result folders, tabulated like the others, whose full-cache and NAMM scores are drawn as
points in the sweep plots while their baselines are left out of the curves (e.g. eval_language runs of several
NAMMs, whose baselines ran at each NAMM's per-sample cache, over a sweep of the baselines at fixed budgets):

    python scripts/make_tables.py results/language/sweep-n50/budget-* --points results/language/eval-n50 \
        results/language/eval-n50-c50-g60 --out results/language/sweep-n50

A run whose --namm is a checkpoint written by `scripts/retention_maps.py --save-renorm` (normalisation statistics
re-estimated on the target model) is reported as NAMM variant "namm-renorm", in its own rows.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer.cli import default_out, out_help  # noqa: E402
from namm_transfer.records import write_text  # noqa: E402
from namm_transfer.reporting.dt_grid import build_grid, grid_csv, grid_markdown  # noqa: E402
from namm_transfer.reporting.plots import is_fixed, plot_sweep, slug, sweep_groups  # noqa: E402
from namm_transfer.reporting.results import DOMAIN_TITLES, ResultFormatError, ResultSet, read_results  # noqa: E402
from namm_transfer.reporting.tables import build_rows, missing_domains, to_csv, to_markdown  # noqa: E402


def only_fixed(result: ResultSet) -> ResultSet:
    """The result with just its full-cache and NAMM scores (the methods whose cache size no budget sets)."""
    return replace(result, methods={m: s for m, s in result.methods.items() if is_fixed(m)})


def make_tables(paths: list[str], out: Path | None, points: list[str] = ()) -> tuple[str, list[Path], int]:
    """(markdown, written files, exit code). `points`: folders tabulated too, but only their full-cache and NAMM
    scores join the sweep plots."""
    results, point_results, errors = [], [], []
    for sink, folders in ((results, paths), (point_results, points)):
        for p in folders:
            try:
                sink.extend(read_results(p))
            except ResultFormatError as err:
                errors.append(str(err))
    plotted = results + [only_fixed(r) for r in point_results]
    results = results + point_results
    rows = build_rows(results)
    md = to_markdown(rows, missing_domains(results), errors)
    grid = build_grid(results)
    if grid:
        md += "\n" + grid_markdown(grid)
    written: list[Path] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "table.md", md)
        to_csv(rows, out / "table.csv")
        written += [out / "table.md", out / "table.csv"]
        if grid:
            write_text(out / "dt_grid.csv", grid_csv(grid))
            written.append(out / "dt_grid.csv")
        for (domain, model, metric), panels in sweep_groups(plotted).items():
            title = f"{DOMAIN_TITLES[domain]} — {model}: {metric} vs realised cache % (sources: table.md)"
            written.append(plot_sweep(panels, out / f"sweep_{slug(domain, Path(model).name, metric)}.png",
                                      title, metric))
    return md, written, 0 if results else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="result folders or their summary / records files")
    ap.add_argument("--out", default=str(default_out("tables")),
                    help="folder for table.md, table.csv, sweep_*.png; " + out_help("tables"))
    ap.add_argument("--points", nargs="+", default=[], metavar="FOLDER",
                    help="result folders whose full-cache and NAMM scores are plotted as points over the sweep "
                         "(their baselines are tabulated, not plotted)")
    args = ap.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out} is a file; pass a folder for table.md, table.csv and the plots")
    md, written, code = make_tables(args.results, Path(args.out), args.points)
    print(md, end="")
    if written:
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
