"""Attention through transformers' public AttentionInterface, exact over the keys a MemoryCache holds.

`enable_memory_attention(model)` registers `memory_attention` under the name "namm_memory" and switches the
model to it. With a MemoryCache each call computes what the model's own eager attention computes, restricted to
the kept keys:
  * visibility: the model's own 4D mask (causality, left padding, sliding windows, block patterns) read at each
    kept key's original sequence column, and the layer's `sliding_window` on top (a window never lets an
    evicted key back, and eviction never brings back a key the window hides);
  * logits q k^T * scaling, soft-capped by tanh when the model passes `softcap` (Gemma2);
  * attention sinks `s_aux` (GPT-OSS): one learned logit per head joins the softmax and is dropped after it;
  * softmax in float32 (with sinks: in the logits' dtype, as GPT-OSS), probabilities cast to the value dtype
    before the product with V (as eager does).
The query block of one forward is cut where any batch row reaches an eviction step, so a one-shot prefill equals
the same tokens fed in chunks. Causal fast path: when no slot of any row is invalid, no window hides a key, the
model's mask is purely causal and the policy reads no attention from these queries (FullCache, L2, recency; the
queries outside SnapKV's observation window), the queries go to fused SDPA with is_causal (no older slot), no mask
(one query) or one shared bottom-right causal mask, as the unmodified model does. Policies that read attention,
after evictions in rows without padding, hide the invalid slots per slot and the forward's own keys by their causal
corner (the same logits as the explicit visibility, without a (B, H, q, N) mask); everything else keeps the
explicit visibility below. The keys and values attended are the tensors `cache.update` returned, or two checked
derivations of them (`attended_tensors`): the stored heads repeated before the call (interleaved or tiled, attended
as grouped heads), and a latent-attention module's `expand_kv` of the stored latents (compacted with the slots).
Anything else (dropout in training, non-causal attention, an argument this module does not know, a mask it cannot
read, keys or values derived otherwise, a second attention call per layer and forward) raises
`UnsupportedAttention` naming it before any output is produced.
Without a MemoryCache the function is transformers' SDPA attention (or the same exact math when the model needs
soft-capping, sinks or attention weights).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .cache import _CAPTURE, CaptureError, UnsupportedAttention

ATTN_NAME = "namm_memory"
# keyword arguments that carry nothing for the attention maths (already applied to q/k/v, or bookkeeping)
IGNORED_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_router_logits",
                            "output_hidden_states", "return_dict"})


@dataclass(frozen=True)
class AttentionSpec:
    """Everything that shapes one layer's attention besides q, k, v and the mask."""

    scaling: float
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # (H,) one logit per query head
    sliding_window: int | None = None  # a query at column t sees columns > t - window
    dropout: float = 0.0
    is_causal: bool = True
    output_attentions: bool = False

    @property
    def exact_only(self) -> bool:
        """Needs the explicit softmax (fused SDPA has no soft-cap, sinks or weights)."""
        return self.softcap is not None or self.sinks is not None or self.output_attentions


def attention_spec(module, query: torch.Tensor, scaling: float | None, dropout: float, kwargs: dict) -> AttentionSpec:
    """Read the attention features the model passes; refuse the ones this module does not reproduce."""
    kw = dict(kwargs)
    spec = AttentionSpec(
        scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
        softcap=kw.pop("softcap", None), sinks=kw.pop("s_aux", None), sliding_window=kw.pop("sliding_window", None),
        dropout=float(dropout or 0.0), output_attentions=bool(kw.pop("output_attentions", False)),
        is_causal=bool(getattr(module, "is_causal", True) if kw.get("is_causal") is None else kw["is_causal"]))
    kw.pop("is_causal", None)
    unknown = sorted(k for k, v in kw.items() if k not in IGNORED_KWARGS and v is not None and v is not False)
    if unknown:
        raise UnsupportedAttention(
            f"{type(module).__name__} passes {', '.join(unknown)} to its attention function; namm_transfer's memory "
            "attention does not reproduce that feature exactly, so this model family is not supported")
    if spec.sinks is not None and spec.sinks.numel() != query.shape[1]:
        raise UnsupportedAttention(f"{type(module).__name__}: attention sinks (s_aux) of shape "
                                   f"{tuple(spec.sinks.shape)} are not one logit per query head ({query.shape[1]})")
    return spec


def boolean_mask(mask: torch.Tensor | None, query: torch.Tensor, kv_length: int) -> torch.Tensor | None:
    """The model's 4D mask as bool (True = visible), checked against the sizes the cache reported."""
    if mask is None:
        return None
    b, h, q = query.shape[:3]
    if mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, h) or mask.shape[2] != q \
            or mask.shape[3] != kv_length:
        raise UnsupportedAttention(
            f"attention mask of shape {tuple(mask.shape)} does not cover the {kv_length} sequence columns seen "
            f"(batch {b}, {q} queries); pass a 2D attention_mask over every token fed so far (padding included)")
    if mask.dtype == torch.bool:
        return mask
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | hidden).all()):
        raise UnsupportedAttention("an additive attention mask with values other than 0 and -inf (an attention "
                                   "bias) is not supported by the memory attention")
    return ~hidden


def real_tokens(mask: torch.Tensor, start: int, batch: int) -> torch.Tensor:
    """(B, q) True where the forward's new token is a real token: its query sees its own key (padding does not)."""
    q = mask.shape[2]
    cols = torch.arange(start, start + q, device=mask.device)
    return mask[:, 0, torch.arange(q, device=mask.device), cols].expand(batch, q)


def visible_keys(mask: torch.Tensor | None, columns: torch.Tensor, valid: torch.Tensor, q_cols: torch.Tensor,
                 sliding_window: int | None) -> torch.Tensor:
    """Bool (B, H_m, q, N): may the query at sequence column q_cols[i] see slot j (column columns[b, h, j])?

    mask: the model's bool mask (B or 1, 1 or H, q, S) indexed by sequence column, or None = causal.
    columns, valid: (B, H_kv, N). H_m is H_kv, or H when the mask has one pattern per query head.
    """
    b, h_kv, n = columns.shape
    if mask is None:
        vis = columns[:, :, None, :] <= q_cols[:, None]
    else:
        heads = mask.shape[1]
        if heads != 1:  # one pattern per query head: expand the slots of each KV head to its query heads
            columns, valid = (t.repeat_interleave(heads // h_kv, dim=1) for t in (columns, valid))
        idx = columns[:, :, None, :].expand(b, columns.shape[1], len(q_cols), n)
        vis = mask.expand(b, columns.shape[1], -1, -1).gather(-1, idx)
    if sliding_window is not None:
        vis = vis & (columns[:, :, None, :] > q_cols[:, None] - sliding_window)
    return vis & valid[:, :, None, :]


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None,
           spec: AttentionSpec, need_probs: bool, training: bool = False, blind_rows: bool = True,
           causal_tail: bool = False, older_valid: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of query (B, H, q, D) over key/value (B, H_kv, N, D); visible (B, H_kv or H, q, N) or None (all).
    `causal_tail` (with visible None): the last t slots hold, in order, the queries' own keys and those of later
    queries of the same forward (t = q, or the slots after `older_valid`'s); each query sees every older slot
    (older_valid (B, H_kv, N - t): only those marked True) and the tail up to its own key.
    `blind_rows`: some query may see no key at all (padding); it then gets zeros, as SDPA gives, not NaN.
    Returns (output (B, H, q, D), probabilities (B, H, q, N) in the query dtype or None)."""
    b, h, q, d = query.shape
    h_kv = key.shape[1]
    if visible is not None and visible.shape[1] != h:
        visible = visible.repeat_interleave(h // visible.shape[1], dim=1)
    dropout = spec.dropout if training else 0.0
    if not need_probs and not spec.exact_only:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=spec.scaling,
                                              dropout_p=dropout, enable_gqa=h != h_kv), None
    # grouped heads without copying K/V: the g query heads of a KV head as one (g * q) block of rows
    scores = torch.matmul(query.reshape(b, h_kv, (h // h_kv) * q, d), key.transpose(-1, -2))
    scores = scores.view(b, h, q, key.shape[2]).mul_(spec.scaling)  # in place: one (B, H, q, N) buffer, not three
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if visible is not None:
        scores.masked_fill_(~visible, float("-inf"))
    elif causal_tail:
        n = key.shape[2]
        t = q if older_valid is None else n - older_valid.shape[-1]
        if older_valid is not None and not bool(older_valid.all()):
            hide_slots(scores.view(b, h_kv, h // h_kv, q, n)[..., :n - t], older_valid)
        if t > 1:  # tail slot j is the key of the forward's query j: query i sees j <= i
            ahead = torch.arange(t, device=scores.device)[None, :] > torch.arange(q, device=scores.device)[:, None]
            scores[..., n - t:].masked_fill_(ahead, float("-inf"))
    if spec.sinks is not None:  # as GPT-OSS's eager: the sink joins the logits, softmax in the logits' dtype
        sink = spec.sinks.to(scores.dtype).reshape(1, h, 1, 1).expand(*scores.shape[:3], 1)
        logits = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1]
    else:  # float32 as eager (float64 models keep float64)
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    del scores
    if visible is not None and blind_rows:
        probs.masked_fill_(~visible.any(-1, keepdim=True), 0.0)
    probs = probs.to(query.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.to(value.dtype).reshape(b, h_kv, (h // h_kv) * q, key.shape[2]), value)
    return out.view(b, h, q, value.shape[-1]), probs


def hide_slots(scores: torch.Tensor, shown: torch.Tensor) -> None:
    """In place: -inf at the slots not shown. scores (B, H_kv, g, q, S), shown (B, H_kv, S) bool.
    Adds a (B, H_kv, 1, 1, S) bias of 0 / -inf (x + 0 == x, x - inf is -inf for every finite x, ~4x faster than a
    broadcast masked_fill here); float16 logits, which can overflow to +inf, take the masked_fill."""
    if scores.dtype == torch.float16:
        scores.masked_fill_(~shown[:, :, None, None], float("-inf"))
        return
    bias = torch.zeros(shown.shape, dtype=scores.dtype, device=scores.device).masked_fill_(~shown, float("-inf"))
    scores.add_(bias[:, :, None, None])


def plain_attention(module, query, key, value, mask, spec: AttentionSpec, kwargs: dict):
    """No MemoryCache in charge of this layer: the model's attention over the keys it was given."""
    if not spec.exact_only:
        rest = {k: v for k, v in kwargs.items() if k not in ("softcap", "s_aux", "sliding_window")}
        return sdpa_attention_forward(module, query, key, value, mask, dropout=spec.dropout, scaling=spec.scaling,
                                      **rest)
    n, q = key.shape[2], query.shape[2]
    mask = boolean_mask(mask, query, n)
    q_cols = torch.arange(n - q, n, device=query.device)
    columns = torch.arange(n, device=query.device).expand(query.shape[0], key.shape[1], n)
    if mask is None and not spec.is_causal:
        mask = torch.ones(1, 1, q, n, dtype=torch.bool, device=query.device)
    vis = visible_keys(mask, columns, torch.ones_like(columns, dtype=torch.bool), q_cols, spec.sliding_window)
    out, probs = attend(query, key, value, vis, spec, spec.output_attentions, training=module.training)
    return out.transpose(1, 2).contiguous(), probs


def scatter_columns(probs: torch.Tensor, columns: torch.Tensor, total: int) -> torch.Tensor:
    """Probabilities over slots (B, H, q, N) -> over sequence columns (B, H, q, total); evicted columns are 0."""
    b, h, q, n = probs.shape
    idx = columns.repeat_interleave(h // columns.shape[1], dim=1)[:, :, None, :].expand(b, h, q, n)
    return probs.new_zeros(b, h, q, total).scatter_add_(-1, idx, probs)


def cache_layer_holding(key: torch.Tensor) -> int | None:
    """The index of the layer of the last-used MemoryCache whose key storage `key` lives in (None: none). Storage,
    not tensor identity: an eviction step re-views the compacted keys as a new tensor over the same storage."""
    ref = getattr(_CAPTURE, "cache", None)
    cache = ref() if ref is not None else None
    if cache is None or not isinstance(key, torch.Tensor):
        return None
    ptr = key.untyped_storage().data_ptr()
    for layer in cache.layers:
        stored = layer.storage.get("keys")
        if stored is not None and stored.untyped_storage().data_ptr() == ptr:
            return layer.layer_idx
    return None


def memory_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function. query (B, H, q, D); key/value (B, H_kv, N, D) from the cache."""
    pending = getattr(_CAPTURE, "pending", None)
    layer_idx = getattr(module, "layer_idx", None)
    if pending is None or pending[1] != layer_idx:
        held = cache_layer_holding(key)
        if held is not None and held != layer_idx:
            _CAPTURE.pending = None
            raise UnsupportedAttention(
                f"{type(module).__name__} (layer_idx {layer_idx}) attends over the keys that cache layer {held} "
                "stored: the memory attention needs every attention module to attend over the cache layer of its "
                "own index (layers that share keys and values, e.g. Gemma 3n's and Gemma 4's KV sharing, and "
                "modules run for several cache layers, e.g. looped models, are not supported)")
        spec = attention_spec(module, query, scaling, dropout, kwargs)
        if held == layer_idx:  # this layer's keys, after its one captured call: a second call per layer and forward
            raise UnsupportedAttention(f"{type(module).__name__} calls its attention more than once per layer and "
                                       "forward over the keys of a MemoryCache; the memory attention reproduces "
                                       "one call per layer only")
        return plain_attention(module, query, key, value, attention_mask, spec, kwargs)
    layer = pending[0].layers[layer_idx]
    try:
        if pending[0].states and not checked_hybrid(getattr(module, "config", None)):
            raise UnsupportedAttention(
                f"{type(module).__name__}: the model keeps linear-attention / state-space states in its cache beside "
                "the attention layers, and its family is not among those checked exact with a MemoryCache "
                "(namm_transfer.attention.HYBRID_FAMILIES); run it without a MemoryCache")
        spec = attention_spec(module, query, scaling, dropout, kwargs)
        key, value, order = attended_tensors(module, layer, key, value)
        if order is None:
            out = _cached_attention(module, layer, query, key, value, attention_mask, spec)
        else:  # query heads regrouped onto the stored KV heads, then put back in the model's order
            query, attention_mask, spec = regroup_query_heads(order, query, attention_mask, spec)
            out, weights = _cached_attention(module, layer, query, key, value, attention_mask, spec)
            back = torch.argsort(order)
            out = (out[:, :, back], None if weights is None else weights[:, back])
    except BaseException:
        _CAPTURE.pending = None  # the cache stays unusable (awaiting capture); later plain forwards are unaffected
        raise
    return out


def attended_tensors(module, layer, key: torch.Tensor, value: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The keys and values the memory attention attends over, and the query-head order to attend in (None: the
    model's). The layer's slots, so the model must hand its attention function exactly what `cache.update`
    returned, or:
    - the stored KV heads repeated g times (a model that expands grouped heads before its attention function:
      `repeat_interleave` order, or JetMoE's tiled `repeat`, for which the query heads are regrouped), checked
      bit for bit on the layer's first call; attended as grouped heads over the slots themselves;
    - (multi-head latent attention: DeepSeek-V2/V3, MiniCPM3, GLM-4 MoE Lite, ...) the module's own per-slot
      expansion of the cached latents (`expand_kv`), one expanded key and value per slot and query head, checked
      bit for bit against a recomputation on the layer's first call.
    Families that change the tensors otherwise (DiffLlama's split values) are refused."""
    if key is layer.keys and value is layer.values:
        return key, value, None
    repeated, order = repeated_heads(layer, key, value)
    if repeated:
        return layer.keys, layer.values, order
    if callable(getattr(module, "expand_kv", None)) and latent_expansion_matches(module, layer, key, value):
        if getattr(layer.cache.policy, "name", None) == "l2":
            raise UnsupportedAttention(
                f"{type(module).__name__} caches compressed latents (multi-head latent attention), not keys: the "
                "L2-norm policy would rank the latents' norms, not the keys' (use recency, H2O, SnapKV or NAMM)")
        layer.riders = [key, value]  # compacted with the slots by an eviction step inside this forward
        return key, value, None
    for name, got, stored in (("keys", key, layer.keys), ("values", value, layer.values)):
        if got is not stored:
            raise UnsupportedAttention(
                f"{type(module).__name__} attends over {name} other than the ones it stored in the cache (its "
                f"attention changes them after cache.update: got shape {tuple(got.shape)}, stored "
                f"{tuple(stored.shape)}); a MemoryCache cannot reproduce this family's attention")
    return key, value, None


def repeated_heads(layer, key: torch.Tensor, value: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
    """Whether key, value are the layer's stored heads repeated g > 1 times along the head axis, and the query-head
    order that puts each stored head's g query heads next to each other: None for `repeat_interleave` (already
    grouped), a permutation for a tiled `repeat` (query head h attends over stored head h % H_kv). The pattern is
    compared exactly on the layer's first call and kept (later calls: the shapes)."""
    stored_k, stored_v = layer.keys, layer.values
    h_kv = stored_k.shape[1]
    if (key.dim() != 4 or key.shape[1] <= h_kv or key.shape[1] % h_kv or value.shape[1] != key.shape[1]
            or key.shape[::2] != stored_k.shape[::2] or key.shape[3] != stored_k.shape[3]
            or value.shape[2:] != stored_v.shape[2:]):
        return False, None
    g = key.shape[1] // h_kv
    if layer.head_pattern is None or layer.head_pattern[0] != g:  # (g, repeated?, order), checked once per layer
        if torch.equal(key, stored_k.repeat_interleave(g, 1)) and torch.equal(value, stored_v.repeat_interleave(g, 1)):
            layer.head_pattern = (g, True, None)
        elif torch.equal(key, stored_k.repeat(1, g, 1, 1)) and torch.equal(value, stored_v.repeat(1, g, 1, 1)):
            layer.head_pattern = (g, True, torch.arange(g * h_kv, device=key.device).view(g, h_kv).t().reshape(-1))
        else:  # e.g. a latent-attention expansion whose head size happens to equal the latent's
            layer.head_pattern = (g, False, None)
    return layer.head_pattern[1], layer.head_pattern[2]


def regroup_query_heads(order: torch.Tensor, query: torch.Tensor, mask, spec: AttentionSpec):
    """The query heads (and a per-head mask, per-head sinks) in `order`."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == query.shape[1] > 1:
        mask = mask[:, order]
    if spec.sinks is not None:
        spec = replace(spec, sinks=spec.sinks[order])
    return query[:, order], mask, spec


def latent_expansion_matches(module, layer, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `key`, `value` are `module.expand_kv(stored latents)`: one row per slot (same batch and slot count as
    the cache), recomputed and compared exactly once per layer (later calls: the shapes)."""
    if key.shape[0] != layer.keys.shape[0] or key.shape[2] != layer.keys.shape[2] or value.shape[2] != key.shape[2]:
        return False
    if not layer.latents_checked:
        with torch.no_grad():
            k, v = module.expand_kv(layer.keys, layer.values)
        if not (torch.equal(k, key) and torch.equal(v, value)):
            return False
        layer.latents_checked = True
    return True


# queries whose probabilities are materialised at once (B, H, PROBS_BLOCK, N): bounds the transient memory of a long
# piece whose attention a policy reads; each query's attention is independent, so the blocks change no value
PROBS_BLOCK = 128

# how often the causal fast path ran, by kind (tests read it; "causal": is_causal, "single": one query, no mask,
# "bottom_right": a (q, N) causal mask shared by every row and head; "probs": the explicit softmax under the same
# conditions, masking only the piece's q x q corner; "tail": the explicit softmax after evictions in lockstep rows,
# hiding invalid slots per slot and the forward's own keys by their causal corner, see lockstep_tail)
FAST_PATH_CALLS = {"causal": 0, "single": 0, "bottom_right": 0, "probs": 0, "tail": 0}


def causal_fast_path(layer, mask: torch.Tensor | None, spec: AttentionSpec, start: int, q_len: int, a: int, e: int
                     ) -> tuple[int, bool, torch.Tensor | None] | None:
    """When the queries [a, e) of this forward see every valid slot up to their own, in order (no invalid slot in
    any row, no window hiding a key, the model's mask purely causal), return (slots to attend, is_causal, mask):
    attention over the first slots then equals SDPA with is_causal (no older slot), no mask (one query) or one
    bottom-right causal (q, N) mask shared by all rows and heads. None: the explicit visibility is needed."""
    if not layer.all_valid or (spec.sliding_window is not None and start + e > spec.sliding_window):
        return None
    q = e - a
    n_vis = layer.length - (q_len - e)  # the forward's later queries' slots are the last ones
    older = n_vis - q  # slots before this piece's own keys: every query sees them all
    if mask is not None and not purely_causal(mask, start, a, e):
        return None
    if q == 1:
        return n_vis, False, None
    if older == 0:
        return n_vis, True, None
    return n_vis, False, bottom_right_causal(n_vis, q, layer.keys.device)[None, None]


def purely_causal(mask: torch.Tensor, start: int, a: int, e: int) -> bool:
    """The model's bool mask (B or 1, 1 or H, q_len, S) lets the forward's queries [a, e) (sequence columns
    start + a ...) see exactly the columns up to their own (no padding, window or block pattern)."""
    cols = torch.arange(mask.shape[-1], device=mask.device)
    causal = cols[None, :] <= torch.arange(start + a, start + e, device=mask.device)[:, None]
    return bool((mask[:, :, a:e] == causal).all())


def lockstep_tail(layer, mask: torch.Tensor | None, spec: AttentionSpec, start: int, q_len: int, a: int, e: int
                  ) -> int | None:
    """When the queries [a, e) see exactly every valid slot older than their forward's piece and the forward's own
    keys up to their own — rows in lockstep, no window hiding a key, the model's mask purely causal, the last
    t = q_len - a slots holding the forward's keys from column start + a on (valid, in order) and every valid
    older slot an earlier column — return t (attend's `causal_tail` with `older_valid`), else None. No query is
    then blind: each sees its own key."""
    if not layer.lockstep or (spec.sliding_window is not None and start + e > spec.sliding_window):
        return None
    if mask is not None and not purely_causal(mask, start, a, e):
        return None
    t = q_len - a
    cols, valid = layer.columns, layer.valid
    own = torch.arange(start + a, start + q_len, device=cols.device)
    if not (bool(valid[:, :, -t:].all()) and bool((cols[:, :, -t:] == own).all())):
        return None
    older = cols[:, :, :-t].masked_fill(~valid[:, :, :-t], -1)
    return t if older.numel() == 0 or int(older.max()) < start + a else None


def bottom_right_causal(n_vis: int, q: int, device) -> torch.Tensor:
    """(q, n_vis) bool: q queries whose own keys are the last q of n_vis slots see every older slot and their own
    keys up to their own (causal attention aligned to the bottom right)."""
    return torch.arange(n_vis, device=device)[None, :] <= n_vis - q + torch.arange(q, device=device)[:, None]


def _piece(layer, query, keys, values, mask, spec: AttentionSpec, start: int, q_len: int, a: int, e: int,
           need_probs: bool):
    """Output (B, H, e - a, D) of the forward's queries [a, e) over the layer's slots (keys, values: one row per
    slot; and their probabilities over the slots when need_probs): the causal fast path when it applies, else the
    explicit visibility."""
    fast = causal_fast_path(layer, mask, spec, start, q_len, a, e) if not spec.output_attentions else None
    if fast is not None and not need_probs and not spec.exact_only:
        n_vis, is_causal, vis = fast
        FAST_PATH_CALLS["causal" if is_causal else ("single" if vis is None else "bottom_right")] += 1
        k, v = keys[:, :, :n_vis], values[:, :, :n_vis]
        return F.scaled_dot_product_attention(query[:, :, a:e], k, v, attn_mask=vis, scale=spec.scaling,
                                              is_causal=is_causal, enable_gqa=query.shape[1] != k.shape[1]), None
    if fast is not None:  # probabilities over the slots seen so far: mask only the piece's own q x q corner
        n_vis = fast[0]
        FAST_PATH_CALLS["probs"] += 1
        return attend(query[:, :, a:e], keys[:, :, :n_vis], values[:, :, :n_vis], None, spec, need_probs,
                      blind_rows=False, causal_tail=True)
    tail = lockstep_tail(layer, mask, spec, start, q_len, a, e) if need_probs or spec.exact_only else None
    if tail is not None:  # per-slot validity and the forward's causal corner instead of a (B, H, q, N) mask
        FAST_PATH_CALLS["tail"] += 1
        return attend(query[:, :, a:e], keys, values, None, spec, need_probs, blind_rows=False,
                      causal_tail=True, older_valid=layer.valid[:, :, :layer.length - tail])
    q_cols = torch.arange(start + a, start + e, device=query.device)
    vis = None
    if mask is not None or e - a > 1 or not layer.all_valid or (
            spec.sliding_window is not None and start + e > spec.sliding_window):
        vis = visible_keys(None if mask is None else mask[:, :, a:e], layer.columns, layer.valid, q_cols,
                           spec.sliding_window)
    return attend(query[:, :, a:e], keys, values, vis, spec, need_probs,
                  blind_rows=mask is not None or not layer.lockstep)


def _cached_attention(module, layer, query, keys, values, attention_mask, spec: AttentionSpec):
    """Attention of the new queries over the slots of a MemoryCache layer (keys, values: one row per slot), cut at
    the rows' eviction steps."""
    if module.training and spec.dropout:
        raise UnsupportedAttention("attention dropout (the model is in training mode): call model.eval() before "
                                   "running it with a MemoryCache")
    if not spec.is_causal:
        raise UnsupportedAttention(f"{type(module).__name__} uses non-causal attention; a MemoryCache needs causal "
                                   "attention (later keys must not be visible to earlier queries)")
    start, q_len = layer.tokens_seen, query.shape[2]
    mask = boolean_mask(attention_mask, query, start + q_len)
    cuts = layer.admit(None if mask is None else real_tokens(mask, start, query.shape[0]))
    need_probs = layer.wants_attention or spec.output_attentions
    outs, weights, a = [], [], 0
    for e in cuts:
        # queries whose attention no step reads (SnapKV reads only its window's) are computed without it
        unread = layer.unread_queries(e - a) if layer.wants_attention and not spec.output_attentions else 0
        parts = [(a, e, False)]
        if need_probs:  # the queries a step reads, in blocks of at most PROBS_BLOCK
            parts = [(a, a + unread, False)] + [(s, min(s + PROBS_BLOCK, e), True)
                                                for s in range(a + unread, e, PROBS_BLOCK)]
        for s0, s1, probs_needed in parts:
            if s1 == s0:
                continue
            out, probs = _piece(layer, query, keys, values, mask, spec, start, q_len, s0, s1, probs_needed)
            outs.append(out)
            if probs is not None:
                layer.record(probs, s0, s1)
                if spec.output_attentions:
                    weights.append(scatter_columns(probs, layer.columns, start + q_len))
            elif layer.wants_attention:
                layer.record_unread(s1 - s0)
        layer.advance(a, e)
        # an eviction step may have compacted the slots (and a latent family's expansion with them)
        keys, values = layer.riders if layer.riders else (layer.keys, layer.values)
        a = e
    layer.finish()
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), (torch.cat(weights, dim=2) if weights else None)


def enable_memory_attention(model) -> None:
    """Route the model's attention through `memory_attention` (required for MemoryCache).

    Raises CaptureError when the model family's attention cannot be routed (it does not call transformers'
    AttentionInterface, e.g. Falcon), and UnsupportedAttention when its config lists layers that keep a state
    besides keys and values (state-space, convolution, recurrent or compressed-attention layers) or whose embeddings
    number positions from the padding index (RoBERTa-style)."""
    AttentionInterface.register(ATTN_NAME, memory_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception as err:  # transformers raises ValueError for models without the attention backend
        raise CaptureError(_unsupported_family(model, str(err))) from err
    from transformers import PreTrainedModel
    for sub in model.modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        if sub.config._attn_implementation != ATTN_NAME or not sub._can_set_attn_implementation():
            raise CaptureError(_unsupported_family(sub, "its attention does not call transformers' "
                                                        "AttentionInterface"))
        refuse_stateful_layers(sub)
    refuse_own_position_numbering(model)


# per-layer types (config.layer_types / layers_block_type / block_types) whose layers keep a state besides the
# attention keys and values: a recurrent or convolution state (state-space, linear-attention, hybrid layers) or a
# compressed / indexed copy of the keys. Some families keep it in the cache, some in the modules themselves
# (RecurrentGemma: there a chunked prefill silently restarts the state); a MemoryCache manages neither.
STATEFUL_LAYER_TYPES = frozenset({"linear_attention", "conv", "mamba", "hybrid", "hybrid_sliding", "recurrent",
                                  "compressed_sparse_attention", "heavily_compressed_attention",
                                  "indexed_attention"})


# hybrid families whose linear-attention / state-space layers keep their convolution and recurrent states in the
# cache through transformers' state API, and whose chunked forwards equal one-shot ones: a MemoryCache holds those
# states whole and evicts only the attention layers' keys and values; each checked against the model's own eager
# attention with the evicted keys hidden (tests/test_core_families.py, scripts/check_families.py). Others stay
# refused (e.g. RecurrentGemma keeps its state in its modules; pure Mamba runs differ when fed in chunks).
# By config.model_type.
HYBRID_FAMILIES: frozenset[str] = frozenset({
    "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",  # gated delta-net + attention
    "falcon_h1", "zaya",  # attention and Mamba-2 in the same layer
    "olmo_hybrid", "lfm2", "lfm2_moe", "lfm3"})  # linear attention / short convolutions beside attention layers


def checked_hybrid(config) -> bool:
    """Whether a model (or attention module) config belongs to a family in HYBRID_FAMILIES."""
    return getattr(config, "model_type", None) in HYBRID_FAMILIES


def refuse_stateful_layers(model) -> None:
    """UnsupportedAttention when the model's config lists layers of a type in STATEFUL_LAYER_TYPES, or layers
    that attend over another layer's keys and values (KV sharing: Gemma 3n, Gemma 4)."""
    shared = getattr(model.config, "num_kv_shared_layers", None)
    if isinstance(shared, int) and shared > 0:
        raise UnsupportedAttention(
            f"{type(model).__name__}: its last {shared} layers attend over the keys and values of earlier layers "
            "(config.num_kv_shared_layers, KV sharing); a MemoryCache evicts per layer, so namm_transfer cannot "
            "run this family exactly (run it without a MemoryCache)")
    if checked_hybrid(model.config):  # states held whole by the MemoryCache
        return
    for attr in ("layer_types", "layers_block_type", "block_types"):
        try:
            types = getattr(model.config, attr, None)
        except Exception:  # noqa: BLE001 - a config that refuses a global read of a per-layer attribute
            continue
        if not isinstance(types, (list, tuple)):
            continue
        stateful = sorted({str(t) for t in types} & STATEFUL_LAYER_TYPES)
        if stateful:
            raise UnsupportedAttention(
                f"{type(model).__name__}: layers of type {', '.join(repr(t) for t in stateful)} (config.{attr}) "
                "keep a state besides attention keys and values (recurrent, convolution or compressed keys) that a "
                "MemoryCache does not hold, so namm_transfer cannot run this family exactly (run it without a "
                "MemoryCache)")


def refuse_own_position_numbering(model) -> None:
    """UnsupportedAttention when the model's embeddings number positions themselves from the padding index
    (RoBERTa-style `create_position_ids_from_input_ids`: the first real token is at padding_idx + 1, and that is what
    the unmodified model and its `generate` use). namm_transfer passes explicit positions 0, 1, ... (each row's own
    count), which such embeddings take as given: every position would shift and the output change silently."""
    for sub in model.modules():
        if callable(getattr(type(sub), "create_position_ids_from_input_ids", None)) and \
                isinstance(getattr(sub, "padding_idx", None), int):
            raise UnsupportedAttention(
                f"{type(model).__name__}: its {type(sub).__name__} numbers positions from the padding index "
                f"(the first token at position {sub.padding_idx + 1}, RoBERTa-style), while namm_transfer passes "
                "positions from 0; the cached run would not reproduce the model, so namm_transfer refuses this "
                "family (run it without a MemoryCache)")


def _unsupported_family(model, why: str) -> str:
    return (f"{type(model).__name__}: this model family is not supported by namm_transfer ({why}). The memory "
            "attention needs models whose attention goes through transformers' AttentionInterface (Llama, Mistral, "
            "Qwen2/3, Gemma2/3, GPT-OSS, Phi3, OLMo2, GPT-NeoX, OPT, GPT-2, ...)")
