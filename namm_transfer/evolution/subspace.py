"""Search a subset of the NAMM's parameters: named groups evolve, the rest stay at a base vector.

Why: with 4,172 parameters and a population of 16, each CMA-ES step is mostly sampling noise (the committed
searches' means moved ~1.01x the distance a ranking of pure noise gives). Evolving only a few groups, e.g. the
scorer's output head (w_score, b_score, b_out: 76 numbers) around an evolved mean, keeps the noise the mean
walks with in 76 directions instead of 4,172 while the signal (how fitness changes along those directions) stays.
"""
from __future__ import annotations

import torch

from ..namm import NAMMConfig


def parameter_indices(cfg: NAMMConfig, groups: list[str]) -> torch.Tensor:
    """Flat indices (in the official layout) of the named parameter groups, in layout order; [] = every one."""
    names = [name for name, _ in cfg.layout]
    unknown = [g for g in groups if g not in names]
    if unknown or len(set(groups)) != len(groups):
        raise ValueError(f"parameter groups {groups}: each once, from {', '.join(names)}")
    index, start = [], 0
    for name, shape in cfg.layout:
        n = torch.Size(shape).numel()
        if not groups or name in groups:
            index.append(torch.arange(start, start + n))
        start += n
    return torch.cat(index)


def embed(coords: torch.Tensor, base: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Full parameter vectors from subspace coordinates: (R, k) or (k,) -> (R, P) or (P,); every parameter outside
    `index` takes its value in `base` (P,)."""
    if coords.shape[-1] != index.numel():
        raise ValueError(f"{coords.shape[-1]} coordinates for a subspace of {index.numel()} parameters")
    full = base.to(coords.dtype).expand(*coords.shape[:-1], base.numel()).clone()
    full[..., index] = coords
    return full
