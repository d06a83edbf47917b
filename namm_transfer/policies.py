"""KV-cache memory policies behind one small interface.

A policy sees one layer at an eviction step (a `LayerView`) and returns which cache slots to keep, per
batch row and KV head, plus its per-token state for every slot (the cache prunes both together).

Budgets have one meaning everywhere: an int is a number of tokens kept after each eviction step; a float
in (0, 1] is a fraction of all tokens seen so far (ceil(budget * tokens_seen)), so the realised cache
fraction at eviction time equals the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import features as feat
from .namm import NAMMConfig, bam_scores, namm_inputs, select_tokens, token_features
from .streams import AttentionStream, AttentionSum, SpectrogramEMA


@dataclass
class LayerView:
    """What a policy sees for one layer at one eviction step. Token axis is dim 2 everywhere."""

    layer_idx: int
    keys: torch.Tensor  # (B, H_kv, N, D)
    values: torch.Tensor  # (B, H_kv, N, D)
    positions: torch.Tensor  # (B, H_kv, N) original absolute positions
    valid: torch.Tensor  # (B, H_kv, N) False for padding slots
    attention: torch.Tensor | None  # (B, H_kv, T, N) GQA-mean attention of the T queries since the last step
    n_new: int  # T: tokens appended since the previous step (the last T slots)
    tokens_seen: int  # all tokens processed so far in this sequence
    step: int  # index of this eviction step for this layer
    state: dict[str, torch.Tensor]  # policy state of the N - T older slots, (B, H_kv, N - T, ...)
    rows: torch.Tensor | None = None  # the cache's batch rows this view holds (None: all, in order)
    summary: dict[str, torch.Tensor] | None = None  # the policy's streamed attention summary (attention is None)


Decision = tuple[torch.Tensor, dict[str, torch.Tensor]]  # keep mask (B, H_kv, N), state for all N slots


def resolve_budget(budget: int | float, tokens_seen: int) -> int:
    """Tokens to keep: int = tokens, float in (0, 1] = fraction of tokens seen."""
    if isinstance(budget, float) and 0 < budget <= 1:
        return max(1, math.ceil(budget * tokens_seen))
    if budget >= 1 and float(budget).is_integer():
        return int(budget)
    raise ValueError(f"budget must be an int >= 1 (tokens) or a float in (0, 1] (fraction), got {budget!r}")


def keep_top(scores: torch.Tensor, valid: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Bool mask keeping the k highest-scoring valid slots per (row, head) (all valid slots if fewer).
    k: one count, or one per batch row ((B,) long)."""
    s = scores.float().masked_fill(~valid, float("-inf"))
    if not isinstance(k, torch.Tensor):
        idx = s.topk(min(k, s.shape[-1]), dim=-1).indices
        return torch.zeros_like(valid).scatter_(-1, idx, True) & valid
    k_max = min(int(k.max()), s.shape[-1])
    idx = s.topk(k_max, dim=-1).indices  # sorted: the first k of each row are its top k
    take = torch.arange(k_max, device=s.device) < k.to(s.device)[:, None, None]
    return torch.zeros_like(valid).scatter_(-1, idx, take.expand_as(idx)) & valid


def newest(view: LayerView, r: int | torch.Tensor) -> torch.Tensor:
    """Mask of the r most recent valid slots (by original position); r per batch row or one count."""
    pos = view.positions.float().masked_fill(~view.valid, float("-inf"))
    return keep_top(pos, view.valid, r)


class MemoryPolicy:
    """Base class. Subclasses implement `step`. `delay`: run every `delay` tokens (prefill and decoding)."""

    name = "base"
    needs_attention = False
    attention_dtype: torch.dtype | None = None  # round attention to this dtype before features
    attention_window: int | None = None  # a step reads only its last this-many queries' attention (None: all)
    evicts = True

    def __init__(self, delay: int = 512):
        if delay < 1:
            raise ValueError("delay must be >= 1")
        self.delay = delay

    def step(self, view: LayerView) -> Decision:
        raise NotImplementedError

    def attention_stream(self) -> AttentionStream | None:
        """A per-layer reduction of the attention as it arrives (the step then reads `view.summary`), or None:
        the cache buffers every query's attention row until the step (`view.attention`)."""
        return None

    def describe(self) -> dict:
        return {"name": self.name, "delay": self.delay}


class FullCache(MemoryPolicy):
    """Keep everything (the unmodified model)."""

    name = "full"
    evicts = False

    def step(self, view: LayerView) -> Decision:
        return view.valid.clone(), {}


class BudgetPolicy(MemoryPolicy):
    """A policy with a fixed budget (tokens or fraction), or one budget per batch row (a list: row b of the
    cache uses budget[b], so prompts evaluated at different cache sizes can share a batch)."""

    def __init__(self, budget: int | float | list = 0.5, delay: int = 512):
        super().__init__(delay)
        for b in budget if isinstance(budget, (list, tuple)) else [budget]:
            resolve_budget(b, 1)
        self.budget = list(budget) if isinstance(budget, (list, tuple)) else budget

    def k(self, view: LayerView) -> int | torch.Tensor:
        """Tokens to keep now: an int, or (B,) per row of the view when the budget is per row."""
        if not isinstance(self.budget, list):
            return resolve_budget(self.budget, view.tokens_seen)
        rows = view.rows.tolist() if view.rows is not None else range(view.valid.shape[0])
        return torch.tensor([resolve_budget(self.budget[r], view.tokens_seen) for r in rows])

    def describe(self) -> dict:
        return {**super().describe(), "budget": self.budget}


class Recency(BudgetPolicy):
    """StreamingLLM: the first `sinks` tokens of the sequence (attention sinks) + the most recent ones."""

    name = "recency"

    def __init__(self, budget: int | float = 0.5, sinks: int = 4, delay: int = 512):
        super().__init__(budget, delay)
        self.sinks = sinks

    def step(self, view: LayerView) -> Decision:
        score = view.positions.float().masked_fill(view.positions < self.sinks, float("inf"))
        return keep_top(score, view.valid, self.k(view)), {}


class H2O(BudgetPolicy):
    """Heavy hitters (largest accumulated attention) + a recent window; `recent_ratio` of the budget is recent."""

    name = "h2o"
    needs_attention = True

    def __init__(self, budget: int | float = 0.5, recent_ratio: float = 0.5, delay: int = 512):
        super().__init__(budget, delay)
        self.recent_ratio = recent_ratio

    def attention_stream(self) -> AttentionStream:
        return AttentionSum()  # the running total per slot: no query's attention row is kept

    def step(self, view: LayerView) -> Decision:
        if view.summary is not None:
            acc = view.summary["acc"]
        else:  # a view built by hand with the attention rows of this step
            b, h, n = view.valid.shape
            old = view.state.get("acc", view.attention.new_zeros(b, h, n - view.n_new))
            acc = torch.cat([old, old.new_zeros(b, h, view.n_new)], dim=-1) + view.attention.float().sum(dim=2)
        k = self.k(view)
        r = (k * self.recent_ratio).round().long() if isinstance(k, torch.Tensor) else round(k * self.recent_ratio)
        recent = newest(view, r)
        keep = keep_top(acc.masked_fill(recent, float("inf")), view.valid, k)
        return keep, ({} if view.summary is not None else {"acc": acc})


class L2Norm(BudgetPolicy):
    """Keep the keys with the lowest L2 norm (Devoto et al., 2024)."""

    name = "l2"

    def step(self, view: LayerView) -> Decision:
        return keep_top(-view.keys.float().norm(dim=-1), view.valid, self.k(view)), {}


class SnapKV(BudgetPolicy):
    """Observation window: attention of the last `window` queries, summed and pooled; the window is kept."""

    name = "snapkv"
    needs_attention = True

    def __init__(self, budget: int | float = 0.5, window: int = 32, kernel: int = 5, pooling: str = "avg",
                 delay: int = 512):
        super().__init__(budget, delay)
        if pooling not in ("avg", "max"):
            raise ValueError("pooling must be 'avg' or 'max'")
        self.window, self.kernel, self.pooling = window, kernel, pooling
        self.attention_window = window  # only the observation window's attention is computed and buffered

    def step(self, view: LayerView) -> Decision:
        b, h, n = view.valid.shape
        w = min(self.window, view.n_new)
        votes = view.attention[:, :, -w:, :].sum(dim=2)  # (B, H, N), each vote <= w
        # the window outranks every pooled vote; inside it the newest first (when the budget is below the window)
        window = (w + 1 + torch.arange(min(w, n), device=votes.device, dtype=votes.dtype)).expand(b, h, -1)
        if n <= w:  # nothing outside the observation window
            return keep_top(window, view.valid, self.k(view)), {}
        prefix = votes[..., : n - w].reshape(b * h, 1, n - w)
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        pooled = pool(prefix, self.kernel, stride=1, padding=self.kernel // 2).reshape(b, h, n - w)
        return keep_top(torch.cat([pooled, window], dim=-1), view.valid, self.k(view)), {}


class RandomEviction(BudgetPolicy):
    """Keep a uniformly random subset (seeded per sequence step and layer)."""

    name = "random"

    def __init__(self, budget: int | float = 0.5, seed: int = 0, delay: int = 512):
        super().__init__(budget, delay)
        self.seed = seed

    def step(self, view: LayerView) -> Decision:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + view.layer_idx * 7919 + view.step)
        score = torch.rand(view.valid.shape, generator=g).to(view.valid.device)
        return keep_top(score, view.valid, self.k(view)), {}


def values_at_positions(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A per-position table (..., H, L) read at each slot's position (..., H, N), the table broadcast over the
    positions' leading dimensions; positions are clamped into the table (callers mask slots that lie outside it)."""
    table = table.expand(*positions.shape[:-1], table.shape[-1])
    return table.gather(-1, positions.clamp(0, table.shape[-1] - 1).long())


class FutureAttention(BudgetPolicy):
    """Oracle reference, not a deployable policy: keeps, per KV head, the slots that the queries read after the
    last eviction step (the question and the gold answer) attend to most in the unmodified model. `scores[r][l]`:
    row r's (H_kv, L) attention mass per absolute position at layer l (`language.benchmark.future_attention_scores`)."""

    name = "oracle"

    def __init__(self, budget: int | float | list = 0.5, scores: list[list[torch.Tensor]] | None = None,
                 delay: int = 512):
        super().__init__(budget, delay)
        if not scores:
            raise ValueError("the oracle policy needs its scores: one list of per-layer (H_kv, L) tensors per batch "
                             "row, from namm_transfer.language.benchmark.future_attention_scores")
        self.scores = scores

    def step(self, view: LayerView) -> Decision:
        b, h, n = view.valid.shape
        rows = view.rows.tolist() if view.rows is not None else range(b)
        tables = [self.scores[r][view.layer_idx] for r in rows]
        width = max(t.shape[-1] for t in tables)
        table = torch.stack([F.pad(t.float(), (0, width - t.shape[-1])) for t in tables]).to(view.keys.device)
        if table.shape[1] != h:
            raise ValueError(f"oracle scores have {table.shape[1]} KV heads at layer {view.layer_idx}, the cache {h}")
        return keep_top(values_at_positions(table, view.positions), view.valid, self.k(view)), {}


class NAMMPolicy(MemoryPolicy):
    """The evolved memory. `params`: (P, num_params) population or (num_params,) single member.

    Batch row b uses member `member_of_row[b]` (default: row b -> member b % P), so P members can be
    evaluated on the same prompt in one batched forward. `stats` holds the frozen spectrogram
    normalisation; with `collect_stats=True` it is measured on the fly (generation-0 keep-all pass).
    """

    name = "namm"
    needs_attention = True

    def __init__(self, params: torch.Tensor | None = None, config: NAMMConfig | None = None,
                 stats: feat.RunningStats | None = None, member_of_row: torch.Tensor | None = None,
                 collect_stats: bool = False, delay: int | None = None):
        self.config = config or NAMMConfig()
        if delay is not None:
            self.config = replace(self.config, delay=delay)
        super().__init__(self.config.delay)
        if self.config.delay % self.config.hop:
            raise ValueError(f"NAMM delay {self.config.delay} must be a multiple of hop {self.config.hop}")
        if params is None:
            params = torch.zeros(self.config.num_params)
        params = torch.as_tensor(params, dtype=torch.float32)
        if params.shape[-1] != self.config.num_params:
            raise ValueError(f"NAMM with this config has {self.config.num_params} parameters, got "
                             f"{params.shape[-1]}; check the checkpoint matches NAMMConfig")
        self.params = params.reshape(-1, self.config.num_params)
        self.stats = stats if stats is not None else feat.RunningStats(self.config.num_bins)
        for name, t in (("parameters", self.params), ("normalisation statistics", self.stats.mean),
                        ("normalisation statistics", self.stats.m2)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"NAMM {name} contain NaN or inf: refusing a NAMM that would score nothing")
        self.member_of_row = member_of_row
        self.collect_stats = collect_stats
        self.attention_dtype = getattr(torch, self.config.attention_dtype) if self.config.attention_dtype else None

    def row_params(self, rows: torch.Tensor, heads: int, device) -> torch.Tensor:
        """Parameters for each (row, KV head) of a view holding the cache's batch rows `rows`."""
        rows = rows.cpu()
        members = self.member_of_row[rows] if self.member_of_row is not None else rows % len(self.params)
        return self.params.to(device)[members.to(device).repeat_interleave(heads)]

    def attention_stream(self) -> AttentionStream | None:
        cfg = self.config
        return SpectrogramEMA(cfg.n_fft, cfg.hop, cfg.ema_coeff) if cfg.n_fft == 2 * cfg.hop else None

    def inputs(self, view: LayerView) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scorer's inputs x (B * H_kv, N, d_in) for this step, and the per-token state to carry."""
        cfg = self.config
        b, h, n = view.valid.shape
        r = b * h
        positions, valid = view.positions.reshape(r, n), view.valid.reshape(r, n)
        if view.summary is not None:  # streamed: the spectrogram EMA is already folded, frame by frame
            x = namm_inputs(view.summary["ema"].reshape(r, n, cfg.num_bins), positions, valid, self.stats, cfg,
                            collect_stats=self.collect_stats)
            state = {}
        else:  # the attention rows of the step, buffered (n_fft != 2 * hop, or a view built by hand)
            n_old = n - view.n_new
            pad = cfg.n_fft - cfg.hop
            ema_prev = view.state.get("ema", view.keys.new_zeros(b, h, n_old, cfg.num_bins, dtype=torch.float32))
            ovl_prev = view.state.get("overlap", view.keys.new_zeros(b, h, n_old, pad, dtype=torch.float32))
            x, ema, overlap = token_features(
                view.attention.reshape(r, view.n_new, n), positions, valid, ema_prev.reshape(r, n_old, cfg.num_bins),
                ovl_prev.reshape(r, n_old, pad), view.n_new, self.stats, cfg, collect_stats=self.collect_stats)
            state = {"ema": ema.reshape(b, h, n, cfg.num_bins), "overlap": overlap.reshape(b, h, n, pad)}
        return x, state

    def step(self, view: LayerView) -> Decision:
        b, h, n = view.valid.shape
        x, state = self.inputs(view)
        rows = view.rows if view.rows is not None else torch.arange(b)
        scores = bam_scores(x, view.valid.reshape(b * h, n), self.row_params(rows, h, x.device), self.config)
        return select_tokens(scores.reshape(b, h, n), view.valid, self.config.threshold), state

    def describe(self) -> dict:
        return {**super().describe(), "members": len(self.params), "config": self.config.to_dict()}


class HoldPolicy(MemoryPolicy):
    """Buffers what `inner` needs but never evicts; used to compute a shared prefix once before
    `MemoryCache.fork` hands the cache to `inner` (e.g. a NAMM population)."""

    name = "hold"

    def __init__(self, inner: MemoryPolicy):
        super().__init__(delay=2 ** 62)
        self.needs_attention, self.attention_dtype = inner.needs_attention, inner.attention_dtype
        self.inner = inner

    def attention_stream(self) -> AttentionStream | None:
        return self.inner.attention_stream()

    def step(self, view: LayerView) -> Decision:
        return view.valid.clone(), dict(view.state)


POLICIES = {"full": FullCache, "recency": Recency, "h2o": H2O, "l2": L2Norm, "snapkv": SnapKV,
            "random": RandomEviction, "namm": NAMMPolicy, "oracle": FutureAttention}


def make_policy(name: str, **kwargs) -> MemoryPolicy:
    """Build a policy by name ('full', 'recency', 'h2o', 'l2', 'snapkv', 'random', 'namm', 'oracle')."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)
