"""Synthetic long-video QA: determinism, disjoint splits, LVB-layout round trip, answers visible in the pixels."""

import json

import numpy as np
import pytest

from video.datasets import load_synthetic
from video.decoding import read_video
from video.prompts import lvb_prompt
from video.synthetic import COLOURS, KINDS, SPLITS, SyntheticConfig, generate_split, make_sample, render

SMALL = SyntheticConfig(frame_counts=(64, 128), size=64)


def test_generation_is_deterministic(tmp_path):
    a = generate_split(tmp_path / "a", "test", num_samples=4, seed=5, config=SMALL)
    b = generate_split(tmp_path / "b", "test", num_samples=4, seed=5, config=SMALL)
    assert a.read_text() == b.read_text()
    for rec in json.loads(a.read_text()):
        va = (tmp_path / "a" / "videos" / rec["video_path"]).read_bytes()
        assert va == (tmp_path / "b" / "videos" / rec["video_path"]).read_bytes()
    c = generate_split(tmp_path / "c", "test", num_samples=4, seed=6, config=SMALL)
    assert json.loads(c.read_text())[0]["signature"] != json.loads(a.read_text())[0]["signature"]


def test_splits_are_disjoint():
    sigs = {}
    for split in SPLITS:
        sigs[split] = {make_sample(0, split, i, SMALL)[1]["signature"] for i in range(40)}
        assert all(int(s, 16) % len(SPLITS) == SPLITS[split] for s in sigs[split])
    assert not (sigs["train"] & sigs["val"]) and not (sigs["train"] & sigs["test"]) and not (sigs["val"] & sigs["test"])


def test_questions_are_well_formed():
    seen = set()
    for i in range(40):
        scene, qa = make_sample(1, "train", i, SMALL)
        seen.add(qa["kind"])
        opts = qa["candidates"]
        assert len(opts) == 5 and len(set(opts)) == 5 and 0 <= qa["correct_choice"] < 5
        if qa["kind"] == "count_event":
            target = qa["question"].split("did a ")[1].split(" flash")[0]
            n = sum(f"{c} {s}" == target for _, c, s in scene.flashes)
            assert opts[qa["correct_choice"]] == str(n) == str(len(qa["evidence"]))
        if qa["kind"] == "first_event":
            first = {f"{c} {s}": t for t, c, s in reversed(scene.flashes)}
            times = [first.get(o, 10**9) for o in opts]
            assert int(np.argmin(times)) == qa["correct_choice"]
        # flashes never touch: there is a gap between any two
        starts = [t for t, _, _ in scene.flashes]
        assert all(b - a > scene.unit for a, b in zip(starts, starts[1:]))
    assert seen == set(KINDS)


def test_lvb_loader_reads_synthetic_and_pixels_hold_the_answer(tmp_path):
    generate_split(tmp_path, "val", num_samples=4, seed=0, config=SMALL)
    samples = load_synthetic(tmp_path, "val")
    assert len(samples) == 4 and {s.dataset for s in samples} == {"synthetic"}
    s = samples[0]  # index 0 is a colour_at_count question
    assert s.category == "colour_at_count" and s.duration_group in (8, 16) and len(s.options) == 5
    assert lvb_prompt(s).endswith("Answer with the option's letter from the given choices directly.\n")
    start, end = s.extra["evidence_frames"][0]
    clip = read_video(s.video_path, num_frames=32)
    inside = [i for i, f in enumerate(clip.indices) if start <= f < end]
    assert inside, "uniform 32-frame sampling must see the evidence"
    frame = clip.frames[inside[0]].astype(int)
    patch = frame[int(0.58 * 64):int(0.62 * 64), int(0.28 * 64):int(0.32 * 64)].reshape(-1, 3).mean(0)
    nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - patch).sum())
    assert nearest == s.options[s.answer]


def test_render_draws_the_scene():
    scene, _ = make_sample(0, "test", 0, SyntheticConfig(frame_counts=(64,)))
    frames = render(scene, 112)
    assert frames.shape == (64, 112, 112, 3) and frames.dtype == np.uint8
    big, small = (int(0.6 * 112), int(0.3 * 112)), (int(0.6 * 112), int(0.76 * 112))  # (row, col) centres
    for k, (colour, _) in enumerate(scene.segments, start=1):
        a, b = scene.segment_range(k)
        assert all(tuple(frames[t][big]) == COLOURS[colour] for t in range(a, b))
    for t, colour, _ in scene.flashes:
        assert tuple(frames[t][small]) == COLOURS[colour] and tuple(frames[t + scene.unit][small]) != COLOURS[colour]
    counter = [frames[scene.segment_range(k)[0], :30, :30] for k in (1, 2)]
    assert not (counter[0] == counter[1]).all()
    with pytest.raises(ValueError):
        generate_split("unused", "holdout", 1)


def test_render_of_some_frames_equals_those_frames_of_the_whole_video():
    scene, _ = make_sample(0, "train", 1, SyntheticConfig())
    idx = np.array([0, 5, 5, scene.num_frames - 1])
    assert np.array_equal(render(scene, 64, idx), render(scene, 64)[idx])
