"""Generate a D4RL-style offline dataset on a gymnasium v5 MuJoCo env and save it in Minari format.

    python scripts/make_dataset.py --env hopper --quality medium
    python scripts/make_dataset.py --env minigrid --quality memory     # scripted MiniGrid Memory data (seconds)

1. Train a stable-baselines3 policy (PPO by default) and stop once the collection policy's mean return
   reaches the quality's target on the project's "local" scale (medium: 45, i.e. roughly a third to a half
   of expert, as D4RL's early-stopped "medium" SAC; expert: 90, or ``--max-train-steps``). One training run per
   env serves medium, medium-replay and expert (D4RL's recipe: one policy, early-stopped for medium, its replay
   buffer up to then for medium-replay, fully trained for expert): the default ``--workdir`` is
   runs/make_dataset/<env>, every evaluation saves a policy snapshot and the episodes trained on since the last
   one, and rerunning resumes where a killed run stopped (or trains further for a higher target).
2. Roll the stochastic policy out for ``--steps`` environment steps (complete episodes only, reset seeds 123,
   124, ... as Minari does): the final policy for ``expert``; for ``medium`` the snapshot of the first evaluation
   at the medium target (capped at half the mean score of the env's expert dataset when that exists, see
   :func:`medium_target`; when the run never got there: the first at half its final score, :func:`medium_eval`). ``medium-replay`` keeps every training episode up to that evaluation (the policy's
   "replay buffer"); ``medium-expert`` concatenates the existing local medium and expert datasets.
3. Save under the project's own id (``namm_transfer/hopper/medium-v0``, never the official
   ``mujoco/...`` id) with ``ref_min_score``/``ref_max_score`` from :data:`envs.registry.LOCAL_REF`.

MiniGrid Memory (``--env minigrid --quality memory``, task ``minigrid-memory``) needs no policy training: the
scripted agent of ``envs/minigrid_memory.py`` walks to see the cue, then to the junction, and steps to the matching
object with probability ``--p-correct`` (default 0.7), else to the other one; default 60,000 steps (~3,500
episodes). No reference returns are written: the task is scored by success rate. Why not 0.5: the choice (turn
towards the upper or the lower object) is then the parity of three bits (cue, layout, success), which no pair of
them predicts; a DT trained on it stayed at chance for 2,000 steps. At 0.7 the cue and the layout already predict
the choice and the return sharpens it.

Choices:
* PPO, not SAC: on one CPU core SB3 PPO runs ~600-800 steps/s against SAC's ~40, so a medium Hopper
  policy takes minutes, not hours. ``--algo sac`` is available for envs where PPO stalls.
* Episodes are written with ``EpisodeBuffer`` + ``minari.create_dataset_from_buffers`` rather than
  ``minari.DataCollector``: the collector needs jax (+520 MB) only for a tree_map, and stepping with plain
  numpy buffers is also ~2x faster.
* Default size 1M steps, as D4RL and Minari: collection with the small PPO MLP runs at ~3k steps/s on one
  core, so 1M steps costs ~6 min and keeps dataset statistics comparable. Smaller sets (``--steps 200000``)
  are enough for a K=20 DT and useful for quick experiments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer.cli import UsageError, default_out, float_in, int_in, out_help, run_cli  # noqa: E402
from namm_transfer.records import read_json, write_json  # noqa: E402
from namm_transfer.runs import open_run  # noqa: E402

# Stop thresholds on the local 0-100 scale for the policy that collects the data.
TARGET_SCORE = {"medium": 45.0, "medium-replay": 45.0, "expert": 90.0}
# Medium is at most this fraction of expert (45 / 90, as the targets above): with the env's local expert dataset made,
# the medium target is capped at this fraction of that dataset's mean score; a run that never reached the medium
# target takes its first evaluation at this fraction of its final score.
MEDIUM_FALLBACK = 0.5


@dataclass
class Config:
    env: str = "hopper"
    quality: str = "medium"
    algo: str = "ppo"
    steps: int | None = None  # default: 1,000,000 (MuJoCo), 60,000 (minigrid)
    p_correct: float = 0.7  # minigrid: share of scripted episodes that pick the matching object
    max_train_steps: int = 3_000_000
    target_score: float | None = None
    eval_every: int = 20_480
    eval_episodes: int = 5
    seed: int = 0
    workdir: str = ""
    data_dir: str = ""
    force: bool = False


class EpisodeRecorder:
    """Gymnasium wrapper that keeps every finished episode (for ``medium-replay``)."""

    def __new__(cls, env):  # built lazily so importing this module does not need gymnasium
        import gymnasium as gym

        class _Recorder(gym.Wrapper):
            def __init__(self, env):
                super().__init__(env)
                self.finished: list[dict] = []
                self._cur: dict | None = None

            def reset(self, **kw):
                obs, info = self.env.reset(**kw)
                self._cur = {"observations": [obs], "actions": [], "rewards": [], "terminations": [],
                             "truncations": [], "seed": kw.get("seed")}
                return obs, info

            def step(self, action):
                obs, r, term, trunc, info = self.env.step(action)
                c = self._cur
                c["observations"].append(obs)
                c["actions"].append(np.asarray(action, dtype=np.float32))
                c["rewards"].append(float(r))
                c["terminations"].append(bool(term))
                c["truncations"].append(bool(trunc))
                if term or trunc:
                    self.finished.append(c)
                    self._cur = None
                return obs, r, term, trunc, info

        return _Recorder(env)


def make_buffer(ep: dict, idx: int, obs_dtype=np.float64, act_dtype=np.float32):
    from minari.data_collector import EpisodeBuffer

    return EpisodeBuffer(
        id=idx, seed=ep.get("seed"),
        observations=np.asarray(ep["observations"], dtype=obs_dtype),
        actions=np.asarray(ep["actions"], dtype=act_dtype),
        rewards=list(map(float, ep["rewards"])),
        terminations=list(map(bool, ep["terminations"])),
        truncations=list(map(bool, ep["truncations"])),
        infos={},
    )


def evaluate(model, gym_id: str, episodes: int, seed: int) -> np.ndarray:
    """Episode returns of the stochastic (collection) policy."""
    import gymnasium as gym

    env = gym.make(gym_id)
    rets = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, ret = False, 0.0
        while not done:
            act, _ = model.predict(obs, deterministic=False)
            obs, r, term, trunc, _ = env.step(act)
            ret += r
            done = term or trunc
        rets.append(ret)
    env.close()
    return np.asarray(rets)


POLICY_FILE = "a make_dataset policy.pt (SB3 parameters, SAC's entropy coefficient)"
BUFFER_FIELDS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def save_policy(model, work: Path) -> None:
    """The training state as data only: SB3 parameters (+ SAC's entropy coefficient) with torch.save, SAC's replay
    buffer as npz (SB3's own save/load would unpickle code on resume)."""
    import torch

    state = {"params": model.get_parameters()}
    if getattr(model, "log_ent_coef", None) is not None:
        state["log_ent_coef"] = model.log_ent_coef.detach().cpu()
    torch.save(state, work / "policy.pt.tmp")
    os.replace(work / "policy.pt.tmp", work / "policy.pt")
    buf = getattr(model, "replay_buffer", None)
    if buf is not None:  # off-policy: the replay buffer is part of the training state
        arrays = {k: getattr(buf, k) for k in BUFFER_FIELDS if getattr(buf, k, None) is not None}
        np.savez(work / "replay_buffer.tmp.npz", pos=buf.pos, full=buf.full, **arrays)
        os.replace(work / "replay_buffer.tmp.npz", work / "replay_buffer.npz")


def load_policy(model, work: Path) -> None:
    """Resume `model` (built fresh) from `save_policy`'s files; ValueError naming the file when they do not fit."""
    import torch

    from namm_transfer.checkpoints import load_torch_file

    state = load_torch_file(work / "policy.pt", POLICY_FILE)
    try:
        model.set_parameters(state["params"], exact_match=True, device="cpu")
        if "log_ent_coef" in state:
            with torch.no_grad():
                model.log_ent_coef.copy_(state["log_ent_coef"])
        if (work / "replay_buffer.npz").exists():
            with np.load(work / "replay_buffer.npz", allow_pickle=False) as saved:
                for k in BUFFER_FIELDS:
                    if k in saved:
                        getattr(model.replay_buffer, k)[...] = saved[k]
                model.replay_buffer.pos, model.replay_buffer.full = int(saved["pos"]), bool(saved["full"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise ValueError(f"{work}: the saved policy does not fit --algo {type(model).__name__.lower()} "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def save_episodes(episodes: list[dict], path: Path) -> None:
    """Episodes (dicts of per-step lists) as one npz: no pickle."""
    arrays = {f"{i}/{k}": np.asarray(v) for i, ep in enumerate(episodes) for k, v in ep.items() if k != "seed"}
    np.savez(path, **arrays, seeds=np.array([-1 if ep.get("seed") is None else ep["seed"] for ep in episodes]))


def load_episodes(path: Path) -> list[dict]:
    with np.load(path, allow_pickle=False) as f:
        eps = [{"seed": None if s < 0 else int(s)} for s in f["seeds"]]
        for key in f.files:
            if key != "seeds":
                i, name = key.split("/", 1)
                eps[int(i)][name] = f[key]
    return eps


def medium_eval(evals: list[dict], target: float) -> int:
    """Index of the evaluation whose snapshot is "medium": the first at ``target`` or above; when none got there
    (an env the policy trains slowly on), the first at ``MEDIUM_FALLBACK`` x the final score or above."""
    scores = [e["score_local"] for e in evals]
    if not scores:
        raise ValueError("no evaluation recorded yet")
    hit = [i for i, s in enumerate(scores) if s >= target]
    if hit:
        return hit[0]
    floor = min(MEDIUM_FALLBACK * scores[-1], scores[-1])  # a final score <= 0: the last evaluation at worst
    return next(i for i, s in enumerate(scores) if s >= floor)


def medium_target(spec, target: float, log) -> float:
    """The medium target, capped at ``MEDIUM_FALLBACK`` x the mean local score of the env's expert dataset when it
    exists (made from the same run: medium then stays about half of expert even where PPO's expert is far below
    D4RL's, e.g. walker2d); without it, ``target`` itself."""
    import minari

    from envs.registry import get_spec, normalized_score

    expert = get_spec(f"{spec.env}-expert").local_dataset_id
    if expert not in minari.list_local_datasets():
        return target
    from envs.data import load_minari

    score = float(normalized_score(spec.env, load_minari(expert).returns().mean(), "local"))
    capped = min(target, MEDIUM_FALLBACK * score)
    log(f"[medium] {expert}: mean local score {score:.1f}; medium target min({target}, {MEDIUM_FALLBACK} x "
        f"{score:.1f}) = {capped:.1f}")
    return capped


def snapshot_path(work: Path, i: int) -> Path:
    """The policy saved at evaluation ``i`` (0-based); replay_{i+1:04d}.npz holds the episodes trained on before."""
    return work / "snapshots" / f"policy_{i + 1:04d}.pt"


def train_policy(cfg: Config, spec, work: Path, log) -> tuple[object, dict]:
    """Train (or resume) until the target score or ``max_train_steps``; return the SB3 model and the training
    state (evaluations). Medium qualities are done once any evaluation reached their target; expert once the last
    one did."""
    import gymnasium as gym
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.logger import Logger

    from envs.registry import normalized_score

    algo_cls = {"ppo": PPO, "sac": SAC}[cfg.algo]
    target = cfg.target_score if cfg.target_score is not None else TARGET_SCORE[cfg.quality]
    state_path, model_path = work / "train_state.json", work / "policy.pt"
    state = read_json(state_path, "timesteps, evals, done") if state_path.exists() else {"timesteps": 0, "evals": [],
                                                                                          "done": False}
    medium = cfg.quality in ("medium", "medium-replay")

    def reached() -> bool:
        scores = [e["score_local"] for e in state["evals"]]
        return bool(scores) and (max(scores) if medium else scores[-1]) >= target

    if state["evals"]:  # re-decide with this run's target / budget (e.g. a larger --max-train-steps)
        state["done"] = reached() or state["timesteps"] >= cfg.max_train_steps
    env = EpisodeRecorder(gym.make(spec.gym_id))  # every training episode: medium-replay's source
    model = algo_cls("MlpPolicy", env, seed=cfg.seed, device="cpu", verbose=0)
    if model_path.exists():
        try:
            load_policy(model, work)
        except ValueError as err:  # not what this script writes (or a crafted file)
            raise UsageError(str(err)) from None
        model.num_timesteps = int(state["timesteps"])
        log(f"resumed {cfg.algo} policy at {state['timesteps']} steps")
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes a /tmp/SB3-* folder per learn()
    t0 = time.time()
    while not state["done"]:
        model.learn(cfg.eval_every, reset_num_timesteps=False, progress_bar=False)
        state["timesteps"] = int(model.num_timesteps)
        rets = evaluate(model, spec.gym_id, cfg.eval_episodes, seed=10_000 + len(state["evals"]))
        score = float(normalized_score(spec.env, rets.mean(), "local"))
        state["evals"].append({"timesteps": state["timesteps"], "return": float(rets.mean()),
                               "std": float(rets.std()), "score_local": score})
        save_episodes(env.finished, work / f"replay_{len(state['evals']):04d}.npz")
        env.finished = []
        state["done"] = reached() or state["timesteps"] >= cfg.max_train_steps
        save_policy(model, work)
        snap = snapshot_path(work, len(state["evals"]) - 1)
        snap.parent.mkdir(exist_ok=True)
        shutil.copyfile(work / "policy.pt", snap)
        write_json(state_path, state)
        log(f"[train] steps {state['timesteps']:>8d}  return {rets.mean():8.1f} ± {rets.std():6.1f}  "
            f"local score {score:5.1f} (target {target})  {time.time() - t0:6.0f}s")
    if not reached():
        log(f"WARNING: stopped at max_train_steps={cfg.max_train_steps} below the target score {target}")
    return model, state


def load_snapshot(model, work: Path, i: int, n_evals: int) -> None:
    """Load evaluation ``i``'s policy into ``model`` (the last one is the model as trained)."""
    from namm_transfer.checkpoints import load_torch_file

    if i == n_evals - 1:
        return
    path = snapshot_path(work, i)
    if not path.exists():
        raise UsageError(f"{path} is missing (a work folder from before snapshots were kept): "
                         "make this dataset with a fresh --workdir")
    model.set_parameters(load_torch_file(path, POLICY_FILE)["params"], exact_match=True, device="cpu")


def collect(model, spec, steps: int, log, seed: int = 0) -> list[dict]:
    """Complete episodes of the stochastic policy, reset seeds 123, 124, ..., until >= ``steps`` steps."""
    import gymnasium as gym
    from stable_baselines3.common.utils import set_random_seed
    from tqdm import tqdm

    set_random_seed(seed)  # the policy's action noise comes from torch's global RNG

    env = gym.make(spec.gym_id)
    episodes, total = [], 0
    bar = tqdm(total=steps, desc="collect", unit="step", mininterval=10, file=sys.stdout)
    while total < steps:
        obs, _ = env.reset(seed=123 + len(episodes))
        ep = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": [],
              "seed": 123 + len(episodes)}
        done = False
        while not done:
            act, _ = model.predict(obs, deterministic=False)
            obs, r, term, trunc, _ = env.step(act)
            ep["observations"].append(obs)
            ep["actions"].append(act)
            ep["rewards"].append(r)
            ep["terminations"].append(term)
            ep["truncations"].append(trunc)
            done = term or trunc
        episodes.append(ep)
        total += len(ep["rewards"])
        bar.update(len(ep["rewards"]))
    bar.close()
    rets = np.array([sum(e["rewards"]) for e in episodes])
    log(f"[collect] {len(episodes)} episodes, {total} steps, return {rets.mean():.1f} ± {rets.std():.1f}")
    return episodes


def load_local_episodes(dataset_id: str) -> list[dict]:
    from envs.data import load_minari

    return [
        {"observations": np.concatenate([t.observations, t.next_observation[None]]), "actions": t.actions,
         "rewards": t.rewards, "terminations": t.terminals, "truncations": t.timeouts, "seed": None}
        for t in load_minari(dataset_id).trajectories
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Config()
    p.add_argument("--env", default=d.env, choices=["hopper", "walker2d", "halfcheetah", "minigrid"])
    p.add_argument("--quality", default=d.quality,
                   choices=["medium", "medium-replay", "expert", "medium-expert", "memory"],
                   help="memory: MiniGrid Memory (with --env minigrid only)")
    p.add_argument("--algo", default=d.algo, choices=["ppo", "sac"])
    p.add_argument("--steps", type=int_in(1), default=d.steps,
                   help="environment steps to collect (complete episodes); default 1M (MuJoCo), 60k (minigrid)")
    p.add_argument("--p-correct", type=float_in(0, 1), default=d.p_correct,
                   help="minigrid: probability that the scripted agent picks the matching object")
    p.add_argument("--max-train-steps", type=int_in(1), default=d.max_train_steps)
    p.add_argument("--target-score", type=float_in(), default=None, help="stop training at this local 0-100 score")
    p.add_argument("--eval-every", type=int_in(1), default=d.eval_every,
                   help="train steps between evaluations/checkpoints")
    p.add_argument("--eval-episodes", type=int_in(1), default=d.eval_episodes)
    p.add_argument("--seed", type=int_in(0), default=d.seed)
    p.add_argument("--workdir", default="", help="policy checkpoints, shared by an env's qualities; "
                   + out_help("make_dataset", "<env>"))
    p.add_argument("--data-dir", default="", help="Minari root; sets MINARI_DATASETS_PATH (default: minari's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing local dataset")
    cfg = Config(**vars(p.parse_args(argv)))
    if (cfg.env == "minigrid") != (cfg.quality == "memory"):
        p.error("--quality memory goes with --env minigrid (and only it)")
    return run_cli(lambda: make(cfg, argv))


def make(cfg: Config, argv: list[str] | None) -> int:
    """Train or resume the collection policy in the work folder (locked, settings checked), collect, save."""
    import torch

    torch.set_num_threads(1)
    if cfg.data_dir:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(cfg.data_dir).resolve())
    import minari

    from envs.registry import get_spec

    spec = get_spec(f"{cfg.env}-{cfg.quality}")
    steps = cfg.steps if cfg.steps is not None else (60_000 if spec.env == "minigrid" else 1_000_000)
    work = Path(cfg.workdir or default_out("make_dataset", spec.name if spec.env == "minigrid" else spec.env))
    if spec.local_dataset_id in minari.list_local_datasets() and not cfg.force:
        raise UsageError(f"dataset {spec.local_dataset_id} already exists (pass --force to overwrite)")
    settings = {k: v for k, v in asdict(cfg).items() if k in ("env", "algo", "seed", "eval_every", "eval_episodes")}
    with open_run(work, settings, "scripts/make_dataset.py", argv):
        build(cfg, spec, steps, work)
    return 0


def build(cfg: Config, spec, steps: int, work: Path) -> None:
    import minari

    from envs.registry import get_spec, normalized_score

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"config: {asdict(cfg)}")
    if spec.local_dataset_id in minari.list_local_datasets():
        minari.delete_dataset(spec.local_dataset_id)
    from minari.storage import get_dataset_path

    partial = get_dataset_path(spec.local_dataset_id)
    if partial.is_dir():  # a write killed before its metadata: not a dataset Minari lists, but it blocks a new one
        log(f"removing {partial}: an unfinished dataset write")
        shutil.rmtree(partial)

    dtypes, env_id = {}, spec.gym_id
    if spec.env == "minigrid":
        from envs.minigrid_memory import collect as collect_scripted

        episodes = collect_scripted(steps, cfg.p_correct, cfg.seed)
        algorithm = (f"scripted agent (envs/minigrid_memory.py): sees the cue, walks to the junction, steps to the "
                     f"matching object with probability {cfg.p_correct}")
        dtypes = dict(obs_dtype=np.uint8, act_dtype=np.int64)
        env_id = spec.gym_id.split(":", 1)[1]  # Minari takes a registered id (registered by the import above)
    elif cfg.quality == "medium-expert":
        episodes = []
        for q in ("medium", "expert"):
            episodes += load_local_episodes(get_spec(f"{cfg.env}-{q}").local_dataset_id)
        algorithm = "concatenation of the local medium and expert datasets"
    else:
        model, state = train_policy(cfg, spec, work, log)
        evals = state["evals"]
        i = len(evals) - 1
        if cfg.quality in ("medium", "medium-replay"):
            target = cfg.target_score if cfg.target_score is not None else TARGET_SCORE[cfg.quality]
            target = medium_target(spec, target, log)
            i = medium_eval(evals, target)
            log(f"[medium] evaluation {i + 1} of {len(evals)}: {evals[i]['timesteps']} steps, local score "
                f"{evals[i]['score_local']:.1f} (target {target}; final {evals[-1]['score_local']:.1f})")
        if cfg.quality == "medium-replay":
            files = [work / f"replay_{k + 1:04d}.npz" for k in range(i + 1)]
            episodes = [ep for f in files for ep in load_episodes(f)]
        else:
            load_snapshot(model, work, i, len(evals))
            episodes = collect(model, spec, steps, log, cfg.seed)
        algorithm = f"stable-baselines3 {cfg.algo.upper()} (stochastic actions)"

    rets = np.array([float(np.sum(e["rewards"])) for e in episodes])
    if spec.metric == "success":
        refs, scale = {}, "success rate is the score: no reference returns"
        summary = f"success {100 * np.mean(rets > 0):.1f}%"
    else:
        local = spec.refs("local")
        refs, scale = dict(ref_min_score=local.min, ref_max_score=local.max), "ref scores on the project's 'local' scale"
        summary = (f"local score {float(normalized_score(spec.env, rets.mean(), 'local')):.1f}, "
                   f"d4rl-scale {float(normalized_score(spec.env, rets.mean(), 'd4rl')):.1f}")
    t0 = time.time()
    minari.create_dataset_from_buffers(
        dataset_id=spec.local_dataset_id,
        buffer=[make_buffer(ep, i, **dtypes) for i, ep in enumerate(episodes)],
        env=env_id,
        eval_env=env_id,
        algorithm_name=algorithm,
        author="namm_transfer",
        author_email="namm_transfer@localhost",
        code_permalink="scripts/make_dataset.py",
        description=(f"{spec.name} generated locally on {spec.gym_id} by scripts/make_dataset.py "
                     f"(not the official Minari/D4RL data); {scale}."),
        **refs,
    )
    log(f"[save] {spec.local_dataset_id}: {len(episodes)} episodes, {sum(len(e['rewards']) for e in episodes)} steps, "
        f"mean return {rets.mean():.3g} ({summary}), written in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
