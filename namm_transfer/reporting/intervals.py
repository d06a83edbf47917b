"""95% intervals for the harness tables: Wilson for success rates, normal approximation for means."""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959964


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, as fractions in [0, 1] ((0, 1) when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def interval95(values, binary_scale: float | None = None) -> tuple[float, float]:
    """95% interval of the mean of `values`. With `binary_scale` (every value is 0 or that number, e.g. 100 for
    success %) the Wilson interval, scaled; otherwise mean ± 1.96 standard errors (sample std, ddof 1)."""
    x = np.asarray(values, dtype=np.float64)
    if binary_scale is not None:
        lo, hi = wilson(int(np.count_nonzero(x)), len(x))
        return binary_scale * lo, binary_scale * hi
    if len(x) < 2:
        return float(x.mean()), float(x.mean())
    half = Z95 * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)
