"""MiniGrid Memory as an offline-RL task that needs memory: flat observations, a scripted data agent.

MiniGrid's ``MemoryEnv`` (Farama ``minigrid``; ``MiniGrid-MemoryS13-v0`` layout): the agent starts in the row
of a hallway that joins a small room (the *cue*, a key or a ball, lies in it) to a junction with a key and a
ball at its two ends. Stepping next to the object that matches the cue ends the episode with reward
``1 - 0.9 * steps / max_steps``; the other object ends it with 0. At the junction the cue is out of sight, so
acting well needs a memory of something seen ~10 steps earlier.

``GYM_ID`` names the env with this module as its import prefix, so ``gym.make(GYM_ID)`` works anywhere (the
harnesses call ``gym.make(spec.gym_id, max_episode_steps=...)``). Its observation is :class:`FlatObs`: the 7x7
egocentric view as a one-hot of the object type per cell (``OBJECTS``; the Memory env holds no other type, all
its objects are green and stateless) plus a one-hot of the agent's direction — 249 values in {0, 1}. Its infos
say whether the state shows the cue (``cue_visible``) and whether the agent stands at the junction, where it
chooses (``at_junction``): scripts/retention_maps.py uses them to ask whether a memory policy kept the cue.

:class:`ScriptedAgent` makes the offline data: it turns around and walks west until it has seen the cue, walks
east to the junction, then steps to the matching object with probability ``p_correct`` and to the other one
otherwise. Its path up to the choice does not depend on the cue, so the data's actions leak nothing: only the
return (success ~0.98, failure 0) says whether the choice was right.
"""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np

ENV_NAME = "namm_transfer/MiniGridMemoryS17-v0"
GYM_ID = f"{__name__}:{ENV_NAME}"  # "envs.minigrid_memory:...": gym.make imports this module first
SIZE = 17  # fixed hallway (MemoryEnv(size=17, random_length=False)), junction at x = 15
OBJECTS = ("unseen", "empty", "wall", "key", "ball")
LEFT, RIGHT, FORWARD = 0, 1, 2  # MiniGrid's action ids
EAST, SOUTH, WEST, NORTH = 0, 1, 2, 3  # MiniGrid's agent_dir


class FlatObs(gym.ObservationWrapper):
    """The dict observation as one flat uint8 vector: one-hot object type per view cell, then direction."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        from minigrid.core.constants import OBJECT_TO_IDX

        view = env.observation_space["image"].shape[:2]
        self.lookup = np.full(max(OBJECT_TO_IDX.values()) + 1, -1, dtype=np.int64)
        for i, name in enumerate(OBJECTS):
            self.lookup[OBJECT_TO_IDX[name]] = i
        self.cells = view[0] * view[1]
        self.observation_space = gym.spaces.Box(0, 1, (self.cells * len(OBJECTS) + 4,), dtype=np.uint8)

    def observation(self, obs: dict) -> np.ndarray:
        return encode(obs["image"][..., 0], int(obs["direction"]), self.lookup, self.cells)

    def reset(self, **kwargs):
        obs, info = super().reset(**kwargs)
        return obs, {**info, **self.where()}

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, {**info, **self.where()}

    def where(self) -> dict:
        u = self.env.unwrapped
        return {"cue_visible": bool(u.agent_sees(*cue_cell(u))), "at_junction": bool(u.agent_pos[0] == u.success_pos[0])}


def cue_cell(u) -> tuple[int, int]:
    """Where MemoryEnv puts the start-room object (the cue) in the unwrapped env ``u``."""
    return 1, u.height // 2 - 1


def encode(types: np.ndarray, direction: int, lookup: np.ndarray, cells: int) -> np.ndarray:
    """(view, view) object-type ids + direction -> the flat one-hot vector (unknown types: all zeros)."""
    out = np.zeros(cells * len(OBJECTS) + 4, dtype=np.uint8)
    idx = lookup[types.reshape(-1)]
    ok = idx >= 0
    out[np.flatnonzero(ok) * len(OBJECTS) + idx[ok]] = 1
    out[cells * len(OBJECTS) + direction] = 1
    return out


def make_env(size: int = SIZE, **kwargs) -> gym.Env:
    """The flat-observation Memory env (``max_steps`` etc. pass through to ``MemoryEnv``)."""
    from minigrid.envs import MemoryEnv

    return FlatObs(MemoryEnv(size=size, random_length=False, **kwargs))


if ENV_NAME not in gym.registry:
    gym.register(ENV_NAME, entry_point=f"{__name__}:make_env")


@dataclass
class ScriptedAgent:
    """Sees the cue, walks to the junction, picks the matching object with probability ``p_correct``.

    Acts on the unwrapped ``MemoryEnv``'s state (agent pose, cue cell, success / failure cells). ``choose``
    forces the choice (True: matching object) for tests; by default it is drawn once per episode.
    """

    p_correct: float = 0.5
    seed: int = 0
    choose: bool | None = None

    def __post_init__(self):
        if not 0.0 <= self.p_correct <= 1.0:
            raise ValueError(f"p_correct must be in [0, 1], got {self.p_correct}")
        self.rng = np.random.default_rng(self.seed)

    def reset(self, env: gym.Env) -> None:
        """Call after every env.reset()."""
        u = env.unwrapped
        self.cue = cue_cell(u)
        self.junction_x = u.success_pos[0]
        self.correct = self.choose if self.choose is not None else bool(self.rng.random() < self.p_correct)
        self.seen = False

    def act(self, env: gym.Env) -> int:
        u = env.unwrapped
        (x, y), d = tuple(u.agent_pos), u.agent_dir
        self.seen = self.seen or u.agent_sees(*self.cue)
        if not self.seen:  # face west (turning left from east passes north), then walk towards the room
            return FORWARD if d == WEST else LEFT
        if x < self.junction_x:  # face east (from west: right, right), then walk to the junction
            return FORWARD if d == EAST else (LEFT if d == SOUTH else RIGHT)
        target_y = (u.success_pos if self.correct else u.failure_pos)[1]
        want = NORTH if target_y < y else SOUTH
        if d == want:
            return FORWARD
        return LEFT if (d - want) % 4 == 1 else RIGHT


def collect(steps: int, p_correct: float, seed: int = 0, first_reset_seed: int = 123) -> list[dict]:
    """Complete scripted episodes (reset seeds first_reset_seed, +1, ...) until >= ``steps`` env steps, in the
    episode-dict layout of scripts/make_dataset.py (observations T+1, actions, rewards, terminations, ...)."""
    env = gym.make(GYM_ID)
    agent = ScriptedAgent(p_correct, seed)
    episodes, total = [], 0
    while total < steps:
        reset_seed = first_reset_seed + len(episodes)
        obs, _ = env.reset(seed=reset_seed)
        agent.reset(env)
        ep = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": [],
              "seed": reset_seed, "correct": agent.correct}
        done = False
        while not done:
            act = agent.act(env)
            obs, r, term, trunc, _ = env.step(act)
            for k, v in (("observations", obs), ("actions", act), ("rewards", r), ("terminations", term),
                         ("truncations", trunc)):
                ep[k].append(v)
            done = term or trunc
        episodes.append(ep)
        total += len(ep["rewards"])
    env.close()
    return episodes
