"""Offline RL trajectories: one in-memory format, loaders for Minari and D4RL files, and the DT batch sampler.

The ``d4rl`` package itself does not install here (it needs mujoco-py and the MuJoCo 2.1 binaries), so D4RL
datasets are read straight from their hdf5 files with h5py. Minari datasets are read with ``minari``
(root: ``$MINARI_DATASETS_PATH``, default ``~/.minari/datasets``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from envs.registry import D4RL_REF, ENVS, RefScores, Source


@dataclass
class Trajectory:
    """One episode. ``observations[t]`` is the state in which ``actions[t]`` was taken."""

    observations: np.ndarray  # (T, obs_dim) float32
    actions: np.ndarray  # (T, act_dim) float32
    rewards: np.ndarray  # (T,) float32
    terminals: np.ndarray  # (T,) bool, true terminal (fell over)
    timeouts: np.ndarray  # (T,) bool, time-limit truncation
    next_observation: np.ndarray | None = None  # state after the last action, when known

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def ret(self) -> float:
        return float(self.rewards.sum())


@dataclass
class OfflineDataset:
    """Trajectories plus where they came from; ``refs`` normalise returns on the dataset's own scale."""

    trajectories: list[Trajectory]
    name: str
    source: Source
    refs: RefScores | None = None
    discrete_actions: bool = False  # actions are one-hot rows of a Discrete(n) space
    _stats: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def obs_dim(self) -> int:
        return self.trajectories[0].observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.trajectories[0].actions.shape[1]

    @property
    def num_steps(self) -> int:
        return sum(len(t) for t in self.trajectories)

    def state_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (+1e-6) over all states of the dataset, as the official DT code."""
        if self._stats is None:
            states = np.concatenate([t.observations for t in self.trajectories]).astype(np.float64)
            self._stats = (states.mean(0).astype(np.float32), (states.std(0) + 1e-6).astype(np.float32))
        return self._stats

    def returns(self) -> np.ndarray:
        return np.array([t.ret for t in self.trajectories])


def _make_traj(obs, act, rew, term, trunc, next_obs=None) -> Trajectory:
    return Trajectory(
        observations=np.asarray(obs, dtype=np.float32),
        actions=np.asarray(act, dtype=np.float32),
        rewards=np.asarray(rew, dtype=np.float32).reshape(-1),
        terminals=np.asarray(term, dtype=bool).reshape(-1),
        timeouts=np.asarray(trunc, dtype=bool).reshape(-1),
        next_observation=None if next_obs is None else np.asarray(next_obs, dtype=np.float32),
    )


# ----------------------------------------------------------------------------------------------- Minari
def minari_ref_scores(ds, source: Source = "minari") -> RefScores | None:
    """Ref scores stored in a Minari dataset's metadata (``None`` when it has none)."""
    meta = ds.storage.metadata
    lo, hi = meta.get("ref_min_score"), meta.get("ref_max_score")
    return None if lo is None or hi is None else RefScores(float(lo), float(hi), source)


def minari_dataset_refs(dataset_id: str | None) -> tuple[RefScores | None, str]:
    """(refs, "") of a Minari dataset from its local copy's metadata (``ref_min_score`` / ``ref_max_score``; only
    the metadata is read, nothing is downloaded), else (None, why not): no id, not under the Minari root, no refs."""
    if not dataset_id:
        return None, "the checkpoint names no dataset_id"
    import minari

    root = os.environ.get("MINARI_DATASETS_PATH", str(Path.home() / ".minari" / "datasets"))
    if dataset_id not in minari.list_local_datasets():
        return None, (f"Minari dataset {dataset_id!r} is not under {root} (MINARI_DATASETS_PATH), so its reference "
                      "scores are not reported")
    refs = minari_ref_scores(minari.load_dataset(dataset_id), "minari")
    if refs is None:
        return None, f"Minari dataset {dataset_id!r} carries no ref_min_score / ref_max_score in its metadata"
    return refs, ""


def dt_scorers(spec, meta: dict) -> tuple[dict, str]:
    """(scales, note) for a DT whose checkpoint meta is `meta`: the task's scales (`spec.scorers`), plus the official
    Minari dataset's own refs when the DT was trained on one and its local copy has them; note says why they are
    missing ("" otherwise), for the run's header."""
    source, minari_refs, note = meta.get("dataset_source"), None, ""
    if source == "minari" and spec.metric != "success":
        minari_refs, why = minari_dataset_refs(meta.get("dataset_id"))
        note = f"no minari-scale scores: {why}" if why else ""
    return spec.scorers(source, minari_refs), note


def load_minari(dataset_id: str, download: bool = False) -> OfflineDataset:
    """Load a Minari dataset from ``$MINARI_DATASETS_PATH``; download only when ``download=True``.

    Ids under ``namm_transfer/`` are the project's own datasets (source ``local``); all others are
    official Minari data (source ``minari``).
    """
    import minari

    if dataset_id not in minari.list_local_datasets() and not download:
        root = os.environ.get("MINARI_DATASETS_PATH", str(Path.home() / ".minari" / "datasets"))
        hint = (
            f"generate it with `python scripts/make_dataset.py --env {dataset_id.split('/')[1]} "
            f"--quality {dataset_id.split('/')[-1].rsplit('-v', 1)[0]}`"
            if dataset_id.startswith("namm_transfer/") and dataset_id.count("/") == 2
            else "download it where the internet is reachable (`minari download ID`, or load with download=True) "
            "and copy it there, or generate a local one with scripts/make_dataset.py"
        )
        raise FileNotFoundError(
            f"Minari dataset {dataset_id!r} not found under {root} "
            f"(set MINARI_DATASETS_PATH to change the root); {hint}"
        )
    from gymnasium.spaces import Discrete

    ds = minari.load_dataset(dataset_id, download=download)
    n_actions = ds.action_space.n if isinstance(ds.action_space, Discrete) else None
    trajs = [
        _make_traj(ep.observations[:-1], ep.actions if n_actions is None else one_hot(ep.actions, n_actions),
                   ep.rewards, ep.terminations, ep.truncations, ep.observations[-1])
        for ep in ds.iterate_episodes()
    ]
    source: Source = "local" if dataset_id.startswith("namm_transfer/") else "minari"
    return OfflineDataset(trajs, dataset_id, source, minari_ref_scores(ds, source), n_actions is not None)


def one_hot(actions: np.ndarray, n: int) -> np.ndarray:
    """(T,) action ids of a Discrete(n) space -> (T, n) float32 one-hot rows (the DT's action tokens)."""
    return np.eye(n, dtype=np.float32)[np.asarray(actions, dtype=np.int64).reshape(-1)]


# ------------------------------------------------------------------------------------------------- D4RL
D4RL_KEYS = ("observations", "actions", "rewards", "terminals")  # required; "timeouts", "next_observations" optional


def load_d4rl_hdf5(path: str | Path, env: str | None = None, max_ep_len: int = 1000) -> OfflineDataset:
    """Read a D4RL gym-mujoco hdf5 (``observations, actions, rewards, terminals, timeouts``) with h5py.

    Episodes end at a terminal or a timeout (as the official DT conversion script); an unfinished tail is
    dropped. A file without ``timeouts`` is cut at the env's step limit as that script does (`max_ep_len`
    steps; after the first cut it counts from 1, so later time-limited episodes have max_ep_len - 1 steps).
    Keys, array shapes and lengths are checked and NaN/inf refused, the file and field named (ValueError).
    ``env`` (hopper, ...) picks the D4RL refs; by default it is read from the file name.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"D4RL file {path} not found. d4rl cannot run here; download e.g. "
            "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium-v2.hdf5 "
            "elsewhere and pass its path"
        )
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in D4RL_KEYS if k not in f]
            if missing:
                raise ValueError(f"{path} is not a D4RL gym-mujoco file: missing keys {missing}")
            arrays = {k: f[k][:] for k in (*D4RL_KEYS, "timeouts", "next_observations") if k in f}
            attrs = dict(f.attrs)
    except OSError as err:
        raise ValueError(f"{path} is not a readable hdf5 file ({err})") from None
    arrays = _checked_d4rl_arrays(arrays, path)
    obs, act, rew, term = (arrays[k] for k in D4RL_KEYS)
    nxt = arrays.get("next_observations")
    if "timeouts" in arrays:
        tout = arrays["timeouts"]
    else:  # official gym/data/download_d4rl_datasets.py: final_timestep = (episode_step == max_ep_len - 1)
        tout, episode_step = np.zeros_like(term), 0
        for i in range(len(term)):
            tout[i] = episode_step == max_ep_len - 1
            if term[i] or tout[i]:
                episode_step = 0
            episode_step += 1
    ends = np.flatnonzero(term | tout)
    if len(ends) == 0:
        raise ValueError(f"{path}: no complete episode (no terminal or timeout in {len(term)} steps)")
    trajs, start = [], 0
    for end in ends:
        sl = slice(start, end + 1)
        trajs.append(_make_traj(obs[sl], act[sl], rew[sl], term[sl], tout[sl], None if nxt is None else nxt[end]))
        start = end + 1
    if "namm_source" in attrs:  # written by export_d4rl_layout: keep the original name, source and refs
        src = str(attrs["namm_source"])
        refs = None
        if "ref_min_score" in attrs:
            refs = RefScores(float(attrs["ref_min_score"]), float(attrs["ref_max_score"]), src)
        return OfflineDataset(trajs, str(attrs["namm_dataset_id"]), src, refs,
                              bool(attrs.get("namm_discrete_actions", False)))
    if env is None:
        env = next((e for e in ENVS if path.name.lower().startswith(e)), None)
    return OfflineDataset(trajs, path.name, "d4rl", D4RL_REF.get(env) if env else None)


def _checked_d4rl_arrays(arrays: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """Shapes (observations/actions/next_observations 2-D, the rest one value per step), equal lengths, finite
    numbers; flags as bool."""
    n = arrays["rewards"].shape[0] if arrays["rewards"].ndim else 0
    out = {}
    for k, a in arrays.items():
        two_d = k in ("observations", "actions", "next_observations")
        shape_ok = a.ndim == 2 if two_d else a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1)
        if not shape_ok or a.shape[0] != n:
            raise ValueError(f"{path}: field {k!r} has shape {a.shape}; expected ({n}{', dim' if two_d else ''}) "
                             f"like 'rewards' (one row per step)")
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{path}: field {k!r} holds {a.dtype}, not numbers")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = np.flatnonzero(~np.isfinite(a.reshape(n, -1)).all(1))
            raise ValueError(f"{path}: field {k!r} has NaN/inf at {len(bad)} step(s), first at step {bad[0]}")
        out[k] = a if two_d else a.reshape(-1).astype(bool) if k in ("terminals", "timeouts") else a.reshape(-1)
    if "next_observations" in out and out["next_observations"].shape != out["observations"].shape:
        raise ValueError(f"{path}: next_observations {out['next_observations'].shape} vs observations "
                         f"{out['observations'].shape}")
    return out


def check_dataset(data: OfflineDataset, obs_dim: int | None = None, act_dim: int | None = None) -> None:
    """ValueError naming the dataset, field and episode when a trajectory holds NaN/inf, or the sizes are not the
    env's (`obs_dim`, `act_dim`; None = not checked)."""
    if not data.trajectories:
        raise ValueError(f"dataset {data.name} has no trajectories")
    for i, t in enumerate(data.trajectories):
        for field_name in ("observations", "actions", "rewards"):
            if not np.isfinite(getattr(t, field_name)).all():
                raise ValueError(f"dataset {data.name}: field {field_name!r} of episode {i} holds NaN or inf")
    for what, have, want in (("observation", data.obs_dim, obs_dim), ("action", data.act_dim, act_dim)):
        if want is not None and have != want:
            raise ValueError(f"dataset {data.name} has {what} dimension {have}, but the env has {want}: data of "
                             "another task?")


def dataset_hash(data: OfflineDataset) -> str:
    """sha256 of every trajectory's arrays (what training reads), with the dataset's name and source."""
    import hashlib

    h = hashlib.sha256(f"{data.name}\0{data.source}\0".encode())
    for t in data.trajectories:
        for a in (t.observations, t.actions, t.rewards, t.terminals, t.timeouts):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def export_d4rl_layout(data: OfflineDataset, path: str | Path, compression: str | None = "gzip") -> Path:
    """Write a dataset as one D4RL-layout hdf5 (float32 arrays; a compact way to move a Minari dataset).

    The file keeps the dataset's name, source and refs as attributes, so :func:`load_d4rl_hdf5` returns
    it under its own scale (``local`` stays ``local``), not as D4RL data.
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cat = lambda f: np.concatenate([getattr(t, f) for t in data.trajectories])  # noqa: E731
    term, tout = cat("terminals"), cat("timeouts")
    ends = np.cumsum([len(t) for t in data.trajectories]) - 1
    tout[ends] |= ~term[ends]  # every episode must end in a terminal or a timeout to split it again
    opts = dict(compression=compression, shuffle=compression is not None)
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=cat("observations"), **opts)
        f.create_dataset("actions", data=cat("actions"), **opts)
        f.create_dataset("rewards", data=cat("rewards"), **opts)
        f.create_dataset("terminals", data=term, **opts)
        f.create_dataset("timeouts", data=tout, **opts)
        f.attrs["namm_source"], f.attrs["namm_dataset_id"] = data.source, data.name
        f.attrs["namm_discrete_actions"] = data.discrete_actions
        if data.refs is not None:
            f.attrs["ref_min_score"], f.attrs["ref_max_score"] = data.refs.min, data.refs.max
    return path


# ---------------------------------------------------------------------------------------------- sampler
@dataclass
class SamplerConfig:
    context: int = 20  # K timesteps per sample
    scale: float = 1000.0  # returns-to-go are divided by this
    max_ep_len: int = 1000  # timesteps are clipped to max_ep_len - 1
    action_pad: float = -10.0  # padding value of actions (official DT code)
    from_start: bool = False  # windows start at the episode's first step (K >= episode length: whole episodes)


class DTBatchSampler:
    """Random K-step windows for DT training, as the official gym code samples them.

    Trajectories are drawn with probability proportional to their length, the window start uniformly (at step 0
    with ``from_start``, so every step sees its whole history when K covers the episode); windows that run past
    the end are left-padded (states 0 after normalisation, actions -10, rewards and
    returns-to-go 0, attention_mask 0).
    """

    def __init__(self, data: OfflineDataset, cfg: SamplerConfig = SamplerConfig(),
                 state_mean: np.ndarray | None = None, state_std: np.ndarray | None = None, seed: int = 0):
        if not data.trajectories:
            raise ValueError(f"dataset {data.name} has no trajectories")
        self.cfg, self.data = cfg, data
        mean, std = data.state_stats()
        self.state_mean = mean if state_mean is None else np.asarray(state_mean, dtype=np.float32)
        self.state_std = std if state_std is None else np.asarray(state_std, dtype=np.float32)
        trajs = data.trajectories
        lengths = np.array([len(t) for t in trajs])
        self.lengths, self.offsets = lengths, np.concatenate([[0], np.cumsum(lengths)[:-1]])
        # flat arrays over all steps; a window is a gather with per-sample offsets
        self.states = (np.concatenate([t.observations for t in trajs]) - self.state_mean) / self.state_std
        self.actions = np.concatenate([t.actions for t in trajs])
        self.rewards = np.concatenate([t.rewards for t in trajs])
        self.rtg = np.concatenate([np.cumsum(t.rewards[::-1])[::-1] for t in trajs]).astype(np.float32) / cfg.scale
        self.steps = np.concatenate([np.arange(n) for n in lengths])
        self.p = lengths / lengths.sum()
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        K = self.cfg.context
        i = self.rng.choice(len(self.lengths), size=batch_size, p=self.p)
        si = (self.rng.random(batch_size) * self.lengths[i]).astype(np.int64)  # uniform start in [0, len)
        if self.cfg.from_start:
            si[:] = 0
        n = np.minimum(K, self.lengths[i] - si)  # real steps in the window; the rest is left padding
        j = np.arange(K)[None] - (K - n)[:, None]  # position inside the real part, < 0 on padding
        mask = j >= 0
        idx = self.offsets[i, None] + si[:, None] + np.maximum(j, 0)
        out = dict(
            states=np.where(mask[..., None], self.states[idx], 0.0).astype(np.float32),
            actions=np.where(mask[..., None], self.actions[idx], self.cfg.action_pad).astype(np.float32),
            rewards=np.where(mask, self.rewards[idx], 0.0).astype(np.float32)[..., None],
            returns_to_go=np.where(mask, self.rtg[idx], 0.0).astype(np.float32)[..., None],
            timesteps=np.where(mask, np.minimum(self.steps[idx], self.cfg.max_ep_len - 1), 0).astype(np.int64),
            attention_mask=mask.astype(np.int64),
        )
        return {k: torch.from_numpy(v) for k, v in out.items()}
