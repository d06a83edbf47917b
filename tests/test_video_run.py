"""scripts/run_video.py end to end on a tiny synthetic split: records, summary, resume, errors, missing data."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from namm_transfer import save_namm
from video.synthetic import SyntheticConfig, generate_split

ROOT = Path(__file__).resolve().parents[1]


def _run_video():
    spec = importlib.util.spec_from_file_location("scripts_run_video", ROOT / "scripts" / "run_video.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run_video():
    return _run_video()


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_end_to_end_resume_and_corrupt_video(run_video, tmp_path):
    data = tmp_path / "data"
    generate_split(data, "test", num_samples=4, seed=0, config=SyntheticConfig(frame_counts=(64,)))
    (data / "videos" / "test_0_00001.mp4").write_bytes(b"not a video at all")
    namm = save_namm(tmp_path / "namm", torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5, None)
    out = tmp_path / "out"
    args = ["--dataset", "synthetic", "--data-root", str(data), "--policies", "full,namm,h2o", "--namm", str(namm),
            "--frames", "8", "--out", str(out), "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--model", "tiny-random"]

    assert run_video.main(args + ["--limit", "3"]) == 0
    first = _lines(out / "records.jsonl")
    assert len(first) == 9 and {(r["policy"], r["sample_index"]) for r in first} == {
        (p, i) for p in ("full", "namm", "h2o") for i in range(3)}
    errors = [r for r in first if r["error"]]
    assert len(errors) == 3 and {r["id"] for r in errors} == {"synthetic_test_0_00001"}
    assert all("VideoDecodeError" in r["error"] and r["prediction"] is None for r in errors)
    h2o = {r["id"]: r for r in first if r["policy"] == "h2o" and not r["error"]}
    namm_recs = {r["id"]: r for r in first if r["policy"] == "namm" and not r["error"]}
    for i, r in h2o.items():  # baselines run at NAMM's realised cache on the same sample
        assert r["budget_source"] == "NAMM's realised cache"
        assert r["budget"] == pytest.approx(namm_recs[i]["step_fraction"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policies"]["full"]["n"] == 3 and summary["policies"]["full"]["n_errors"] == 1
    assert summary["policies"]["full"]["realised_cache_pct"] == 100.0
    assert "WARNING" in " ".join(summary["notes"])  # random tiny model, said loudly
    md = (out / "summary.md").read_text()
    assert "| namm |" in md and "realised cache %" in md and "by category" in md

    assert run_video.main(args + ["--limit", "4"]) == 0  # resume: only sample 3 is new
    second = _lines(out / "records.jsonl")
    assert second[:9] == first and len(second) == 12
    assert {r["sample_index"] for r in second[9:]} == {3}
    assert run_video.main(args + ["--limit", "4"]) == 0
    assert len(_lines(out / "records.jsonl")) == 12


def test_synthetic_without_data_root_generates_a_split(run_video, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_video.main(["--dataset", "synthetic", "--policies", "full,recency", "--budget", "0.5", "--limit", "1",
                         "--frames", "8", "--synthetic-samples", "2", "--cache-dir", str(tmp_path / "cache"),
                         "--out", str(out), "--no-progress"])
    assert rc == 0
    assert list((tmp_path / "cache").glob("video-synthetic-test-*/lvb_test.json"))
    recs = _lines(out / "records.jsonl")
    assert [r["policy"] for r in recs] == ["full", "recency"] and recs[1]["budget_source"] == "--budget"
    assert "| recency | --budget (mean 0.5) |" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())  # the shipped trained model is the default
    assert summary["settings"]["model"] == "video/checkpoints/llava-tiny-synth"  # recorded relative to the checkout
    assert "WARNING" not in " ".join(summary["notes"])


def test_missing_dataset_and_namm_messages(run_video, tmp_path, capsys):
    rc = run_video.main(["--dataset", "mlvu", "--data-root", str(tmp_path / "nothing"), "--policies", "full"])
    err = capsys.readouterr().err
    assert rc == 2 and "MLVU not found" in err and "huggingface-cli download" in err and "--dataset synthetic" in err
    assert "Traceback" not in err
    data = tmp_path / "data"
    generate_split(data, "test", num_samples=1, seed=0, config=SyntheticConfig(frame_counts=(64,)))
    rc = run_video.main(["--dataset", "synthetic", "--data-root", str(data), "--policies", "full,namm",
                         "--namm", str(tmp_path / "no-such-namm"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no NAMM checkpoint" in err and "Traceback" not in err


def test_bad_arguments_are_refused_before_any_work(run_video, tmp_path, capsys):
    from helpers_inputs import refused
    out = tmp_path / "out"
    refused(run_video.main, ["--dataset", "longvideobench", "--out", str(out)], capsys,
            "--dataset longvideobench needs --data-root")
    base = ["--dataset", "synthetic", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    for bad, msg in ((["--budget", "0"], "'0' is not a cache budget: a fraction in (0, 1]"),
                     (["--budget", "1.5"], "whole number of tokens >= 2"), (["--frames", "0"], "an integer >= 1"),
                     (["--chunk", "0"], "an integer >= 1"), (["--delay", "0"], "an integer >= 1"),
                     (["--threads", "0"], "an integer >= 1"), (["--limit", "-1"], "'-1' is not an integer >= 1"),
                     (["--policies", "full,full"], "repeated ['full']"), (["--policies", "h2o,fifo"], "unknown")):
        refused(run_video.main, base + bad, capsys, msg)
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_malformed_entries_are_per_sample_errors_and_paths_stay_in_the_root(run_video, tmp_path, capsys):
    from helpers_inputs import refused, snapshot
    data = tmp_path / "data"
    generate_split(data, "test", num_samples=5, seed=0, config=SyntheticConfig(frame_counts=(64,)))
    (tmp_path / "outside.mp4").write_bytes((data / "videos" / "test_0_00000.mp4").read_bytes())
    ann = data / "lvb_test.json"
    entries = json.loads(ann.read_text())
    del entries[1]["question"]
    entries[2]["video_path"] = "../../outside.mp4"
    entries[3]["video_path"] = str(tmp_path / "outside.mp4")
    entries[4]["correct_choice"] = 9
    ann.write_text(json.dumps(entries))
    out = tmp_path / "out"
    args = ["--dataset", "synthetic", "--data-root", str(data), "--policies", "full", "--frames", "4",
            "--out", str(out), "--no-progress", "--model", "tiny-random"]
    assert run_video.main(args) == 0
    recs = {r["id"]: r for r in _lines(out / "records.jsonl")}
    assert recs["synthetic_test_0_00000"]["error"] is None
    errors = {i: r["error"] for i, r in recs.items() if r["error"]}
    assert set(errors) == {f"synthetic_test_0_0000{i}" for i in (1, 2, 3, 4)}
    assert "missing ['question']" in errors["synthetic_test_0_00001"]
    assert "points outside" in errors["synthetic_test_0_00002"] and "--allow-outside-paths" in errors[
        "synthetic_test_0_00003"]
    assert "correct_choice 9 but 5 options" in errors["synthetic_test_0_00004"]
    assert "--retry-errors" in capsys.readouterr().err
    # a duplicate id refuses the whole file, before anything is written
    entries[4] = {**entries[0]}
    ann.write_text(json.dumps(entries))
    before = snapshot(out)
    refused(run_video.main, args, capsys, "sample ids ['synthetic_test_0_00000'] occur more than once")
    assert snapshot(out) == before


def test_settings_lock_and_retry_errors(run_video, tmp_path, capsys):
    from helpers_inputs import refused, snapshot
    from namm_transfer.runs import folder_lock
    data = tmp_path / "data"
    generate_split(data, "test", num_samples=2, seed=0, config=SyntheticConfig(frame_counts=(64,)))
    video = data / "videos" / "test_0_00001.mp4"
    good = video.read_bytes()
    video.write_bytes(b"broken")
    namm = save_namm(tmp_path / "namm", torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5, None)
    out = tmp_path / "out"
    args = ["--dataset", "synthetic", "--data-root", str(data), "--policies", "full,namm", "--namm", str(namm),
            "--frames", "4", "--out", str(out), "--no-progress", "--model", "tiny-random"]
    assert run_video.main(args) == 0
    capsys.readouterr()
    before = snapshot(out)
    refused(run_video.main, [*args, "--frames", "8"], capsys, "other settings", "frames: recorded 4, this run 8")
    save_namm(namm, torch.randn(4172, generator=torch.Generator().manual_seed(1)) * 0.5, None)  # same path
    refused(run_video.main, args, capsys, "namm_hash: recorded")
    save_namm(namm, torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5, None)
    with folder_lock(out):
        refused(run_video.main, args, capsys, "is being written by another run")
    (out / "run.json").write_text("{")
    refused(run_video.main, args, capsys, "run.json is not valid JSON")
    (out / "run.json").write_bytes(before["run.json"])
    assert snapshot(out) == before
    # the broken video is fixed: --retry-errors runs its two records again, nothing else
    video.write_bytes(good)
    assert run_video.main(args) == 0 and sum(r["error"] is not None for r in _lines(out / "records.jsonl")) == 2
    assert run_video.main([*args, "--retry-errors"]) == 0
    recs = _lines(out / "records.jsonl")
    assert len(recs) == 4 and all(r["error"] is None for r in recs)
    first = [json.loads(line) for line in before["records.jsonl"].decode().splitlines()]
    assert recs[:2] == first[:2] and {r["id"] for r in recs[2:]} == {"synthetic_test_0_00001"}
