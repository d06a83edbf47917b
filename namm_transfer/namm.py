"""The Neural Attention Memory Model (NAMM): features -> backward-masked attention scorer -> keep rule.

Faithful to the released configuration of the reference implementation (see shared design notes):
spectrogram of each token's attention (n_fft 32, hop 16), EMA 0.99 per token, 8-dim recency embedding,
one BAM layer (hidden 32, one head, bias, residual + multiplicative output), a linear score, keep iff
score >= 0 with the newest token always kept and a rectangular top-k per layer. 4172 parameters.

Every function takes per-row parameters, so a whole CMA-ES population is scored in one call.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import features as feat


@dataclass(frozen=True)
class NAMMConfig:
    n_fft: int = 32
    hop: int = 16
    ema_coeff: float = 0.99
    recency_dim: int = 8
    recency_max_freq: float = 50000.0
    hidden: int = 32
    threshold: float = 0.0
    delay: int = 512
    attention_dtype: str | None = "bfloat16"  # reference rounds attention probabilities to bf16 first
    recency_table: str = "float32"  # "float64": evo-memory's recency table (imported official checkpoints)

    @property
    def num_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def d_in(self) -> int:
        return self.recency_dim + self.num_bins

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Official flat order; weights are input-major (y = x @ W)."""
        d, h = self.d_in, self.hidden
        return [("w_qkv", (d, 3 * h)), ("b_qkv", (3 * h,)), ("w_out", (h, 2 * d)), ("b_out", (2 * d,)),
                ("w_score", (d,)), ("b_score", (1,))]

    @property
    def num_params(self) -> int:
        return sum(torch.Size(s).numel() for _, s in self.layout)

    def to_dict(self) -> dict:
        return asdict(self)


def unflatten(params: torch.Tensor, cfg: NAMMConfig) -> dict[str, torch.Tensor]:
    """(R, P) or (P,) flat parameters -> dict of (R, *shape) tensors in the official layout."""
    if params.shape[-1] != cfg.num_params:
        raise ValueError(f"NAMM expects {cfg.num_params} parameters per member, got {params.shape[-1]}")
    flat = params.reshape(-1, cfg.num_params)
    out, start = {}, 0
    for name, shape in cfg.layout:
        n = torch.Size(shape).numel()
        out[name] = flat[:, start:start + n].reshape(flat.shape[0], *shape)
        start += n
    return out


def bam_scores(x: torch.Tensor, valid: torch.Tensor, params: torch.Tensor, cfg: NAMMConfig) -> torch.Tensor:
    """Backward-masked attention scorer.

    x: (R, N, d_in) token features in cache order; valid: (R, N) bool; params: (R, P) one set per row.
    Token i attends to itself and every newer valid token j >= i. Returns scores (R, N).
    """
    w = unflatten(params.to(x.dtype), cfg)
    h = cfg.hidden
    qkv = torch.baddbmm(w["b_qkv"][:, None, :], x, w["w_qkv"])  # (R, N, 3h)
    q, k, v = qkv[..., :h], qkv[..., h:2 * h], qkv[..., 2 * h:]
    if bool((valid[:, 1:] >= valid[:, :-1]).all()):
        # Padding slots only on the left (as the cache keeps them): a backward mask is a causal mask on the
        # reversed sequence, and valid queries never reach the padding there -> fused kernel, no N x N mask.
        # One head axis (R, 1, N, h): CUDA's fused kernels take 4-D inputs only; 3-D ones fell back to the math
        # kernel, which holds R x N x N scores and probabilities (6.3 GB above the inputs at 32 rows x 4,700 slots
        # on an H200, scripts/bench_bam_memory.py). On CPU both shapes give the same bits.
        att = F.scaled_dot_product_attention(q.flip(1)[:, None], k.flip(1)[:, None], v.flip(1)[:, None],
                                             is_causal=True)[:, 0].flip(1)
    else:
        n = x.shape[1]
        backward = torch.ones(n, n, dtype=torch.bool, device=x.device).triu()
        mask = backward[None, None] & valid[:, None, None, :]  # 4-D as above (same bits on CPU)
        att = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask)[:, 0]
    o = torch.baddbmm(w["b_out"][:, None, :], att, w["w_out"])  # (R, N, 2d)
    d = cfg.d_in
    hid = x * (1 + o[..., d:]) + o[..., :d]
    return (hid * w["w_score"][:, None, :]).sum(-1) + w["b_score"]


def token_features(
    attn: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, ema_prev: torch.Tensor,
    overlap_prev: torch.Tensor, n_new: int, stats: feat.RunningStats | None, cfg: NAMMConfig,
    collect_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of one eviction step for one layer.

    attn: (R, T, N) GQA-averaged attention of the T new queries; positions (R, N) original positions;
    valid (R, N); ema_prev (R, N_old, B) and overlap_prev (R, N_old, n_fft-hop) for the kept tokens.
    Returns (x (R, N, d_in), new EMA (R, N, B) un-normalised, new overlap (R, N, n_fft-hop)).
    """
    r, t, n = attn.shape
    pad = cfg.n_fft - cfg.hop
    overlap = torch.cat([overlap_prev.float(), attn.new_zeros(r, n_new, pad, dtype=torch.float32)], dim=1)
    spec = feat.spectrogram_frames(attn, overlap.transpose(1, 2), cfg.n_fft, cfg.hop)  # (R, F, B, N)
    w = feat.ema_weights(n, n_new, spec.shape[1], cfg.ema_coeff, cfg.hop, attn.device)  # (F, N)
    ema = (spec * w[None, :, None, :]).sum(dim=1).transpose(1, 2)  # (R, N, B)
    if n > n_new:  # kept tokens carry their previous state, decayed over the n_new queries of this step
        ema[:, :n - n_new] += (cfg.ema_coeff ** n_new) * ema_prev.float()
    new_overlap = attn[:, -pad:, :].transpose(1, 2).float()
    return namm_inputs(ema, positions, valid, stats, cfg, collect_stats), ema, new_overlap


def namm_inputs(ema: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, stats: feat.RunningStats | None,
                cfg: NAMMConfig, collect_stats: bool = False) -> torch.Tensor:
    """Scorer inputs from each token's spectrogram EMA (R, N, B): [recency embedding, normalised EMA] (R, N, d_in).
    With collect_stats the valid tokens' EMAs first join the normalisation statistics."""
    if stats is not None and collect_stats:
        stats.update(ema[valid])
    spec_feat = ema
    if stats is not None and stats.count > 0:
        spec_feat = feat.normalise(ema, stats.mean.to(ema), stats.var.to(ema))
    last = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=-1, keepdim=True).values
    rec = feat.recency_embedding(last - positions, cfg.recency_dim, cfg.recency_max_freq, cfg.recency_table)
    return torch.cat([rec, spec_feat], dim=-1)


def select_tokens(scores: torch.Tensor, valid: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Keep rule. scores, valid: (batch, H_kv, N). Returns a bool keep mask.

    Invalid slots score -inf, the newest slot +inf; k = max over KV heads of #(score >= threshold)
    (per batch row, so population members stay independent); every head keeps its own top k.
    """
    s = scores.masked_fill(~valid, float("-inf")).clone()
    s[..., -1] = float("inf")
    k = (s >= threshold).sum(-1).amax(dim=-1, keepdim=True)  # (batch, 1)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return ranks < k[..., None]
