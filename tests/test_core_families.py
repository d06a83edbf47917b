"""The memory attention on families the core tests do not name: sliding windows (per layer), logit soft-caps,
attention sinks, partial rotary, mixture of experts. Keep-all == the model's own eager attention; evict == that
attention with the evicted keys hidden; what is not reproduced is refused before any output."""
import dataclasses

import pytest
import torch
import transformers as T

import namm_transfer.attention as memory_attention_module
from namm_transfer import (CaptureError, FullCache, H2O, MemoryCache, NAMMPolicy, UnsupportedAttention,
                           enable_memory_attention)
from namm_transfer.adapters.causal_lm import generate

from helpers_core import run_with_policy
from helpers_families import FAMILIES, VOCAB, WINDOW, eager_logits, family_model

L, DELAY, CHUNK, DECODE_FROM = 300, 64, 40, 280  # 4 eviction steps per layer; chunks straddle them; 20 decode steps


def prompt(seed=0, n=L):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def random_namm(seed=0):
    return NAMMPolicy(torch.randn(4172, generator=torch.Generator().manual_seed(seed)) * 0.5, delay=DELAY)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_keep_all_equals_the_models_own_attention(name):
    """FullCache and a zero NAMM (whose steps run and keep everything) in 40-token chunks + single-token decoding,
    and one 300-token forward (eviction steps inside it), equal the model's eager attention on the whole prompt."""
    model = family_model(name)
    ids = prompt()
    ref = eager_logits(model, ids)
    for policy in (FullCache(), NAMMPolicy(delay=DELAY)):
        got, cache, _ = run_with_policy(model, ids, policy, chunk=CHUNK, decode_from=DECODE_FROM)
        assert torch.allclose(got, ref, atol=1e-4), (name, policy.name, (got - ref).abs().max())
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    attention_layers = len(cache.kv_layers)  # a hybrid's linear-attention layers hold states, no keys
    assert attention_layers >= 1 and len(cache.log) == attention_layers * (L // DELAY)
    assert all(r.before == r.after for r in cache.log)
    enable_memory_attention(model)
    cache = MemoryCache(NAMMPolicy(delay=DELAY))
    with torch.no_grad():
        one_shot = model(input_ids=ids, cache=cache, use_cache=True).logits
    assert torch.allclose(one_shot, ref, atol=1e-4) and len(cache.log) == attention_layers * (L // DELAY)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_evict_equals_eager_attention_with_the_evicted_keys_hidden(name):
    model = family_model(name)
    ids = prompt(1)
    for policy in (H2O(0.5, delay=DELAY), random_namm()):
        got, cache, events = run_with_policy(model, ids, policy, chunk=CHUNK, decode_from=DECODE_FROM)
        assert cache.realised_fraction() < 0.7
        ref = eager_logits(model, ids, events)
        assert torch.allclose(got, ref, atol=1e-4), (name, policy.name, (got - ref).abs().max())


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss", "mistral-window"])
def test_bf16_follows_the_models_own_rounding(name):
    """In bf16 the memory attention rounds where the model's eager attention rounds (fp32 softmax cast to bf16;
    GPT-OSS: the sink softmax in bf16): equal here bit for bit; an fp32 sink softmax was 2.6 away."""
    model = family_model(name).to(torch.bfloat16)
    ids = prompt()
    ref = eager_logits(model, ids).float()
    got, _, _ = run_with_policy(model, ids, NAMMPolicy(delay=DELAY), chunk=CHUNK, decode_from=DECODE_FROM)
    assert (got.float() - ref).abs().max() < 0.5
    got, _, events = run_with_policy(model, ids, H2O(0.5, delay=DELAY), chunk=CHUNK, decode_from=DECODE_FROM)
    assert (got.float() - eager_logits(model, ids, events).float()).abs().max() < 0.5


@pytest.mark.parametrize("name, feature", [("gemma2", "softcap"), ("gpt_oss", "sinks"), ("mistral-window", "mask")])
def test_dropping_a_feature_is_caught(name, feature, monkeypatch):
    """The checks above can fail: the same run with one feature switched off in the memory attention is far
    from the reference (the window lives in the model's mask; dropping the mask loses it)."""
    model = family_model(name)
    ids = prompt()
    ref = eager_logits(model, ids)
    if feature == "mask":
        monkeypatch.setattr(memory_attention_module, "boolean_mask", lambda *a: None)
        spec = memory_attention_module.attention_spec
        monkeypatch.setattr(memory_attention_module, "attention_spec",
                            lambda *a: dataclasses.replace(spec(*a), sliding_window=None))
    else:
        spec = memory_attention_module.attention_spec
        monkeypatch.setattr(memory_attention_module, "attention_spec",
                            lambda *a: dataclasses.replace(spec(*a), **{feature: None}))
    got, _, _ = run_with_policy(model, ids, FullCache(), chunk=CHUNK, decode_from=DECODE_FROM)
    assert (got - ref).abs().max() > 1.0


def test_window_hides_keys_eviction_kept():
    """A key outside a query's window stays hidden however the policy ranks it: with everything kept, the
    window layer's attention never reaches back more than WINDOW columns."""
    model = family_model("mistral-window")
    enable_memory_attention(model)
    with torch.no_grad():
        out = model(input_ids=prompt(), cache=MemoryCache(FullCache()), use_cache=True, output_attentions=True)
    att = out.attentions[0][0]  # (H, L, L) over sequence columns
    q, k = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    assert att[:, (k <= q - WINDOW) | (k > q)].abs().max() == 0
    assert torch.allclose(att.sum(-1), torch.ones(()), atol=1e-5)


def test_unknown_attention_features_are_refused_before_any_output():
    model = family_model("mistral")
    enable_memory_attention(model)
    with pytest.raises(UnsupportedAttention, match="MistralAttention passes foo_bias"):
        model(input_ids=prompt(n=8), cache=MemoryCache(FullCache()), use_cache=True, foo_bias=torch.ones(1))
    with torch.no_grad():  # a plain forward afterwards is unaffected by the refused cache
        assert torch.allclose(model(input_ids=prompt(n=8)).logits, eager_logits(model, prompt(n=8)), atol=1e-4)


def test_dropout_in_training_and_non_causal_attention_are_refused():
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    model = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attention_dropout=0.1)).train()
    enable_memory_attention(model)
    with pytest.raises(UnsupportedAttention, match="dropout"):
        model(input_ids=prompt(n=8), cache=MemoryCache(FullCache()), use_cache=True)
    model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**cfg, head_dim=16, use_bidirectional_attention=True)).eval()
    enable_memory_attention(model)
    with pytest.raises(UnsupportedAttention, match="non-causal"):
        model(input_ids=prompt(n=8), cache=MemoryCache(FullCache()), use_cache=True)


def test_a_family_whose_attention_cannot_be_routed_is_refused_when_enabling():
    model = T.FalconForCausalLM(T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4))
    with pytest.raises(CaptureError, match="FalconForCausalLM: this model family is not supported"):
        enable_memory_attention(model)


@pytest.mark.parametrize("name, config, model_cls, extra, what", [
    ("diffllama", T.DiffLlamaConfig, T.DiffLlamaForCausalLM, {}, "values"),  # two calls over halves of V
])
def test_families_that_change_the_cached_tensors_are_refused(name, config, model_cls, extra, what):
    """Attention routed through the interface, but over tensors derived from what the cache stored: refused at
    the first forward (DiffLlama's keep-everything run was 7.1 logits away from the model before this check)."""
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = model_cls(config(**{**cfg, **extra})).eval()
    enable_memory_attention(model)
    with pytest.raises(UnsupportedAttention, match=f"attends over {what} other than the ones it stored"):
        model(input_ids=prompt(n=8), cache=MemoryCache(FullCache()), use_cache=True)


def test_latent_attention_expands_the_kept_latents_and_refuses_anything_else():
    """Multi-head latent attention (DeepSeek-V3 here) caches one compressed latent per token and expands it into
    every head's key and value after cache.update: eviction drops latents, and what is attended is the expansion
    of the kept ones, compacted with the slots when a step runs inside a forward (one 300-token forward with NAMM
    steps in it, against eager attention with the evicted keys hidden; the chunked runs are in the tests above).
    Refused: an expansion that is not the module's `expand_kv` of the stored latents, and the L2-norm policy (it
    would rank the latents' norms, not the keys')."""
    from helpers_core import eviction_recorder
    from namm_transfer import L2Norm
    from namm_transfer.attention import ATTN_NAME, memory_attention
    from transformers import AttentionInterface
    model = family_model("deepseek_v3-mla")
    ids = prompt(2, n=300)
    enable_memory_attention(model)
    events, on_evict = eviction_recorder()
    cache = MemoryCache(random_namm(3), on_evict=on_evict)
    with torch.no_grad():
        got = model(input_ids=ids, cache=cache, use_cache=True).logits
    assert cache.layers[0].keys.shape[1] == 1 and cache.realised_fraction() < 0.7 and events
    ref = eager_logits(model, ids, events)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    with pytest.raises(UnsupportedAttention, match="L2-norm policy would rank the latents"):
        model(input_ids=prompt(n=8), cache=MemoryCache(L2Norm(0.5, delay=DELAY)), use_cache=True)
    AttentionInterface.register(ATTN_NAME, lambda m, q, k, v, *a, **kw: memory_attention(m, q, k * 1.001, v, *a, **kw))
    try:
        with pytest.raises(UnsupportedAttention, match="attends over keys other than the ones it stored"):
            model(input_ids=prompt(n=8), cache=MemoryCache(FullCache()), use_cache=True)
    finally:
        AttentionInterface.register(ATTN_NAME, memory_attention)


def test_keys_repeated_before_the_attention_function_attend_as_grouped_heads(monkeypatch):
    """A model that expands its grouped KV heads before calling the attention function (repeat_interleave, as
    custom model code often does; JetMoE's tiled repeat runs in the family tests above) attends over the slots as
    grouped heads: keep-all and evicting runs equal the eager references, and the attention weights come back in
    the model's head order; any other head pattern is refused."""
    real = memory_attention_module.memory_attention

    def repeating(f):
        return lambda m, q, k, v, *a, **kw: real(m, q, f(k), f(v), *a, **kw)
    model = family_model("mistral")  # 4 query heads over 2 KV heads
    ids = prompt(3)
    monkeypatch.setattr(memory_attention_module, "memory_attention", repeating(lambda t: t.repeat_interleave(2, 1)))
    for policy in (NAMMPolicy(delay=DELAY), H2O(0.5, delay=DELAY)):
        got, cache, events = run_with_policy(model, ids, policy, chunk=CHUNK, decode_from=DECODE_FROM)
        ref = eager_logits(model, ids, events)
        assert torch.allclose(got, ref, atol=1e-4), (policy.name, (got - ref).abs().max())
    assert cache.realised_fraction() < 0.7
    monkeypatch.setattr(memory_attention_module, "memory_attention",
                        repeating(lambda t: t.repeat_interleave(2, 1).flip(1)))
    with pytest.raises(UnsupportedAttention, match="attends over keys other than the ones it stored"):
        run_with_policy(model, ids, FullCache(), chunk=CHUNK)
    monkeypatch.setattr(memory_attention_module, "memory_attention", real)
    jet = family_model("jetmoe-tiled")  # tiled: query heads regrouped, weights put back in the model's order
    jet.set_attn_implementation("eager")
    with torch.no_grad():
        plain = jet(input_ids=ids[:, :60], output_attentions=True).attentions
    enable_memory_attention(jet)
    with torch.no_grad():
        mine = jet(input_ids=ids[:, :60], cache=MemoryCache(FullCache()), use_cache=True,
                   output_attentions=True).attentions
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, mine)) and len(mine) == len(plain) > 0


def test_a_second_attention_call_per_layer_is_refused(monkeypatch):
    """A family whose layer calls its attention twice over the cached keys (one capture per layer and forward)."""
    import transformers.models.mistral.modeling_mistral as mistral

    real = mistral.ALL_ATTENTION_FUNCTIONS.get_interface

    def twice(name, default):
        fn = real(name, default)
        return lambda *a, **k: (fn(*a, **k), fn(*a, **k))[0]

    monkeypatch.setattr(mistral.ALL_ATTENTION_FUNCTIONS, "get_interface", twice)
    model = family_model("mistral")
    enable_memory_attention(model)
    with pytest.raises(UnsupportedAttention, match="more than once per layer"):
        model(input_ids=prompt(n=8), cache=MemoryCache(FullCache()), use_cache=True)


def test_right_padding_is_refused():
    model = family_model("mistral")
    ids = prompt(n=20)
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    with pytest.raises(UnsupportedAttention, match="only left padding"):
        generate(model, ids, FullCache(), max_new_tokens=2, attention_mask=mask)


def test_a_family_that_asks_its_cache_for_its_own_state_is_refused_by_name():
    """DeepSeek-V4's compressed attention keeps compressor buffers in cache layers of its own type: refused when
    enabling (its config names the layer type); a MemoryCache layer asked for such a method refuses it by name
    (it was an AttributeError from inside the model), and stays an AttributeError for hasattr/getattr probes."""
    cfg = T.DeepseekV4Config(vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_rope_head_dim=2,
                             n_routed_experts=4, num_experts_per_tok=2, index_n_heads=2, index_head_dim=16,
                             layer_types=["heavily_compressed_attention"] * 2, mlp_layer_types=["hash_moe"] * 2)
    torch.manual_seed(0)
    model = T.DeepseekV4ForCausalLM(cfg).eval()
    with pytest.raises(UnsupportedAttention, match="layers of type 'heavily_compressed_attention'"):
        enable_memory_attention(model)
    cache = MemoryCache(FullCache())
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    with pytest.raises(UnsupportedAttention, match="asks layer 0 of its cache for `store_compression_weights`"):
        cache.layers[0].store_compression_weights("compressor", None, None)
    assert not hasattr(cache.layers[0], "store_compression_weights")
    assert getattr(cache.layers[0], "update_compressor_states", None) is None


@pytest.mark.parametrize("name, config, model_cls, extra, layer_type", [
    ("recurrent_gemma", T.RecurrentGemmaConfig, T.RecurrentGemmaForCausalLM, dict(  # state kept in its modules
        head_dim=16, lru_width=64, block_types=["recurrent", "attention"]), "linear_attention"),
    ("jamba", T.JambaConfig, T.JambaForCausalLM, dict(  # Mamba layers fed in chunks differ from one shot
        num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
        attn_layer_offset=1, mamba_d_state=8, mamba_expand=2), "linear_attention"),
])
def test_stateful_families_not_checked_exact_are_refused(name, config, model_cls, extra, layer_type):
    """RecurrentGemma's recurrent blocks keep their state in the modules (a chunked prefill restarts it: keep-all
    was 0.07 logits off the model, silently) and Jamba's Mamba layers give other logits when a prompt is fed in
    chunks, even under transformers' own cache (scripts/chunked_vs_oneshot.py): refused when enabling, by the layer type the config lists. Hybrids whose
    states go through the cache and whose chunked runs equal one-shot ones (attention.HYBRID_FAMILIES) run, the
    MemoryCache holding their states whole (FAMILIES: olmo_hybrid-linear, falcon_h1-hybrid, lfm2-conv)."""
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = model_cls(config(**{**cfg, **extra})).eval()
    with pytest.raises(UnsupportedAttention, match=f"layers of type '{layer_type}'"):
        enable_memory_attention(model)
    cache = MemoryCache(FullCache())
    assert cache.get_conv_state(0) is None and cache.get_recurrent_state(1) is None  # nothing stored yet
    assert not cache.has_previous_state(1)
    with pytest.raises(UnsupportedAttention, match="keeps more than attention keys and values"):
        cache.update_indexer(torch.zeros(1, 2, 4), 1)


def test_chunked_vs_oneshot_separates_exact_hybrids_from_mamba():
    """scripts/chunked_vs_oneshot.py under transformers' own cache: OLMo-hybrid's chunked prefill equals one forward
    to rounding, pure Mamba's does not (float64 does not close the gap) - why one runs and the other is refused."""
    from helpers_inputs import script
    mod = script("chunked_vs_oneshot")
    ids = torch.randint(3, VOCAB, (1, 120), generator=torch.Generator().manual_seed(0))
    assert mod.chunked_vs_oneshot(mod.tiny_model("olmo_hybrid", 150e6), ids, 40) < 1e-4
    assert mod.chunked_vs_oneshot(mod.tiny_model("mamba", 150e6).double(), ids, 40) > 1e-2


def test_a_hybrid_family_not_checked_exact_is_refused_even_past_the_config_check(monkeypatch):
    """The config check is the first guard; the second: an attention call of a family outside HYBRID_FAMILIES after
    a layer stored states in the MemoryCache is refused before any output (Jamba, with the config check removed)."""
    monkeypatch.setattr(memory_attention_module, "refuse_stateful_layers", lambda model: None)
    cfg = T.JambaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1,
                        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
                        mamba_d_state=8, mamba_expand=2)
    torch.manual_seed(0)
    model = T.JambaForCausalLM(cfg).eval()
    enable_memory_attention(model)
    with pytest.raises(UnsupportedAttention, match="not among those checked exact"):
        model(input_ids=prompt(n=8), cache=MemoryCache(FullCache()), use_cache=True)


def test_a_hybrid_cache_holds_the_states_whole_and_evicts_only_attention_layers():
    """OLMo-hybrid (a gated delta-net layer, then attention): the linear layer's states live in the MemoryCache
    and are never evicted; the eviction steps, the realised cache and the tokens seen are the attention layer's."""
    from helpers_core import eviction_recorder
    model = family_model("olmo_hybrid-linear")
    enable_memory_attention(model)
    events, on_evict = eviction_recorder()
    cache = MemoryCache(H2O(0.5, delay=DELAY), on_evict=on_evict)
    with torch.no_grad():
        for s in range(0, 200, 40):
            model(input_ids=prompt(4)[:, s:s + 40], cache=cache, use_cache=True,
                  position_ids=torch.arange(s, s + 40)[None])
    assert list(cache.states) == [0] and [layer.is_initialized for layer in cache.layers] == [False, True]
    assert {layer for layer, _, _ in events} == {1} and cache.get_seq_length() == cache.tokens_seen == 200
    assert cache.has_previous_state(0) and cache.get_recurrent_state(0) is not None
    assert 0.4 < cache.realised_fraction() < 0.7 and cache.stored_bytes() > 0


@pytest.mark.parametrize("name", ["deepseek_v3-mla", "jetmoe-tiled", "olmo_hybrid-linear", "falcon_h1-hybrid",
                                  "lfm2-conv"])
def test_transformers_generate_with_a_memory_cache_equals_its_own_cache(name):
    """The model's own `generate` on a 2-row batch: with a keep-everything MemoryCache the same tokens as with
    transformers' default cache (latent attention, tiled heads, hybrid states)."""
    model = family_model(name)
    ids = torch.randint(3, VOCAB, (2, 50), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    enable_memory_attention(model)
    cache = MemoryCache(FullCache())
    got = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, cache=cache)
    assert torch.equal(got, ref) and cache.tokens_seen == 59  # the cache in use: the prompt and 9 fed-back tokens


def test_a_forked_hybrid_cache_continues_each_row_as_a_direct_run():
    """A shared prefix (batch 1, HoldPolicy) forked into 3 NAMM members, states copied per row, equals running the
    3 members from the start (OLMo-hybrid: linear-attention states; the fork's copies are independent of the
    source's)."""
    from namm_transfer.policies import HoldPolicy
    model = family_model("olmo_hybrid-linear")
    ids = prompt(5)[:, :256]
    pop = torch.stack([torch.randn(4172, generator=torch.Generator().manual_seed(s)) * 0.5 for s in range(3)])
    direct, _, _ = run_with_policy(model, ids.expand(3, -1), NAMMPolicy(pop, delay=DELAY), chunk=32)
    policy = NAMMPolicy(pop, delay=DELAY)
    shared = MemoryCache(HoldPolicy(policy))
    with torch.no_grad():
        outs = [model(input_ids=ids[:, s:s + 32], cache=shared, use_cache=True,
                      position_ids=torch.arange(s, s + 32)[None]).logits.expand(3, -1, -1) for s in (0, 32)]
        cache = shared.fork(policy, 3)
        assert cache.states[0].recurrent_states[0].shape[0] == 3
        assert cache.states[0].recurrent_states[0].data_ptr() != shared.states[0].recurrent_states[0].data_ptr()
        for s in range(64, 256, 32):
            outs.append(model(input_ids=ids[:, s:s + 32].expand(3, -1), cache=cache, use_cache=True,
                              position_ids=torch.arange(s, s + 32)[None].expand(3, -1)).logits)
    assert torch.allclose(torch.cat(outs, 1), direct, atol=1e-4), (torch.cat(outs, 1) - direct).abs().max()
    assert cache.realised_fraction() < 1.0


def test_an_lfm2_of_attention_layers_only_runs_exactly():
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = T.Lfm2ForCausalLM(T.Lfm2Config(**cfg, layer_types=["full_attention"] * 2)).eval()
    ids = prompt(n=64)
    got, _, _ = run_with_policy(model, ids, NAMMPolicy(delay=16), chunk=20)
    assert torch.allclose(got, eager_logits(model, ids), atol=1e-4)


def test_the_family_sweep_classifies_families(monkeypatch):
    """scripts/check_families.py's per-family check: equal for a supported family, refused (by name) for a hybrid
    state-space family and a family outside the AttentionInterface, MISMATCH when the memory attention is broken."""
    from helpers_inputs import script
    sweep = script("check_families")
    assert sweep.check_one("gemma2", 1e-4, 40e6)["outcome"] == "equal"
    # per-family tiny settings (latent-attention head sizes) and per-layer lists cut to one layer of each kind
    # (Gemma 4's per-layer overrides renumbered; Qwen3-Next keeps a linear-attention layer: a hybrid whose states the
    # MemoryCache holds; RecurrentGemma keeps its state in its modules: refused)
    assert sweep.check_one("deepseek_v3", 1e-4, 40e6)["outcome"] == "equal"
    assert sweep.check_one("gemma4_text", 1e-4, 150e6)["outcome"] == "equal"
    assert sweep.check_one("gemma3", 1e-4, 40e6)["outcome"] == "equal"  # text + vision sub-configs shrunk
    assert sweep.check_one("qwen3_next", 1e-4, 150e6)["outcome"] == "equal"
    assert "linear_attention" in sweep.check_one("recurrent_gemma", 1e-4, 150e6)["detail"]
    assert sweep.tiny_layers(["sliding", "sliding", "full", "linear"]) == [0, 2]
    assert sweep.tiny_layers(["full"] * 4) == [0, 1]
    assert sweep.check_one("mamba", 1e-4, 40e6)["outcome"] == "refused"
    assert "not supported" in sweep.check_one("bloom", 1e-4, 40e6)["detail"]
    spec = memory_attention_module.attention_spec
    monkeypatch.setattr(memory_attention_module, "attention_spec",
                        lambda *a: dataclasses.replace(spec(*a), softcap=None))
    assert sweep.check_one("gemma2", 1e-4, 40e6)["outcome"] == "MISMATCH"


def test_the_family_sweep_rechecks_given_families_with_redo(tmp_path):
    """--redo replaces the records of the families named (a fix checked without the whole sweep), keeps the others
    and summarises all of them; --redo without --families is refused."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_families.py"
    (tmp_path / "families.jsonl").write_text(json.dumps({"family": "gemma2", "outcome": "error", "detail": "old"}) + "\n"
                                             + json.dumps({"family": "llama", "outcome": "equal"}) + "\n")
    run = lambda *a: subprocess.run([sys.executable, str(script), "--out", str(tmp_path), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    res = run("--families", "gemma2", "--redo")
    assert res.returncode == 0, res.stderr[-2000:]
    recs = {r["family"]: r for r in map(json.loads, (tmp_path / "families.jsonl").read_text().splitlines())}
    assert recs["gemma2"]["outcome"] == "equal" and recs["llama"] == {"family": "llama", "outcome": "equal"}
    assert "2 equal" in (tmp_path / "summary.md").read_text()
    res = run("--redo")
    assert res.returncode != 0 and "--redo needs --families" in res.stderr


def test_a_module_attending_over_another_cache_layer_is_refused():
    """HRM runs its stack of attention modules several times, each cycle in other cache layers (module 0 stores
    in cache layer 2 on its second cycle): refused by name (it was a CaptureError telling the user to call
    enable_memory_attention, which they had)."""
    cfg = T.HrmTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_layers_per_stack=2, num_hidden_layers=16,
                          H_cycles=2, L_cycles=1, L_bp_cycles=[1])
    torch.manual_seed(0)
    model = T.HrmTextForCausalLM(cfg).eval()
    enable_memory_attention(model)
    with pytest.raises(UnsupportedAttention, match=r"\(layer_idx 0\) attends over the keys that cache layer 2 stored"):
        model(input_ids=prompt(n=8), cache=MemoryCache(FullCache()), use_cache=True)


def test_attention_computed_in_the_models_own_code_is_refused_by_name():
    """GIT enables (its config takes the attention implementation) but its text layers multiply queries and keys
    in their own code: the first forward over a MemoryCache is refused, saying so (the message used to tell only
    to call enable_memory_attention, which had been called)."""
    cfg = T.GitConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=16),
                      vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    model = T.GitForCausalLM(cfg).eval()
    enable_memory_attention(model)
    with pytest.raises(CaptureError, match="computes this layer's attention in its own code"):
        with torch.no_grad():
            model(input_ids=prompt(n=8), cache=MemoryCache(FullCache()), use_cache=True)


ROBERTA_STYLE = [(T.RobertaConfig, T.RobertaForCausalLM), (T.XLMRobertaConfig, T.XLMRobertaForCausalLM),
                 (T.CamembertConfig, T.CamembertForCausalLM), (T.Data2VecTextConfig, T.Data2VecTextForCausalLM),
                 (T.RobertaPreLayerNormConfig, T.RobertaPreLayerNormForCausalLM),
                 (T.XLMRobertaXLConfig, T.XLMRobertaXLForCausalLM)]
ENCODER_CFG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=256, is_decoder=True, pad_token_id=1)


@pytest.mark.parametrize("config, model_cls", ROBERTA_STYLE, ids=lambda c: getattr(c, "__name__", ""))
def test_decoders_that_number_positions_from_the_padding_index_are_refused(config, model_cls):
    torch.manual_seed(0)
    model = model_cls(config(**ENCODER_CFG)).eval()
    ids = prompt(n=12)
    with torch.no_grad():  # why: the model's own numbering is not the 0, 1, ... that a cached run passes
        own = model(input_ids=ids).logits
        from_zero = model(input_ids=ids, position_ids=torch.arange(12)[None]).logits
    assert (own - from_zero).abs().max() > 1e-3
    with pytest.raises(UnsupportedAttention, match=r"numbers positions from the padding index \(the first token "
                                                   r"at position 2"):
        enable_memory_attention(model)


def test_a_bert_decoder_numbers_positions_from_zero_and_runs_exactly():
    torch.manual_seed(0)
    model = T.BertLMHeadModel(T.BertConfig(**ENCODER_CFG)).eval()
    ids = prompt(n=20)
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, 20:].tolist()
        plain = model(input_ids=ids).logits
    res = generate(model, ids, FullCache(), max_new_tokens=6, chunk_size=8)
    assert res.tokens[0] == reference
    logits, _, _ = run_with_policy(model, ids, FullCache(), chunk=8, decode_from=16)
    assert (logits - plain).abs().max() < 1e-5
