"""Names of the offline-RL tasks: "hopper-medium" -> datasets, gym env, DT settings, reference scores.

Three sources of data exist and their scores never mix:

* ``d4rl``  — the D4RL v2 hdf5 files (collected on ``Hopper-v3`` etc.), normalised with D4RL's refs.
* ``minari`` — the official Minari ports (``mujoco/hopper/medium-v0``, ``Hopper-v5``); their refs live in
  each dataset's metadata and are read at load time (:func:`envs.data.minari_ref_scores`).
* ``local`` — datasets this project generates itself with ``scripts/make_dataset.py``
  (``namm_transfer/hopper/medium-v0``, ``Hopper-v5``), with the refs in :data:`LOCAL_REF`.

Every normalised number therefore names its source (see :func:`normalized_score`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ENVS = ("hopper", "walker2d", "halfcheetah")
QUALITIES = ("medium", "medium-replay", "expert", "medium-expert")
Source = Literal["d4rl", "minari", "local"]


@dataclass(frozen=True)
class RefScores:
    """Random (min) and expert (max) episode returns that define a 0-100 normalised score."""

    min: float
    max: float
    source: Source

    def normalize(self, returns: float | np.ndarray) -> float | np.ndarray:
        """``100 * (R - min) / (max - min)`` (D4RL papers' convention)."""
        return 100.0 * (np.asarray(returns, dtype=np.float64) - self.min) / (self.max - self.min)


@dataclass(frozen=True)
class SuccessRate:
    """Success as a per-episode score of 0 or 100 (return > 0: the goal was reached); its mean is a rate in %."""

    source: str = "success"

    def normalize(self, returns: float | np.ndarray) -> float | np.ndarray:
        return 100.0 * (np.asarray(returns, dtype=np.float64) > 0)


Scorer = RefScores | SuccessRate


# D4RL d4rl/infos.py (the v2 datasets inherit the -random-v0 entries); benchmarks.md §3.1.
D4RL_REF: dict[str, RefScores] = {
    "hopper": RefScores(-20.272305, 3234.3, "d4rl"),
    "halfcheetah": RefScores(-280.178953, 12135.0, "d4rl"),
    "walker2d": RefScores(1.629008, 4592.3, "d4rl"),
}

# Refs written into the project's own v5 datasets. min: mean return of a uniform-random policy over 100
# episodes on the v5 env (action_space.seed(123), every reset seeded: 123..222), measured here with gymnasium
# 1.4.0 / mujoco 4.0.0. Minari's RandomPolicy (minari/utils.py get_average_reference_score) seeds only the first
# reset (123) and continues unseeded; that variant gives 15.93 / 1.24 / -282.64 (hopper / walker2d / halfcheetah).
# max: no expert v5 policy exists offline, so the D4RL expert return is used as the top of the scale; it is a
# constant of this project's "local" scale, not a D4RL score.
LOCAL_REF: dict[str, RefScores] = {
    "hopper": RefScores(16.668783, 3234.3, "local"),
    "halfcheetah": RefScores(-276.044740, 12135.0, "local"),
    "walker2d": RefScores(1.399958, 4592.3, "local"),
}

_GYM_IDS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}
_TARGETS = {"hopper": (3600.0, 1800.0), "halfcheetah": (12000.0, 6000.0), "walker2d": (5000.0, 2500.0)}
# Official Minari MuJoCo proficiencies: expert, medium, simple, medium-expert (no medium-replay).
_MINARI_QUALITIES = ("medium", "expert", "medium-expert")
# edbeeching/decision-transformer-gym-* exists for 3 envs x {medium, medium-replay, expert}.
_HF_QUALITIES = ("medium", "medium-replay", "expert")


@dataclass(frozen=True)
class TaskSpec:
    """Everything the scripts need to know about one ``{env}-{quality}`` task."""

    name: str
    env: str
    quality: str
    gym_id: str
    minari_id: str | None
    local_dataset_id: str
    d4rl_file: str
    target_returns: tuple[float, ...]
    hf_checkpoint: str | None
    return_scale: float = 1000.0
    max_ep_len: int = 1000
    metric: str = "normalised"  # "normalised": D4RL / local reference returns; "success": SuccessRate
    discrete_actions: bool = False  # one-hot action tokens, logits out, cross-entropy (scripts/train_dt.py)
    normalize_states: bool = True  # False: states enter the DT as they are (one-hot observations)
    dt_delay: int = 48  # scripts/run_dt.py's default eviction period (tokens; 3 per timestep)
    dt_train: tuple[tuple[str, object], ...] = ()  # scripts/train_dt.py defaults for this task (flags win)

    def refs(self, source: Source) -> RefScores:
        if self.metric == "success":
            raise ValueError(f"{self.name} is scored by success rate, it has no {source} reference returns")
        return ref_scores(self.env, source)

    def scorers(self, dataset_source: str | None = None, minari_refs: RefScores | None = None) -> dict[str, Scorer]:
        """Every scale an episode return is reported on: {"success"}, or {"d4rl"} + {"local"} when the DT was
        trained on the project's own (local) data, + {"minari"} when it was trained on official Minari data and
        that dataset's own refs are given (`minari_refs`: envs.data.minari_dataset_refs reads them)."""
        if self.metric == "success":
            return {"success": SuccessRate()}
        out: dict[str, Scorer] = {"d4rl": self.refs("d4rl")}
        if dataset_source == "local":
            out["local"] = self.refs("local")
        if dataset_source == "minari" and minari_refs is not None:
            out["minari"] = minari_refs
        return out


def _make(env: str, quality: str) -> TaskSpec:
    return TaskSpec(
        name=f"{env}-{quality}",
        env=env,
        quality=quality,
        gym_id=_GYM_IDS[env],
        minari_id=f"mujoco/{env}/{quality}-v0" if quality in _MINARI_QUALITIES else None,
        local_dataset_id=f"namm_transfer/{env}/{quality}-v0",
        d4rl_file=f"{env}-{quality}-v2.hdf5",
        target_returns=_TARGETS[env],
        hf_checkpoint=f"edbeeching/decision-transformer-gym-{env}-{quality}" if quality in _HF_QUALITIES else None,
    )


TASKS: dict[str, TaskSpec] = {f"{e}-{q}": _make(e, q) for e in ENVS for q in QUALITIES}

# MiniGrid Memory (envs/minigrid_memory.py, S17 with a fixed hallway): the cue is out of sight >= 10 steps before
# the choice; scripted episodes take 14-21 steps, so a 24-step context holds the whole episode. Success returns
# are ~0.99 (MiniGrid's 1 - 0.9 * steps / 1445), failures 0: target 1 asks for success, 0 for failure. Evictions
# every 16 tokens (NAMM's STFT hop; ~5 timesteps) so that every policy evicts before the choice.
TASKS["minigrid-memory"] = TaskSpec(
    name="minigrid-memory", env="minigrid", quality="memory",
    gym_id="envs.minigrid_memory:namm_transfer/MiniGridMemoryS17-v0", minari_id=None,
    local_dataset_id="namm_transfer/minigrid/memory-v0", d4rl_file="", target_returns=(1.0, 0.0),
    hf_checkpoint=None, return_scale=1.0, max_ep_len=24, metric="success", discrete_actions=True,
    normalize_states=False, dt_delay=16,
    dt_train=(("context", 24), ("hidden", 64), ("layers", 3), ("heads", 2), ("batch_size", 64), ("dropout", 0.0),
              ("lr", 6e-4), ("warmup", 500), ("steps", 6000), ("ckpt_every", 500), ("eval_every", 500),
              ("eval_episodes", 50)),
)


def get_spec(name: str) -> TaskSpec:
    """Look up ``"hopper-medium"`` etc.; unknown names raise a ValueError listing the valid ones."""
    key = name.strip().lower()
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(sorted(TASKS))}")
    return TASKS[key]


def ref_scores(env: str, source: Source) -> RefScores:
    """Reference scores of one env on one scale. ``minari`` refs are per dataset: read them from it."""
    if env not in ENVS:
        raise ValueError(f"unknown env {env!r}; valid envs: {', '.join(ENVS)}")
    if source == "d4rl":
        return D4RL_REF[env]
    if source == "local":
        return LOCAL_REF[env]
    if source == "minari":
        raise ValueError(
            "official Minari ref scores are stored in each dataset's metadata; "
            "use envs.data.minari_ref_scores(dataset) instead"
        )
    raise ValueError(f"unknown score source {source!r}; valid: 'd4rl', 'local', 'minari'")


def normalized_score(env: str, returns: float | np.ndarray, source: Source) -> float | np.ndarray:
    """0-100 normalised score of episode returns on an explicitly named scale (``d4rl`` or ``local``)."""
    return ref_scores(env, source).normalize(returns)
