"""Is a search's ranking of members repeatable, and is it about quality or about cache? (pure functions)

The split-half check scores the same members on two disjoint halves of a generation's prompts and correlates the
rankings. A NAMM search with a cache target ranks members largely by how much cache they keep; the residual of the
score ratio after a line on the realised cache fraction (across members) is the quality at matched cache, the
part a better eviction rule has to show. The slope of that line against the hinge weight also says where the
search's cache settles relative to its target (hinge_settle_point).
"""
from __future__ import annotations

import math
import random
from statistics import NormalDist

import torch

from .trainer import fitness_from_scores, spearman, task_halves


def cache_slope(ratio: torch.Tensor, cache: torch.Tensor) -> float:
    """Slope b of the least-squares line ratio ~ a + b * cache across members (score ratio gained per unit of cache
    fraction kept); nan when all members keep the same cache."""
    r = ratio.double() - ratio.double().mean()
    c = cache.double() - cache.double().mean()
    den = float((c * c).sum())
    return float((c * r).sum()) / den if den > 0 else float("nan")


def residual_on_cache(ratio: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Residual of a least-squares line ratio ~ a + b * cache across members (the ratio at matched cache, up to a
    constant); the centred ratio when all members keep the same cache."""
    r = ratio.double() - ratio.double().mean()
    b = cache_slope(ratio, cache)
    return r if math.isnan(b) else r - b * (cache.double() - cache.double().mean())


def hinge_settle_point(target: float, weight: float, slope: float, spread: float) -> float:
    """Mean cache fraction at which the trainer's hinge (fitness = ratio - weight * max(0, cache - target)) stops
    pulling: where the members' expected fitness slope, slope - weight * P(member cache > target), is zero for member
    caches spread normally with sd `spread` around the mean. That is where a search settles when evaluation noise
    dominates the ranking (a rank-based search with little noise settles nearer the target); below the target when
    slope < weight / 2, above it when slope > weight / 2. inf when slope >= weight: the target does not bind, the cache
    grows until the trade-off flattens below the weight; the target itself when the members do not spread."""
    if slope >= weight:
        return float("inf")
    if spread <= 0 or slope <= 0:
        return target if spread <= 0 else float("-inf")
    return target - spread * NormalDist().inv_cdf(1 - slope / weight)


def split_half_agreement(score: torch.Tensor, frac: torch.Tensor, tasks: list[str], refs: list[float],
                         cache_weight: float, cache_target: float, splits: int = 200, seed: int = 0) -> dict:
    """Mean Spearman correlation of the members' ranking between two disjoint halves of the prompts (each half
    holds half of every task's prompts, `splits` random splits): of the fitness, the score ratio and the score
    ratio at matched cache (each half regressed on that half's cache). Also the between-member spread of the
    matched-cache ratio that repeats across halves (sqrt of the cross-half covariance) and the part that does not
    (per-half noise sd), both at the scale of half the prompts."""
    rng = random.Random(seed)
    if any(tasks.count(t) < 2 for t in tasks):
        raise ValueError("split-half agreement needs at least 2 prompts per task")
    acc = {"fitness": [], "ratio": [], "matched_cache": [], "cov": [], "noise_var": []}
    for _ in range(splits):
        halves = task_halves(tasks, rng)
        parts = []
        for h in halves:
            fit, ratio = fitness_from_scores(score[:, h], frac[:, h], [tasks[j] for j in h], [refs[j] for j in h],
                                             cache_weight, cache_target)
            parts.append((fit, ratio, residual_on_cache(ratio, frac[:, h].mean(1))))
        (fa, ra, ea), (fb, rb, eb) = parts
        acc["fitness"].append(spearman(fa, fb))
        acc["ratio"].append(spearman(ra, rb))
        acc["matched_cache"].append(spearman(ea, eb))
        n = len(ea)
        acc["cov"].append(float((ea * eb).sum()) / (n - 2))  # residuals have mean 0 and 2 fitted parameters
        acc["noise_var"].append(float(((ea - eb) ** 2).sum()) / (2 * (n - 2)))
    def mean(v):  # splits whose ranking is all ties (no correlation defined) left out
        v = [x for x in v if math.isfinite(x)]
        return sum(v) / len(v) if v else float("nan")
    return {"fitness": mean(acc["fitness"]), "ratio": mean(acc["ratio"]), "matched_cache": mean(acc["matched_cache"]),
            "true_sd": max(mean(acc["cov"]), 0.0) ** 0.5, "noise_sd": mean(acc["noise_var"]) ** 0.5,
            "prompts_per_half": len(task_halves(tasks)[0]), "splits": splits}


def spearman_brown(rho: float, factor: float) -> float:
    """Reliability of a mean over `factor` times as many prompts, from the reliability `rho` of one half."""
    return factor * rho / (1 + (factor - 1) * rho) if rho > -1 / max(factor - 1, 1e-9) else float("nan")


def prompts_for_reliability(rho_half: float, prompts_per_half: int, target: float = 0.5) -> float:
    """Prompts per member at which the ranking reaches reliability `target` (the inverse of spearman_brown from the
    split-half agreement `rho_half` at `prompts_per_half` prompts); inf when rho_half <= 0."""
    return prompts_per_half * target * (1 - rho_half) / (rho_half * (1 - target)) if rho_half > 0 else float("inf")
