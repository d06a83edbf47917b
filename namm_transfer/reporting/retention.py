"""Which tokens a memory policy kept: pure functions from cache positions to maps, and a recorder.

A MemoryCache layer stores, per batch row and KV head, the original position of every slot and whether the
slot is valid. `keep_matrix` turns the final layers into a (layers x tokens) map of the share of KV heads
that still hold each token; the domain helpers regroup it:
  language  `text_html`: the prompt with each token shaded by how many heads kept it (one chosen layer);
  DT        `dt_type_map` / `dt_type_shares`: tokens come in triples (return-to-go, state, action) in that order,
            position p is timestep p // 3, type p % 3 (the KV rollout feeds R_0, s_0, then a_{t-1}, R_t, s_t);
  video     `frame_index` / `frame_shares`: video placeholder tokens are one contiguous run per frame, in order.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import torch

DT_TYPES = ("return", "state", "action")


def keep_matrix(layers: list[tuple[torch.Tensor, torch.Tensor]], n_tokens: int, row: int = 0) -> np.ndarray:
    """(positions, valid) per layer, each (B, H, K) -> (L, n_tokens) share of batch row `row`'s KV heads that
    store each position < n_tokens."""
    out = np.zeros((len(layers), n_tokens))
    for li, (positions, valid) in enumerate(layers):
        pos, ok = positions[row].cpu(), valid[row].cpu()
        heads = pos.shape[0]
        sel = ok & (pos < n_tokens) & (pos >= 0)
        counts = torch.bincount(pos[sel].flatten().long(), minlength=n_tokens)[:n_tokens]
        out[li] = counts.double().numpy() / heads
    return out


def cache_keep_matrix(cache, n_tokens: int, row: int = 0) -> np.ndarray:
    """`keep_matrix` of a MemoryCache's current layers."""
    return keep_matrix([(layer.positions, layer.valid) for layer in cache.kv_layers], n_tokens, row)


def dt_type_map(keep: np.ndarray) -> np.ndarray:
    """(n_tokens,) kept shares -> (3, T) by token type (return, state, action) x timestep; NaN where the episode
    has no such token (the last action)."""
    n = keep.shape[-1]
    steps = -(-n // 3)
    out = np.full((3, steps), np.nan)
    for p in range(n):
        out[p % 3, p // 3] = keep[p]
    return out


def dt_type_shares(keep: np.ndarray) -> np.ndarray:
    """(L, n_tokens) -> (L, 3) mean kept share per token type (return, state, action)."""
    types = np.arange(keep.shape[-1]) % 3
    return np.stack([keep[:, types == t].mean(axis=1) if (types == t).any() else np.full(len(keep), np.nan)
                     for t in range(3)], axis=1)


def frame_index(is_video: np.ndarray, num_frames: int) -> np.ndarray:
    """(n_tokens,) bool video-token mask -> frame number of each video token, -1 elsewhere. Frames are equal
    contiguous shares of the video tokens, in order."""
    is_video = np.asarray(is_video, dtype=bool)
    n_video = int(is_video.sum())
    if num_frames <= 0 or n_video % num_frames:
        raise ValueError(f"{n_video} video tokens do not split into {num_frames} equal frames")
    out = np.full(is_video.shape, -1)
    out[is_video] = np.arange(n_video) // (n_video // num_frames)
    return out


def frame_shares(keep: np.ndarray, frames: np.ndarray, num_frames: int) -> np.ndarray:
    """(L, n_tokens) kept shares and per-token frame numbers -> (num_frames, L) mean kept share per frame."""
    out = np.zeros((num_frames, keep.shape[0]))
    for f in range(num_frames):
        out[f] = keep[:, frames == f].mean(axis=1)
    return out


def text_html(tokens: list[str], kept: np.ndarray, title: str = "") -> str:
    """The tokens as HTML, each shaded by its kept share (1 = every KV head kept it, white = evicted)."""
    spans = []
    for tok, k in zip(tokens, kept):
        shade = f"rgba(30, 120, 255, {0.15 + 0.85 * float(k):.2f})" if k > 0 else "white"
        style = f"background:{shade}" + ("" if k > 0 else ";color:#aaa;text-decoration:line-through")
        spans.append(f'<span title="kept by {float(k):.0%} of heads" style="{style}">{html.escape(tok)}</span>')
    body = "".join(spans).replace("\n", "<br>\n")
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<h3 style='font-family:sans-serif'>{html.escape(title)}</h3>"
            f"<div style='font-family:monospace;white-space:pre-wrap;line-height:1.6'>{body}</div>\n")


@dataclass
class EvictionLog:
    """`MemoryCache(policy, on_evict=log)`: remembers each layer object (its final positions / valid are
    readable after the run) and the kept count of every eviction step."""

    layers: dict[int, object] = field(default_factory=dict)
    steps: list[tuple[int, int, float]] = field(default_factory=list)  # (layer, tokens_seen, mean kept per head)

    def __call__(self, layer, keep: torch.Tensor) -> None:
        self.layers[layer.layer_idx] = layer
        self.steps.append((layer.layer_idx, layer.tokens_seen, float(keep[0].sum(-1).float().mean())))

    def keep_matrix(self, n_tokens: int, row: int = 0) -> np.ndarray:
        """The final state of the layers that evicted at least once (all layers when the policy ran)."""
        layers = [self.layers[i] for i in sorted(self.layers)]
        return keep_matrix([(l.positions, l.valid) for l in layers], n_tokens, row)
