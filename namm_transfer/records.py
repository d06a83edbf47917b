"""Result files: append-only JSONL records that long evaluations resume from, and atomic JSON/text writes."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

from .cli import REPO_ROOT, UsageError


def in_repo(text: str | Path) -> str:
    """`text` with this checkout's absolute prefix removed: paths inside the checkout are recorded relative to
    it, so result files read the same from any clone and a moved checkout can still resume them."""
    return str(text).replace(str(REPO_ROOT) + os.sep, "")


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` atomically (a temp file in the same folder, then rename): a crash or a full disk leaves the
    old file or the new one, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj) -> Path:
    """`obj` as indented JSON, written atomically (see `write_text`)."""
    return write_text(path, json.dumps(obj, indent=2))


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from `path`; a corrupt or non-object file is a UsageError saying what the file is."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except OSError as err:
        raise UsageError(f"cannot read {path} ({err.strerror or err}); it should hold {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}); it should hold {what}. Fix or remove it.") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a JSON {type(obj).__name__}, expected an object with {what}")
    return obj


def complete_lines(path: Path) -> bytes:
    """The file's bytes up to its last newline; a torn last line (a run killed mid-write) is cut off the file too,
    so that later appends start on a line of their own."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return data


def read_records(path: Path) -> list[dict]:
    """Records already written; a torn last line (killed mid-write) is cut off so later appends stay valid. A
    corrupt line elsewhere is a UsageError naming the file and line."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise UsageError(f"{path} is not a file; move it away or use another --out")
    if not path.is_file():
        return []
    data = complete_lines(path)
    rows = []
    for i, line in enumerate(data.decode(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}, line {i}: not a JSON record ({err}); remove that line (the run resumes "
                             "without it) or use another --out") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}, line {i}: a JSON {type(row).__name__}, not a record; remove that line")
        rows.append(row)
    return rows


def drop_records(path: Path, drop: Callable[[dict], bool]) -> int:
    """Rewrite `path` (atomically) without the records for which `drop` is true; returns how many were dropped."""
    rows = read_records(path)
    kept = [r for r in rows if not drop(r)]
    if len(kept) != len(rows):
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(rows) - len(kept)


def append_record(path: Path, row: dict) -> None:
    """Append one record and flush it, so an interrupted run loses at most the record being written."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def record_command(out: Path, script: str, argv: list[str] | None) -> None:
    """Write <out>/command.json: the exact command line of this run (`argv` None = sys.argv[1:]), which
    scripts/make_tables.py cites as the result's source."""
    argv = sys.argv[1:] if argv is None else list(argv)
    write_json(Path(out, "command.json"), {"argv": ["python", script, *map(str, argv)],
                                           "python": sys.executable, "cwd": os.getcwd()})
