"""MemoryCache: a transformers Cache whose layers prune keys, values and per-token state together.

Each layer keeps, per batch row and KV head: keys/values after RoPE, the sequence column each slot came from
(padding included: what the model's attention mask indexes; minus the row's left padding it is the row's own
position of the token, what policies see), a validity flag (False for padding tokens and for the filler slots that
keep the cache rectangular when rows or heads keep different counts) and the policy's per-token state.

Every row has its own clock: its tokens seen count only its real tokens, and the policy runs for a row when that
count reaches a multiple of `policy.delay`, on exactly the queries since the row's previous step. The attention
function (`attention.py`) drives a layer through one forward: `admit` marks the new tokens real or padding (read
from the model's mask) and says where to cut the forward's queries so that each step happens at its boundary;
`record` buffers the attention of each piece; `advance` moves the clocks and runs the steps due. A one-shot
forward therefore equals the same tokens fed in chunks cut at the boundaries, and a left-padded batch gives each
row what its prompt alone gives.

`get_seq_length()` reports the sequence columns processed (padding included), so models and `generate()` place
new tokens correctly; `row_tokens_seen()` gives each row's own count.
"""
from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer

from .features import gqa_mean
from .policies import LayerView, MemoryPolicy
from .streams import fit_slots, gather_slots

_CAPTURE = threading.local()  # pending: (cache, layer_idx) awaiting its attention call; cache: the last one


class CaptureError(RuntimeError):
    """The model's attention did not (or cannot) go through the memory attention function."""


class UnsupportedAttention(ValueError):
    """The model asks its attention for a feature the memory attention does not reproduce exactly."""


class UnsupportedCacheMethod(UnsupportedAttention, AttributeError):
    """The model calls a method of its own cache type on a MemoryCache layer (state a MemoryCache does not keep).
    Also an AttributeError, so `hasattr` and `getattr(layer, name, default)` keep their meaning."""


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


def _pending(blk: Block) -> torch.Tensor:
    """A block's (B, q) pending mask, materialised."""
    if blk.pending is not None:
        return blk.pending
    b, _, q, _ = blk.attention.shape
    return torch.ones(b, q, dtype=torch.bool, device=blk.attention.device)


@dataclass
class EvictionRecord:
    layer: int
    tokens_seen: int  # the stepping rows' own token count
    before: int  # valid slots before (mean over the stepping rows' KV heads, floored)
    after: int
    rows: tuple[int, ...] = (0,)  # the batch rows that stepped
    after_rows: tuple[float, ...] = ()  # valid slots after, per stepping row (mean over KV heads)


@dataclass
class Block:
    """Buffered attention of one piece of a forward: (B, H_kv, q, N then), and which of its queries are real
    tokens of each row not yet read by that row's eviction step (B, q; None = all, while the rows are in lockstep)."""

    attention: torch.Tensor
    pending: torch.Tensor | None = None


class MemoryLayer(DynamicLayer):
    """One layer of a MemoryCache."""

    def __init__(self, cache: "MemoryCache", layer_idx: int):
        super().__init__()
        # a weak link back: a strong one would make every cache a reference cycle, freed (GPU memory included) only
        # whenever Python's cycle collector runs -- caches of earlier samples piled up on the GPU until then
        self._cache, self.layer_idx = weakref.ref(cache), layer_idx
        self.columns: torch.Tensor | None = None  # (B, H, N) sequence column of each slot
        self.valid: torch.Tensor | None = None
        # keys, values, columns and valid are views of the first N slots of preallocated storage (B, H, capacity,
        # ...): a forward writes its new slots in place, an eviction step compacts the kept slots to the front;
        # storage grows geometrically, so appending never copies the cache except when capacity runs out
        self.storage: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}  # (B, H, S, ...) for the first S slots; later slots: zeros
        self.buffer: list[Block] = []
        # the policy's running summary of the attention (None: every query's attention row is buffered)
        self.stream = cache.policy.attention_stream() if cache.policy.needs_attention else None
        self.tokens_seen = 0  # sequence columns processed (padding included)
        self.seen: list[int] = []  # per row: own (real) tokens processed
        self.since: list[int] = []  # per row: own tokens since the row's last step
        self.steps: list[int] = []  # per row: steps run
        self.offset: list[int] = []  # per row: padding columns before its first real token
        self.all_valid = True  # no padding and no filler slot anywhere (lets single queries skip the mask)
        self.lockstep = True  # no padding ever: all rows share one clock
        self.awaiting_capture = False
        self.latents_checked = False  # latent-attention families: their expansion of the slots was checked once
        self.head_pattern: tuple | None = None  # (g, repeats?, query-head order) of keys with g x the stored heads
        # per-slot tensors besides the storage that an eviction step inside the forward in progress compacts with
        # the slots (a latent-attention family's expanded keys and values, (B, H, N, D)); cleared by finish()
        self.riders: list[torch.Tensor] = []
        self._future = 0  # slots of the forward in progress that no query has reached yet
        self._real: torch.Tensor | None = None  # (B, q) real tokens of the forward in progress
        self._due: dict[int, list[int]] = {}  # piece end -> rows stepping there

    @property
    def cache(self) -> "MemoryCache":
        cache = self._cache()
        if cache is None:
            raise ReferenceError("this MemoryLayer's MemoryCache has been freed; keep a reference to the cache for as "
                                 "long as you use its layers")
        return cache

    def __getattr__(self, name: str):
        """Only called for attributes a MemoryLayer does not have: a model family asking its cache layer for its
        own kind of state (e.g. compressed-attention buffers) is refused by name instead of failing inside it."""
        if name.startswith("_") or name in ("cache", "layer_idx"):
            raise AttributeError(name)
        raise UnsupportedCacheMethod(
            f"the model asks layer {self.layer_idx} of its cache for `{name}`, a method of its own cache type that a "
            f"MemoryCache does not have: this model family keeps state in its cache beyond keys and values, which "
            f"namm_transfer cannot evict exactly (run it without a MemoryCache)")

    # ---- transformers layer API -------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if self.awaiting_capture:
            raise self.cache.capture_error(self.layer_idx)
        b, h, q, _ = key_states.shape
        if not self.seen:
            self.seen, self.since, self.steps, self.offset = [0] * b, [0] * b, [0] * b, [0] * b
        elif len(self.seen) != b:
            raise ValueError(f"a MemoryCache holds {len(self.seen)} batch rows; got a forward with {b}")
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
        n = self.length
        self.reserve(n + q, key_states, value_states)
        st = self.storage
        st["keys"][:, :, n:n + q] = key_states
        st["values"][:, :, n:n + q] = value_states
        st["columns"][:, :, n:n + q] = torch.arange(self.tokens_seen, self.tokens_seen + q, device=self.device)
        st["valid"][:, :, n:n + q] = True
        self._view(n + q)
        self._future = q
        self.awaiting_capture = True
        _CAPTURE.pending = (self.cache, self.layer_idx)
        _CAPTURE.cache = weakref.ref(self.cache)  # the cache whose key storage attention calls are checked against
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.tokens_seen + query_length, 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("MemoryCache cannot be cropped (evicted tokens are gone)")

    # ---- one forward, driven by the attention function --------------------------------------------
    @property
    def length(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[2]

    # ---- storage ----------------------------------------------------------------------------------
    def capacity(self) -> int:
        """Slots the storage holds before it has to grow."""
        return self.storage["keys"].shape[2] if self.storage else 0

    def reserve(self, slots: int, keys_like: torch.Tensor, values_like: torch.Tensor) -> None:
        """Make room for `slots` slots: new storage with 25% (at least 256 slots) headroom holding the current
        ones (the only time appending copies the cache: O(log) times over a sequence, not every forward)."""
        if slots <= self.capacity():
            return
        b, h = keys_like.shape[:2]
        cap = slots + max(256, slots // 4)
        new = {"keys": keys_like.new_empty(b, h, cap, keys_like.shape[-1]),
               "values": values_like.new_empty(b, h, cap, values_like.shape[-1]),
               "columns": torch.empty(b, h, cap, dtype=torch.long, device=keys_like.device),
               "valid": torch.zeros(b, h, cap, dtype=torch.bool, device=keys_like.device)}
        n = self.length
        if n:
            for name in new:
                new[name][:, :, :n] = getattr(self, name)
        self.storage = new
        self._view(n)

    def _view(self, n: int) -> None:
        """Point keys, values, columns and valid at the storage's first n slots (no copy)."""
        st = self.storage
        self.keys, self.values = st["keys"][:, :, :n], st["values"][:, :, :n]
        self.columns, self.valid = st["columns"][:, :, :n], st["valid"][:, :, :n]

    def load(self, keys: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, valid: torch.Tensor) -> None:
        """Fill the layer with these slots (a fork's copy): fresh storage sized to them plus headroom."""
        self.storage, self.keys, self.values, self.columns, self.valid = {}, None, None, None, None
        self.device, self.is_initialized = keys.device, True
        self.reserve(keys.shape[2], keys, values)
        n = keys.shape[2]
        for name, t in (("keys", keys), ("values", values), ("columns", columns), ("valid", valid)):
            self.storage[name][:, :, :n] = t
        self._view(n)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("MemoryCache does not support beam search (rows evict independently); "
                                  "decode greedily or sample")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("MemoryCache rows cannot be repeated in place; use MemoryCache.fork(policy, "
                                  "repeats) instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("MemoryCache rows cannot be selected in place; use MemoryCache.fork(policy, "
                                  "rows=[...]) instead")

    @property
    def positions(self) -> torch.Tensor:
        """(B, H, N) each slot's position in its row's own tokens (meaningless on invalid slots)."""
        if self.lockstep:
            return self.columns
        return self.columns - torch.tensor(self.offset, device=self.columns.device)[:, None, None]

    @property
    def wants_attention(self) -> bool:
        return self.cache.policy.needs_attention and self.cache.policy.evicts

    def admit(self, real: torch.Tensor | None) -> list[int]:
        """Mark the forward's q new slots real or padding (real (B, q) bool; None = all real), give them their
        rows' own positions, and return the ends of the pieces the queries are cut into (ascending, last = q):
        a row's eviction step falls at the end of a piece."""
        q, b = self._future, len(self.seen)
        lead = [0] * b
        if real is not None:
            lead = (~real).sum(-1).tolist()
            if any(lead):
                expect = torch.arange(q, device=real.device)[None] >= torch.tensor(lead, device=real.device)[:, None]
                if not torch.equal(expect, real) or any(l and s for l, s in zip(lead, self.seen)):
                    raise UnsupportedAttention("only left padding is supported: a row's attention_mask has a 0 "
                                               "after its first 1")
        if any(lead):
            self.all_valid = self.lockstep = False
            new_valid = (torch.arange(q, device=self.valid.device)[None]
                         >= torch.tensor(lead, device=self.valid.device)[:, None])
            self.valid[..., -q:] = new_valid[:, None, :]
            for r in range(b):
                if self.seen[r] == 0:
                    self.offset[r] = self.tokens_seen + lead[r]
        self._real = None if not any(lead) else new_valid
        self._lead = lead
        self._due = {}
        policy = self.cache.policy
        if policy.evicts:
            d = policy.delay
            for r in range(b):
                until = self.cache.until(r)
                e = lead[r] + d - self.seen[r] % d  # piece end where row r's own count reaches the next multiple
                if not self.cache.cut_forwards and e <= q:
                    e = q  # one step after the forward's last query
                while e <= q and (until is None or self.seen[r] + e - lead[r] <= until):
                    self._due.setdefault(e, []).append(r)
                    e += d
        return sorted({*self._due, q})

    def record(self, probs: torch.Tensor, a: int, e: int) -> None:
        """Buffer the attention (B, H, e - a, N) of the forward's queries [a, e) for the coming steps: in the
        attention's dtype, rounded to the policy's `attention_dtype`, averaged per KV head in that dtype."""
        if not self.wants_attention:
            return
        dtype = self.cache.policy.attention_dtype
        att = gqa_mean(probs if dtype is None else probs.to(dtype), self.keys.shape[1])
        if self.stream is not None:
            self.stream.add(att, None if self._real is None else self._real[:, a:e])
            return
        pending = None
        if not self.lockstep:
            pending = (torch.ones(att.shape[0], e - a, dtype=torch.bool, device=att.device) if self._real is None
                       else self._real[:, a:e].clone())
        self.buffer.append(Block(att, pending))

    def unread_queries(self, q: int) -> int:
        """How many of the next q queries (one piece, never past a step) no step will read: the policy reads only
        the attention of the last `attention_window` queries before each step. Counted only while the rows are
        in lockstep and forwards are cut at the steps (elsewhere every query is buffered)."""
        policy = self.cache.policy
        w = getattr(policy, "attention_window", None)
        if w is None or not self.lockstep or not self.cache.cut_forwards or not self.seen:
            return 0
        return max(0, min(q, policy.delay - w - self.seen[0] % policy.delay))

    def record_unread(self, q: int) -> None:
        """q queries whose attention no step reads: buffered as zero-width rows (zeros when a step reads them)."""
        dtype = self.cache.policy.attention_dtype or self.keys.dtype
        self.buffer.append(Block(self.keys.new_zeros(self.keys.shape[0], self.keys.shape[1], q, 0, dtype=dtype)))

    def advance(self, a: int, e: int) -> None:
        """The forward's queries [a, e) are computed: move the clocks and run the steps due at e."""
        for r, lead in enumerate(self._lead):
            n = max(0, e - max(a, lead))
            self.seen[r] += n
            self.since[r] += n
        self.tokens_seen += e - a
        self._future -= e - a
        rows = self._due.get(e)
        if rows:
            self.step_rows(rows)
        if self.cache.evict_until is not None and self.buffer:
            past = [r for r, s in enumerate(self.seen) if self.cache.until(r) is not None and s > self.cache.until(r)]
            if past:
                self._consume(past)

    def finish(self) -> None:
        self.awaiting_capture = False
        self.riders = []
        _CAPTURE.pending = None

    # ---- eviction ---------------------------------------------------------------------------------
    def step_rows(self, rows: list[int]) -> None:
        """Run the policy for these rows now (rows with the same clocks step together)."""
        groups: dict[tuple[int, int, int], list[int]] = {}
        for r in rows:
            groups.setdefault((self.seen[r], self.since[r], self.steps[r]), []).append(r)
        for (seen, since, step), group in groups.items():
            self._step(group, seen, since, step)

    def _step(self, group: list[int], seen: int, since: int, step: int) -> None:
        policy, n = self.cache.policy, self.length
        nv = n - self._future  # slots the stepping rows have seen (the rest belong to later queries)
        rows = torch.tensor(group, device=self.keys.device)
        every_row = len(group) == self.valid.shape[0]
        whole = every_row and nv == n  # the step covers the whole layer (no other row, no later query)

        def sub(t: torch.Tensor, width: int = nv) -> torch.Tensor:  # the stepping rows' first `width` slots
            return t[:, :, :width] if every_row else t[rows, :, :width]
        attention = summary = None
        if self.stream is not None:
            summary = self.stream.take(rows, nv, since, every_row)
        elif policy.needs_attention:
            attention = self._take_attention(rows, since, nv)
        view = LayerView(self.layer_idx, sub(self.keys), sub(self.values), sub(self.positions), sub(self.valid),
                         attention, since, seen, step, {k: sub(fit_slots(v, nv - since, 2)) for k, v in self.state.items()},
                         rows=rows, summary=summary)
        keep_rows, state = policy.step(view)
        keep_rows = keep_rows & view.valid
        if whole:
            keep = keep_rows
        else:  # other rows keep their valid slots, later queries' slots stay
            keep = self.valid.clone()
            keep[..., nv:] = True
            keep[rows, :, :nv] = keep_rows
        if self.cache.on_evict is not None:
            self.cache.on_evict(self, keep)
        for name, value in state.items():
            if whole:
                self.state[name] = value
                continue
            full = self.state.get(name)
            full = value.new_zeros(*self.valid.shape, *value.shape[3:]) if full is None else fit_slots(full, n, 2)
            full[rows, :, :nv] = value.to(full.dtype)
            self.state[name] = full
        for r in group:
            self.since[r], self.steps[r] = 0, self.steps[r] + 1
        counts = torch.cat([view.valid.sum()[None].float(), keep_rows.sum()[None].float(),
                            keep_rows.float().sum(-1).mean(-1)]).tolist()  # before, after, after per row
        self._consume(group)
        self._compact(keep)
        heads = self.valid.shape[1]
        self.cache.log.append(EvictionRecord(self.layer_idx, seen, int(counts[0]) // (len(group) * heads),
                                             int(counts[1]) // (len(group) * heads), tuple(group), tuple(counts[2:])))

    def _take_attention(self, rows: torch.Tensor, t: int, nv: int) -> torch.Tensor:
        """(R, H_kv, t, nv) float: the attention of each stepping row's t queries since its last step."""
        n = self.length
        if self.lockstep and len(rows) == self.valid.shape[0]:  # every buffered query is pending for every row
            att = torch.cat([F.pad(blk.attention, (0, n - blk.attention.shape[-1])) for blk in self.buffer], dim=2)
            return att[..., :nv].float()
        att = torch.cat([F.pad(blk.attention[rows], (0, n - blk.attention.shape[-1])) for blk in self.buffer], dim=2)
        pending = torch.cat([_pending(blk)[rows] for blk in self.buffer], dim=1)
        if not bool((pending.sum(-1) == t).all()):
            raise RuntimeError(f"layer {self.layer_idx}: buffered queries do not match the {t} tokens since the "
                               "last step")
        order = torch.sort((~pending).to(torch.uint8), dim=1, stable=True).indices[:, :t]
        att = att.gather(2, order[:, None, :, None].expand(-1, att.shape[1], -1, n))
        return att[..., :nv].float()

    def _consume(self, rows: list[int]) -> None:
        """These rows' buffered queries have been read; drop blocks nobody needs any more."""
        if self.lockstep and len(rows) == self.valid.shape[0]:
            self.buffer.clear()
            return
        for blk in self.buffer:
            blk.pending = _pending(blk)
            blk.pending[rows] = False
        self.buffer = [blk for blk in self.buffer if bool(blk.pending.any())]

    def _compact(self, keep: torch.Tensor) -> None:
        if bool(keep.all()):
            return
        idx, filled = compact(keep)
        n, k = keep.shape[-1], idx.shape[-1]
        kept = {"keys": gather_tokens(self.keys, idx), "values": gather_tokens(self.values, idx),
                "columns": gather_tokens(self.columns, idx),
                "valid": filled & gather_tokens(self.valid, idx)}  # padding not yet reached stays invalid
        for name, t in kept.items():  # compacted to the front of the same storage
            self.storage[name][:, :, :k] = t
        self._view(k)
        self.riders = [gather_tokens(t, idx.repeat_interleave(t.shape[1] // idx.shape[1], dim=1))
                       for t in self.riders]
        self.state = {k: gather_tokens(fit_slots(v, n, 2), idx) for k, v in self.state.items()}
        if self.stream is not None:
            self.stream.gather(idx, n)
        for blk in self.buffer:
            blk.attention = gather_slots(fit_slots(blk.attention, n, 3), idx)
        self.all_valid = bool(self.valid.all())

    def evict(self) -> None:
        """Run the due steps of every row whose clock sits on a multiple of the delay (used after `fork`)."""
        d = self.cache.policy.delay
        due = [r for r, (s, t) in enumerate(zip(self.seen, self.since))
               if t and s % d == 0 and (self.cache.until(r) is None or s <= self.cache.until(r))]
        if due:
            self.step_rows(due)


def fork_states(old: LinearAttentionLayer, index: torch.Tensor) -> LinearAttentionLayer:
    """A copy of a linear-attention layer's states holding batch rows `index`: its per-state tables copied, the rows
    picked by transformers' own `reorder_cache` (index_select on each initialised state's batch axis)."""
    new = copy.copy(old)
    for name, table in vars(old).items():
        if isinstance(table, dict):  # conv / recurrent states and their per-state flags
            setattr(new, name, dict(table))
    new.reorder_cache(index)
    return new


class MemoryCache(Cache):
    """A Cache driven by a MemoryPolicy. Create one per sequence (or batch of sequences)."""

    def __init__(self, policy: MemoryPolicy, on_evict=None, evict_until: int | list[int] | None = None,
                 cut_forwards: bool = True):
        super().__init__(layers=[])
        self.policy = policy
        # True: a forward is cut where a row reaches a multiple of the delay, so each step sees exactly `delay`
        # new tokens wherever the forwards start and end. False: a forward that crosses a multiple runs one step
        # after its last query, over all its tokens (the Decision Transformer's per-timestep window).
        self.cut_forwards = cut_forwards
        # eviction steps only at own token counts <= this (one per row when a list; None: no limit)
        self.evict_until = list(evict_until) if isinstance(evict_until, (list, tuple)) else evict_until
        self.log: list[EvictionRecord] = []
        self.on_evict = on_evict  # callback(layer, keep_mask) before pruning: retention maps, tests
        # convolution / recurrent states of a hybrid model's linear-attention or state-space layers, kept whole (only
        # keys and values are evicted), in transformers' own layer type so they update as under a DynamicCache
        self.states: dict[int, LinearAttentionLayer] = {}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(MemoryLayer(self, len(self.layers)))
        for layer in self.layers:
            if layer.awaiting_capture and layer.layer_idx != layer_idx:
                raise self.capture_error(layer.layer_idx)
        return self.layers[layer_idx].update(key_states, value_states)

    # ---- states of a hybrid model's linear-attention layers (enable_memory_attention lets only the families
    # checked exact through here: attention.HYBRID_FAMILIES) ------------------------------------------------
    def _state_layer(self, layer_idx: int, state_idx: int) -> LinearAttentionLayer:
        layer = self.states.get(layer_idx)
        if layer is None:
            layer = self.states[layer_idx] = LinearAttentionLayer(number_of_states=state_idx + 1)
        for i in range(layer.number_of_states, state_idx + 1):  # a further state of this layer
            for table in (layer.conv_states, layer.recurrent_states, layer.conv_kernel_size):
                table[i] = None
            for table in (layer.is_conv_states_initialized, layer.is_recurrent_states_initialized,
                          layer.has_previous_state):
                table[i] = False
            layer.number_of_states = i + 1
        return layer

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        layer = self.states.get(layer_idx)
        return layer.conv_states[state_idx] if layer is not None and layer.has_previous_state.get(state_idx) else None

    def update_conv_state(self, conv_states, layer_idx: int, state_idx: int = 0, **kwargs):
        return self._state_layer(layer_idx, state_idx).update_conv_state(conv_states, state_idx, **kwargs)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        layer = self.states.get(layer_idx)
        return layer.recurrent_states[state_idx] if layer is not None and layer.has_previous_state.get(state_idx) \
            else None

    def update_recurrent_state(self, recurrent_states, layer_idx: int, state_idx: int = 0, **kwargs):
        return self._state_layer(layer_idx, state_idx).update_recurrent_state(recurrent_states, state_idx, **kwargs)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        if layer_idx is None:  # as transformers' Cache: the last linear-attention layer
            layer_idx = max(self.states, default=None)
        layer = self.states.get(layer_idx) if layer_idx is not None else None
        if layer is None:
            return False
        return all(layer.has_previous_state.values()) if state_idx is None else \
            bool(layer.has_previous_state.get(state_idx, False))

    def is_recording_past(self, layer_idx: int) -> bool:
        return False  # a MemoryCache cannot be cropped

    def update_indexer(self, indexer_key_states, layer_idx: int, *args, **kwargs):
        raise UnsupportedCacheMethod(
            f"the model asks its cache for an indexer key cache for layer {layer_idx}: this model family keeps more "
            "than attention keys and values in its cache (a sparse-attention indexer's keys, which select the keys "
            "each query reads), which a MemoryCache does not hold and namm_transfer cannot evict exactly (run it "
            "without a MemoryCache)")

    def until(self, row: int) -> int | None:
        """Row `row`'s last own token count at which an eviction step may run (None: no limit)."""
        return self.evict_until[row] if isinstance(self.evict_until, list) else self.evict_until

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by layer `layer_idx`, or (a hybrid's linear-attention layer, which stores no keys) by the
        attention layers."""
        if layer_idx < len(self.layers) and self.layers[layer_idx].is_initialized:
            return self.layers[layer_idx].tokens_seen
        return self.tokens_seen

    @property
    def kv_layers(self) -> list["MemoryLayer"]:
        """The layers that store keys and values (a hybrid model's linear-attention layers have none)."""
        return [layer for layer in self.layers if layer.is_initialized]

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def capture_error(self, layer_idx: int) -> CaptureError:
        return CaptureError(
            f"the attention of layer {layer_idx} was not routed through namm_transfer's memory attention: either "
            "namm_transfer.enable_memory_attention(model) was not called on this model (call it before running it "
            "with a MemoryCache), or the model computes this layer's attention in its own code instead of calling "
            "transformers' AttentionInterface (e.g. GIT's text layers), which a MemoryCache cannot capture: such a "
            "family is not supported.")

    def assert_captured(self) -> None:
        for layer in self.layers:
            if layer.awaiting_capture:
                raise self.capture_error(layer.layer_idx)

    def __deepcopy__(self, memo: dict) -> "MemoryCache":
        """A copy that goes on by itself (`copy.deepcopy(prompt_cache)`, transformers' way to reuse a prompt):
        everything copied, the copied layers' weak links to their cache pointed at the copy."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, copy.deepcopy(value, memo))
        for layer in new.layers:
            if isinstance(layer, MemoryLayer):
                layer._cache = weakref.ref(new)
        return new

    def fork(self, policy: MemoryPolicy, repeats: int = 1, rows: list[int] | None = None) -> "MemoryCache":
        """A copy holding batch rows `rows` (default all), each repeated `repeats` times, with `policy` in charge,
        running the eviction steps that are due now. Lets P population members share the computation of a common
        prefix: run the prefix once (batch 1) under `HoldPolicy`, then fork at the first eviction boundary; or
        continue one row of a batch alone (`rows=[b]`)."""
        if policy.needs_attention and not self.policy.needs_attention and any(
                any(layer.since) for layer in self.layers):
            raise ValueError(f"cannot fork into {policy.name!r}: it reads the attention of the tokens since the last "
                             f"step, which this cache's policy {self.policy.name!r} never recorded; run the shared "
                             f"prefix under HoldPolicy({type(policy).__name__}(...)) instead")
        n_rows = len(self.kv_layers[0].seen) if self.kv_layers else 0
        pick = list(range(n_rows)) if rows is None else list(rows)
        index = torch.tensor(pick, dtype=torch.long).repeat_interleave(repeats)
        until = [self.evict_until[r] for r in index.tolist()] if isinstance(self.evict_until, list) else \
            self.evict_until
        new = MemoryCache(policy, on_evict=self.on_evict, evict_until=until, cut_forwards=self.cut_forwards)
        rep = lambda t: t[index.to(t.device)]  # noqa: E731
        per_row = lambda xs: [xs[r] for r in index.tolist()]  # noqa: E731
        for old in self.layers:
            layer = MemoryLayer(new, old.layer_idx)
            if not old.is_initialized:  # a layer that stored nothing yet
                new.layers.append(layer)
                continue
            layer.load(rep(old.keys), rep(old.values), rep(old.columns), rep(old.valid))
            layer.state = {k: rep(v) for k, v in old.state.items()}
            layer.buffer = [Block(rep(blk.attention), None if blk.pending is None else rep(blk.pending))
                            for blk in old.buffer]
            if old.stream is not None:
                if layer.stream is None or type(layer.stream) is not type(old.stream):
                    raise ValueError(f"cannot fork: the cache streams attention as {type(old.stream).__name__}, "
                                     f"the new policy {policy.name!r} reads it differently")
                layer.stream = old.stream.repeat(index.to(old.keys.device))
            layer.tokens_seen, layer.all_valid, layer.lockstep = old.tokens_seen, old.all_valid, old.lockstep
            layer.seen, layer.since = per_row(old.seen), per_row(old.since)
            layer.steps, layer.offset = per_row(old.steps), per_row(old.offset)
            new.layers.append(layer)
            if policy.evicts:
                layer.evict()
        for idx, old in self.states.items():  # a hybrid's linear-attention states: the picked rows, copied
            new.states[idx] = fork_states(old, index)
        for rec in self.log:  # earlier steps, renumbered to the new rows
            mine = [(i, rec.after_rows[rec.rows.index(r)]) for i, r in enumerate(index.tolist()) if r in rec.rows]
            if mine:
                new.log.append(replace(rec, rows=tuple(i for i, _ in mine), after_rows=tuple(a for _, a in mine)))
        new.log.sort(key=lambda rec: rec.tokens_seen)
        return new

    # ---- statistics -------------------------------------------------------------------------------
    def cache_lengths(self) -> list[float]:
        """Mean number of valid slots per layer (over batch rows and KV heads)."""
        return [float(l.valid.float().sum(-1).mean()) if l.valid is not None else 0.0 for l in self.kv_layers]

    def stored_bytes(self) -> int:
        """Bytes held now: the slot storage as allocated (keys, values, columns, validity, headroom included),
        per-token state, buffered attention rows and a hybrid's linear-attention states."""
        total = sum(t.numel() * t.element_size() for layer in self.states.values()
                    for t in (*layer.conv_states.values(), *layer.recurrent_states.values()) if t is not None)
        for l in self.layers:
            tensors = [*l.storage.values(), *l.state.values(), *(b.attention for b in l.buffer)]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
            total += l.stream.nbytes() if l.stream is not None else 0
        return total

    @property
    def tokens_seen(self) -> int:
        """Sequence columns processed (padding included; equals each row's tokens seen without padding)."""
        layers = self.kv_layers
        return layers[0].tokens_seen if layers else 0

    def row_tokens_seen(self) -> list[int]:
        """Each batch row's own tokens processed (its padding excluded)."""
        layers = self.kv_layers
        return list(layers[0].seen) if layers else []

    def row_fractions(self) -> list[float]:
        """Per batch row: mean over layers of stored / seen tokens, now."""
        seen = self.row_tokens_seen()
        if not seen:
            return []
        stored = torch.stack([l.valid.float().sum(-1).mean(-1) for l in self.kv_layers]).cpu()  # (layers, B)
        return [float((stored[:, r] / s).mean()) if s else 1.0 for r, s in enumerate(seen)]

    def realised_fraction(self) -> float:
        """Mean over rows and layers of stored / seen tokens, now."""
        fractions = self.row_fractions()
        return sum(fractions) / len(fractions) if fractions else 1.0

    def kept_fractions(self) -> list[float]:
        """Per batch row: stored / seen right after each layer's last eviction step for that row, mean over the
        layers that evicted (1.0 for a row never evicted)."""
        last: dict[tuple[int, int], float] = {}
        for rec in self.log:
            for r, after in zip(rec.rows, rec.after_rows):
                last[(r, rec.layer)] = after / rec.tokens_seen
        out = []
        for r in range(len(self.row_tokens_seen())):
            mine = [v for (row, _), v in last.items() if row == r]
            out.append(sum(mine) / len(mine) if mine else 1.0)
        return out
