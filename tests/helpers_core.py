"""Shared helpers for core tests: tiny models and the brute-force masked reference."""
import torch
from transformers import (AttentionInterface, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from namm_transfer import MemoryCache, enable_memory_attention


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        return LlamaForCausalLM(cfg).eval()
    if arch == "qwen2":
        cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        return Qwen2ForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=4096)
        return GPT2LMHeadModel(cfg).eval()
    raise ValueError(arch)


def eviction_recorder():
    """(events, on_evict): events collects (layer, tokens_seen, evicted positions per batch row and KV head)."""
    events = []

    def on_evict(layer, keep):
        gone = layer.valid & ~keep
        per_head = [[layer.positions[b, h][gone[b, h]].tolist() for h in range(gone.shape[1])]
                    for b in range(gone.shape[0])]
        events.append((layer.layer_idx, layer.tokens_seen, per_head))

    return events, on_evict


@torch.no_grad()
def run_with_policy(model, ids, policy, chunk=64, decode_from=None):
    """Feed ids in chunks (then one token at a time from `decode_from`), logging evictions.
    Returns (logits (1, L, V), cache, events) with events = [(layer, tokens_seen, evicted positions per head)]."""
    enable_memory_attention(model)
    events, on_evict = eviction_recorder()
    cache = MemoryCache(policy, on_evict=on_evict)
    decode_from = decode_from or ids.shape[1]
    bounds = [(s, min(s + chunk, decode_from)) for s in range(0, decode_from, chunk)]
    bounds += [(s, s + 1) for s in range(decode_from, ids.shape[1])]
    outs = []
    for s, e in bounds:
        pos = torch.arange(s, e)[None].expand(ids.shape[0], -1)
        outs.append(model(input_ids=ids[:, s:e], cache=cache, use_cache=True, position_ids=pos).logits)
    return torch.cat(outs, 1), cache, events


_REF_MASKS = {}


def _ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    vis = _REF_MASKS[module.layer_idx]  # (B, H_kv, L, L)
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, 1)
    v = value.repeat_interleave(groups, 1)
    s = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    s = s.masked_fill(~vis.repeat_interleave(groups, 1), float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2).contiguous(), None


@torch.no_grad()
def masked_reference_logits(model, ids, events, num_layers, num_kv_heads):
    """One full forward where query t cannot see key s if s was evicted (in that layer and KV head) by an
    eviction that ran after token T_e - 1, for t >= T_e. Brute force, independent of the cache code."""
    b, n = ids.shape
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for layer in range(num_layers):
        vis = causal.expand(b, num_kv_heads, n, n).clone()
        for ev_layer, t_e, per_head in events:
            if ev_layer != layer:
                continue
            for bi in range(b):
                for h in range(num_kv_heads):
                    for p in per_head[bi][h]:
                        vis[bi, h, t_e:, p] = False
        _REF_MASKS[layer] = vis
    AttentionInterface.register("test_ref_masked", _ref_attention)
    old = model.config._attn_implementation
    model.set_attn_implementation("test_ref_masked")
    try:
        return model(input_ids=ids, position_ids=torch.arange(n)[None].expand(b, -1)).logits
    finally:
        model.set_attn_implementation(old)
