"""Separable CMA-ES with the reference NAMM rates (maximisation).

Why our own ~80 lines instead of pycma: the reference (evo-memory `cma_es.py`) fixes specific rates, active
(negative) weights and the "mean is the result" rule; at n = 4172 its learning rates for the covariance are
c1 ~ 1e-7 and c_mu ~ 8e-7, so a full 4172^2 covariance barely moves from the identity while costing 200 MB per
checkpoint and seconds of eigendecomposition per generation. Keeping the diagonal keeps the same weighted
recombination, path-based step-size control and rank-one/rank-mu updates (restricted to the diagonal, so
C^(-1/2) y = y / sqrt(diag C)), gives KB-sized checkpoints, and its own torch.Generator makes a resumed run
bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import math

import torch


class SepCMAES:
    def __init__(self, dim: int, popsize: int = 32, sigma0: float = 0.065, elite_ratio: float = 0.5,
                 c_m: float = 1.0, seed: int = 0, mean: torch.Tensor | None = None):
        n, lam = dim, popsize
        mu = max(1, int(math.floor(lam * elite_ratio)))
        self.dim, self.popsize, self.mu, self.c_m = n, lam, mu, c_m
        raw = torch.tensor([math.log((lam + 1) / 2) - math.log(i + 1) for i in range(lam)], dtype=torch.float64)
        pos, neg = raw[:mu], raw[mu:]
        self.mu_eff = float(pos.sum() ** 2 / (pos ** 2).sum())
        mu_eff_neg = float(neg.sum() ** 2 / (neg ** 2).sum()) if len(neg) else 0.0
        n_r = min(n, 40000)
        self.c1 = 2 / ((n_r + 1.3) ** 2 + self.mu_eff)
        self.c_mu = min(1 - self.c1 - 1e-8, 2 * (self.mu_eff - 2 + 1 / self.mu_eff) / ((n_r + 2) ** 2 + self.mu_eff))
        self.c_sigma = (self.mu_eff + 2) / (n_r + self.mu_eff + 5)
        self.d_sigma = 1 + 2 * max(0.0, math.sqrt((self.mu_eff - 1) / (n_r + 1)) - 1) + self.c_sigma
        self.c_c = (4 + self.mu_eff / n_r) / (n_r + 4 + 2 * self.mu_eff / n_r)
        self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n ** 2))
        inf = float("inf")
        alpha_min = min(1 + self.c1 / self.c_mu if self.c_mu else inf, 1 + 2 * mu_eff_neg / (self.mu_eff + 2),
                        (1 - self.c1 - self.c_mu) / (n_r * self.c_mu) if self.c_mu else inf)
        self.weights = torch.cat([pos / pos.sum(), alpha_min * neg / neg.abs().sum() if len(neg) else neg])
        self.mean = torch.zeros(n, dtype=torch.float64) if mean is None else mean.double().clone()
        self.sigma = float(sigma0)
        self.diag_c = torch.ones(n, dtype=torch.float64)
        self.p_sigma = torch.zeros(n, dtype=torch.float64)
        self.p_c = torch.zeros(n, dtype=torch.float64)
        self.generation = 0
        self.gen = torch.Generator().manual_seed(seed)
        self._y: torch.Tensor | None = None

    def ask(self) -> torch.Tensor:
        """Sample the population (popsize, dim), float64."""
        z = torch.randn(self.popsize, self.dim, generator=self.gen, dtype=torch.float64)
        self._y = z * self.diag_c.sqrt()
        return self.mean + self.sigma * self._y

    def tell(self, fitness: torch.Tensor) -> None:
        """Update from the fitness of the last `ask` (higher is better)."""
        if self._y is None:
            raise RuntimeError("tell() without ask()")
        self.generation += 1
        order = torch.argsort(torch.as_tensor(fitness, dtype=torch.float64), descending=True, stable=True)
        y = self._y[order]
        d = self.diag_c.sqrt()
        y_w = (self.weights[:self.mu, None] * y[:self.mu]).sum(0)
        self.mean = self.mean + self.c_m * self.sigma * y_w
        self.p_sigma = (1 - self.c_sigma) * self.p_sigma + \
            math.sqrt(self.c_sigma * (2 - self.c_sigma) * self.mu_eff) * y_w / d
        norm_ps = float(self.p_sigma.norm())
        h_sigma = float(norm_ps / math.sqrt(1 - (1 - self.c_sigma) ** (2 * self.generation))
                        < (1.4 + 2 / (self.dim + 1)) * self.chi_n)
        self.p_c = (1 - self.c_c) * self.p_c + h_sigma * math.sqrt(self.c_c * (2 - self.c_c) * self.mu_eff) * y_w
        w = self.weights.clone()
        neg = w < 0
        if neg.any():
            w[neg] = w[neg] * self.dim / ((y[neg] / d) ** 2).sum(1).clamp_min(1e-30)
        decay = 1 + self.c1 * (1 - h_sigma) * self.c_c * (2 - self.c_c) - self.c1 - self.c_mu * float(self.weights.sum())
        self.diag_c = (decay * self.diag_c + self.c1 * self.p_c ** 2 + self.c_mu * (w[:, None] * y ** 2).sum(0))
        self.diag_c = self.diag_c.clamp_min(1e-20)
        self.sigma *= math.exp((self.c_sigma / self.d_sigma) * (norm_ps / self.chi_n - 1))
        self._y = None

    def state_dict(self) -> dict:
        return {"mean": self.mean, "sigma": self.sigma, "diag_c": self.diag_c, "p_sigma": self.p_sigma,
                "p_c": self.p_c, "generation": self.generation, "rng": self.gen.get_state(),
                "y": self._y, "popsize": self.popsize, "dim": self.dim}

    def load_state_dict(self, state: dict) -> None:
        if state["dim"] != self.dim or state["popsize"] != self.popsize:
            raise ValueError(f"CMA-ES state is for dim {state['dim']} / popsize {state['popsize']}, "
                             f"not {self.dim} / {self.popsize}")
        self.mean, self.sigma, self.diag_c = state["mean"], state["sigma"], state["diag_c"]
        self.p_sigma, self.p_c, self.generation = state["p_sigma"], state["p_c"], state["generation"]
        self.gen.set_state(state["rng"])
        self._y = state["y"]


def random_selection_path_norm(dim: int, c_sigma: float, generations: int) -> float:
    """Root of E||p_sigma||^2 after `generations` updates from p_sigma = 0 when the ranking carries no information
    about the samples: each update adds sqrt(c_s (2 - c_s) mu_eff) y_w / sqrt(diag C) ~ N(0, c_s (2 - c_s) I),
    so E||p||^2 = dim (1 - (1 - c_s)^(2 t)). A larger observed norm means the selected steps point the same way
    from one generation to the next (the signal cumulative step-size adaptation reads)."""
    return math.sqrt(dim * (1 - (1 - c_sigma) ** (2 * generations)))


def random_selection_mean_drift(sigmas: list[float], diag_sum: float, mu_eff: float, c_m: float = 1.0) -> float:
    """Root of E||m_T - m_0||^2 when the ranking carries no information: generation t moves the mean by
    c_m sigma_t y_w with E||y_w||^2 = sum(diag C) / mu_eff, independent across generations. `sigmas` are the step
    sizes the T generations sampled with; `diag_sum` is sum(diag C) (constant here: its rates are ~1e-7)."""
    return c_m * math.sqrt(sum(s * s for s in sigmas) * diag_sum / mu_eff)
