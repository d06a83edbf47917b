"""Append-only JSONL result files that long evaluations resume from."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def in_repo(text: str | Path) -> str:
    """`text` with this checkout's absolute prefix removed: paths inside the checkout are recorded relative to
    it, so result files read the same from any clone and a moved checkout can still resume them."""
    return str(text).replace(str(REPO_ROOT) + os.sep, "")


def read_records(path: Path) -> list[dict]:
    """Records already written; a torn last line (killed mid-write) is cut off so later appends stay valid."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def append_record(path: Path, row: dict) -> None:
    """Append one record and flush it, so an interrupted run loses at most the record being written."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def record_command(out: Path, script: str, argv: list[str] | None) -> None:
    """Write <out>/command.json: the exact command line of this run (`argv` None = sys.argv[1:]), which
    scripts/make_tables.py cites as the result's source."""
    argv = sys.argv[1:] if argv is None else list(argv)
    Path(out, "command.json").write_text(json.dumps({"argv": ["python", script, *map(str, argv)],
                                                     "python": sys.executable, "cwd": os.getcwd()}, indent=2))
