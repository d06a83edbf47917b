"""Attention reduced as it arrives, instead of buffered until the eviction step.

A policy that reads only a running summary of the attention its slots receive returns an `AttentionStream` from
`MemoryPolicy.attention_stream()`. The cache then hands each piece of a forward's attention to the stream (GQA
mean, rounded as the policy asks) and drops it; the step reads the summary. NAMM's summary is the EMA of each
slot's attention spectrogram: a frame is folded in whenever a row's own query count reaches a multiple of the hop,
so a layer holds the last n_fft - 1 query rows instead of every query since the last step (`delay` rows).

Rows of a batch may be out of phase (left padding): each row folds its frames at its own counts; rows in phase are
folded together. Padding queries enter the history as zero rows and are not counted, which is what the
reference's zero overlap before a sequence's first query gives.
"""
from __future__ import annotations

import copy

import torch

from . import features as feat
from . import native


def fit_slots(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Cut or zero-pad tensor t to n entries along dim (slots past its size have received nothing yet)."""
    size = t.shape[dim]
    if size >= n:
        return t.narrow(dim, 0, n)
    shape = list(t.shape)
    shape[dim] = n - size
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def gather_slots(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Slots along the last axis of t (B, H, rows, N) picked by index (B, H, K) -> (B, H, rows, K)."""
    return t.gather(3, index[:, :, None, :].expand(-1, -1, t.shape[2], -1))


class AttentionStream:
    """Per-layer streaming reduction of the attention rows of one MemoryCache layer."""

    def add(self, attention: torch.Tensor, real: torch.Tensor | None) -> None:
        """Fold in the attention (B, H_kv, q, N) of a forward's next q queries; real (B, q): which are real
        tokens of each row (None = all); padding is only ever a prefix of a row's first queries."""
        raise NotImplementedError

    def take(self, rows: torch.Tensor, n_slots: int, n_new: int, every_row: bool) -> dict[str, torch.Tensor]:
        """The summary the stepping rows' policy step reads, over the first n_slots slots."""
        raise NotImplementedError

    def gather(self, index: torch.Tensor, n_slots: int) -> None:
        """The layer kept slots `index` (B, H_kv, K) of its n_slots: follow it."""
        raise NotImplementedError

    def repeat(self, index: torch.Tensor) -> "AttentionStream":
        """A copy holding batch rows `index` (MemoryCache.fork)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError


class SpectrogramEMA(AttentionStream):
    """NAMM's features, streamed: per slot, the EMA over frames of the magnitude STFT of the attention it received.

    ema (B, H, bins, S) fp32 for the first S slots (later slots: zero); blocks: the last n_fft - 1 (or more, until a
    frame needs them) query rows as the pieces that brought them (B, H, q_i, N_i), attention dtype, zeros before a
    sequence starts; fill: per row, own queries since its last frame. A piece is only appended (no copy) unless a
    frame completes in it. The EMA folds frame by frame, s <- a s + (1 - a) |STFT frame|, a = coeff^hop: over one
    step's F frames that is a^F s_prev + sum_f (1 - a) a^(F-1-f) S_f, the reference's update (kept tokens carry
    coeff^T s_prev, new tokens start from zero at the frame their first query falls in).
    """

    def __init__(self, n_fft: int = 32, hop: int = 16, ema_coeff: float = 0.99):
        if n_fft != 2 * hop:
            raise ValueError("the streamed spectrogram needs n_fft == 2 * hop (as NAMM's released configuration)")
        self.n_fft, self.hop, self.a = n_fft, hop, ema_coeff ** hop
        self.bins = n_fft // 2 + 1
        self.ema: torch.Tensor | None = None
        self.blocks: list[torch.Tensor] = []
        self.fill: list[int] = []
        self.frame_slots = 0  # (row, head, frame, slot) spectra computed so far: the work done, for benchmarks

    @property
    def held(self) -> int:
        return sum(blk.shape[2] for blk in self.blocks)

    @property
    def history(self) -> torch.Tensor:
        """The query rows held, (B, H, rows, N) over the widest piece's slots."""
        n = max(blk.shape[3] for blk in self.blocks)
        return torch.cat([fit_slots(blk, n, 3) for blk in self.blocks], dim=2)

    def add(self, attention: torch.Tensor, real: torch.Tensor | None) -> None:
        b, h, q, n = attention.shape
        if self.ema is None:
            self.blocks = [attention.new_zeros(b, h, self.n_fft - 1, 0)]
            self.ema = attention.new_zeros(b, h, self.bins, 0, dtype=torch.float32)
            self.fill = [0] * b
        own = [q] * b
        if real is not None:
            attention = attention * real[:, None, :, None].to(attention.dtype)  # padding rows: zeros
            own = real.sum(-1).tolist()
        # row r's frames end at its own counts fill + k = multiple of hop: at piece index (its first real query
        # + k); rows whose first frame ends at the same index fold together
        groups: dict[int, list[int]] = {}
        for r in range(b):
            first_end = (q - own[r]) + (self.hop - self.fill[r] - 1)
            if first_end < q:
                groups.setdefault(first_end, []).append(r)
            self.fill[r] = (self.fill[r] + own[r]) % self.hop
        if groups:
            self._fold(groups, attention)
        self.blocks.append(attention)
        self._trim()

    def _fold(self, groups: dict[int, list[int]], attention: torch.Tensor) -> None:
        b, h, q, n_seen = attention.shape
        # slots: those the piece's queries could see, or more when the history was compacted with slots of the
        # forward's later queries (zero so far)
        n = max(n_seen, *(blk.shape[3] for blk in self.blocks), self.ema.shape[3])
        lead = self.n_fft - 1  # rows of history the earliest possible frame reaches back
        rows = torch.zeros(b, h, lead + q, n, dtype=torch.float32, device=attention.device)  # fp32, one copy each
        rows[:, :, lead:, :n_seen] = attention
        end = lead
        for blk in reversed(self.blocks):  # the last `lead` history rows, newest block last
            take = min(end, blk.shape[2])
            rows[:, :, end - take:end, :blk.shape[3]] = blk[:, :, blk.shape[2] - take:]
            end -= take
            if not end:
                break
        self.ema = fit_slots(self.ema, n, 3)
        fused = native.usable(rows, self.n_fft, self.hop)
        for first_end, members in groups.items():
            frames = (q - 1 - first_end) // self.hop + 1
            sel = slice(None) if len(members) == b else torch.tensor(members, device=attention.device)
            part = rows if len(members) == b else rows[sel]
            r_ = part.shape[0]
            self.frame_slots += r_ * h * frames * n
            flat_rows = part.reshape(r_ * h, lead + q, n)  # frame j ends at row lead + first_end + j hop
            flat_ema = self.ema[sel].reshape(r_ * h, self.bins, n)
            if fused:  # the same arithmetic in one pass (native.py)
                weights = feat._fold_weights(frames, self.a, attention.device)[0]
                s = native.spectrogram_fold(flat_rows, first_end, frames, feat.dft_basis(self.n_fft), weights,
                                            self.a ** frames, flat_ema)
            else:
                s = feat.fold_row_frames(flat_rows, first_end, frames, flat_ema, self.a, self.n_fft, self.hop)
            s = s.view(r_, h, self.bins, n)
            if len(members) == b:
                self.ema = s
            else:
                self.ema[sel] = s

    def _trim(self) -> None:
        """Keep the last n_fft - 1 query rows: no frame reaches further back."""
        excess = self.held - (self.n_fft - 1)
        while excess > 0 and excess >= self.blocks[0].shape[2]:
            excess -= self.blocks.pop(0).shape[2]
        if excess > 0:
            self.blocks[0] = self.blocks[0][:, :, excess:].clone()  # at most n_fft - 1 rows

    def take(self, rows: torch.Tensor, n_slots: int, n_new: int, every_row: bool) -> dict[str, torch.Tensor]:
        fill = [self.fill[r] for r in rows.tolist()]
        if any(fill) or n_new % self.hop:
            raise ValueError(f"NAMM needs the number of new tokens per step ({n_new}) to be a multiple of "
                             f"hop={self.hop}")
        ema = fit_slots(self.ema, n_slots, 3).transpose(-1, -2)  # (B, H, N, bins)
        return {"ema": ema if every_row else ema[rows]}

    def gather(self, index: torch.Tensor, n_slots: int) -> None:
        if self.ema is None:
            return
        self.ema = gather_slots(fit_slots(self.ema, n_slots, 3), index)
        self.blocks = [gather_slots(fit_slots(blk, n_slots, 3), index) for blk in self.blocks]

    def repeat(self, index: torch.Tensor) -> "SpectrogramEMA":
        new = copy.copy(self)
        new.frame_slots = 0
        new.ema = None if self.ema is None else self.ema[index.to(self.ema.device)]
        new.blocks = [blk[index.to(blk.device)] for blk in self.blocks]
        new.fill = [self.fill[i] for i in index.tolist()] if self.fill else []
        return new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ema, *self.blocks) if t is not None)


class AttentionSum(AttentionStream):
    """Per slot, the total attention it has received from every real query so far (H2O's heavy-hitter score),
    accumulated in fp32 as the queries arrive. acc (B, H, S) for the first S slots; later slots: zero."""

    def __init__(self):
        self.acc: torch.Tensor | None = None

    def add(self, attention: torch.Tensor, real: torch.Tensor | None) -> None:
        if real is not None:
            attention = attention * real[:, None, :, None].to(attention.dtype)
        total = attention.float().sum(dim=2)
        self.acc = total if self.acc is None else fit_slots(self.acc, total.shape[-1], 2) + total

    def take(self, rows: torch.Tensor, n_slots: int, n_new: int, every_row: bool) -> dict[str, torch.Tensor]:
        acc = fit_slots(self.acc, n_slots, 2)
        return {"acc": acc if every_row else acc[rows]}

    def gather(self, index: torch.Tensor, n_slots: int) -> None:
        from .cache import gather_tokens
        if self.acc is not None:
            self.acc = gather_tokens(fit_slots(self.acc, n_slots, 2), index)

    def repeat(self, index: torch.Tensor) -> "AttentionSum":
        new = AttentionSum()
        new.acc = None if self.acc is None else self.acc[index.to(self.acc.device)]
        return new

    def nbytes(self) -> int:
        return 0 if self.acc is None else self.acc.numel() * self.acc.element_size()
