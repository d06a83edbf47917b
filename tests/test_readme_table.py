"""The cross-domain table in README.md is exactly what its make_tables command prints from the committed results."""
import importlib.util
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- cross-domain table: begin -->", "<!-- cross-domain table: end -->"


def _make_tables():
    spec = importlib.util.spec_from_file_location("scripts_make_tables", ROOT / "scripts" / "make_tables.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.make_tables


def test_readme_table_matches_the_command(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(BEGIN) + len(BEGIN):readme.index(END)]
    command = re.search(r"`(python scripts/make_tables\.py [^`]+)`", readme[:readme.index(BEGIN)].rsplit("##", 1)[-1])
    assert command, "the README names the command right above the table"
    argv = shlex.split(command.group(1))[2:]
    paths = argv[: argv.index("--out")] if "--out" in argv else argv
    assert all((ROOT / p).exists() for p in paths), "the table's result folders are committed"
    monkeypatch.chdir(ROOT)
    md, _, code = _make_tables()(paths, None)
    assert code == 0
    assert block.strip() == md.strip()
