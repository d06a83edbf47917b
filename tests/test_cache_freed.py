"""A MemoryCache is freed as soon as nothing refers to it, without waiting for Python's cycle collector.

A cache in a reference cycle (its layers pointing back at it, a callback closing over it) keeps its keys and values
until the collector happens to run: on a GPU the caches of earlier samples piled up (the 7B video check's peak
memory grew by about one KV cache per sample). Each test runs with the collector off."""
import gc
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from namm_transfer import H2O, FullCache, MemoryCache, NAMMPolicy
from namm_transfer.adapters.causal_lm import generate
from namm_transfer.adapters.video_lm import generate_video
from video.prompts import conversation, lvb_prompt
from video.tiny_model import build_tiny_llava_next_video

sys.path.insert(0, str(Path(__file__).parent))
from helpers_core import run_with_policy, tiny_model  # noqa: E402
from test_video_pipeline import SAMPLE  # noqa: E402


@pytest.fixture
def made_caches(monkeypatch):
    """Weak references to every MemoryCache built while the test runs; the cycle collector is off meanwhile."""
    refs = []
    init = MemoryCache.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        refs.append(weakref.ref(self))

    monkeypatch.setattr(MemoryCache, "__init__", recording_init)
    gc.collect()
    gc.disable()
    try:
        yield refs
    finally:
        gc.enable()


def _namm():
    return NAMMPolicy(torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5, delay=32)


POLICIES = {"full": FullCache, "h2o": lambda: H2O(48, delay=32), "namm": _namm}


@pytest.mark.parametrize("name", list(POLICIES))
def test_a_dropped_cache_is_freed_at_once(made_caches, name):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(1))
    _, cache, events = run_with_policy(model, ids, POLICIES[name]())
    assert name == "full" or events  # the evicting policies did evict
    forked = cache.fork(POLICIES[name](), repeats=2, rows=[1])  # a fork is a cache of its own
    del cache, forked
    assert made_caches and all(r() is None for r in made_caches)


def test_a_layer_outliving_its_cache_says_so():
    model = tiny_model("llama")
    _, cache, _ = run_with_policy(model, torch.randint(0, 128, (1, 20)), FullCache())
    layer = cache.layers[0]
    del cache
    with pytest.raises(ReferenceError, match="keep a reference to the cache"):
        layer.cache


def test_language_generation_frees_its_cache(made_caches):
    model = tiny_model("qwen2")
    generate(model, torch.randint(0, 128, (1, 100)), H2O(40, delay=32), max_new_tokens=4, chunk_size=32)
    assert len(made_caches) == 1 and made_caches[0]() is None


def test_video_generation_frees_its_cache(made_caches):
    model, processor = build_tiny_llava_next_video(seed=0)
    text = processor.apply_chat_template(conversation(lvb_prompt(SAMPLE)), add_generation_prompt=True)
    frames = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    enc = processor(text=text, videos=frames, return_tensors="pt")
    res = generate_video(model, enc, _namm(), max_new_tokens=3, chunk_size=40)
    assert res.peak_kv_bytes > 0  # the meter sampled the cache through its layers
    assert len(made_caches) == 1 and made_caches[0]() is None


@pytest.mark.parametrize("name", ["h2o", "namm"])
def test_a_deep_copy_goes_on_by_itself(name):
    """copy.deepcopy(cache) after a prompt (transformers' prompt reuse): the copy's layers belong to the copy, it
    lives on when the original is dropped, and both continue exactly as the uncopied cache does."""
    import copy
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    whole, _, _ = run_with_policy(model, ids, POLICIES[name]())
    _, cache, _ = run_with_policy(model, ids[:, :128], POLICIES[name]())
    twin = copy.deepcopy(cache)
    assert all(layer.cache is twin for layer in twin.layers) and all(l.cache is cache for l in cache.layers)
    pos = torch.arange(128, 200)[None]
    with torch.no_grad():
        first = model(input_ids=ids[:, 128:], cache=cache, use_cache=True, position_ids=pos).logits
        del cache  # the copy must not need its original
        second = model(input_ids=ids[:, 128:], cache=twin, use_cache=True, position_ids=pos).logits
    assert torch.equal(first, second)
    assert torch.allclose(second, whole[:, 128:], atol=1e-5)  # = the uncopied run (fed in other chunks)
