"""Result folders that resume safely: one settings record per folder, checked on every rerun, and a lock.

A resumable command records in <out>/run.json the settings that change its results, content hashes of the files
it reads (model, NAMM, data, statistics) included. A rerun into the same folder with other settings is refused
with the differences listed; <out>/.lock (an flock, released by the OS even on SIGKILL) stops two runs writing
one folder at once. Keys a recorded run.json does not have yet (written by an older version) are filled in.

    settings = {"model": name, "model_hash": content_hash(path), "frames": 32, ...}
    with open_run(out, settings, "scripts/run_video.py", args.argv, fillable=("namm", "namm_hash")):
        ...  # read records, run, records.write_json(out / "summary.json", summary)
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .cli import UsageError
from .records import read_json, record_command, write_json

RUN_FILE = "run.json"
LOCK_FILE = ".lock"


# ------------------------------------------------------------------------------------------- content hashes


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, hidden files skipped)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" if f != path else b"")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def json_hash(obj) -> str:
    """sha256 of `obj` as canonical JSON (for data that is loaded, not read from one file; other values as str)."""
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_hash(name_or_path: str | os.PathLike) -> str | None:
    """Content hash of a local model folder or file; for a Hub id, the commit of its cached snapshot; None when
    neither is found (the id alone then names the model)."""
    if Path(name_or_path).exists():
        return content_hash(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        return "hub-commit:" + Path(snapshot_download(str(name_or_path), local_files_only=True)).name
    except Exception:  # not a Hub id, or not in the local cache
        return None


# -------------------------------------------------------------------------------------------- lock + check


@contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold <out>/.lock exclusively for the block; a second run into `out` is refused, not queued."""
    path = Path(out) / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise UsageError(f"{path} is a folder, not the lock file a run takes there; remove it (it holds "
                             f"no results) and rerun, or use another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(f"{out} is being written by another run ({holder}); wait for it to finish or use "
                             "another --out") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else the previous holder removed the file after we opened it: take the new one
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def check_settings(out: Path, settings: dict, fillable: tuple[str, ...] = (), legacy: dict | None = None) -> dict:
    """The run.json record to write for `settings`, or a UsageError listing how they differ from the recorded
    ones. `fillable` keys may be None on one side (e.g. no NAMM in a first run) and filled in later. `legacy`:
    values a recorded run.json without that key implicitly had (a setting added since); other missing keys are
    filled in."""
    settings = json.loads(json.dumps(settings))
    path = Path(out) / RUN_FILE
    old = read_json(path, "the settings of the run recorded there") if path.is_file() else {}
    if old:
        old = {**(legacy or {}), **old}
    diff = [(k, old[k], v) for k, v in settings.items()
            if k in old and old[k] != v and not (k in fillable and None in (old[k], v))]
    if diff:
        lines = "\n".join(f"  {k}: recorded {a!r}, this run {b!r}" for k, a, b in diff)
        raise UsageError(f"{out} holds results of other settings (mixing them would mislabel results):\n{lines}\n"
                         f"Use another --out, or rerun with the recorded settings ({path}).")
    return {**old, **{k: old.get(k) if v is None and k in fillable else v for k, v in settings.items()}}


@contextmanager
def open_run(out: str | os.PathLike, settings: dict, script: str, argv: list[str] | None,
             fillable: tuple[str, ...] = (), legacy: dict | None = None, info: dict | None = None) -> Iterator[Path]:
    """Create `out`, lock it, check `settings` against its run.json (see `check_settings`), record them, `info`
    (not checked: e.g. this run's policy list) and the command line (command.json), and yield the folder; the
    lock is held until the block ends."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission, read-only disk
        raise UsageError(f"--out {out}: cannot create this folder ({err.strerror or err}); pass a folder path "
                         "that can be written") from None
    with folder_lock(out):
        write_json(out / RUN_FILE, {**check_settings(out, settings, fillable, legacy), **(info or {})})
        record_command(out, script, argv)
        yield out
