"""Shared input checks: argument types, the settings record + lock of result folders, atomic writes, records."""
import argparse
import json
import multiprocessing
import os
import time

import pytest

from namm_transfer import cli, records, runs
from namm_transfer.cli import UsageError


@pytest.mark.parametrize("rule, text, expected", [
    (cli.int_in(1), "0", "an integer >= 1"), (cli.int_in(1), "1.5", "an integer >= 1"),
    (cli.int_in(0, 3), "4", "an integer in [0, 3]"), (cli.float_in(0, lo_open=True), "nan", "> 0"),
    (cli.float_in(0, 1), "inf", "<= 1"), (cli.budget, "1.5", "whole number of tokens"),
    (cli.budget, "0", "fraction in (0, 1]"), (cli.budget, "-3", "fraction"),
    (cli.name_list(["a", "b"]), "a,a", "repeated ['a']"), (cli.name_list(["a", "b"]), "a,c", "unknown ['c']"),
    (cli.name_list(["a", "b"]), ",", "empty"), (cli.number_list(cli.int_in(0), "seeds"), "0,0", "repeated"),
])
def test_argument_types_refuse_with_the_valid_range(rule, text, expected):
    with pytest.raises(argparse.ArgumentTypeError, match=expected.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        rule(text)


def test_argument_types_accept():
    assert cli.budget("0.5") == 0.5 and cli.budget("1") == 1.0 and cli.budget("64") == 64
    assert isinstance(cli.budget("64.0"), int)
    assert cli.name_list(["a", "b"])(" b, a") == ["b", "a"]
    assert cli.number_list(cli.int_in(0), "seeds")("2,0") == [2, 0]
    assert cli.default_out("dt", "x") == cli.REPO_ROOT / "runs" / "dt" / "x"


def test_settings_refused_with_differences_and_nothing_written(tmp_path):
    out = tmp_path / "out"
    with runs.open_run(out, {"model": "m", "frames": 8, "namm": None}, "scripts/x.py", ["--frames", "8"],
                       fillable=("namm",)):
        (out / "records.jsonl").write_text('{"a": 1}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UsageError) as err:
        with runs.open_run(out, {"model": "m2", "frames": 8, "namm": None}, "scripts/x.py", ["--frames", "9"]):
            raise AssertionError("must not run")
    msg = str(err.value)
    assert "other settings" in msg and "model: recorded 'm', this run 'm2'" in msg and "frames" not in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # run.json, command.json, records untouched
    # a fillable key is filled in; a key an older run.json lacks is added; extra old keys are kept
    (out / "run.json").write_text(json.dumps({"model": "m", "namm": None, "old_flag": 1}))
    with runs.open_run(out, {"model": "m", "frames": 8, "namm": "n"}, "scripts/x.py", None, fillable=("namm",)):
        pass
    assert json.loads((out / "run.json").read_text()) == {"model": "m", "namm": "n", "old_flag": 1, "frames": 8}


def test_corrupt_run_json_is_a_message(tmp_path):
    (tmp_path / "run.json").write_text('{"model": "m", ')
    with pytest.raises(UsageError, match="run.json is not valid JSON.*Fix or remove it"):
        runs.check_settings(tmp_path, {"model": "m"})


def _hold_lock(folder, ready):
    with runs.folder_lock(folder):
        ready.set()
        time.sleep(60)


def test_lock_refuses_a_second_run_and_is_released(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(UsageError, match=rf"being written by another run \(pid {holder.pid} on "):
            with runs.folder_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: the OS releases the flock
        holder.join()
    with runs.folder_lock(tmp_path):
        assert (tmp_path / ".lock").is_file()
    assert not (tmp_path / ".lock").exists()


def test_records_torn_and_corrupt_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2')
    assert records.read_records(path) == [{"a": 1}] and path.read_text() == '{"a": 1}\n'
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(UsageError, match="r.jsonl, line 2: not a JSON record"):
        records.read_records(path)
    path.write_text('{"a": 1, "error": "x"}\n{"a": 2, "error": null}\n')
    assert records.drop_records(path, lambda r: r["error"]) == 1 and records.read_records(path) == [
        {"a": 2, "error": None}]


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = records.write_json(tmp_path / "summary.json", {"ok": 1})
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        records.write_json(path, {"ok": 2, "big": "x" * 10000})
    assert json.loads(path.read_text()) == {"ok": 1} and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_content_hash_sees_content_not_names_of_the_folder(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "w.bin").write_bytes(b"123")
    (b / ".lock").write_text("pid 1")
    assert runs.content_hash(a) == runs.content_hash(b)
    (b / "w.bin").write_bytes(b"124")  # rewritten at the same path
    assert runs.content_hash(a) != runs.content_hash(b)
    assert runs.model_hash("no/such-model-anywhere") is None
