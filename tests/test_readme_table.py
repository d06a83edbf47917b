"""The cross-domain table in README.md is exactly what its make_tables command prints from the committed results."""
import itertools
import re
import shlex
from pathlib import Path

import pytest

from test_reporting_tables import _script

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- cross-domain table: begin -->", "<!-- cross-domain table: end -->"


def test_readme_table_matches_the_command(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(BEGIN) + len(BEGIN):readme.index(END)]
    command = re.search(r"`(python scripts/make_tables\.py [^`]+)`", readme[:readme.index(BEGIN)].rsplit("##", 1)[-1])
    assert command, "the README names the command right above the table"
    argv = shlex.split(command.group(1))[2:]
    paths = argv[: argv.index("--out")] if "--out" in argv else argv
    assert all((ROOT / p).exists() for p in paths), "the table's result folders are committed"
    monkeypatch.chdir(ROOT)
    md, _, code = _script("make_tables").make_tables(paths, None)
    assert code == 0
    assert block.strip() == md.strip()


@pytest.mark.parametrize("anchor, run", [("**Generation 60 of namm-c50 on the test split", "eval-n50-c50-g60"),
                                         ("**Generation 100 of namm-c50 on the test split", "eval-n50-c50-g100"),
                                         ("**namm-c75's generation 143 on the test split", "eval-n50-c75-g143"),
                                         ("**namm-c75's generation 180 on the test split", "eval-n50-c75-g180")])
def test_readme_namm_c50_test_tables_are_read_from_their_committed_results(anchor, run):
    """Every number of the README's test-split table of a shipped namm-c50 mean (realised cache, answer p / full,
    EM, paired differences) is the one results/language/<run>/summary.md holds for that task and baseline."""
    readme = (ROOT / "README.md").read_text()
    text = (ROOT / "results/language" / run / "summary.md").read_text()
    means, paired = (part.splitlines() for part in text.split("Paired differences", 1))
    header = "| task | realised cache % | NAMM answer p / full [95% CI] | NAMM EM (full) |"
    start = readme.index(header, readme.index(anchor))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), readme[start:].splitlines()[2:]))
    assert [r.split("|")[1].strip() for r in rows] == ["passkey", "kv_retrieval", "passage_retrieval", "all"]

    def cells(task: str, policy: str, lines: list[str]) -> list[str]:
        line = next(l for l in lines if l.startswith(f"| {task} | {policy} |"))
        return [c.strip() for c in line.split("|")[1:-1]]
    for row in rows:
        task, cache, ratio, em, *diffs = [c.strip() for c in row.split("|")[1:-1]]
        namm, full = cells(task, "namm", means), cells(task, "full", means)
        assert (cache, ratio) == (namm[7], namm[6]), task
        assert em == f"{namm[3].split()[0]} ({full[3].split()[0]})", task
        for baseline, diff in zip(("h2o", "l2", "recency", "snapkv"), diffs):
            assert cells(task, baseline, paired)[3] == diff, (task, baseline)


def test_readme_validation_protocol_table_matches_the_runs():
    """The README's table of candidates under the test protocol on validation prompts (section "Language NAMM
    search in progress") quotes each run's summary.json: ratio of full with its interval and realised cache."""
    import json
    readme = (ROOT / "README.md").read_text()
    runs = sorted((ROOT / "results/language/val-protocol").iterdir())
    assert len(runs) == 4
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        (row,) = [r for r in summary if r["task"] == "all" and r["policy"] == "namm"]
        assert json.loads((run / "run.json").read_text())["split"] == "validation"
        lo, hi = row["relative_to_full_ci95"]
        cell = f"{row['relative_to_full']:.3f} [{lo:.3f}, {hi:.3f}] @ {row['realised_cache_pct']:.1f}%"
        assert cell in readme, (run.name, cell)


def test_readme_oracle_table_is_read_from_its_committed_results():
    """The README's oracle table (NAMM and oracle over full, NAMM - oracle, EM) equals results/language/
    oracle-n50-c50-g60/summary.md, row by row."""
    readme = (ROOT / "README.md").read_text()
    text = (ROOT / "results/language/oracle-n50-c50-g60/summary.md").read_text()
    means, paired = (part.splitlines() for part in text.split("Paired differences", 1))
    cells = {}
    for line in means:
        c = [x.strip() for x in line.split("|")[1:-1]]
        if len(c) == 9 and c[1] in ("full", "namm", "oracle"):
            cells[(c[0], c[1])] = c
    diffs = {c[0]: c[3] for c in ([x.strip() for x in l.split("|")[1:-1]] for l in paired)
             if len(c) == 6 and c[1] == "oracle"}
    header = "| task | realised cache % | NAMM / full [95% CI] | oracle / full [95% CI] |"
    start = readme.index(header, readme.index("**How far is the ceiling? An oracle reference"))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), readme[start:].splitlines()[2:]))
    assert [r.split("|")[1].strip() for r in rows] == ["passkey", "kv_retrieval", "passage_retrieval", "all"]
    for row in rows:
        task, cache, namm, oracle, diff, em = [x.strip() for x in row.split("|")[1:-1]]
        assert cache == cells[(task, "namm")][7] and namm == cells[(task, "namm")][6]
        assert oracle == cells[(task, "oracle")][6] and diff == diffs[task]
        assert em == " / ".join(f"{float(cells[(task, p)][3].split()[0]):.2f}" for p in ("namm", "oracle", "full"))
