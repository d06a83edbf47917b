"""The causal fast path (issue 20): taken exactly when no slot is hidden beyond causality, and results unchanged."""
import pytest
import torch

from namm_transfer import H2O, FullCache, L2Norm, NAMMPolicy, Recency
from namm_transfer import attention as attn

from helpers_core import run_with_policy, tiny_model

L = 400


def counts_during(fn):
    before = dict(attn.FAST_PATH_CALLS)
    out = fn()
    return out, {k: attn.FAST_PATH_CALLS[k] - before[k] for k in before}


def without_fast_path(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(attn, "causal_fast_path", lambda *a, **k: None)
        return fn()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk", [64, L])
def test_full_cache_takes_the_fast_path_and_equals_the_plain_model(arch, chunk, monkeypatch):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    run = lambda: run_with_policy(model, ids, FullCache(), chunk=chunk, decode_from=L - 20)  # noqa: E731
    (got, _, _), n = counts_during(run)
    layers = 2
    assert n["causal"] == layers  # the first forward has no older slot: is_causal
    assert n["single"] == layers * 20
    assert n["bottom_right"] == layers * (-(-(L - 20) // chunk) - 1)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    slow, _, _ = without_fast_path(monkeypatch, run)
    assert torch.allclose(got, slow, atol=1e-5)


@pytest.mark.parametrize("policy", [lambda: L2Norm(0.5, delay=128), lambda: Recency(150, delay=96)])
def test_evicting_policies_without_attention_take_the_fast_path_after_evictions(policy, monkeypatch):
    model = tiny_model("qwen2")
    ids = torch.randint(0, 128, (1, L), generator=torch.Generator().manual_seed(1))
    run = lambda: run_with_policy(model, ids, policy(), chunk=64, decode_from=L - 20)  # noqa: E731
    (got, cache, events), n = counts_during(run)
    assert any(len(h) for _, _, per_b in events for per_h in per_b for h in per_h), "nothing evicted"
    assert n["bottom_right"] > 0 and n["single"] == 2 * 20
    slow, _, _ = without_fast_path(monkeypatch, run)
    assert torch.allclose(got, slow, atol=1e-5), (got - slow).abs().max()


@pytest.mark.parametrize("policy", [lambda: H2O(0.5, delay=128),
                                    lambda: NAMMPolicy(torch.randn(4172, generator=torch.Generator().manual_seed(0))
                                                       * 0.5, delay=128)])
def test_policies_reading_attention_never_take_the_fused_path(policy, monkeypatch):
    """Policies that read the attention get explicit probabilities; where nothing hides a key beyond causality only
    the piece's own q x q corner is masked ("probs"), and everything (logits, kept slots) equals the fully masked
    explicit path."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(2))
    run = lambda: run_with_policy(model, ids, policy(), chunk=64, decode_from=290)  # noqa: E731
    (got, _, events), n = counts_during(run)
    assert n["causal"] == n["single"] == n["bottom_right"] == 0 and n["probs"] > 0
    assert any(len(h) for _, _, per_b in events for per_h in per_b for h in per_h), "nothing evicted"
    slow, _, slow_events = without_fast_path(monkeypatch, run)
    assert events == slow_events
    assert torch.allclose(got, slow, atol=1e-5), (got - slow).abs().max()


def test_padded_batch_never_takes_the_fast_path():
    from namm_transfer.adapters.causal_lm import generate
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    (res, n) = counts_during(lambda: generate(model, ids, FullCache(), max_new_tokens=4, chunk_size=64,
                                              attention_mask=mask))
    assert sum(n.values()) == 0
    alone = generate(model, ids[1:, 40:], FullCache(), max_new_tokens=4, chunk_size=64)
    assert res.tokens[1] == alone.tokens[0]


def test_a_window_that_hides_keys_disables_the_fast_path():
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=48,
                        max_position_embeddings=4096)
    model = MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    (got, _, _), n = counts_during(lambda: run_with_policy(model, ids, FullCache(), chunk=32, decode_from=190))
    assert n["causal"] == 2 and n["bottom_right"] == 0 and n["single"] == 0  # only the first chunk (32 <= 48)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def test_snapkv_computes_attention_only_for_its_window(monkeypatch):
    from namm_transfer import SnapKV
    from namm_transfer.cache import MemoryLayer
    model = tiny_model("qwen2")
    ids = torch.randint(0, 128, (1, L), generator=torch.Generator().manual_seed(5))
    recorded = []
    record = MemoryLayer.record
    monkeypatch.setattr(MemoryLayer, "record", lambda self, probs, a, e: (recorded.append(probs.shape[2]),
                                                                         record(self, probs, a, e))[1])

    def run(window_only):
        policy = SnapKV(0.4, window=16, delay=128)
        if not window_only:
            policy.attention_window = None
        recorded.clear()
        got, _, events = run_with_policy(model, ids, policy, chunk=48, decode_from=L - 20)
        return got, events, sum(recorded)

    got, events, n_window = run(True)
    ref, ref_events, n_all = run(False)
    assert events == ref_events and any(len(h) for _, _, per_b in events for per_h in per_b for h in per_h)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert n_all == 2 * L
    assert n_window == 2 * 16 * (L // 128)  # the window before each of the 3 steps, in each of 2 layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q, t", [(5, 5), (5, 12), (1, 1), (1, 6), (7, 7)])
def test_tail_masking_equals_the_explicit_visibility(dtype, q, t):
    """attend's per-slot validity + causal corner gives the bits of the full (B, H, q, N) visibility mask: the
    same probabilities and outputs, with softcap and sinks too."""
    g = torch.Generator().manual_seed(q * 100 + t)
    b, h, h_kv, d, older = 3, 6, 2, 8, 20
    n = older + t
    query = torch.randn(b, h, q, d, generator=g).to(dtype)
    key, value = (torch.randn(b, h_kv, n, d, generator=g).to(dtype) for _ in range(2))
    older_valid = torch.rand(b, h_kv, older, generator=g) > 0.4
    older_valid[1] = True  # one row with nothing hidden among its older slots
    ahead = torch.arange(t)[None, :] > torch.arange(q)[:, None]
    visible = torch.cat([older_valid[:, :, None, :].expand(b, h_kv, q, older),
                         (~ahead).expand(b, h_kv, q, t)], dim=-1)
    for spec in (attn.AttentionSpec(scaling=d ** -0.5), attn.AttentionSpec(scaling=0.3, softcap=5.0),
                 attn.AttentionSpec(scaling=0.3, sinks=torch.randn(h, generator=g))):
        ref_out, ref_p = attn.attend(query, key, value, visible, spec, True)
        out, p = attn.attend(query, key, value, None, spec, True, blind_rows=False, causal_tail=True,
                             older_valid=older_valid)
        assert torch.equal(p, ref_p) and torch.equal(out, ref_out)


def rows_evicting_differently():
    """A two-member NAMM population on a batch of 2 (row b = member b), stepping every 32 tokens."""
    from namm_transfer.namm import NAMMConfig
    cfg = NAMMConfig(delay=32)
    pop = torch.randn(2, cfg.num_params, generator=torch.Generator().manual_seed(3)) * 0.5
    return NAMMPolicy(pop, cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [48, 100])
def test_lockstep_rows_after_evictions_take_the_tail_path_with_the_same_bits(chunk, dtype, monkeypatch):
    """Rows that evict differently (invalid slots in some rows, forwards cut at the steps, so the tail holds later
    queries' keys too) take the "tail" path and give the bits of the explicit visibility: logits and evictions."""
    model = tiny_model("llama").to(dtype)
    ids = torch.randint(0, 128, (2, 220), generator=torch.Generator().manual_seed(6))
    run = lambda: run_with_policy(model, ids, rows_evicting_differently(), chunk=chunk, decode_from=210)  # noqa: E731
    (got, cache, events), n = counts_during(run)
    assert n["tail"] > 0
    assert not all(layer.all_valid for layer in cache.layers), "no row holds an invalid slot"
    with monkeypatch.context() as m:
        m.setattr(attn, "lockstep_tail", lambda *a, **k: None)
        (slow, _, slow_events), n_slow = counts_during(run)
    assert n_slow["tail"] == 0
    assert events == slow_events and torch.equal(got, slow)


def test_padded_rows_keep_the_explicit_visibility():
    """With padding (rows not in lockstep) the tail path never runs: padding slots are not older keys."""
    from namm_transfer.adapters.causal_lm import generate
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    _, n = counts_during(lambda: generate(model, ids, H2O(0.5, delay=32), max_new_tokens=4, chunk_size=64,
                                          attention_mask=mask))
    assert n["tail"] == 0
