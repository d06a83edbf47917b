"""Training the small video model: per-frame targets, codec simulation, prompt format, the script end to end."""
import json

import numpy as np
import pytest
import torch

from video.datasets import load_synthetic
from video.decoding import read_video, sample_indices
from video.pipeline import max_new_tokens_for, prepare_inputs
from video.synthetic import COLOURS, SHAPES, SyntheticConfig, generate_split, make_sample, render, write_mp4
from video.tiny_model import build_processor
from video.training import TALLY, VideoTrainConfig, frame_labels, make_example, yuv420_roundtrip

from test_reporting_tables import _script

SMALL_SYNTH = SyntheticConfig(frame_counts=(64, 128))
COLOURS_IDX = {c: i for i, c in enumerate(COLOURS)}


def test_frame_labels_match_the_pixels():
    scene, _ = make_sample(3, "train", 2, SMALL_SYNTH)
    idx = sample_indices(scene.num_frames, 32)
    frames, labels = render(scene, 64)[idx], frame_labels(scene, idx)
    colours = list(COLOURS)
    for frame, (counter, colour, shape, flash_colour, flash_shape) in zip(frames, labels):
        assert tuple(frame[int(0.6 * 64), int(0.3 * 64)]) == COLOURS[colours[colour]]
        flash_px = tuple(frame[int(0.6 * 64), int(0.76 * 64)])
        assert (flash_colour > 0) == (flash_px != (25, 25, 25))
        if flash_colour:
            assert flash_px == COLOURS[colours[flash_colour - 1]] and 1 <= flash_shape <= len(SHAPES)
        assert 1 <= counter <= len(scene.segments) and 0 <= shape < len(SHAPES)
    assert labels[0, 0] == 1 and labels[-1, 0] == len(scene.segments)


def test_codec_simulation_is_close_to_a_real_mp4(tmp_path):
    scene, _ = make_sample(0, "train", 5, SMALL_SYNTH)
    frames = render(scene, 64)
    write_mp4(tmp_path / "v.mp4", frames, fps=8)
    clip = read_video(tmp_path / "v.mp4", num_frames=16)
    real, raw = clip.frames.astype(float), frames[clip.indices].astype(float)
    sim = yuv420_roundtrip(frames[clip.indices], np.random.default_rng(0), noise=0.0).astype(float)
    assert np.abs(sim - real).mean() < 0.7 * np.abs(raw - real).mean()  # measured 1.10 vs 1.78
    assert np.abs(sim - real).max() < 0.5 * np.abs(raw - real).max()  # chroma bleeding at edges: 19 vs 104


def test_training_example_uses_run_videos_prompt_and_processor(tmp_path):
    cfg = VideoTrainConfig(frames=8, synthetic=SMALL_SYNTH)
    processor = build_processor()
    generate_split(tmp_path, "val", num_samples=2, seed=0, config=SMALL_SYNTH)
    for i, sample in enumerate(load_synthetic(tmp_path, "val")):
        ex = make_example(processor, i, "val", cfg, simulate_codec=False)
        ref = prepare_inputs(sample, processor, num_frames=8).enc
        n = ref["input_ids"].shape[1]
        assert torch.equal(ex["input_ids"][:n], ref["input_ids"][0])  # prompt_ids expands <video> as the processor
        reply = processor.tokenizer.decode(ex["input_ids"][n:])
        assert reply.endswith(f" {sample.options[sample.answer]} {sample.answer_letter}</s>")
        assert (ex["labels"][:n] == -100).all()
        assert torch.equal(ex["labels"][n:], ex["input_ids"][n:])
        # the mp4 run_video decodes vs the training renderer without the codec simulation: same pixels up to H.264
        assert ex["pixel_values_videos"].shape == ref["pixel_values_videos"][0].shape
        assert (ex["pixel_values_videos"] - ref["pixel_values_videos"][0]).abs().mean() < 0.05


def test_reply_styles_are_read_by_the_longvideobench_parser():
    from video.datasets import VideoQASample
    from video.prompts import parse_lvb_answer
    from video.training import reply_text

    sample = VideoQASample("x", "", "q", ["red", "blue", "green", "cyan", "white"], 2, "synthetic")
    assert reply_text(sample) == " green C" and reply_text(sample, "letter") == "C"
    assert parse_lvb_answer(reply_text(sample)).letter == "C"
    scene, qa = make_sample(0, "train", 0, SyntheticConfig())  # a colour_at_count question
    k = int(qa["question"].rstrip("?").split()[-1])
    sample = VideoQASample("x", "", qa["question"], qa["candidates"], qa["correct_choice"], "synthetic", category=qa["kind"])
    reply = reply_text(sample, "reasoned", scene, qa["evidence"])
    assert reply == f" {k} {scene.segments[k - 1][0]} {sample.answer_letter}" and qa["candidates"][qa["correct_choice"]] == scene.segments[k - 1][0]
    scene, qa = make_sample(0, "train", 3, SyntheticConfig())  # a change question
    sample = VideoQASample("x", "", qa["question"], qa["candidates"], qa["correct_choice"], "synthetic", category=qa["kind"])
    a, b = (int(w) for w in qa["question"].rstrip("?").split() if w.isdigit())
    words = lambda k: f"{k} {scene.segments[k - 1][0]} {k} {scene.segments[k - 1][1]}"  # noqa: E731 -- k again
    assert reply_text(sample, "reasoned", scene, qa["evidence"]) == f" {words(a)} {words(b)} {qa['candidates'][qa['correct_choice']]} {sample.answer_letter}"
    tok = build_processor().tokenizer
    for index in (2, 6, 10, 14):  # count questions: what flashed at each counter value with a tally, then the count
        scene, qa = make_sample(0, "train", index, SyntheticConfig())
        sample = VideoQASample("x", "", qa["question"], qa["candidates"], qa["correct_choice"], "synthetic",
                               category=qa["kind"])
        idx = sample_indices(scene.num_frames, 32)
        reply = reply_text(sample, "reasoned", scene, qa["evidence"], idx)
        words = reply.split()
        count = qa["correct_choice"] + 1
        assert words[-2:] == [str(count), sample.answer_letter]
        assert parse_lvb_answer(" ".join(words)).letter == sample.answer_letter
        assert [w for w in words if w in TALLY] == list(TALLY[:count])
        target = qa["question"].split(" did a ")[1].split()[:2]
        flashes = [(i, words[i - 2:i + 1]) for i, w in enumerate(words) if w in SHAPES]  # colour, counter, shape
        assert [f[::2] for i, f in flashes if words[i + 1] in TALLY] == [target] * count
        counters = [int(w) for w in words[:-2] if w.isdigit()]
        assert len(flashes) == len(scene.flashes)  # every flash once ...
        assert [int(f[1]) for _, f in flashes] == [scene.counter_at(s) for s, _, _ in scene.flashes]  # ... its counter
        assert sorted(set(counters)) == list(range(1, len(scene.segments) + 1))  # every counter value, in order
        assert counters == sorted(counters)
        assert len(tok(reply, add_special_tokens=False)["input_ids"]) <= max_new_tokens_for(sample)  # all generated
    assert parse_lvb_answer(" from a red circle to a blue square D").letter == "D"


def test_evidence_clips_hold_the_evidence_and_keep_flashes_apart():
    from video.training import evidence_indices

    for i in range(16):
        scene, qa = make_sample(0, "train", i, SMALL_SYNTH)
        idx = evidence_indices(scene, qa)
        assert (np.diff(idx) >= 0).all()
        assert all(any(a <= t < b for t in idx) for a, b in qa["evidence"]), "every evidence range is in the clip"
        labels = frame_labels(scene, idx)
        if qa["kind"] == "colour_at_count":
            assert (labels[:, 1] == COLOURS_IDX[qa["candidates"][qa["correct_choice"]]]).all()
        if qa["kind"] == "count_event":  # flashes seen in the clip = the answer
            onsets = int((labels[0, 3] > 0) + ((labels[1:, 3] > 0) & (labels[:-1, 3] == 0)).sum())
            assert onsets == qa["correct_choice"] + 1


def test_frame_codes_are_word_embeddings_of_what_the_frame_shows():
    from video.training import FrameCodes

    processor = build_processor()
    tok = processor.tokenizer
    emb = torch.randn(len(tok), 16)
    codes = FrameCodes(tok, 16, tokens_per_frame=4, seed=0)
    labels = torch.tensor([[[3, 1, 2, 0, 0], [4, 0, 4, 5, 1]]])  # frame 2: a flash (colour id 4, shape id 0)
    out = codes(labels, emb).reshape(1, 2, 4, 16)
    e = lambda w: emb[tok.convert_tokens_to_ids("\u0120" + w)]  # noqa: E731
    c, s = list(COLOURS), list(SHAPES)
    torch.testing.assert_close(out[0, 0, 0], e("3") + e(c[1]) + e(s[2]) + codes.slot[0])
    torch.testing.assert_close(out[0, 0, 1], e("3") + codes.slot[1])  # no flash: counter only
    torch.testing.assert_close(out[0, 1, 3], e("4") + e(c[4]) + e(s[0]) + codes.slot[3])
    torch.testing.assert_close(out[0, 1, 2], e("4") + e(c[0]) + e(s[4]) + codes.slot[2])
    for w in c + s + [str(i) for i in range(10)]:  # every word is one token, so the codes exist
        assert len(tok.tokenize(" " + w)) == 1


def test_stages_train_disjoint_parts_and_follow_each_other():
    from video.tiny_model import build_tiny_llava_next_video
    from video.training import trainable

    model, _ = build_tiny_llava_next_video(0)
    text, reader, vision, joint = ({id(p) for p in trainable(model, s)} for s in ("text", "reader", "vision", "joint"))
    assert text == reader and reader and vision and not reader & vision
    assert reader | vision == joint == {id(p) for p in model.parameters()}
    cfg = VideoTrainConfig(text_steps=1, reader_steps=2, vision_steps=2, joint_steps=1)
    assert [cfg.stage_at(i)[:2] for i in range(6)] == [("text", 0), ("reader", 0), ("reader", 1), ("vision", 0),
                                                       ("vision", 1), ("joint", 0)]
    with pytest.raises(ValueError):
        cfg.stage_at(6)


def test_tiny_training_runs_resumes_and_saves_a_loadable_model(tmp_path, capsys):
    script = _script("train_video_model")
    base = ["--size", "tiny", "--batch-size", "4", "--frames", "8", "--val-samples", "2", "--eval-every", "2",
            "--checkpoint-every", "1", "--workers", "0", "--out", str(tmp_path / "run"), "--no-progress",
            "--text-steps", "2", "--reader-steps", "2", "--vision-steps", "2", "--joint-steps", "2"]
    assert script.main(base + ["--stop-after", "5"]) == 0
    from video.training import load_checkpoint
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 5  # data only (weights_only)
    assert script.main(base) == 0  # resumes at step 5 (in the vision stage)
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    stages = ["text", "text", "reader", "reader", "vision", "vision", "joint", "joint"]
    assert [(r["step"], r["stage"]) for r in rows] == list(enumerate(stages, start=1))
    assert "val_acc" in rows[1] and "val_acc" in rows[3] and "val_code_error" in rows[5] and "val_acc" in rows[7]
    assert (tmp_path / "run" / "curve.png").stat().st_size > 0
    from video.pipeline import load_video_model

    model, processor = load_video_model(tmp_path / "run" / "model")
    assert type(model).__name__ == "LlavaNextVideoForConditionalGeneration"
    assert processor.tokenizer.convert_tokens_to_ids("<video>") == model.config.video_token_index
    assert script.main(base + ["--reader-lr", "0.5"]) == 2  # other settings: refused, said why
    assert "other settings" in capsys.readouterr().err
    more = base[:-8] + ["--text-steps", "0", "--reader-steps", "1", "--vision-steps", "0", "--joint-steps", "0"]
    more[more.index("--out") + 1] = str(tmp_path / "more")
    assert script.main(more + ["--init-from", str(tmp_path / "run" / "checkpoint.pt")]) == 0  # a new schedule
    rows = [json.loads(x) for x in (tmp_path / "more" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in rows] == [(1, "reader")]


def test_answer_pointer_goes_from_the_token_before_the_letter_to_the_right_option_line():
    from video.training import answer_positions, pointer_loss

    processor = build_processor()
    tok = processor.tokenizer
    cfg = VideoTrainConfig(frames=4, synthetic=SMALL_SYNTH)
    from video.training import collate

    batch = collate([make_example(processor, i, "val", cfg, pixels=False) for i in range(8)], tok.pad_token_id)
    sources, targets = answer_positions(batch["labels"], batch["option_ends"], batch["answer"])  # right-padded rows
    for i in range(8):
        _, qa = make_sample(0, "val", i, SMALL_SYNTH)
        ids = batch["input_ids"][i]
        src, dst = int(sources[i]), int(targets[i])
        assert tok.decode(ids[src + 1]).strip() == "ABCDE"[qa["correct_choice"]] and ids[src + 2] == tok.eos_token_id
        line_start = int((ids[:dst] == tok.convert_tokens_to_ids("\u010a")).nonzero().max()) + 1
        assert tok.decode(ids[line_start:dst + 1]) == f"{'ABCDE'[qa['correct_choice']]}. {qa['candidates'][qa['correct_choice']]}"
    attention = torch.zeros(1, 2, 5, 5)
    attention[0, 0, 4, 1] = 1.0
    assert pointer_loss(attention, torch.tensor([4]), torch.tensor([1])).item() < 1e-5


def test_text_example_states_the_answer_above_the_options():
    from video.training import make_text_example

    processor = build_processor()
    cfg = VideoTrainConfig(synthetic=SMALL_SYNTH)
    ex = make_text_example(processor, 2, "train", cfg)
    _, qa = make_sample(0, "train", 2, SMALL_SYNTH)
    answer = qa["candidates"][qa["correct_choice"]]
    text = processor.tokenizer.decode(ex["input_ids"])
    assert text.startswith(f"<s>USER: \nThe answer is {answer}.\nA. {qa['candidates'][0]}\n")
    assert text.endswith(f" ASSISTANT: {answer} {'ABCDE'[qa['correct_choice']]}</s>")
    assert len(ex["option_ends"]) == 5 and len(ex["frame_labels"]) == 0


def test_stop_after_resume_is_exact_and_logs_are_cut_to_the_checkpoint(tmp_path):
    from safetensors.torch import load_file
    script = _script("train_video_model")
    base = ["--size", "tiny", "--batch-size", "4", "--frames", "8", "--val-samples", "2", "--eval-every", "2",
            "--checkpoint-every", "2", "--workers", "0", "--no-progress", "--text-steps", "1", "--reader-steps", "3",
            "--vision-steps", "0", "--joint-steps", "0"]
    assert script.main([*base, "--out", str(tmp_path / "straight")]) == 0
    stopped = [*base, "--out", str(tmp_path / "stopped")]
    assert script.main([*stopped, "--stop-after", "3"]) == 0  # inside the reader stage (random code noise)
    log = tmp_path / "stopped" / "log.jsonl"
    with open(log, "a") as f:  # a killed run's lines after its last checkpoint
        f.write(json.dumps({"step": 4, "stage": "reader", "loss": 1.0}) + "\n")
    assert script.main(stopped) == 0
    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_train_video_model_refuses_bad_input(tmp_path, capsys):
    import os
    from helpers_inputs import refused, snapshot
    script = _script("train_video_model")
    out = tmp_path / "run"
    for bad, msg in ((["--batch-size", "1"], "an integer >= 2"), (["--frames", "0"], "an integer >= 1"),
                     (["--eval-every", "0"], "an integer >= 1"), (["--reader-lr", "0"], "a finite number > 0"),
                     (["--short-share", "1.5"], "<= 1"), (["--stop-after", "0"], "an integer >= 1"),
                     (["--text-steps", "0", "--reader-steps", "0", "--vision-steps", "0", "--joint-steps", "0"],
                      "give at least one stage a step"),
                     (["--init-from", str(tmp_path / "none.pt")], "no such file")):
        refused(script.main, ["--out", str(out), *bad], capsys, msg)
    assert not out.exists()

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    torch.save({"model": {}, "x": Exploit()}, tmp_path / "evil.pt")
    args = ["--size", "tiny", "--out", str(out), "--text-steps", "1", "--reader-steps", "0", "--vision-steps", "0",
            "--joint-steps", "0", "--no-progress"]
    refused(script.main, [*args, "--init-from", str(tmp_path / "evil.pt")], capsys, "refused to load",
            "can run code")
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((tmp_path / "evil.pt").read_bytes())  # a resume file swapped for it
    before = snapshot(out)
    refused(script.main, args, capsys, "checkpoint.pt: refused to load")
    assert not (tmp_path / "pwned").exists() and snapshot(out) == before
