"""torchrun scale-out of the harnesses: 2 gloo ranks write exactly the records and summary of 1 process (run_video,
run_dt, eval_language), resume from any mix of records.jsonl and rank journals, and 1 process resumes their folders.

One torchrun starts both ranks once and runs all three harnesses in them (tests/torchrun_harnesses.py); the
1-process references run in this process. Timings and process memory are left out of the comparison."""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_inputs import script
from namm_transfer import save_namm
from namm_transfer.distributed import RankRecords, World
from namm_transfer.namm import NAMMConfig
from video.synthetic import SyntheticConfig, generate_split

ROOT = Path(__file__).resolve().parents[1]
TIMING = re.compile(r"seconds|per_s|_ms$|peak_memory|tok/s")
SEEDED = -1.0  # a timing no run produces: marks records that must be kept, not run again


def strip(obj):
    """`obj` without timings and process memory (which differ from run to run)."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not TIMING.search(k)}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def seed(rows: list[dict], field: str) -> list[dict]:
    return [{**r, field: SEEDED} for r in rows]


def write_lines(path, rows: list[dict], torn: str = "") -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Inputs, the 1-process reference folders (one/), and folders made by one 2-rank torchrun (two/)."""
    tmp = tmp_path_factory.mktemp("dist")
    data = tmp / "videos"
    generate_split(data, "test", num_samples=4, seed=0, config=SyntheticConfig(frame_counts=(64,)))
    (data / "videos" / "test_0_00002.mp4").write_bytes(b"not a video")  # an error record, sharded like the rest
    params = torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5
    save_namm(tmp / "namm", params, None)
    save_namm(tmp / "namm-lang", params, None, NAMMConfig(delay=128))
    video = ["--dataset", "synthetic", "--data-root", str(data), "--model", "tiny-random", "--frames", "8",
             "--policies", "full,namm,h2o,random", "--namm", str(tmp / "namm"), "--cache-dir", str(tmp / "cache"),
             "--no-progress"]
    dt = ["--env", "hopper-medium", "--policies", "full,namm,h2o,recency", "--episodes", "2", "--seeds", "0,1",
          "--max-steps", "60", "--batch", "2", "--no-progress"]  # the shipped NAMM: its cache differs by episode
    lang = ["--model", "tiny-llama", "--namm", str(tmp / "namm-lang"), "--tasks", "passkey", "--tokens", "300",
            "--n", "3", "--batch-size", "2", "--policies", "full,namm,h2o", "--no-progress"]
    one, two = tmp / "one", tmp / "two"
    for name, argv, out in (("run_video", [*video, "--limit", "2"], one / "video-2"),
                            ("run_video", [*video, "--limit", "4"], one / "video"),
                            ("run_dt", dt, one / "dt"), ("eval_language", lang, one / "lang")):
        assert script(name).main([*argv, "--out", str(out)]) == 0

    # two/video starts as the 1-process folder of the first two samples (a 2-rank run resumes a 1-process one);
    # two/lang as a killed 4-rank run left it: journals of ranks 1 and 3, one with the full and NAMM records of the
    # third sample, one torn in its first record
    shutil.copytree(one / "video-2", two / "video")
    write_lines(two / "video" / "records.jsonl", seed(lines(one / "video-2" / "records.jsonl"), "seconds"))
    (two / "lang").mkdir(parents=True)
    third = lines(one / "lang" / "records.jsonl")[-3:-1]
    assert [r["policy"] for r in third] == ["full", "namm"]
    write_lines(two / "lang" / "records.rank1.jsonl", seed(third, "prefill_tokens_per_s"))
    write_lines(two / "lang" / "records.rank3.jsonl", [], torn='{"policy": "h2o", "ta')
    refused = ["run_video", [*video, "--frames", "4", "--out", str(two / "video")], 2]  # rank 0's refusal, on all
    jobs = [refused, ["run_dt", [*dt, "--out", str(two / "dt")], 0],
            ["run_video", [*video, "--limit", "4", "--out", str(two / "video")], 0],
            ["eval_language", [*lang, "--out", str(two / "lang")], 0]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "torchrun_harnesses.py"), json.dumps(jobs)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    return {"one": one, "two": two, "video": video, "stderr": res.stderr}


FILES = {"video": ("records.jsonl", "summary.json"), "dt": ("episodes.jsonl", "summary.json"),
         "lang": ("records.jsonl", "summary.json", "paired.json")}


@pytest.mark.parametrize("harness", ["video", "dt", "lang"])
def test_two_ranks_write_the_one_process_records_and_summary(runs, harness):
    one, two = runs["one"] / harness, runs["two"] / harness
    records, *summaries = FILES[harness]
    assert strip(lines(two / records)) == strip(lines(one / records))  # same records, same order
    for name in summaries:
        assert strip(json.loads((two / name).read_text())) == strip(json.loads((one / name).read_text()))
    assert not list(two.glob("*.rank*")) and not (two / ".lock").exists()  # journals merged and removed
    assert json.loads((two / "run.json").read_text()) == json.loads((one / "run.json").read_text())


def test_ranks_split_the_work_and_resume_what_is_recorded(runs):
    assert runs["stderr"].count("4 samples x 4 policies: 8 to run, 8 already in") == 1  # said by rank 0 alone
    assert runs["stderr"].count("frames: recorded 8, this run 4") == 2  # both ranks stop with rank 0's message
    video = lines(runs["two"] / "video" / "records.jsonl")
    assert [r.get("seconds") == SEEDED for r in video] == [True] * 8 + [False] * 8  # the 1-process records were kept
    assert [r["sample_index"] for r in video] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert sum(bool(r["error"]) for r in video) == 4  # the broken video: its records, on whichever rank ran it
    lang = lines(runs["two"] / "lang" / "records.jsonl")
    assert [r["prefill_tokens_per_s"] == SEEDED for r in lang] == [False] * 6 + [True, True, False]
    h2o = lang[-1]
    assert h2o["policy"] == "h2o" and h2o["budget"] == lang[-2]["kept_fraction"]  # at the journaled NAMM's cache
    dt = lines(runs["two"] / "dt" / "episodes.jsonl")
    namm = [r["eviction_fraction"] for r in dt if r["policy"] == "namm"]
    assert len(namm) == 4 and {r["budget"] for r in dt if r["policy"] in ("h2o", "recency")} == {
        min(max(sum(namm) / 4, 1e-3), 1.0)}  # baselines at NAMM's fraction over the episodes of both ranks


def test_one_process_resumes_a_folder_of_ranks_and_their_journals(runs, tmp_path):
    video = script("run_video")
    two = runs["two"] / "video"
    before = (two / "records.jsonl").read_bytes()
    assert video.main([*runs["video"], "--limit", "4", "--out", str(two)]) == 0  # nothing left to run
    assert (two / "records.jsonl").read_bytes() == before
    # a killed 3-rank run left journals of ranks 0 and 2 (and no records.jsonl): one process finishes the work
    ref = lines(runs["one"] / "video" / "records.jsonl")
    out = tmp_path / "killed"
    shutil.copytree(runs["one"] / "video", out, ignore=shutil.ignore_patterns("records.jsonl", "summary.*"))
    write_lines(out / "records.rank2.jsonl", seed(ref[4:8], "seconds"))
    write_lines(out / "records.rank0.jsonl", seed(ref[:2] + ref[12:14], "seconds"), torn='{"policy": "fu')
    assert video.main([*runs["video"], "--limit", "4", "--out", str(out)]) == 0
    got = lines(out / "records.jsonl")
    assert strip(got) == strip(ref) and not list(out.glob("*.rank*"))
    assert [i for i, r in enumerate(got) if r.get("seconds") == SEEDED] == [0, 1, 4, 5, 6, 7, 12, 13]
    assert strip(json.loads((out / "summary.json").read_text())) == \
        strip(json.loads((runs["one"] / "video" / "summary.json").read_text()))


def test_rank_records_order_and_journal_names(tmp_path):
    """One process: records.jsonl is appended as it goes and left as it is; journals of other names are not read."""
    path = tmp_path / "records.jsonl"
    write_lines(path, [{"k": "b"}])
    (tmp_path / "records.rankx.jsonl").write_text("not a journal\n")
    write_lines(tmp_path / "records.rank10.jsonl", [{"k": "z"}])
    write_lines(tmp_path / "records.rank2.jsonl", [{"k": "a"}, {"k": "b", "v": 1}])
    rec = RankRecords(path, World(), key=lambda r: r["k"])
    assert [p.name for p in rec.journal_paths()] == ["records.rank2.jsonl", "records.rank10.jsonl"]
    assert rec.load() == {"b": {"k": "b"}, "a": {"k": "a"}, "z": {"k": "z"}}  # records.jsonl wins over a journal
    rec.add({"k": "c"})
    done = rec.merge(["a", "c", "z"])
    assert list(done) == ["b", "a", "c", "z"] and lines(path) == [{"k": k} for k in "bacz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl", "records.rankx.jsonl"]


class _Parser(Exception):
    """Carries a harness's ArgumentParser out of its parse_args()."""


@pytest.mark.parametrize("name", ["run_video", "run_dt", "eval_language"])
def test_every_harness_option_has_a_spelling_torchrun_passes_through(name, monkeypatch):
    """torchrun parses the whole command line with abbreviations allowed before any rank starts: a harness option
    that abbreviates several of torchrun's own (eval_language's `--n` does) stops the README's command with
    "ambiguous option". Every option needs a spelling that reaches the harness unchanged."""
    from torch.distributed.run import get_args_parser

    def grab(self, *args, **kwargs):
        raise _Parser(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Parser) as caught:
        script(name).parse_args([])
    monkeypatch.undo()
    torchrun = get_args_parser()

    def passes(option: str) -> bool:
        try:
            parsed = torchrun.parse_args(["--nproc-per-node", "2", f"scripts/{name}.py", option, "1"])
        except SystemExit:
            return False
        return parsed.training_script_args == [option, "1"]
    actions = [a for a in caught.value.args[0]._actions if a.option_strings and a.dest != "help"]
    assert actions
    blocked = [a.option_strings for a in actions if not any(passes(o) for o in a.option_strings)]
    assert not blocked, f"{name}: no spelling of {blocked} passes through torchrun"
    if name == "eval_language":
        assert not passes("--n") and passes("--samples-per-task")  # the alias the README names under torchrun
