"""The nine D4RL-style datasets and a Decision Transformer for each, resumably, one command:

    nohup nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python scripts/make_grid.py >> runs/grid/grid.log 2>&1 &
    python scripts/make_grid.py --dry-run              # what is done, what is left

Per env (hopper, walker2d, halfcheetah; each env finished before the next starts):
  1. ``make_dataset.py --quality expert``: trains the env's PPO run (runs/make_dataset/<env>) to the expert target
     or ``--ppo-steps``, then collects ``--steps`` steps with the final policy;
  2. ``--quality medium``: the same run's snapshot at medium, ``--steps`` steps (after 1, so that a run which never
     reaches the medium target picks medium relative to its final, expert score);
  3. ``--quality medium-replay``: that run's training episodes up to the medium snapshot;
  4. ``train_dt.py`` for each quality (runs/train_dt/<task>), its final model copied with its evaluation and a
     README of measured numbers into ``envs/checkpoints/dt-<task>`` (whole folder renamed into place at the end).
Done work is skipped: a dataset already in the Minari root, a checkpoint folder already there (the committed
dt-hopper-medium included), an env's datasets when all its DTs exist. A killed run resumes from the last PPO evaluation / DT checkpoint when the same
command is rerun; a collection or dataset write in progress is redone. Datasets go to ``--data-dir``
(data/minari, never committed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer.cli import UsageError, int_in, load_script, name_list, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENVS = ("hopper", "walker2d", "halfcheetah")
QUALITIES = ("expert", "medium", "medium-replay")  # the order they are made in


@dataclass
class Config:
    envs: tuple[str, ...] = ENVS
    qualities: tuple[str, ...] = QUALITIES
    ppo_steps: int = 2_000_000  # PPO training budget per env (make_dataset --max-train-steps)
    ppo_eval_every: int = 20_480
    ppo_eval_episodes: int = 5
    steps: int = 1_000_000  # collected steps for medium and expert (D4RL's size)
    dt_steps: int = 5_000
    dt_warmup: int = 500
    dt_batch_size: int = 64
    dt_hidden: int = 128
    dt_layers: int = 3
    dt_ckpt_every: int = 500
    dt_eval_episodes: int = 10
    data_dir: str = str(ROOT / "data" / "minari")
    checkpoints: str = str(ROOT / "envs" / "checkpoints")
    work: str = str(ROOT / "runs")
    dry_run: bool = False


def log(msg: str) -> None:
    print(f"[grid {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dataset_args(cfg: Config, env: str, quality: str) -> list[str]:
    args = ["--env", env, "--quality", quality, "--max-train-steps", str(cfg.ppo_steps),
            "--eval-every", str(cfg.ppo_eval_every), "--eval-episodes", str(cfg.ppo_eval_episodes),
            "--workdir", str(Path(cfg.work) / "make_dataset" / env), "--data-dir", cfg.data_dir]
    return args + (["--steps", str(cfg.steps)] if quality != "medium-replay" else [])


def dt_args(cfg: Config, task: str) -> list[str]:
    return ["--env", task, "--steps", str(cfg.dt_steps), "--warmup", str(cfg.dt_warmup),
            "--batch-size", str(cfg.dt_batch_size), "--hidden", str(cfg.dt_hidden), "--layers", str(cfg.dt_layers),
            "--ckpt-every", str(cfg.dt_ckpt_every), "--eval-episodes", str(cfg.dt_eval_episodes),
            "--out", str(Path(cfg.work) / "train_dt" / task), "--data-dir", cfg.data_dir]


def plan(cfg: Config) -> list[tuple[str, str, bool]]:
    """(kind, task, done) for every step in order: kind "data" or "dt"."""
    import minari

    have = set(minari.list_local_datasets())
    out = []
    for env in cfg.envs:
        dts = [(Path(cfg.checkpoints) / f"dt-{env}-{q}" / "model.safetensors").exists() for q in cfg.qualities]
        for q in cfg.qualities:  # an env whose DTs all exist needs no data (a fresh clone of a finished env)
            out.append(("data", f"{env}-{q}", f"namm_transfer/{env}/{q}-v0" in have or all(dts)))
        out += [("dt", f"{env}-{q}", done) for q, done in zip(cfg.qualities, dts)]
    return out


def dataset_summary(task: str) -> dict:
    """Measured numbers of a local dataset: episodes, steps, return mean/std and its normalised scores."""
    import numpy as np

    from envs.data import load_minari
    from envs.registry import get_spec, normalized_score

    spec = get_spec(task)
    data = load_minari(spec.local_dataset_id)
    rets = data.returns()
    return {"dataset_id": spec.local_dataset_id, "episodes": len(data.trajectories), "steps": int(data.num_steps),
            "return_mean": float(rets.mean()), "return_std": float(rets.std()),
            "score_local_mean": float(normalized_score(spec.env, rets.mean(), "local")),
            "score_d4rl_mean": float(normalized_score(spec.env, rets.mean(), "d4rl")),
            "episode_length_mean": float(np.mean([len(t) for t in data.trajectories]))}


def ppo_summary(cfg: Config, env: str) -> dict:
    """The env's PPO run: training steps and evaluation scores (runs/make_dataset/<env>/train_state.json)."""
    path = Path(cfg.work) / "make_dataset" / env / "train_state.json"
    if not path.exists():
        return {}
    state = json.loads(path.read_text())
    ev = state["evals"]
    return {"timesteps": state["timesteps"], "evaluations": len(ev), "final_return": ev[-1]["return"],
            "final_score_local": ev[-1]["score_local"], "evals": ev}


def readme(task: str, cfg: Config, data: dict, ppo: dict, result: dict, eval_name: str) -> str:
    """The checkpoint's README: how it was made, with the measured numbers."""
    env, quality = task.split("-", 1)
    lines = [f"# dt-{task}", "",
             "Decision Transformer (transformers `DecisionTransformerModel`) trained by this project on its own "
             f"{task} dataset by `scripts/make_grid.py` (issue 17). Load it with `envs.rollout.load_dt(this_dir)`.", "",
             f"- **Data:** `{data['dataset_id']}` (source `local`; not D4RL, not the official Minari data): "
             f"`python scripts/make_dataset.py --env {env} --quality {quality}` (PPO run of "
             f"runs/make_dataset/{env}, {ppo.get('timesteps', '?')} training steps, final evaluation local score "
             f"{ppo.get('final_score_local', float('nan')):.1f}). {data['episodes']} episodes, {data['steps']} steps, "
             f"mean episode return {data['return_mean']:.1f} ± {data['return_std']:.1f} (local score "
             f"{data['score_local_mean']:.1f}, D4RL-scale {data['score_d4rl_mean']:.1f}).",
             f"- **Training:** K=20, hidden {cfg.dt_hidden}, {cfg.dt_layers} layers, 1 head, dropout 0.1, AdamW lr 1e-4 "
             f"wd 1e-4, batch {cfg.dt_batch_size}, {cfg.dt_steps} steps with {cfg.dt_warmup} warmup (the paper trains "
             "100k: this is the CPU budget of make_grid.py, see envs/README.md), one CPU core: "
             f"`python scripts/train_dt.py {' '.join(dt_args(cfg, task)[:-4])}` (+ --out, --data-dir).",
             f"- **Evaluation** (recompute-last-K rollout, {cfg.dt_eval_episodes} episodes, reset seeds 0-"
             f"{cfg.dt_eval_episodes - 1}, CPU; `{eval_name}`):"]
    for key, ev in result.get("eval", {}).items():
        lines.append(f"  - {key}: return {ev['return_mean']:.1f} ± {ev['return_std']:.1f}, D4RL-scale "
                     f"{ev['score_d4rl_mean']:.1f}, local {ev['score_local_mean']:.1f}")
    lines.append("  D4RL-scale scores use D4RL's refs on a v5 env; `local` uses the dataset's refs (envs/registry.py).")
    return "\n".join(lines) + "\n"


def make_data(cfg: Config, task: str) -> None:
    env, quality = task.split("-", 1)
    code = load_script("make_dataset").main(dataset_args(cfg, env, quality))
    if code:
        raise UsageError(f"make_dataset.py failed for {task} (exit {code})")


def make_dt(cfg: Config, task: str) -> None:
    """Train (or resume) the task's DT, then move it with its evaluation and README into the checkpoints folder."""
    env = task.split("-", 1)[0]
    result = load_script("train_dt").main(dt_args(cfg, task))
    out = Path(cfg.work) / "train_dt" / task
    dest = Path(cfg.checkpoints) / f"dt-{task}"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out / "final", tmp)
    eval_name = f"eval_recompute_{cfg.dt_eval_episodes}ep.json"
    (tmp / eval_name).write_text(json.dumps(result.get("eval", {}), indent=1) + "\n")
    (tmp / "README.md").write_text(readme(task, cfg, dataset_summary(task), ppo_summary(cfg, env), result, eval_name))
    os.replace(tmp, dest)


def run(cfg: Config) -> int:
    os.environ["MINARI_DATASETS_PATH"] = str(Path(cfg.data_dir).resolve())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    steps = plan(cfg)
    for kind, task, done in steps:
        log(f"{kind:4s} {task:26s} {'done' if done else 'to do'}")
    if cfg.dry_run:
        return 0
    for kind, task, done in plan(cfg):  # re-read: another process may have finished some meanwhile
        if done:
            continue
        t0 = time.time()
        log(f"start {kind} {task}")
        (make_data if kind == "data" else make_dt)(cfg, task)
        log(f"done  {kind} {task} in {time.time() - t0:.0f}s")
    log("grid complete" if all(d for *_, d in plan(cfg)) else "grid incomplete")
    return 0


def main(argv: list[str] | None = None) -> int:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--envs", type=name_list(ENVS), default=",".join(d.envs))
    p.add_argument("--qualities", type=name_list(QUALITIES), default=",".join(d.qualities),
                   help="made in the order expert, medium, medium-replay whatever the order given")
    for k, v in asdict(d).items():
        if k in ("envs", "qualities"):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            p.add_argument(flag, action="store_true")
        elif isinstance(v, int):
            p.add_argument(flag, type=int_in(0 if k == "dt_eval_episodes" else 1), default=v)
        else:
            p.add_argument(flag, default=v)
    a = vars(p.parse_args(argv))
    a["envs"] = tuple(e for e in ENVS if e in a["envs"])
    a["qualities"] = tuple(q for q in QUALITIES if q in a["qualities"])
    return run_cli(lambda: run(Config(**a)))


if __name__ == "__main__":
    sys.exit(main())
