"""Attention capture through transformers' public AttentionInterface (no patched model forwards).

`enable_memory_attention(model)` registers one attention function under the name "namm_memory" and
switches the model to it. When a MemoryCache layer has just been updated, the function:
  * builds the mask from that layer's real cache length (valid slots + causal among the new queries),
  * computes attention (explicit softmax when the policy needs probabilities, SDPA otherwise),
  * hands the new queries' probabilities to the cache layer and lets it evict on schedule.
Without a MemoryCache (e.g. training or a plain forward) it is ordinary SDPA with the model's mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .cache import _CAPTURE

ATTN_NAME = "namm_memory"


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def memory_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function. query (B, H, q, D); key/value (B, H_kv, N, D) from the cache."""
    pending = getattr(_CAPTURE, "pending", None)
    layer_idx = getattr(module, "layer_idx", None)
    if pending is None or pending[1] != layer_idx:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    cache, _ = pending
    layer = cache.layers[layer_idx]
    b, h, q_len, d = query.shape
    h_kv = key.shape[1]
    groups = h // h_kv
    scale = scaling if scaling is not None else d ** -0.5
    mask = layer.attention_mask(q_len)
    k, v = _repeat_kv(key, groups), _repeat_kv(value, groups)
    probs = None
    if cache.policy.needs_attention or kwargs.get("output_attentions", False):
        scores = torch.matmul(query, k.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~_repeat_kv(mask, groups), float("-inf"))
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
        out = torch.matmul(probs.to(v.dtype), v)
        if cache.policy.needs_attention:
            layer.record_attention(probs, h_kv)
        probs = probs.to(query.dtype)
    else:
        m = None if mask is None else _repeat_kv(mask, groups)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=m, scale=scale,
                                             is_causal=False)
    layer.after_attention(q_len)
    return out.transpose(1, 2).contiguous(), probs


def enable_memory_attention(model) -> None:
    """Route the model's attention through `memory_attention` (required for MemoryCache)."""
    AttentionInterface.register(ATTN_NAME, memory_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception as err:  # transformers raises ValueError for models without the attention backend
        raise ValueError(
            f"{type(model).__name__} cannot use a custom attention function ({err}). namm_transfer needs models "
            "whose attention goes through transformers' AttentionInterface (Llama-family, Qwen2, GPT-2, ...)."
        ) from err
