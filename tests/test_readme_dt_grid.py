"""The nine-task Decision Transformer grid in README.md is what make_tables builds from the committed results of
`scripts/eval_grid.py` (results/dt/grid/<task>): scores with 95% intervals and paired differences."""
from pathlib import Path

from namm_transfer.reporting.dt_grid import GRID_TASKS, build_grid, grid_markdown
from namm_transfer.reporting.results import read_results

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- dt grid table: begin -->", "<!-- dt grid table: end -->"


def test_readme_grid_is_the_committed_results(monkeypatch):
    monkeypatch.chdir(ROOT)
    folders = [ROOT / "results" / "dt" / "grid" / task for task in GRID_TASKS]
    assert all((f / "episodes.jsonl").is_file() for f in folders), "every grid task has committed episodes"
    results = [r for f in folders for r in read_results(f.relative_to(ROOT))]
    rows = build_grid(results)
    assert rows is not None and [r.task for r in rows] == list(GRID_TASKS)
    assert all(min(e.n for e in r.methods.values()) >= 20 and r.paired for r in rows)
    body = grid_markdown(rows).split("\n", 1)[1]  # without its own '## ' heading
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(BEGIN) + len(BEGIN):readme.index(END)]
    assert block.strip() == body.strip()
