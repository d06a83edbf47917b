"""Tiny random models of many transformers families, and the reference every memory-attention test compares to:
the model's own eager attention function (from its modeling file) with the evicted keys hidden."""
import sys

import torch
import transformers as T
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

VOCAB = 128
WINDOW = 48  # sliding window of the families that have one: shorter than every test prompt

_LM = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2, pad_token_id=0,
           bos_token_id=1, eos_token_id=2)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# name -> (config class, model class, config overrides)
FAMILIES = {
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(sliding_window=None)),
    "mistral-window": (T.MistralConfig, T.MistralForCausalLM, dict(sliding_window=WINDOW)),
    "qwen3-window": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(
        head_dim=16, use_sliding_window=True, sliding_window=WINDOW, layer_types=["sliding_attention",
                                                                                "full_attention"])),
    "starcoder2-window": (T.Starcoder2Config, T.Starcoder2ForCausalLM, dict(sliding_window=WINDOW)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(  # soft-cap small enough to bite, alternating windows
        head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=2.0, query_pre_attn_scalar=4)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(
        head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM, dict(  # attention sinks, alternating windows, MoE
        head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
    "llama4-chunked": (T.Llama4TextConfig, T.Llama4ForCausalLM, dict(  # chunked attention on the RoPE layer
        head_dim=16, attention_chunk_size=WINDOW, no_rope_layers=[1, 0], num_local_experts=1, moe_layers=[],
        intermediate_size_mlp=128)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, {}),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(num_key_value_heads=None)),
    "opt": (T.OPTConfig, T.OPTForCausalLM, dict(ffn_dim=128, word_embed_proj_dim=64, num_key_value_heads=None,
                                                intermediate_size=None, init_std=0.2)),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, _MOE),
    "gpt_bigcode-mqa": (T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM, dict(  # multi-query: one KV head for four
        multi_query=True, num_key_value_heads=None, intermediate_size=None, max_position_embeddings=None,
        bos_token_id=None, eos_token_id=None)),
    "jetmoe-tiled": (T.JetMoeConfig, T.JetMoeForCausalLM, dict(  # tiles its cached heads (repeat) after update
        kv_channels=16, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=None)),
    "olmo_hybrid-linear": (T.OlmoHybridConfig, T.OlmoHybridForCausalLM, dict(  # gated delta-net layer + attention
        layer_types=["linear_attention", "full_attention"])),
    "falcon_h1-hybrid": (T.FalconH1Config, T.FalconH1ForCausalLM, dict(  # attention + Mamba-2 in every layer
        head_dim=16, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=16,
        mamba_chunk_size=16)),
    "lfm2-conv": (T.Lfm2Config, T.Lfm2ForCausalLM, dict(layer_types=["conv", "full_attention"])),  # short convs
    "deepseek_v3-mla": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM, dict(  # caches latents, expands them after
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=32,
        n_group=1, topk_group=1)),
}


def family_model(name: str, seed: int = 0):
    cfg_cls, model_cls, extra = FAMILIES[name]
    kwargs = {k: v for k, v in {**_LM, **extra}.items() if v is not None or k in ("sliding_window",)}
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).eval()
    model.generation_config.pad_token_id = 0
    return model


_HIDDEN: dict[int, torch.Tensor] = {}  # layer -> (B, H_kv, L, L) True where a query may not see an evicted key


def _eager_with_evictions(module, query, key, value, attention_mask, **kwargs):
    """The model family's own eager attention, with the evicted keys of this layer hidden in its mask."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    hidden = _HIDDEN.get(module.layer_idx)
    if hidden is not None:
        h_kv, g = hidden.shape[1], query.shape[1] // hidden.shape[1]
        tiled = g > 1 and key.shape[1] == query.shape[1] and torch.equal(key[:, :h_kv], key[:, h_kv:2 * h_kv]) \
            and not torch.equal(key[:, 0], key[:, 1])  # JetMoE: query head h attends over stored head h % H_kv
        hidden = hidden.repeat(1, g, 1, 1) if tiled else hidden.repeat_interleave(g, dim=1)
        attention_mask = attention_mask.masked_fill(hidden, torch.finfo(attention_mask.dtype).min)
    return eager(module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def eager_logits(model, ids, events=(), attention_mask=None, position_ids=None):
    """One full forward with the model's own eager attention; query t of row b cannot see key s of layer l / KV
    head h when an eviction event (l, t_e, per-row per-head positions) with t_e <= t removed it."""
    b, n = ids.shape
    _HIDDEN.clear()
    for layer, t_e, per_row in events:
        hidden = _HIDDEN.setdefault(layer, torch.zeros(b, len(per_row[0]), n, n, dtype=torch.bool))  # the cache's KV heads
        for r, per_head in enumerate(per_row):
            for h, gone in enumerate(per_head):
                hidden[r, h, t_e:, gone] = True
    AttentionInterface.register("test_eager_evicted", _eager_with_evictions)
    ALL_MASK_ATTENTION_FUNCTIONS.register("test_eager_evicted", eager_mask)
    old = model.config._attn_implementation
    model.set_attn_implementation("test_eager_evicted")
    try:
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)  # materialise the mask so the hook always has one to edit
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits
    finally:
        model.set_attn_implementation(old)
        _HIDDEN.clear()
