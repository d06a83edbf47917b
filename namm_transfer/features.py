"""Pure tensor functions for NAMM token features.

Shapes use R for "rows" (any leading batch dims flattened: batch x KV heads), N for cache tokens,
T for the new queries since the previous eviction step, B for frequency bins (n_fft // 2 + 1).

Every function here is stateless and testable alone; the policy owns the state.
"""
from __future__ import annotations

import functools
import math

import torch


def gqa_mean(attn: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Average the query heads that share a KV head: (batch, H, q, N) -> (batch, H_kv, q, N)."""
    b, h, q, n = attn.shape
    if h % num_kv_heads:
        raise ValueError(f"{h} query heads cannot be grouped into {num_kv_heads} KV heads")
    if h == num_kv_heads:
        return attn
    groups = attn.view(b, num_kv_heads, h // num_kv_heads, q, n)
    if attn.device.type == "cpu" and attn.dtype in (torch.bfloat16, torch.float16):
        # what torch's mean computes for these dtypes (float sums in head order, divided, rounded once), as
        # element-wise adds: ~2x faster on CPU than the strided reduction (tests/test_core_features.py checks
        # the bits against .mean)
        acc = groups[:, :, 0].float()
        for i in range(1, groups.shape[2]):
            acc += groups[:, :, i]
        return acc.div_(groups.shape[2]).to(attn.dtype)
    return groups.mean(dim=2)


def hann_window(n_fft: int, device=None) -> torch.Tensor:
    """Periodic Hann window (as torch.hann_window(periodic=True)), fp32."""
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float32, device=device)


def streaming_spectrogram(
    series: torch.Tensor, overlap: torch.Tensor, n_fft: int = 32, hop: int = 16
) -> torch.Tensor:
    """Magnitude STFT of each token's attention time series, continuing the previous step.

    series:  (..., N, T) attention each cache token received from the T new queries (T % hop == 0).
    overlap: (..., N, n_fft - hop) the last queries of the previous step for kept tokens, zeros for new
             tokens and at the start of a sequence.
    Returns  (..., N, T // hop, n_fft // 2 + 1): frame f covers new queries [hop*f - (n_fft-hop), hop*f + hop).
    """
    t = series.shape[-1]
    if t % hop:
        raise ValueError(f"NAMM needs the number of new tokens per step ({t}) to be a multiple of hop={hop}")
    padded = torch.cat([overlap.to(series.dtype), series], dim=-1).float()
    lead = padded.shape[:-1]
    spec = torch.stft(
        padded.reshape(-1, padded.shape[-1]), n_fft=n_fft, hop_length=hop,
        window=hann_window(n_fft, padded.device), center=False, onesided=True,
        normalized=False, return_complex=True,
    ).abs()  # (rows, bins, frames)
    return spec.transpose(-1, -2).reshape(*lead, spec.shape[-1], spec.shape[-2])


def dft_basis(n_fft: int, device=None) -> torch.Tensor:
    """Windowed real DFT as a matrix: rows [w*cos(2 pi b t / n); -w*sin(...)] for bins b, (2 * bins, n_fft).
    Built once per (n_fft, device); treat it as read-only."""
    key = (n_fft, str(torch.device(device) if device is not None else torch.device("cpu")))
    if key not in _DFT_BASES:
        _DFT_BASES[key] = _dft_basis(n_fft, device)
    return _DFT_BASES[key]


_DFT_BASES: dict[tuple[int, str], torch.Tensor] = {}


def _dft_basis(n_fft: int, device=None) -> torch.Tensor:
    t = torch.arange(n_fft, dtype=torch.float64, device=device)
    b = torch.arange(n_fft // 2 + 1, dtype=torch.float64, device=device)
    angle = 2 * math.pi * b[:, None] * t[None] / n_fft
    w = hann_window(n_fft, device).double()
    return torch.cat([torch.cos(angle) * w, -torch.sin(angle) * w]).float()


def spectrogram_frames(attn: torch.Tensor, overlap: torch.Tensor, n_fft: int = 32, hop: int = 16) -> torch.Tensor:
    """The same magnitudes as `streaming_spectrogram`, computed in the query-major layout as one batched
    matmul with the windowed DFT matrix (no transpose of the attention, BLAS speed). Needs n_fft == 2 * hop.

    attn: (R, T, N) attention of T new queries over N cache tokens; overlap: (R, n_fft - hop, N).
    Returns (R, F, bins, N) with F = T // hop.
    """
    r, t, n = attn.shape
    if t % hop:
        raise ValueError(f"NAMM needs the number of new tokens per step ({t}) to be a multiple of hop={hop}")
    if n_fft != 2 * hop:
        spec = streaming_spectrogram(attn.transpose(1, 2), overlap.transpose(1, 2), n_fft, hop)
        return spec.permute(0, 2, 3, 1)
    f = t // hop
    padded = torch.cat([overlap.to(attn.dtype), attn], dim=1).float().contiguous()  # (R, T + pad, N)
    frames = padded.as_strided((r, f, n_fft, n), (padded.stride(0), hop * n, n, 1))  # overlapping view
    y = torch.matmul(dft_basis(n_fft, attn.device), frames)  # (R, F, 2 * bins, N)
    bins = n_fft // 2 + 1
    return torch.hypot(y[:, :, :bins], y[:, :, bins:])


def fold_row_frames(rows: torch.Tensor, first: int, frames: int, ema: torch.Tensor, a: float, n_fft: int = 32,
                    hop: int = 16) -> torch.Tensor:
    """Fold `frames` STFT frames of each row's slots into its EMA: frame j reads query rows first + j * hop ..
    first + j * hop + n_fft - 1 of rows (R, L, N) (C-contiguous rows of N slots); ema (R, bins, N) -> the new EMA.
    Windowed DFT as one batched matmul, magnitudes, then `fold_frames`; native.spectrogram_fold is the same in one pass."""
    r, _, n = rows.shape
    view = rows.as_strided((r, frames, n_fft, n), (rows.stride(0), hop * n, n, 1), rows.storage_offset() + first * n)
    y = torch.matmul(dft_basis(n_fft, rows.device), view)  # (R, F, 2 bins, N)
    bins = n_fft // 2 + 1
    return fold_frames(ema, torch.hypot(y[:, :, :bins], y[:, :, bins:]), a)


def fold_frames(ema: torch.Tensor, mags: torch.Tensor, a: float) -> torch.Tensor:
    """EMA over F new frames in one product: a^F ema + sum_f (1 - a) a^(F-1-f) mags_f.
    ema (..., bins, N); mags (..., F, bins, N) -> (..., bins, N)."""
    f = mags.shape[-3]
    lead, bins, n = mags.shape[:-3], mags.shape[-2], mags.shape[-1]
    folded = torch.matmul(_fold_weights(f, a, mags.device), mags.reshape(*lead, f, bins * n)).reshape(*lead, bins, n)
    return folded.add_(ema, alpha=a ** f)


@functools.lru_cache(maxsize=64)
def _fold_weights(f: int, a: float, device) -> torch.Tensor:
    """(1, F) fp32 weights (1 - a) a^(F-1-f) (computed in fp64)."""
    return ((1 - a) * a ** torch.arange(f - 1, -1, -1, dtype=torch.float64)).float()[None].to(device)


def ema_weights(n_tokens: int, n_new: int, n_frames: int, coeff: float, hop: int, device=None) -> torch.Tensor:
    """(F, N) weights (1 - a) a^(F-1-f) m[j, f] of the EMA over this step's frames, a = coeff^hop."""
    a = coeff ** hop
    w = (1 - a) * a ** torch.arange(n_frames - 1, -1, -1, dtype=torch.float32, device=device)
    return w[:, None] * new_token_frame_mask(n_tokens, n_new, n_frames, hop, device).T


def new_token_frame_mask(n_tokens: int, n_new: int, n_frames: int, hop: int, device=None) -> torch.Tensor:
    """m[j, f] = 1 for kept tokens; for new token j (local index l) it is 1 iff l // hop <= f. (N, F)."""
    local = torch.arange(n_tokens, device=device) - (n_tokens - n_new)
    block = torch.where(local >= 0, local // hop, torch.zeros_like(local))
    return (torch.arange(n_frames, device=device)[None, :] >= block[:, None]).float()


RECENCY_TABLES = ("float32", "float64")


def recency_embedding(recency: torch.Tensor, dim: int = 8, max_freq: float = 50000.0,
                      table: str = "float32") -> torch.Tensor:
    """Sinusoidal embedding [sin(r w_0..), cos(r w_0..)], w_k = max_freq^(-k / (dim/2)). (...,) -> (..., dim).
    table "float32": computed in float32 (the project's own NAMMs were evolved with it); "float64": frequencies,
    angles, sin and cos in float64, then rounded to float32, as evo-memory's table (numpy float64, cast to float32;
    the two differ by up to ~3e-5 for ages below 4,096 and ~3e-4 near 40,000)."""
    half = dim // 2
    if table == "float64":
        k = torch.arange(half, dtype=torch.float64, device=recency.device) / half
        angles = recency.double()[..., None] * (1 / max_freq ** k)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).float()
    if table != "float32":
        raise ValueError(f"recency table {table!r}: expected one of {RECENCY_TABLES}")
    freqs = max_freq ** (-torch.arange(half, dtype=torch.float32, device=recency.device) / half)
    angles = recency.float()[..., None] * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def normalise(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-bin standardisation (x - mean) / max(std, eps)."""
    return (x - mean) / torch.clamp(var.sqrt(), min=eps)


class RunningStats:
    """Pooled per-bin mean / population variance (Chan's parallel merge). Frozen stats never change."""

    def __init__(self, num_bins: int):
        self.count = 0
        self.mean = torch.zeros(num_bins, dtype=torch.float64)
        self.m2 = torch.zeros(num_bins, dtype=torch.float64)
        self.frozen = False

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1)

    def update(self, x: torch.Tensor) -> None:
        """Merge samples x: (n, bins)."""
        if self.frozen or x.numel() == 0:
            return
        x = x.detach().to(torch.float64).cpu()
        self.merge(x.shape[0], x.mean(0), ((x - x.mean(0)) ** 2).sum(0))

    def merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.frozen or count == 0:
            return
        total = self.count + count
        delta = mean.to(torch.float64) - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2.to(torch.float64) + delta ** 2 * self.count * count / total
        self.count = total

    def set(self, mean: torch.Tensor, var: torch.Tensor, count: int = 1, frozen: bool = True) -> None:
        self.mean = mean.detach().to(torch.float64).cpu().reshape(-1)
        self.m2 = var.detach().to(torch.float64).cpu().reshape(-1) * count
        self.count = count
        self.frozen = frozen

    def state_dict(self) -> dict:
        return {"mean": self.mean.float(), "var": self.var.float(), "count": self.count, "frozen": self.frozen}


def flop_counts(n_tokens: int, n_new: int, n_fft: int = 32, hop: int = 16, d_in: int = 25, hidden: int = 32) -> dict:
    """FLOPs of one NAMM step for one row (batch x KV head) of N cache tokens, as implemented: the windowed
    DFT as a matmul (2 * n_fft * 2 bins per frame) + magnitudes + EMA, and the scorer with its full N x N
    backward attention (QK^T and AV counted over all N^2 pairs)."""
    frames, bins = n_new // hop, n_fft // 2 + 1
    spectrogram = n_tokens * frames * (2 * n_fft * 2 * bins + 3 * bins + 2 * bins)
    qkv = 2 * n_tokens * d_in * 3 * hidden
    attn = 2 * 2 * n_tokens * n_tokens * hidden
    out = 2 * n_tokens * hidden * 2 * d_in + 4 * n_tokens * d_in
    return {"stft": spectrogram, "scorer": qkv + attn + out}
