"""Bootstrap 95% intervals for evaluations where methods share samples (percentile bootstrap, fixed seed).

Paired: every resample draws the same sample indices for all methods, so an interval of a difference or of a
ratio to the full cache reflects only the per-sample disagreement, not the spread of sample difficulty.
Stratified by task when `groups` is given (each resample keeps each task's sample count), so an "all tasks"
mean stays a mean over the same task mix.
"""
from __future__ import annotations

import numpy as np

N_BOOT = 10_000


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = 0, groups=None) -> np.ndarray:
    """(n_boot, n) indices drawn with replacement; within each group when `groups` (length n) is given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.integers(0, n, size=(n_boot, n))
    groups = np.asarray(groups)
    out = np.empty((n_boot, n), dtype=np.int64)
    col = 0
    for g in sorted(set(groups.tolist())):
        members = np.flatnonzero(groups == g)
        out[:, col:col + len(members)] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        col += len(members)
    return out


def _percentiles(stats: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def mean_ci(values, n_boot: int = N_BOOT, seed: int = 0, groups=None) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of `values`."""
    x = np.asarray(values, dtype=np.float64)
    idx = resample_indices(len(x), n_boot, seed, groups)
    return (float(x.mean()), *_percentiles(x[idx].mean(1)))


def paired_difference_ci(a, b, n_boot: int = N_BOOT, seed: int = 0, groups=None) -> tuple[float, float, float]:
    """(mean(a - b), low, high) for two methods scored on the same samples, in the same order."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in number: {a.shape} vs {b.shape}")
    return mean_ci(a - b, n_boot, seed, groups)


def ratio_ci(a, ref, n_boot: int = N_BOOT, seed: int = 0, groups=None) -> tuple[float, float, float]:
    """(mean(a) / mean(ref), low, high), resampling the pairs (a_i, ref_i) together."""
    a, ref = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        raise ValueError(f"paired samples differ in number: {a.shape} vs {ref.shape}")
    idx = resample_indices(len(a), n_boot, seed, groups)
    den = ref[idx].mean(1)
    return (float(a.mean() / ref.mean()), *_percentiles(a[idx].mean(1) / np.where(den == 0, np.nan, den)))


def median_ci(values, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high) of the median of `values` (e.g. within-round speed ratios of a benchmark's rounds)."""
    x = np.asarray(values, dtype=np.float64)
    idx = resample_indices(len(x), n_boot, seed)
    return (float(np.median(x)), *_percentiles(np.median(x[idx], axis=1)))
