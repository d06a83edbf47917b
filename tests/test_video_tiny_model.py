"""Tiny offline LLaVA-NeXT-Video: build, processor on real frames, generate, save/load round trip."""

import numpy as np
import pytest
import torch

from video.prompts import conversation, lvb_prompt
from video.datasets import VideoQASample
from video.tiny_model import build_tiny_llava_next_video, load_tiny_llava_next_video, tokens_per_frame

SAMPLE = VideoQASample("s", "s.mp4", "What colour is the large shape?", ["red", "blue", "green", "cyan", "white"], 1,
                       "synthetic")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model, processor = build_tiny_llava_next_video(seed=0, save_dir=path)
    return model, processor, path


def _inputs(processor, num_frames=8):
    text = processor.apply_chat_template(conversation(lvb_prompt(SAMPLE)), add_generation_prompt=True)
    frames = np.random.default_rng(0).integers(0, 256, (num_frames, 64, 64, 3), dtype=np.uint8)
    return text, processor(text=text, videos=frames, return_tensors="pt")


def test_config_and_chat_format(tiny):
    model, processor, _ = tiny
    tc, vc = model.config.text_config, model.config.vision_config
    assert (tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads) == (2, 64, 4, 2)
    assert (vc.num_hidden_layers, vc.hidden_size) == (2, 32)
    assert model.config.text_config._attn_implementation == "eager"
    text, _ = _inputs(processor)
    assert text == "USER: <video>\n" + lvb_prompt(SAMPLE) + " ASSISTANT:"


def test_processor_and_generate(tiny):
    model, processor, _ = tiny
    _, enc = _inputs(processor, num_frames=8)
    assert tuple(enc["pixel_values_videos"].shape) == (1, 8, 3, 56, 56)
    n_video = int((enc["input_ids"] == model.config.video_token_index).sum())
    assert n_video == 8 * tokens_per_frame(processor) == 32
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, enc["input_ids"].shape[1] + 4)


def test_save_load_roundtrip(tiny):
    model, processor, path = tiny
    model2, processor2 = load_tiny_llava_next_video(path)
    _, enc = _inputs(processor)
    _, enc2 = _inputs(processor2)
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    assert torch.equal(enc["pixel_values_videos"], enc2["pixel_values_videos"])
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, model2(**enc2).logits, rtol=0, atol=0)
    assert processor2.tokenizer.convert_tokens_to_ids("<video>") == model2.config.video_token_index


def test_end_to_end_on_synthetic(tiny, tmp_path):
    from video.datasets import load_synthetic
    from video.decoding import read_video
    from video.prompts import build_prompt, parse_answer
    from video.scoring import accuracy_table, make_record
    from video.synthetic import SyntheticConfig, generate_split

    model, processor, _ = tiny
    generate_split(tmp_path, "test", num_samples=2, seed=0, config=SyntheticConfig(frame_counts=(64,)))
    records = []
    for i, s in enumerate(load_synthetic(tmp_path, "test")):
        clip = read_video(s.video_path, num_frames=8)
        text = processor.apply_chat_template(conversation(build_prompt(s)), add_generation_prompt=True)
        enc = processor(text=text, videos=clip.frames, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        reply = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        records.append(make_record(s, reply, parse_answer(s, reply, seed=0, index=i)))
    table = accuracy_table(records)
    assert table["n"] == 2 and all(r.prediction in "ABCDE" for r in records)
