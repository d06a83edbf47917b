"""run_video.py on the official layouts' test splits (no answers): submission files, subtitles interleaved with the
frames, frame sampling, and the refusals of the new flags. Tiny random model, synthetic videos."""
import json
import shutil

import numpy as np
import pytest

from test_video_run import _lines, _run_video
from video.datasets import load_longvideobench
from video.pipeline import prepare_inputs
from video.prompts import FRAME_TOKEN, lvb_prompt
from video.synthetic import SyntheticConfig, generate_split
from video.tiny_model import build_tiny_llava_next_video, tokens_per_frame


@pytest.fixture(scope="module")
def run_video():
    return _run_video()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_split(root, "test", num_samples=2, seed=0, config=SyntheticConfig(frame_counts=(64,)))
    return root


def lvb_test_layout(synth, root):
    """LongVideoBench test layout: lvb_test_wo_gt.json (no correct_choice), videos/, subtitles/."""
    shutil.copytree(synth / "videos", root / "videos")
    (root / "subtitles").mkdir()
    entries = json.loads((synth / "lvb_test.json").read_text())
    for e in entries:
        del e["correct_choice"]
        e["subtitle_path"] = e["video_id"] + "_en.json"
        (root / "subtitles" / e["subtitle_path"]).write_text(json.dumps([
            {"timestamp": [1.0, 3.0], "text": "the counter starts"},
            {"start": "00:00:07.00", "end": "00:00:08.00", "line": "the shapes flash"}]))
    (root / "lvb_test_wo_gt.json").write_text(json.dumps(entries))
    return root


def test_subtitles_interleaved_with_one_frame_videos(synth, tmp_path):
    _, processor = build_tiny_llava_next_video(seed=0)
    sample = load_longvideobench(lvb_test_layout(synth, tmp_path / "lvb"), split="test")[0]
    inputs = prepare_inputs(sample, processor, num_frames=4, subtitles=True)
    text = processor.tokenizer.decode(inputs.enc["input_ids"][0])
    # frames at 0, 2.625, 5.25, 7.875 s (indices 0, 21, 42, 63 of 64 at 8 fps); subtitle midpoints 2.0 and 7.5
    compact = text.replace(FRAME_TOKEN * tokens_per_frame(processor), "<F>")
    assert compact == ("<s>USER: <F>\nthe counter starts\n<F>\n<F>\nthe shapes flash\n<F>\n" + lvb_prompt(sample)
                       + " ASSISTANT:")
    assert inputs.enc["pixel_values_videos"].shape[:2] == (4, 1)  # four one-frame videos
    plain = prepare_inputs(sample, processor, num_frames=4)
    assert plain.enc["pixel_values_videos"].shape[:2] == (1, 4)
    assert (inputs.enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids(FRAME_TOKEN)).sum() == \
        (plain.enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids(FRAME_TOKEN)).sum()


def test_lmms_eval_sampling_repeats_frames_of_a_short_video(synth):
    _, processor = build_tiny_llava_next_video(seed=0)
    sample = load_longvideobench(synth, annotation="lvb_test.json", dataset="synthetic")[0]  # 64 frames
    rep = prepare_inputs(sample, processor, num_frames=70)
    uniq = prepare_inputs(sample, processor, num_frames=70, sampling="unique")
    assert (rep.num_frames, uniq.num_frames) == (70, 64)
    pixels = rep.enc["pixel_values_videos"][0]
    idx = np.linspace(0, 63, 70, dtype=int)
    first_repeat = int(np.nonzero(idx[1:] == idx[:-1])[0][0])
    assert bool((pixels[first_repeat] == pixels[first_repeat + 1]).all())


def test_lvb_test_split_writes_the_submission(run_video, synth, tmp_path):
    data = lvb_test_layout(synth, tmp_path / "lvb")
    out = tmp_path / "out"
    rc = run_video.main(["--dataset", "longvideobench", "--split", "test", "--data-root", str(data), "--subtitles",
                         "--model", "tiny-random", "--policies", "full,recency", "--budget", "0.5", "--frames", "4",
                         "--out", str(out), "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    recs = _lines(out / "records.jsonl")
    for policy in ("full", "recency"):
        sub = json.loads((out / f"submission_{policy}.json").read_text())
        assert sub == {r["id"]: r["prediction"] for r in recs if r["policy"] == policy}
        assert list(sub) == ["synthetic_test_0_00000", "synthetic_test_0_00001"]
        assert all(v in ("A", "B", "C", "D", "E") for v in sub.values())  # parsed, else the seeded guess
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policies"]["full"]["headline"] is None and summary["policies"]["full"]["overall"] is None
    assert summary["settings"]["subtitles"] is True and summary["settings"]["frame_sampling"] == "lmms-eval"
    md = (out / "summary.md").read_text()
    assert "answers withheld" in md and "submission_full.json" in md and "| full | - | 2 | - |" in md


def test_mlvu_test_split_writes_the_official_list(run_video, synth, tmp_path):
    base = tmp_path / "MLVU_Test"
    shutil.copytree(synth / "videos", base / "MLVU_Test" / "video")
    entries = json.loads((synth / "lvb_test.json").read_text())
    questions = [{"question_id": f"AR_{i}", "question_type": "anomaly_reco", "video": e["video_path"],
                  "question": e["question"], "candidates": e["candidates"] + ["nothing"], "duration": 8.0}
                 for i, e in enumerate(entries)]
    (base / "test_multi_choice_tasks.json").write_text(json.dumps(questions))
    out = tmp_path / "out"
    rc = run_video.main(["--dataset", "mlvu", "--split", "test", "--data-root", str(tmp_path), "--model",
                         "tiny-random", "--policies", "full", "--frames", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    sub = json.loads((out / "submission_full.json").read_text())
    assert [s["question_id"] for s in sub] == ["AR_0", "AR_1"] and {s["question_type"] for s in sub} == {"anomaly_reco"}
    recs = {r["id"]: r for r in _lines(out / "records.jsonl")}
    from video.prompts import mlvu_test_option
    assert all(s["option"] == mlvu_test_option(recs[s["question_id"]]["response"]) for s in sub)


def test_new_flags_refused_where_they_do_not_apply(run_video, tmp_path, capsys):
    from helpers_inputs import refused
    base = ["--data-root", str(tmp_path), "--out", str(tmp_path / "o")]
    refused(run_video.main, ["--dataset", "mlvu", "--subtitles", *base], capsys, "only LongVideoBench has subtitles")
    refused(run_video.main, ["--dataset", "mlvu", "--split", "val", *base], capsys, "mlvu has dev, test")
    refused(run_video.main, ["--dataset", "synthetic", "--frame-sampling", "all", *base], capsys, "invalid choice")


def test_subtitles_without_files_refused(run_video, synth, tmp_path, capsys):
    from helpers_inputs import refused
    data = lvb_test_layout(synth, tmp_path / "lvb")
    shutil.rmtree(data / "subtitles")
    refused(run_video.main, ["--dataset", "longvideobench", "--split", "test", "--data-root", str(data),
                             "--subtitles", "--model", "tiny-random", "--out", str(tmp_path / "o")], capsys,
            "2 sample(s) have no subtitle file")
