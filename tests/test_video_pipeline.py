"""Llava-Next-Video adapter exactness (keep-all == model.generate; evict == mask in its language model) and the
per-sample error path of the pipeline."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from namm_transfer import H2O, FullCache, NAMMPolicy, Recency
from namm_transfer.adapters.causal_lm import chunk_bounds
from namm_transfer.adapters.video_lm import embed_inputs, generate_video, video_positions
from video.datasets import VideoQASample, load_synthetic
from video.pipeline import run_sample
from video.prompts import conversation, lvb_prompt
from video.synthetic import SyntheticConfig, generate_split
from video.tiny_model import build_tiny_llava_next_video

from helpers_core import eviction_recorder, masked_reference_logits

SAMPLE = VideoQASample("s", "s.mp4", "What colour is the large shape when the counter shows 3?",
                       ["red", "blue", "green", "cyan", "white"], 1, "synthetic")


def _enc(processor, num_frames=32, seed=0):
    text = processor.apply_chat_template(conversation(lvb_prompt(SAMPLE)), add_generation_prompt=True)
    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, 64, 64, 3), dtype=np.uint8)
    return processor(text=text, videos=frames, return_tensors="pt")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava_next_video(seed=0)


def test_split_points():
    assert chunk_bounds(0, 300, 128, 512) == [(0, 128), (128, 256), (256, 300)]
    assert chunk_bounds(0, 100, 128, 32) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert chunk_bounds(10, 70, 16, 24) == [(10, 16), (16, 24), (24, 32), (32, 48), (48, 64), (64, 70)]


def test_keep_all_equals_model_generate():
    model, processor = build_tiny_llava_next_video(seed=0)  # own copy: the reference runs on untouched attention
    enc = _enc(processor)
    ref = model.generate(**enc, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_tokens = ref.sequences[0, enc["input_ids"].shape[1]:].tolist()
    with torch.no_grad():
        ref_prefill = model(**enc).logits
    for policy, chunk in [(FullCache(), 128), (FullCache(delay=32), 48), (NAMMPolicy(delay=32), 40)]:
        res = generate_video(model, enc, policy, max_new_tokens=10, chunk_size=chunk, keep_logits=True,
                             tokenizer=processor.tokenizer)
        assert res.tokens[0] == ref_tokens, policy.name
        torch.testing.assert_close(res.prefill_logits, ref_prefill.float(), atol=1e-4, rtol=1e-4)
        for got, want in zip(res.step_logits, ref.logits):
            torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)
        assert res.realised_fraction == 1.0 and res.video_kept_fraction == 1.0
        assert res.video_tokens == 32 * 4 and res.peak_cache_bytes > 0
    assert res.text[0] == processor.tokenizer.decode(ref_tokens, skip_special_tokens=True)


class _EmbedsAsLM:
    """The Llava language model + lm_head on fixed inputs_embeds, called like a causal LM, so the core tests'
    brute-force `masked_reference_logits` can run on it (input_ids only give the shape)."""

    def __init__(self, model, embeds):
        self.model, self.embeds, self.config = model, embeds, model.config.text_config

    def set_attn_implementation(self, name):
        self.model.model.language_model.set_attn_implementation(name)

    def __call__(self, input_ids, position_ids):
        hidden = self.model.model.language_model(inputs_embeds=self.embeds, position_ids=position_ids)
        return SimpleNamespace(logits=self.model.lm_head(hidden.last_hidden_state))


def _namm(seed=0, scale=0.5):
    return NAMMPolicy(torch.randn(4172, generator=torch.Generator().manual_seed(seed)) * scale, delay=32)


@pytest.mark.parametrize("make_policy", [lambda: H2O(0.3, delay=32), lambda: Recency(40, delay=48), _namm],
                         ids=["h2o", "recency", "namm"])
def test_evict_equals_mask(tiny, make_policy):
    model, processor = tiny
    enc = _enc(processor, seed=1)
    events, on_evict = eviction_recorder()
    res = generate_video(model, enc, make_policy(), max_new_tokens=32, chunk_size=40, eos_token_id=None,
                         keep_logits=True, on_evict=on_evict)
    n = enc["input_ids"].shape[1]
    video = set(torch.nonzero(video_positions(model, enc["input_ids"])[0]).flatten().tolist())
    evicted_video_in_prefill = {p for _, t, per_b in events if t <= n for h in per_b[0] for p in h} & video
    assert evicted_video_in_prefill, "video tokens should be evicted while the prompt is read"
    assert any(t > n for _, t, _ in events), "and eviction goes on while decoding"
    assert res.realised_fraction < 1.0

    # reference: one full forward of the same embeddings (+ generated tokens), keys hidden per layer and KV head
    with torch.no_grad():
        embeds = embed_inputs(model, enc["input_ids"], enc["pixel_values_videos"])
        gen = torch.tensor([res.tokens[0][:-1]])
        embeds = torch.cat([embeds, model.get_input_embeddings()(gen)], dim=1)
    dummy_ids = torch.zeros(embeds.shape[:2], dtype=torch.long)
    tc = model.config.text_config
    ref = masked_reference_logits(_EmbedsAsLM(model, embeds), dummy_ids, events, tc.num_hidden_layers,
                                  tc.num_key_value_heads)
    torch.testing.assert_close(res.prefill_logits, ref[:, :n].float(), atol=1e-4, rtol=1e-4)
    got_steps = torch.stack(res.step_logits, dim=1)
    torch.testing.assert_close(got_steps, ref[:, n - 1:n - 1 + got_steps.shape[1]].float(), atol=1e-4, rtol=1e-4)
    assert model.config.text_config._attn_implementation == "namm_memory"  # restored after the reference


def test_corrupt_video_becomes_error_record(tiny, tmp_path):
    model, processor = tiny
    generate_split(tmp_path, "test", num_samples=2, seed=0, config=SyntheticConfig(frame_counts=(64,)))
    samples = load_synthetic(tmp_path, "test")
    with open(samples[0].video_path, "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    policies = [FullCache(), H2O(0.5, delay=64)]
    broken = run_sample(model, processor, samples[0], policies, num_frames=8)
    fine = run_sample(model, processor, samples[1], policies, index=1, num_frames=8)
    assert len(broken) == 2 and all(r["error"].startswith("VideoDecodeError") for r in broken)
    assert all(r["prediction"] is None and not r["correct"] and r["response"] == "" for r in broken)
    assert all(r["error"] is None and r["num_frames"] == 8 and r["video_tokens"] == 32 for r in fine)
    assert fine[1]["realised_fraction"] < 1.0 == fine[0]["realised_fraction"]


def test_evict_during_video_stops_at_the_video_and_keeps_the_question(tiny):
    model, processor = tiny
    enc = _enc(processor, seed=2)
    is_video = video_positions(model, enc["input_ids"])[0]
    video_end = int(is_video.nonzero().max()) + 1
    events, on_evict = eviction_recorder()
    res = generate_video(model, enc, Recency(16, delay=32), max_new_tokens=4, chunk_size=40, eos_token_id=None,
                         on_evict=on_evict, evict_during="video")
    assert events and all(t <= video_end for _, t, _ in events)
    assert {t for _, t, _ in events} == set(range(32, video_end + 1, 32))
    n = enc["input_ids"].shape[1]
    assert res.video_kept_fraction < 0.5  # Recency(16) at each step inside the video
    n_video = int(is_video.sum())
    last_step = max(t for _, t, _ in events)
    # what is stored at the end: the 16 kept at the last step + every token read after it (prompt and generated)
    assert res.cache_lengths == [16 + (n - last_step) + 3] * model.config.text_config.num_hidden_layers
    assert n_video > 16
    with pytest.raises(ValueError, match="evict_during"):
        generate_video(model, enc, Recency(16, delay=32), max_new_tokens=1, evict_during="question")
