"""Exactness of the memory cache: keep-all == unmodified model; evict == mask; batching; bad input."""
import pytest
import torch

from namm_transfer import (CaptureError, FullCache, H2O, L2Norm, MemoryCache, NAMMConfig, NAMMPolicy,
                           RandomEviction, Recency, SnapKV, enable_memory_attention)
from namm_transfer.adapters.causal_lm import chunk_bounds, generate

from helpers_core import masked_reference_logits, run_with_policy, tiny_model

ARCHS = ["llama", "qwen2", "gpt2"]
L = 700


def kv_heads(model):
    c = model.config
    return getattr(c, "num_key_value_heads", None) or c.num_attention_heads


def namm_policy(scale=0.5, seed=0, delay=128):
    g = torch.Generator().manual_seed(seed)
    return NAMMPolicy(torch.randn(4172, generator=g) * scale, delay=delay)


def policies():
    return {"h2o": H2O(0.5, delay=128), "l2": L2Norm(0.5, delay=128), "recency": Recency(200, delay=96),
            "snapkv": SnapKV(0.4, delay=128), "random": RandomEviction(0.3, seed=1, delay=100),
            "namm": namm_policy()}


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_all_reproduces_unmodified_model(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for policy in [FullCache(), NAMMPolicy(delay=128)]:
        got, cache, _ = run_with_policy(model, ids, policy, chunk=64, decode_from=600)
        assert torch.allclose(got, ref, atol=1e-4), (arch, policy.name, (got - ref).abs().max())
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        assert cache.cache_lengths() == [float(L)] * 2
    # NAMM with zero parameters really ran its eviction steps
    assert cache.log and all(r.before == r.after for r in cache.log)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["h2o", "l2", "recency", "snapkv", "random", "namm"])
def test_evict_equals_mask(arch, name):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, L), generator=torch.Generator().manual_seed(1))
    policy = policies()[name]
    got, cache, events = run_with_policy(model, ids, policy, chunk=64, decode_from=640)
    evicted = sum(len(h) for _, _, per_b in events for per_h in per_b for h in per_h)
    assert evicted > 0, "the policy should evict something in this test"
    ref = masked_reference_logits(model, ids, events, 2, kv_heads(model))
    assert torch.allclose(got, ref, atol=1e-4), (arch, name, (got - ref).abs().max())


def test_namm_heads_evict_differently_and_positions_are_original():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, L), generator=torch.Generator().manual_seed(2))
    _, cache, events = run_with_policy(model, ids, namm_policy(scale=1.0, seed=3), chunk=64)
    layer = cache.layers[0]
    # kept keys carry their original absolute positions, in chronological order, ending at the newest token
    assert torch.all(layer.positions[..., 1:] > layer.positions[..., :-1])
    assert layer.positions[0, 0, -1].item() == L - 1
    # decisions are per KV head: the cache keeps a different set in each head when the policy says so
    _, _, events = run_with_policy(model, ids, RandomEviction(0.3, seed=2, delay=128), chunk=64)
    assert any(per_b[0][0] != per_b[0][1] for _, _, per_b in events)


def test_population_batch_equals_separate_runs():
    """P NAMM members on the same prompt in one batched forward == P separate runs (rows keep different
    numbers of tokens, so padding slots are exercised)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(3))
    pop = torch.stack([torch.randn(4172, generator=torch.Generator().manual_seed(s)) * 0.5 for s in range(3)])
    together, cache, _ = run_with_policy(model, ids.expand(3, -1), NAMMPolicy(pop, delay=128), chunk=64)
    lengths = [cache.layers[0].valid[b, 0].sum().item() for b in range(3)]
    assert len(set(lengths)) > 1, lengths
    for p in range(3):
        alone, _, _ = run_with_policy(model, ids, NAMMPolicy(pop[p], delay=128), chunk=64)
        assert torch.allclose(together[p], alone[0], atol=1e-4)


def test_budget_means_fraction_of_tokens_seen():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 512), generator=torch.Generator().manual_seed(4))
    for budget, expect in [(0.25, 128), (100, 100)]:
        _, cache, _ = run_with_policy(model, ids, L2Norm(budget, delay=256), chunk=64)
        assert cache.cache_lengths() == [float(expect)] * 2
        assert cache.realised_fraction() == pytest.approx(expect / 512)


def test_uncapturable_attention_raises_clear_error():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")  # memory attention not enabled
    cache = MemoryCache(H2O(0.5))
    with pytest.raises(CaptureError, match="enable_memory_attention"):
        model(input_ids=torch.zeros(1, 8, dtype=torch.long), cache=cache, use_cache=True)


def test_wrong_parameter_count_raises():
    with pytest.raises(ValueError, match="4172"):
        NAMMPolicy(torch.zeros(100))


def test_generate_adapter_matches_hf_generate():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(5))
    model.set_attn_implementation("sdpa")
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 300:].tolist()
    res = generate(model, ids, FullCache(), max_new_tokens=12, chunk_size=128)
    assert res.tokens[0] == ref
    assert res.realised_fraction == 1.0 and res.tokens_seen == 311


def test_chunk_bounds_follow_absolute_multiples():
    assert chunk_bounds(0, 300, 128) == [(0, 128), (128, 256), (256, 300)]
    assert chunk_bounds(300, 600, 128) == [(300, 384), (384, 512), (512, 600)]


def test_fork_after_shared_prefix_equals_direct_batched_run():
    """Prefix computed once (batch 1, HoldPolicy) then forked to 3 NAMM members == running all 3 from scratch."""
    from namm_transfer.policies import HoldPolicy
    model = tiny_model("llama")
    enable_memory_attention(model)
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(6))
    pop = torch.stack([torch.randn(4172, generator=torch.Generator().manual_seed(s)) * 0.5 for s in range(3)])
    direct, _, _ = run_with_policy(model, ids.expand(3, -1), NAMMPolicy(pop, delay=128), chunk=64)
    policy = NAMMPolicy(pop, delay=128)
    shared = MemoryCache(HoldPolicy(policy))
    with torch.no_grad():
        outs = [model(input_ids=ids[:, s:s + 64], cache=shared, use_cache=True,
                      position_ids=torch.arange(s, s + 64)[None]).logits.expand(3, -1, -1) for s in (0, 64)]
        cache = shared.fork(policy, 3)
        for s in range(128, 400, 64):
            e = min(s + 64, 400)
            outs.append(model(input_ids=ids[:, s:e].expand(3, -1), cache=cache, use_cache=True,
                              position_ids=torch.arange(s, e)[None].expand(3, -1)).logits)
    assert torch.allclose(torch.cat(outs, 1), direct, atol=1e-5)
    assert cache.realised_fraction() < 1.0


def test_chunk_bounds_also_cut_at_delay_multiples():
    assert chunk_bounds(0, 300, 128, delay=96) == [(0, 96), (96, 128), (128, 192), (192, 256), (256, 288),
                                                   (288, 300)]


def test_snapkv_first_step_inside_window():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(7))
    res = generate(model, ids, SnapKV(0.5, window=32, delay=32), max_new_tokens=2, chunk_size=32)
    assert len(res.tokens[0]) == 2


def test_gqa_mean_is_taken_in_the_attention_dtype():
    """With bf16 attention (NAMM's reference setting) the mean over the query heads of a KV head is itself
    rounded to bf16, as the reference computes it, not averaged in fp32."""
    from namm_transfer.cache import MemoryLayer
    cache = MemoryCache(NAMMPolicy())  # a layer refers to its cache weakly: the test keeps it
    layer = MemoryLayer(cache, 0)
    layer.keys = torch.zeros(1, 2, 40, 4)
    layer._real = None
    probs = torch.softmax(torch.randn(1, 6, 16, 40, generator=torch.Generator().manual_seed(0)) * 3, -1)
    layer.record(probs, 0, 16)
    got = layer.stream.history[:, :, -16:]  # NAMM streams its attention: the last query rows it holds
    rounded = probs.to(torch.bfloat16).view(1, 2, 3, 16, 40)
    assert got.dtype == torch.bfloat16 and torch.equal(got, rounded.mean(2))
    assert not torch.equal(got.float(), rounded.float().mean(2))  # what an fp32 mean would have given


@pytest.mark.parametrize("name", ["recency", "namm"])
def test_decoding_after_evictions_never_copies_the_cache(name):
    """Keys, values, columns and validity are views of per-layer storage: decoding writes each new slot in place
    and an eviction step compacts inside the same storage, so after the prefill no forward reallocates or copies
    the cache (storage identity), while the logits stay those of the masked reference."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 320), generator=torch.Generator().manual_seed(3))
    policy = Recency(0.5, delay=32) if name == "recency" else namm_policy(delay=32)
    enable_memory_attention(model)
    cache = MemoryCache(policy)
    with torch.no_grad():
        model(input_ids=ids[:, :256], cache=cache, use_cache=True)
        layers = cache.layers
        storage = [l.storage["keys"] for l in layers]
        steps_before = len(cache.log)
        for t in range(256, 320):  # 64 decoding steps, two eviction steps per layer among them
            model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            for layer, st in zip(layers, storage):
                assert layer.storage["keys"] is st
                for name_ in ("keys", "values", "columns", "valid"):
                    view = getattr(layer, name_)
                    assert view.untyped_storage().data_ptr() == layer.storage[name_].untyped_storage().data_ptr()
                    assert view.data_ptr() == layer.storage[name_].data_ptr()  # the first slot is the storage's
    assert len(cache.log) > steps_before and any(r.after < r.before for r in cache.log[steps_before:])


def test_storage_grows_geometrically_not_per_forward():
    """Appending one token at a time reallocates the storage only when its headroom runs out (O(log) times)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(4))
    enable_memory_attention(model)
    cache = MemoryCache(FullCache())
    seen = set()
    with torch.no_grad():
        for t in range(ids.shape[1]):
            model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            seen.add(cache.layers[0].storage["keys"].data_ptr())
    assert len(seen) <= 3, f"{len(seen)} allocations for 600 appended tokens"
    assert cache.layers[0].capacity() >= 600 and cache.layers[0].length == 600


def full_cache_after(tokens: int) -> MemoryCache:
    """A full MemoryCache after one forward of `tokens` zeros through the tiny Llama."""
    model = tiny_model("llama")
    enable_memory_attention(model)
    cache = MemoryCache(FullCache())
    with torch.no_grad():
        model(input_ids=torch.zeros(1, tokens, dtype=torch.long), cache=cache, use_cache=True)
    return cache


def test_beam_search_reordering_is_refused():
    cache = full_cache_after(8)
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.layers[0].reorder_cache(torch.tensor([0]))


def test_fork_into_an_attention_policy_needs_the_attention_recorded():
    cache = full_cache_after(40)
    with pytest.raises(ValueError, match="HoldPolicy"):
        cache.fork(NAMMPolicy(delay=32))
    cache.fork(L2Norm(0.5, delay=32))  # a policy that reads no attention can take over
