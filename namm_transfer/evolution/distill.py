"""Distil a NAMM from the oracle: fit the scorer so that score >= 0 marks the tokens the question and the answer
will attend to most (language.benchmark.future_attention_scores), by gradient descent on a logistic loss.

The keep rule (score >= 0) makes the scorer a classifier: trained on labels "among the top `keep` share of the
tokens present at this step by the oracle's score", its logit is the evidence that a token will be needed, from
what the NAMM sees when it decides (its features at that step; it never sees the question under context-only).
Features are recorded in a keep-all pass, so each step sees every token read so far (a running NAMM sees the ones
it kept; the attention over them differs a little). Used as a start for a CMA-ES search (`train_namm.py
--init-from`), which then optimises the real objective.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..namm import NAMMConfig, bam_scores
from ..policies import LayerView, NAMMPolicy, values_at_positions


@dataclass
class StepFeatures:
    """One layer at one eviction step of one prompt: the scorer's inputs and the oracle's labels, per KV head."""

    layer: int
    x: torch.Tensor  # (H_kv, N, d_in)
    valid: torch.Tensor  # (H_kv, N) bool
    labels: torch.Tensor  # (H_kv, N) float, 1 = among the oracle's top share
    weights: torch.Tensor | None = None  # (H_kv, N) per-slot loss weights (None: all 1)


class FeatureRecorder(NAMMPolicy):
    """Keeps every token; at each eviction step stores, per layer, the NAMM's inputs and the tokens' positions."""

    name = "namm-features"

    def __init__(self, config: NAMMConfig, stats):
        super().__init__(None, config, stats)
        self.records: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def step(self, view: LayerView):
        if view.valid.shape[0] != 1:
            raise ValueError("the feature recorder reads one prompt at a time")
        x, state = self.inputs(view)
        self.records.append((view.layer_idx, x.detach().float().cpu(), view.positions[0].cpu(), view.valid[0].cpu()))
        return view.valid.clone(), state


def step_logits(params: torch.Tensor, st: StepFeatures, cfg: NAMMConfig) -> torch.Tensor:
    """The scorer's logits (H_kv, N) for one recorded step under one parameter vector (P,)."""
    return bam_scores(st.x, st.valid, params[None].expand(st.x.shape[0], -1).float(), cfg)


def top_share_labels(table: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, keep: float) -> torch.Tensor:
    """(H, N) labels: 1 for the ceil(keep * valid) slots of each head with the highest oracle score at their
    positions (table (H, L) per absolute position), 0 elsewhere (and on invalid slots)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    s = values_at_positions(table.float(), positions).masked_fill(~valid, float("-inf"))
    k = math.ceil(keep * int(valid[0].sum()))
    labels = torch.zeros_like(s)
    labels.scatter_(-1, s.topk(k, dim=-1).indices, 1.0)
    return labels * valid


def mass_weights(table: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, mass_weight: float) -> torch.Tensor:
    """(H, N) loss weights (1 - m) + m * (oracle score / its mean over the head's valid slots): m = 0 weighs every
    slot alike; m > 0 weighs the slots the question and answer read most more, where a wrong decision costs most."""
    if not 0 <= mass_weight <= 1:
        raise ValueError(f"mass_weight must be in [0, 1], got {mass_weight}")
    s = values_at_positions(table.float(), positions) * valid
    mean = s.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    return ((1 - mass_weight) + mass_weight * s / mean.clamp(min=1e-12)) * valid


def label_steps(records, tables: list[torch.Tensor], keep: float, mass_weight: float = 0.0) -> list[StepFeatures]:
    """Pair the recorder's steps with the oracle's per-layer tables (one prompt)."""
    return [StepFeatures(layer, x, valid, top_share_labels(tables[layer], pos, valid, keep),
                         mass_weights(tables[layer], pos, valid, mass_weight) if mass_weight else None)
            for layer, x, pos, valid in records]


def distill_loss(params: torch.Tensor, steps: list[StepFeatures], cfg: NAMMConfig) -> torch.Tensor:
    """Mean logistic loss of the scorer's logits (one parameter vector (P,)) against the labels over valid slots,
    weighted by each step's `weights` where it has them."""
    total, count = params.new_zeros(()), params.new_zeros(())
    for st in steps:
        logits = step_logits(params, st, cfg)
        loss = F.binary_cross_entropy_with_logits(logits, st.labels, reduction="none")
        w = st.valid.to(loss.dtype) if st.weights is None else st.weights.to(loss.dtype) * st.valid
        total = total + (loss * w).sum()
        count = count + w.sum()
    return total / count.clamp(min=1e-12)


def agreement(params: torch.Tensor, steps: list[StepFeatures], cfg: NAMMConfig) -> dict[str, float]:
    """How the fitted scorer's keep decisions (score >= 0) meet the labels: kept share and recall of labelled slots."""
    kept = hit = pos = n = 0
    with torch.no_grad():
        for st in steps:
            keep = (step_logits(params, st, cfg) >= cfg.threshold) & st.valid
            kept += int(keep.sum())
            hit += int((keep & (st.labels > 0)).sum())
            pos += int(st.labels.sum())
            n += int(st.valid.sum())
    return {"kept_share": kept / max(n, 1), "recall": hit / max(pos, 1)}


def calibrate(params: torch.Tensor, steps: list[StepFeatures], cfg: NAMMConfig, keep: float) -> torch.Tensor:
    """Shift the score's bias (`b_score`, the last parameter) so that a share `keep` of the valid slots of `steps`
    score >= the keep threshold: a classifier's 0.5 point is not the share a cache target asks for."""
    with torch.no_grad():
        logits = torch.cat([step_logits(params, st, cfg)[st.valid] for st in steps])
        drop = round((1 - keep) * logits.numel())
        cut = logits.kthvalue(drop).values if drop else logits.min()  # the highest logit of the dropped share
    out = params.detach().double().clone()
    # strictly above the cut: the dropped share scores below the threshold, the rest at or above it
    out[-1] += cfg.threshold - float(torch.nextafter(cut, torch.tensor(float("inf"))))
    return out


def fit(start: torch.Tensor, train: list[StepFeatures], cfg: NAMMConfig, steps: int = 200, lr: float = 3e-3,
        batch: int = 64, seed: int = 0, held_out: list[StepFeatures] | None = None, every: int = 20,
        progress=None) -> tuple[torch.Tensor, list[dict]]:
    """Adam on the logistic loss from `start` (P,), minibatches of `batch` steps; returns (params float64, log).
    The log holds the loss on the minibatch and, every `every` steps, on the held-out steps."""
    g = torch.Generator().manual_seed(seed)
    params = start.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    log = []
    for i in range(steps):
        idx = torch.randperm(len(train), generator=g)[:batch].tolist()
        loss = distill_loss(params, [train[j] for j in idx], cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        row = {"step": i + 1, "train_loss": float(loss.detach())}
        if held_out and ((i + 1) % every == 0 or i + 1 == steps):
            with torch.no_grad():
                row["held_out_loss"] = float(distill_loss(params, held_out, cfg))
        log.append(row)
        if progress:
            progress(row)
    return params.detach().double(), log
