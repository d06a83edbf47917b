"""The cross-domain table in README.md is exactly what its make_tables command prints from the committed results."""
import re
import shlex
from pathlib import Path

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
