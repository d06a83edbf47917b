"""Decision Transformer episodes with a KV cache managed by any memory policy, and a timed recompute episode.

Two rollouts, always named in outputs:
  * ``recompute-last-K``: the standard DT rollout (``envs.rollout.rollout_recompute``), the whole model on the last
    K timesteps at every step;
  * ``kv-cache``: ``namm_transfer.adapters.decision_transformer.KVStepper``, each timestep's tokens fed once into
    a ``MemoryCache`` whose policy (full, sliding window, NAMM, H2O, ...) decides what stays.

Both return an :class:`Episode`: return, length, normalised scores per named scale (``d4rl``, ``local``; never
mixed), realised cache fraction, env steps per second (wall clock, env included) and policy milliseconds per
step (wall time minus env time). Return-to-go and timesteps follow ``evaluate_episode_rtg``: R̂₀ = target / scale,
R̂ₜ₊₁ = R̂ₜ − rₜ / scale; stop on termination, truncation or ``max_ep_len`` steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from envs.registry import Scorer
from envs.rollout import DTPolicy, rollout_recompute
from namm_transfer.adapters.decision_transformer import TOKENS_PER_STEP, KVStepper
from namm_transfer.policies import MemoryPolicy

RECOMPUTE, KV = "recompute-last-K", "kv-cache"
ROLLOUTS = (RECOMPUTE, KV)


@dataclass
class Episode:
    rollout: str  # RECOMPUTE or KV
    ret: float
    length: int
    scores: dict[str, float]  # normalised 0-100 per named scale
    realised_fraction: float  # tokens attended / kept over tokens seen, mean over steps
    eviction_fraction: float | None  # the same right after eviction steps (what a fractional budget means)
    final_cache_tokens: float  # tokens stored at the end (mean over layers); recompute: its context
    steps_per_s: float  # env steps per wall-clock second, env included
    policy_ms: float  # model time per step (milliseconds)

    def to_dict(self) -> dict:
        return asdict(self)


def _scores(ret: float, refs: dict[str, Scorer] | None) -> dict[str, float]:
    return {name: float(ref.normalize(ret)) for name, ref in (refs or {}).items()}


def _capped(dt: DTPolicy, max_steps: int | None) -> DTPolicy:
    return dt if max_steps is None or max_steps >= dt.max_ep_len else replace(dt, max_ep_len=max_steps)


def window_fraction(length: int, context: int) -> float:
    """Mean over steps of the recompute rollout's context (tokens its state query attends to) / tokens seen."""
    t = np.arange(length)
    seen = TOKENS_PER_STEP * t + 2
    return float(np.mean((TOKENS_PER_STEP * np.minimum(t, context - 1) + 2) / seen))


class TimedEnv:
    """Wraps an env and accumulates the wall time of reset() and step(), so policy time = wall - env time
    is measured the same way for both rollouts."""

    def __init__(self, env):
        self.env, self.seconds = env, 0.0
        self.action_space, self.observation_space = env.action_space, env.observation_space

    def reset(self, **kwargs):
        t0 = time.perf_counter()
        out = self.env.reset(**kwargs)
        self.seconds += time.perf_counter() - t0
        return out

    def step(self, action):
        t0 = time.perf_counter()
        out = self.env.step(action)
        self.seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        self.env.close()


def _timed(env) -> TimedEnv:
    return env if isinstance(env, TimedEnv) else TimedEnv(env)


def run_recompute(dt: DTPolicy, env, target_return: float, seed: int | None = None,
                  refs: dict[str, Scorer] | None = None, max_steps: int | None = None) -> Episode:
    """One timed episode of the standard recompute-last-K rollout."""
    dt, env = _capped(dt, max_steps), _timed(env)
    env_s, t0 = env.seconds, time.perf_counter()
    res = rollout_recompute(dt, env, target_return, seed=seed)
    wall, env_s = time.perf_counter() - t0, env.seconds - env_s
    return Episode(RECOMPUTE, res.ret, res.length, _scores(res.ret, refs), window_fraction(res.length, dt.context),
                   None, float(TOKENS_PER_STEP * min(res.length - 1, dt.context - 1) + 2),
                   res.length / wall, 1e3 * (wall - env_s) / res.length)


@torch.inference_mode()
def kv_episode(dt: DTPolicy, env, stepper: KVStepper, target_return: float, seed: int | None = None,
               on_step: Callable[[int, KVStepper], None] | None = None) -> tuple[float, int, list[dict]]:
    """Step one episode through `stepper` (up to dt.max_ep_len steps): (return, length, env infos — the reset's
    and every step's, so infos[t] describes the state the DT saw at timestep t). on_step(t, stepper) runs after
    the DT's step at timestep t."""
    dev = stepper.device
    mean = torch.as_tensor(dt.state_mean, device=dev)
    std = torch.as_tensor(dt.state_std, device=dev)
    obs, info = env.reset(seed=seed)
    infos = [info]
    rtg, ret, t = target_return / dt.scale, 0.0, 0
    for t in range(dt.max_ep_len):
        state = (torch.as_tensor(obs, dtype=torch.float32, device=dev) - mean) / std
        action, token = dt.env_action(stepper.step(state, rtg, t))
        if dt.discrete_actions:
            stepper.set_action(token)
        if on_step is not None:
            on_step(t, stepper)
        obs, r, terminated, truncated, info = env.step(action)
        infos.append(info)
        ret += float(r)
        if terminated or truncated:
            break
        rtg -= float(r) / dt.scale
    return ret, t + 1, infos


def run_kv(dt: DTPolicy, env, policy: MemoryPolicy, target_return: float, seed: int | None = None,
           refs: dict[str, Scorer] | None = None, max_steps: int | None = None, fast: bool = True) -> Episode:
    """One episode of the KV-cache rollout with `policy` managing the encoder's cache."""
    stepper = KVStepper(dt.model, policy, fast=fast)
    ret, length, steps_per_s, policy_ms = timed_kv_episode(dt, env, stepper, target_return, seed, max_steps)
    return Episode(KV, ret, length, _scores(ret, refs), stepper.mean_fraction(), stepper.mean_eviction_fraction(),
                   float(np.mean(stepper.cache.cache_lengths())), steps_per_s, policy_ms)


def timed_kv_episode(dt: DTPolicy, env, stepper: KVStepper, target_return: float, seed: int | None = None,
                     max_steps: int | None = None) -> tuple[float, int, float, float]:
    """`kv_episode` timed: (return, length, env steps per wall-clock second, policy milliseconds per step)."""
    dt, env = _capped(dt, max_steps), _timed(env)
    env_s, t0 = env.seconds, time.perf_counter()
    ret, length, _ = kv_episode(dt, env, stepper, target_return, seed)
    wall, env_s = time.perf_counter() - t0, env.seconds - env_s
    return ret, length, length / wall, 1e3 * (wall - env_s) / length


@dataclass
class _Row:
    """One episode of a batched rollout while it runs."""

    env: TimedEnv
    obs: np.ndarray
    rtg: float
    ret: float = 0.0
    length: int = 0
    fractions: list[float] = field(default_factory=list)
    eviction_fractions: list[float] = field(default_factory=list)
    final_tokens: float = 0.0


@torch.inference_mode()
def kv_batch(dt: DTPolicy, envs: list, stepper: KVStepper, target_return: float, seeds: list[int | None]
             ) -> list[_Row]:
    """len(envs) episodes in lockstep through `stepper`: one batch row (and MemoryCache row) per episode, one
    batched DT forward per timestep; a finished episode's row is dropped before the next step. Row i is the
    episode `kv_episode` runs on envs[i] with reset seed seeds[i]."""
    dev = stepper.device
    mean, std = torch.as_tensor(dt.state_mean, device=dev), torch.as_tensor(dt.state_std, device=dev)
    rows = [_Row(env, env.reset(seed=seed)[0], target_return / dt.scale) for env, seed in zip(envs, seeds)]
    alive = list(range(len(rows)))
    for t in range(dt.max_ep_len):
        if not alive:
            break
        obs = torch.as_tensor(np.stack([rows[i].obs for i in alive]), dtype=torch.float32, device=dev)
        rtg = torch.tensor([rows[i].rtg for i in alive], dtype=torch.float32, device=dev)
        evictions = len(stepper.cache.log)
        preds = stepper.step((obs - mean) / std, rtg, torch.full((len(alive),), t, dtype=torch.long))
        acted = [dt.env_action(p) for p in preds]
        if dt.discrete_actions:
            stepper.set_action(torch.stack([token for _, token in acted]))
        fractions, evicted = stepper.cache.row_fractions(), len(stepper.cache.log) > evictions
        lengths = torch.stack([l.valid.float().sum(-1).mean(-1) for l in stepper.cache.layers]).mean(0).tolist()
        keep = []
        for j, (i, (action, _)) in enumerate(zip(alive, acted)):
            row = rows[i]
            row.fractions.append(fractions[j])
            if evicted:
                row.eviction_fractions.append(fractions[j])
            row.obs, r, terminated, truncated, _ = row.env.step(action)
            row.ret, row.length, row.final_tokens = row.ret + float(r), t + 1, lengths[j]
            row.rtg -= float(r) / dt.scale
            if not (terminated or truncated):
                keep.append(j)
        alive = [alive[j] for j in keep]
        if alive:
            stepper.keep_rows(keep)
    return rows


def run_kv_batch(dt: DTPolicy, envs: list, policy: MemoryPolicy, target_return: float, seeds: list[int | None],
                 refs: dict[str, Scorer] | None = None, max_steps: int | None = None, fast: bool = True
                 ) -> list[Episode]:
    """`run_kv` for len(envs) episodes at once (`kv_batch`): the same returns and actions as one by one. steps_per_s
    and policy_ms are the batch's (all its env steps over its wall time), the same for each of its episodes."""
    dt, envs = _capped(dt, max_steps), [_timed(e) for e in envs]
    stepper = KVStepper(dt.model, policy, fast=fast)
    env_s, t0 = sum(e.seconds for e in envs), time.perf_counter()
    rows = kv_batch(dt, envs, stepper, target_return, seeds)
    wall, env_s = time.perf_counter() - t0, sum(e.seconds for e in envs) - env_s
    steps = sum(r.length for r in rows)
    return [Episode(KV, r.ret, r.length, _scores(r.ret, refs), float(np.mean(r.fractions)),
                    float(np.mean(r.eviction_fractions)) if r.eviction_fractions else None, r.final_tokens,
                    steps / wall, 1e3 * (wall - env_s) / steps) for r in rows]


def make_env(gym_id: str, max_steps: int) -> TimedEnv:
    import gymnasium as gym

    return TimedEnv(gym.make(gym_id, max_episode_steps=max_steps))
