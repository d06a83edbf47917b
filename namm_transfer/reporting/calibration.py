"""The normalisation ablation ("namm-renorm"): the language NAMM's parameters with its spectrogram normalisation
statistics re-estimated on the target model.

Transfer is zero-shot by default (statistics from language training). The ablation measures the statistics the
way training did at generation 0, in a keep-all pass: a NAMMPolicy with *zero* parameters (every score is 0, so
every token is kept) and the trained NAMM's config (same delay, STFT, EMA) collects them; the trained parameters
then run with the new, frozen statistics.

    renorm = renormalise(namm, lambda collector: run_my_model(collector))   # policy named "namm-renorm"
    save_renormalised(renorm, "runs/namm-renorm-dt", {"target": "dt-hopper-medium"})  # for the harnesses' --namm
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..checkpoints import save_namm
from ..features import RunningStats
from ..policies import NAMMPolicy
from ..records import in_repo
from .results import RENORM


def stats_collector(trained: NAMMPolicy) -> NAMMPolicy:
    """A keep-all NAMM (zero parameters, the trained config) that measures fresh normalisation statistics."""
    cfg = trained.config
    return NAMMPolicy(torch.zeros(cfg.num_params), cfg, RunningStats(cfg.num_bins), collect_stats=True)


def with_stats(trained: NAMMPolicy, collector: NAMMPolicy) -> NAMMPolicy:
    """The trained parameters with the collector's statistics, frozen; named "namm-renorm"."""
    stats = collector.stats
    if stats.count == 0:
        raise ValueError("the calibration pass ran no NAMM eviction step (inputs shorter than the NAMM's delay "
                         f"{trained.config.delay} tokens?): no statistics were collected")
    frozen = RunningStats(trained.config.num_bins)
    frozen.set(stats.mean, stats.var, count=stats.count, frozen=True)
    policy = NAMMPolicy(trained.params.clone(), trained.config, frozen)
    policy.name = RENORM
    policy.source = f"{getattr(trained, 'source', 'NAMM')} (renormalised on {stats.count} token-steps)"
    return policy


def renormalise(trained: NAMMPolicy, run_keep_all: Callable[[NAMMPolicy], object]) -> NAMMPolicy:
    """`run_keep_all(collector)` runs the target model on calibration inputs with the collector as its policy."""
    collector = stats_collector(trained)
    run_keep_all(collector)
    return with_stats(trained, collector)


def save_renormalised(policy: NAMMPolicy, path: str | Path, meta: dict | None = None) -> Path:
    """A checkpoint the harnesses load with --namm; its meta marks it so tables name its rows namm-renorm."""
    return save_namm(path, policy.params[0], policy.stats, policy.config,
                     {**(meta or {}), "variant": RENORM, "base": in_repo(getattr(policy, "source", ""))})
