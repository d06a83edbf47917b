"""MemoryCache: a transformers Cache whose layers prune keys, values and per-token state together.

Each layer keeps, per batch row and KV head: keys/values after RoPE, the original absolute position of
every slot, a validity flag (padding slots when batch rows keep different counts), and the policy's
per-token state. Between eviction steps the attention rows of new queries (handed over by the attention
function in `attention.py`) are buffered; when the total number of processed tokens reaches a multiple of
`policy.delay` the policy runs and the layer is pruned. This happens right after the layer's attention in
the forward that completes the block, which is equivalent to pruning after that forward.

`get_seq_length()` reports the number of tokens *seen* (not stored), so models and `generate()` place new
tokens at their true absolute positions.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .features import gqa_mean
from .policies import LayerView, MemoryPolicy

_CAPTURE = threading.local()  # (cache, layer_idx) awaiting its attention call


class CaptureError(RuntimeError):
    """The model's attention did not go through the memory attention function."""


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather along the token axis (dim 2) with idx (B, H, K); trailing dims follow."""
    index = idx.reshape(*idx.shape, *([1] * (x.dim() - 3))).expand(*idx.shape, *x.shape[3:])
    return x.gather(2, index)


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask (B, H, N) -> (indices (B, H, K) ascending, valid (B, H, K)), K = max kept count.

    Rows/heads that keep fewer than K slots are left-padded with evicted slots marked invalid.
    """
    n = keep.shape[-1]
    counts = keep.sum(-1)
    k = int(counts.max())
    arange = torch.arange(n, device=keep.device)
    order = torch.sort(torch.where(keep, arange + n, arange), dim=-1).indices[..., n - k:]
    valid = torch.arange(k, device=keep.device) >= (k - counts)[..., None]
    return order, valid


@dataclass
class EvictionRecord:
    layer: int
    tokens_seen: int
    before: int  # valid slots before (mean over batch x heads)
    after: int


class MemoryLayer(DynamicLayer):
    """One layer of a MemoryCache."""

    def __init__(self, cache: "MemoryCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.buffer: list[torch.Tensor] = []
        self.tokens_seen = 0
        self.since_step = 0
        self.steps = 0
        self.awaiting_capture = False

    # ---- transformers layer API -------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if self.awaiting_capture:
            raise self.cache.capture_error(self.layer_idx)
        b, h, q, _ = key_states.shape
        super().update(key_states, value_states)
        pos = torch.arange(self.tokens_seen, self.tokens_seen + q, device=key_states.device)
        pos = pos.expand(b, h, q)
        new_valid = torch.ones(b, h, q, dtype=torch.bool, device=key_states.device)
        self.positions = pos if self.positions is None else torch.cat([self.positions, pos], dim=2)
        self.valid = new_valid if self.valid is None else torch.cat([self.valid, new_valid], dim=2)
        self.tokens_seen += q
        self.since_step += q
        self.awaiting_capture = True
        _CAPTURE.pending = (self.cache, self.layer_idx)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.tokens_seen + query_length, 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("MemoryCache cannot be cropped (evicted tokens are gone)")

    # ---- memory -----------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[2]

    def attention_mask(self, q_len: int) -> torch.Tensor | None:
        """Bool (B, H_kv, q, N) visibility: every valid older slot + causal among the q new slots.
        None when plain causal attention over all slots is exact."""
        n = self.length
        if q_len == 1 and bool(self.valid.all()):
            return None
        col = torch.arange(n, device=self.keys.device)
        row = torch.arange(q_len, device=self.keys.device)
        causal = col[None, :] <= row[:, None] + (n - q_len)
        return causal[None, None] & self.valid[:, :, None, :]

    def record_attention(self, probs: torch.Tensor, num_kv_heads: int) -> None:
        """Buffer the new queries' attention (B, H, q, N), rounded and averaged per KV head."""
        policy = self.cache.policy
        if policy.attention_dtype is not None:
            probs = probs.to(policy.attention_dtype)
        self.buffer.append(gqa_mean(probs.float(), num_kv_heads))

    def after_attention(self, q_len: int) -> None:
        """Called once the layer's attention for this forward is computed; evicts on schedule."""
        self.awaiting_capture = False
        _CAPTURE.pending = None
        policy, until = self.cache.policy, self.cache.evict_until
        if not policy.evicts or (until is not None and self.tokens_seen > until):
            self.buffer.clear()
            return
        delay = policy.delay
        if self.tokens_seen // delay > (self.tokens_seen - q_len) // delay:
            self.evict()

    def evict(self) -> None:
        policy, n = self.cache.policy, self.length
        attention = None
        if policy.needs_attention:
            attention = torch.cat([torch.nn.functional.pad(a, (0, n - a.shape[-1])) for a in self.buffer], dim=2)
        view = LayerView(self.layer_idx, self.keys, self.values, self.positions, self.valid, attention,
                         self.since_step, self.tokens_seen, self.steps, self.state)
        keep, state = policy.step(view)
        keep = keep & self.valid
        if self.cache.on_evict is not None:
            self.cache.on_evict(self, keep)
        before = int(self.valid.sum()) // max(self.valid.shape[0] * self.valid.shape[1], 1)
        if bool(keep.all()):
            self.state = state
        else:
            idx, valid = compact(keep)
            self.keys, self.values = gather_tokens(self.keys, idx), gather_tokens(self.values, idx)
            self.positions, self.valid = gather_tokens(self.positions, idx), valid
            self.state = {k: gather_tokens(v, idx) for k, v in state.items()}
        self.buffer.clear()
        self.since_step = 0
        self.steps += 1
        after = int(self.valid.sum()) // max(self.valid.shape[0] * self.valid.shape[1], 1)
        self.cache.log.append(EvictionRecord(self.layer_idx, self.tokens_seen, before, after))


class MemoryCache(Cache):
    """A Cache driven by a MemoryPolicy. Create one per sequence (or batch of sequences)."""

    def __init__(self, policy: MemoryPolicy, on_evict=None, evict_until: int | None = None):
        super().__init__(layers=[])
        self.policy = policy
        self.evict_until = evict_until  # eviction steps only at token counts <= this (None: no limit)
        self.log: list[EvictionRecord] = []
        self.on_evict = on_evict  # callback(layer, keep_mask) before pruning: retention maps, tests

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(MemoryLayer(self, len(self.layers)))
        for layer in self.layers:
            if layer.awaiting_capture and layer.layer_idx != layer_idx:
                raise self.capture_error(layer.layer_idx)
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].tokens_seen if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def capture_error(self, layer_idx: int) -> CaptureError:
        return CaptureError(
            f"the attention of layer {layer_idx} was not routed through namm_transfer's memory attention. "
            "Call namm_transfer.enable_memory_attention(model) before running it with a MemoryCache; "
            "models whose attention does not use transformers' AttentionInterface cannot be captured.")

    def assert_captured(self) -> None:
        for layer in self.layers:
            if layer.awaiting_capture:
                raise self.capture_error(layer.layer_idx)

    def fork(self, policy: MemoryPolicy, repeats: int) -> "MemoryCache":
        """A copy with every batch row repeated `repeats` times and `policy` in charge, running the eviction
        steps that are due now. Lets P population members share the computation of a common prefix: run the
        prefix once (batch 1) under `HoldPolicy`, then fork at the first eviction boundary."""
        new = MemoryCache(policy, on_evict=self.on_evict)
        rep = lambda t: t.repeat_interleave(repeats, dim=0)  # noqa: E731
        for old in self.layers:
            layer = MemoryLayer(new, old.layer_idx)
            layer.keys, layer.values = rep(old.keys), rep(old.values)
            layer.positions, layer.valid = rep(old.positions), rep(old.valid)
            layer.state = {k: rep(v) for k, v in old.state.items()}
            layer.buffer = [rep(a) for a in old.buffer]
            layer.tokens_seen, layer.since_step, layer.steps = old.tokens_seen, old.since_step, old.steps
            layer.is_initialized, layer.device = old.is_initialized, getattr(old, "device", None)
            new.layers.append(layer)
            if policy.evicts and layer.since_step and layer.tokens_seen % policy.delay == 0:
                layer.evict()
        new.log = list(self.log)
        return new

    # ---- statistics -------------------------------------------------------------------------------
    def cache_lengths(self) -> list[float]:
        """Mean number of valid slots per layer (over batch rows and KV heads)."""
        return [float(l.valid.float().sum(-1).mean()) if l.valid is not None else 0.0 for l in self.layers]

    def stored_bytes(self) -> int:
        """Bytes held now: keys, values, per-token state and buffered attention rows."""
        total = 0
        for l in self.layers:
            tensors = [l.keys, l.values, l.positions, *l.state.values(), *l.buffer]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total

    @property
    def tokens_seen(self) -> int:
        return self.layers[0].tokens_seen if self.layers else 0

    def realised_fraction(self) -> float:
        """Mean over layers of stored / seen tokens, now."""
        lengths = self.cache_lengths()
        return sum(lengths) / len(lengths) / self.tokens_seen if self.tokens_seen else 1.0
