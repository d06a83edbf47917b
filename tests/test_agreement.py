"""Split-half ranking agreement (raw and at matched cache) and the member-spread measurement script."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import pytest
import torch

from namm_transfer.evolution.agreement import (cache_slope, hinge_settle_point, prompts_for_reliability,
                                               residual_on_cache, spearman_brown, split_half_agreement)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["a"] * 8 + ["b"] * 8 + ["c"] * 8


def synthetic(seed: int, quality_sd: float, noise_sd: float = 0.05, members: int = 16):
    """(scores (members, prompts) = 0.4 + 0.5 * cache + member quality + per-prompt noise, cache, tasks, refs 1)."""
    g = torch.Generator().manual_seed(seed)
    cache = 0.5 + 0.4 * torch.rand(members, 1, generator=g, dtype=torch.float64)
    quality = quality_sd * torch.randn(members, 1, generator=g, dtype=torch.float64)
    score = 0.4 + 0.5 * cache + quality + noise_sd * torch.randn(members, len(TASKS), generator=g,
                                                                  dtype=torch.float64)
    return score, cache.expand(-1, len(TASKS)), TASKS, [1.0] * len(TASKS)


def test_residual_removes_the_line_on_cache():
    cache = torch.tensor([0.5, 0.6, 0.7, 0.9], dtype=torch.float64)
    assert residual_on_cache(0.2 + 0.8 * cache, cache).abs().max() < 1e-12
    other = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    r = residual_on_cache(0.8 * cache + other, cache)
    assert abs(float((r * (cache - cache.mean())).sum())) < 1e-12 and abs(float(r.sum())) < 1e-12
    flat = torch.full((4,), 0.7, dtype=torch.float64)
    assert torch.allclose(residual_on_cache(other, flat), other - other.mean())


def test_members_that_differ_only_by_cache_rank_by_cache_not_quality():
    runs = [split_half_agreement(*synthetic(s, quality_sd=0.0), 0.0, 1.0, splits=30) for s in range(8)]
    ratio = sum(r["ratio"] for r in runs) / len(runs)
    matched = sum(r["matched_cache"] for r in runs) / len(runs)
    assert ratio > 0.8  # the cache spread repeats in both halves
    assert abs(matched) < 0.2  # nothing at matched cache does
    assert all(r["true_sd"] < 0.02 for r in runs)


def test_real_quality_differences_repeat_at_matched_cache_and_their_spread_is_recovered():
    runs = [split_half_agreement(*synthetic(s, quality_sd=0.06), 0.0, 1.0, splits=30) for s in range(8)]
    assert sum(r["matched_cache"] for r in runs) / len(runs) > 0.7
    # noise per half: 0.05 / sqrt(12 prompts); true spread 0.06 (sample sd of 16 members, after the fit)
    assert sum(r["noise_sd"] for r in runs) / len(runs) == pytest.approx(0.05 / 12 ** 0.5, rel=0.25)
    assert sum(r["true_sd"] for r in runs) / len(runs) == pytest.approx(0.06, rel=0.3)


def test_spearman_brown_and_refusals():
    assert spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    assert spearman_brown(0.2, 1) == pytest.approx(0.2)
    k = prompts_for_reliability(0.17, 6, 0.5)  # the inverse: at k prompts, reliability 0.5
    assert k == pytest.approx(29.29, abs=0.01) and spearman_brown(0.17, k / 6) == pytest.approx(0.5)
    assert prompts_for_reliability(0.0, 6) == float("inf")
    score, cache, _, refs = synthetic(0, 0.0)
    with pytest.raises(ValueError, match="at least 2 prompts per task"):
        split_half_agreement(score[:, :9], cache[:, :9], TASKS[:9], refs[:9], 0.0, 1.0)


def test_cache_slope_and_hinge_settle_point_hand_values():
    cache = torch.tensor([0.5, 0.6, 0.7, 0.9], dtype=torch.float64)
    assert cache_slope(0.2 + 0.8 * cache, cache) == pytest.approx(0.8)
    assert math.isnan(cache_slope(cache, torch.full((4,), 0.7)))
    # namm-c75's logs: slope 0.72, weight 3, spread 0.058 -> P(above) = 0.24, z(0.76) = 0.7063
    assert hinge_settle_point(0.74, 3.0, 0.72, 0.058) == pytest.approx(0.74 - 0.058 * 0.70630, abs=1e-5)
    assert hinge_settle_point(0.5, 2.0, 1.0, 0.07) == pytest.approx(0.5)  # slope = weight / 2: at the target
    assert hinge_settle_point(0.5, 2.0, 1.5, 0.07) > 0.5  # steeper trade-off: above the target
    assert hinge_settle_point(0.5, 1.0, 1.0, 0.07) == float("inf")  # the target does not bind
    assert hinge_settle_point(0.5, 3.0, 0.7, 0.0) == 0.5
    for slope, weight, spread in [(0.72, 3.0, 0.058), (0.89, 1.0, 0.073), (1.2, 2.0, 0.05)]:
        m = hinge_settle_point(0.6, weight, slope, spread)  # the expected fitness slope vanishes there
        above = 1 - NormalDist(m, spread).cdf(0.6)
        assert slope - weight * above == pytest.approx(0.0, abs=1e-9)


def test_a_noisy_rank_based_search_settles_where_the_hinge_balances_the_slope():
    """1-D model of the cache direction: members at mean + spread * eps, fitness slope * cache - weight * hinge plus
    evaluation noise that dominates the ranking (as the split-half checks find in the searches), log-weighted
    recombination of the best half of 16. Averaged over chains and generations the mean settles within
    hinge_settle_point (0.006); without noise it settles nearer the target (the point is a noise-dominated limit)."""
    def settle(target, weight, slope, spread, noise, chains=64, generations=1500):
        g = torch.Generator().manual_seed(0)
        lam, mu = 16, 8
        w = torch.log(torch.tensor(mu + 0.5)) - torch.log(torch.arange(1, mu + 1, dtype=torch.float64))
        w = w / w.sum()
        mean, seen = torch.full((chains, 1), target, dtype=torch.float64), []
        for gen in range(generations):
            eps = torch.randn(chains, lam, generator=g, dtype=torch.float64)
            cache = mean + spread * eps
            fit = slope * cache - weight * (cache - target).clamp_min(0)
            fit = fit + noise * torch.randn(chains, lam, generator=g, dtype=torch.float64)
            best = fit.argsort(dim=1, descending=True)[:, :mu]
            mean = mean + 0.45 * spread * (eps.gather(1, best) * w).sum(1, keepdim=True)
            if gen >= 300:
                seen.append(mean)
        return float(torch.cat(seen).mean())
    for target, weight, slope, spread in [(0.74, 3.0, 0.72, 0.058), (0.5, 2.0, 1.3, 0.07)]:
        predicted = hinge_settle_point(target, weight, slope, spread)
        assert settle(target, weight, slope, spread, noise=0.2) == pytest.approx(predicted, abs=0.006)
    quiet = settle(0.74, 3.0, 0.72, 0.058, noise=0.0)
    assert abs(quiet - 0.74) < abs(hinge_settle_point(0.74, 3.0, 0.72, 0.058) - 0.74) - 0.01


def _run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def test_member_spread_measures_resumes_and_refuses_other_settings(tmp_path):
    run = tmp_path / "run"
    res = _run(ROOT / "scripts/train_namm.py", "--model", "tiny-llama", "--stages", "passkey+kv_retrieval:1",
               "--tokens", "300", "--popsize", "4", "--delay", "128", "--chunk", "64", "--pool-per-task", "6",
               "--samples-per-task", "2", "--stats-samples-per-task", "1", "--cache-weight", "1",
               "--cache-target", "0.5", "--out", run)
    assert res.returncode == 0, res.stderr[-2000:]
    spread = [ROOT / "scripts/member_spread.py", "--run", run, "--out", tmp_path / "spread",
              "--prompts-per-task", "2", "--scales", "1,3"]
    res = _run(*spread)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "spread/scores.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["score"]) == len(r["cache"]) == 1 + 2 * 4 for r in rows)
    summary = json.loads((tmp_path / "spread/summary.json").read_text())
    assert set(summary["scales"]) == {"1.0", "3.0"} and summary["prompts"] == 4
    assert summary["scales"]["3.0"]["cache_sd"] > 0
    vs = summary["scales"]["1.0"]["matched_cache_vs_mean"]
    assert vs["below_mean"] == pytest.approx(summary["mean"]["ratio"] - vs["line_at_mean_cache"])
    assert 0 <= vs["members_above_mean"] <= 4
    # the mean's own row is the run's NAMM: its score ratio on these prompts is what the summary says
    assert 0 < summary["mean"]["ratio"] < 2 and "split-half" in (tmp_path / "spread/summary.md").read_text()
    again = _run(*spread)
    assert again.returncode == 0 and "4 already scored" in again.stdout
    assert len((tmp_path / "spread/scores.jsonl").read_text().splitlines()) == 4
    other = _run(*spread[:-1], "1,2")
    assert other.returncode != 0 and "other settings" in other.stderr
    mass = _run(*spread[:-1], "1", "--oracle-mass", "--out", tmp_path / "mass")  # the dense candidate signal
    assert mass.returncode == 0, mass.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "mass/scores.jsonl").read_text().splitlines()]
    assert all(len(r["mass"]) == 1 + 4 and all(0 < m <= 1 for m in r["mass"]) for r in rows)
    entry = json.loads((tmp_path / "mass/summary.json").read_text())["scales"]["1.0"]
    assert -1 <= entry["corr_mass_ratio_matched_cache"] <= 1 and "mass_agreement" in entry
    assert "Retained oracle attention mass" in (tmp_path / "mass/summary.md").read_text()
    other = _run(*spread[:-1], "1", "--out", tmp_path / "mass")  # without the flag: other settings
    assert other.returncode != 0 and "other settings" in other.stderr
    missing = _run(ROOT / "scripts/member_spread.py", "--run", tmp_path / "nothing", "--out", tmp_path / "x")
    assert missing.returncode != 0 and "no training state" in missing.stderr
