"""Train a Decision Transformer (transformers ``DecisionTransformerModel``) on an offline dataset.

    python scripts/train_dt.py --env hopper-medium                      # local Minari data (make_dataset.py)
    python scripts/train_dt.py --env hopper-medium --d4rl-file hopper-medium-v2.hdf5
    python scripts/train_dt.py --env hopper-medium --dataset-id mujoco/hopper/medium-v0
    python scripts/train_dt.py --env minigrid-memory                    # discrete actions, whole-episode context

Paper settings (Chen et al. 2021, gym/experiment.py): K=20, hidden 128, 3 layers, 1 head, n_inner 512, relu,
dropout 0.1, AdamW lr 1e-4 / wd 1e-4, linear warmup 10k steps, batch 64, grad-norm clip 0.25, MSE on actions.
A checkpoint (model, optimiser, scheduler, RNG, loss history) is written to ``--out`` (default
<checkout>/runs/train_dt/<env>) every ``--ckpt-every`` steps; rerunning the same command resumes from it (loaded as
data only). ``--out``/run.json records the settings with a content hash of the data: a rerun with other settings is
refused and a lock stops two runs in one folder (``--steps`` may grow: training continues). Data are checked
first: keys, lengths, NaN/inf, dimensions vs the env (D4RL files without timeouts are cut at the env's step
limit, as the official conversion script does). The final model is written with ``save_pretrained`` to
``--out/final`` (and ``--export`` if given); its config.json also holds state_mean/state_std, return_scale,
context_length and the dataset it was trained on, so :func:`envs.rollout.load_dt` needs nothing else.

Tasks can set their own defaults (``dt_train`` in envs/registry.py; flags given still win). Tasks with discrete
actions (minigrid-memory) train the same model with one-hot action tokens, no tanh and cross-entropy on the action
logits; when K covers the longest episode of the data, every window starts at the episode's first step (whole
episodes, each step seeing its full history as in the rollouts).
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

from namm_transfer.cli import UsageError, check_device, default_out, float_in, int_in, out_help  # noqa: E402


@dataclass
class Config:
    env: str = "hopper-medium"
    dataset_id: str = ""  # Minari id; default: the task's local id (namm_transfer/...)
    d4rl_file: str = ""  # or a D4RL hdf5 file
    data_dir: str = ""  # sets MINARI_DATASETS_PATH
    steps: int = 100_000
    batch_size: int = 64
    context: int = 20
    hidden: int = 128
    layers: int = 3
    heads: int = 1
    dropout: float = 0.1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup: int = 10_000
    grad_clip: float = 0.25
    ckpt_every: int = 2_000
    eval_every: int = 0  # 0: only at the end
    eval_episodes: int = 10
    seed: int = 0
    device: str = "cpu"  # "cuda" trains on a GPU; evaluation always runs on the CPU
    time_limit: float = 0.0  # seconds; >0: checkpoint and stop early once exceeded (rerun to resume)
    out: str = ""
    export: str = ""


# valid values of the flags (argparse types that name the range); the rest take any value of their type
RULES = {"steps": int_in(1), "batch_size": int_in(1), "context": int_in(1), "hidden": int_in(1), "layers": int_in(1),
         "heads": int_in(1), "dropout": float_in(0, 1, hi_open=True), "lr": float_in(0, lo_open=True),
         "weight_decay": float_in(0), "warmup": int_in(1), "grad_clip": float_in(0, lo_open=True),
         "ckpt_every": int_in(1), "eval_every": int_in(0), "eval_episodes": int_in(0), "seed": int_in(0),
         "time_limit": float_in(0)}
RUN_ONLY = ("steps", "ckpt_every", "eval_every", "eval_episodes", "time_limit", "out", "export", "data_dir")
CHECKPOINT = "a train_dt ckpt.pt (model, opt, sched, step, losses, evals, RNG states, config)"


def load_data(cfg: Config, spec):
    """The dataset, checked (finite, dimensions vs the env); every problem is a UsageError naming the file."""
    import gymnasium as gym

    from envs.data import check_dataset, load_d4rl_hdf5, load_minari

    try:
        if cfg.d4rl_file:
            data = load_d4rl_hdf5(cfg.d4rl_file, env=spec.env, max_ep_len=spec.max_ep_len)
        else:
            data = load_minari(cfg.dataset_id or spec.local_dataset_id)
        env = gym.make(spec.gym_id)
        space = env.action_space
        act_dim = space.n if isinstance(space, gym.spaces.Discrete) else int(np.prod(space.shape))
        obs_dim = int(np.prod(env.observation_space.shape)) if env.observation_space.shape else None
        env.close()
        check_dataset(data, obs_dim, act_dim)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    if data.discrete_actions != spec.discrete_actions:
        kind = lambda d: "discrete" if d else "continuous"  # noqa: E731
        raise UsageError(f"{data.name} has {kind(data.discrete_actions)} actions, task {spec.name} expects "
                         f"{kind(spec.discrete_actions)} ones")
    return data


def parse_config(argv: list[str] | None) -> Config:
    """Flags over the task's defaults (registry ``dt_train``) over :class:`Config`'s; values checked."""
    from envs.registry import TASKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in asdict(Config()).items():
        help_ = out_help("train_dt", "<env>") if k == "out" else None
        p.add_argument("--" + k.replace("_", "-"), type=RULES.get(k, type(v)), default=v, help=help_,
                       **({"choices": ["cpu", "cuda"]} if k == "device" else {}))
    task = TASKS.get(p.parse_known_args(argv)[0].env.strip().lower())
    if task is not None:
        p.set_defaults(**dict(task.dt_train))
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.d4rl_file and cfg.dataset_id:
        p.error("pass either --dataset-id or --d4rl-file, not both")
    if cfg.hidden % cfg.heads:
        p.error(f"--hidden {cfg.hidden} must be a multiple of --heads {cfg.heads}")
    return cfg


def build_model(cfg: Config, obs_dim: int, act_dim: int, extra: dict, max_ep_len: int = 1000,
                discrete: bool = False):
    """The transformers DT; discrete actions: one-hot action tokens in, logits out (no tanh)."""
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    mcfg = DecisionTransformerConfig(
        state_dim=obs_dim, act_dim=act_dim, hidden_size=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads,
        n_inner=4 * cfg.hidden, activation_function="relu", resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout, max_ep_len=max_ep_len, n_positions=1024, action_tanh=not discrete,
        bos_token_id=None, eos_token_id=None, action_type="discrete" if discrete else "continuous", **extra,
    )
    return DecisionTransformerModel(mcfg)


def action_loss(pred, actions, mask, discrete: bool):
    """Mean over the real (mask > 0) steps: cross-entropy of the logits vs one-hot actions, or the action MSE."""
    import torch.nn.functional as F

    m = mask.reshape(-1) > 0
    pred, actions = pred.reshape(-1, pred.shape[-1])[m], actions.reshape(-1, actions.shape[-1])[m]
    return F.cross_entropy(pred, actions.argmax(-1)) if discrete else F.mse_loss(pred, actions)


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(losses)
    w = max(1, min(200, len(y) // 20))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(y, alpha=0.3, lw=0.5, label="loss")
    if len(y) >= w:
        ax.plot(np.arange(w - 1, len(y)), np.convolve(y, np.ones(w) / w, "valid"), label=f"mean of {w}")
    ax.set(xlabel="step", ylabel="action loss (MSE or cross-entropy)", yscale="log", title=path.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Train (or resume); returns what final_eval.json holds. Bad input: a message and exit code 2."""
    cfg = parse_config(argv)
    try:
        return train(cfg, argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def train(cfg: Config, argv: list[str] | None = None) -> dict:
    from envs.data import dataset_hash
    from envs.registry import get_spec
    from namm_transfer.checkpoints import load_torch_file
    from namm_transfer.records import write_json
    from namm_transfer.runs import RUN_FILE, open_run

    if cfg.data_dir:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(cfg.data_dir).resolve())
    try:
        spec = get_spec(cfg.env)
    except ValueError as err:
        raise UsageError(str(err)) from None
    check_device(cfg.device)
    out = Path(cfg.out or default_out("train_dt", spec.name))
    data = load_data(cfg, spec)
    ckpt = out / "ckpt.pt"
    try:
        state = load_torch_file(ckpt, CHECKPOINT) if ckpt.exists() else None
    except ValueError as err:
        raise UsageError(str(err)) from None
    if state is not None and not (out / RUN_FILE).is_file():  # a folder from before run.json: its checkpoint's
        write_json(out / RUN_FILE, {k: v for k, v in state.get("config", {}).items() if k not in RUN_ONLY})
    settings = {**{k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY}, "data_hash": dataset_hash(data)}
    with open_run(out, settings, "scripts/train_dt.py", argv):
        return fit(cfg, spec, data, out, state)


def fit(cfg: Config, spec, data, out: Path, state: dict | None) -> dict:
    """The training loop from `state` (a loaded ckpt.pt, or None), the final save and evaluation."""
    import torch
    from tqdm import tqdm

    from envs.data import DTBatchSampler, SamplerConfig
    from envs.rollout import DTPolicy, evaluate
    from namm_transfer.records import write_json

    torch.set_num_threads(1)
    mean, std = data.state_stats()
    if not spec.normalize_states:  # one-hot observations: no statistics (a feature constant in the data would
        mean, std = np.zeros_like(mean), np.ones_like(std)  # get std 1e-6 and explode when it changes at test time)
    discrete = spec.discrete_actions
    whole = cfg.context >= max(len(t) for t in data.trajectories)
    print(f"dataset {data.name} ({data.source}): {len(data.trajectories)} trajectories, {data.num_steps} steps, "
          f"return {data.returns().mean():.1f} ± {data.returns().std():.1f}", flush=True)
    extra = dict(state_mean=mean.tolist(), state_std=std.tolist(), return_scale=spec.return_scale,
                 context_length=cfg.context, env_name=spec.name, gym_id=spec.gym_id, dataset_id=data.name,
                 dataset_source=data.source, target_returns=list(spec.target_returns))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.obs_dim, data.act_dim, extra, spec.max_ep_len, discrete)
    sampler = DTBatchSampler(data, SamplerConfig(cfg.context, spec.return_scale, spec.max_ep_len, from_start=whole),
                             mean, std, seed=cfg.seed)
    if whole:
        print(f"K={cfg.context} covers every episode: training on whole episodes", flush=True)
    model.to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / cfg.warmup, 1.0))
    step, losses, evals = 0, [], []
    ckpt = out / "ckpt.pt"
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            sampler.rng.bit_generator.state = state["np_rng"]
            torch.set_rng_state(state["torch_rng"])
            step, losses, evals = int(state["step"]), list(state["losses"]), list(state["evals"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise UsageError(f"{ckpt} is not {CHECKPOINT} for these settings ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); use another --out") from None
        print(f"resumed from {ckpt} at step {step}", flush=True)

    refs = spec.scorers()
    if data.refs is not None and data.refs.source != "d4rl":
        refs[data.refs.source] = data.refs

    def run_eval(n: int) -> dict:
        model.eval().cpu()
        pol = DTPolicy(model, mean, std, spec.return_scale, cfg.context, spec.max_ep_len, discrete_actions=discrete)
        res = {f"target_{int(t)}": evaluate(pol, spec.gym_id, t, episodes=n, refs=refs) for t in spec.target_returns}
        model.train().to(cfg.device)
        return res

    def save_ckpt() -> None:
        tmp = out / "ckpt.pt.tmp"
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), step=step,
                        losses=losses, evals=evals, np_rng=sampler.rng.bit_generator.state,
                        torch_rng=torch.get_rng_state(), config=asdict(cfg)), tmp)
        os.replace(tmp, ckpt)
        plot_losses(losses, out / "loss.png")

    model.train()
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", mininterval=30, file=sys.stdout)
    while step < cfg.steps:
        batch = {k: v.to(cfg.device) for k, v in sampler.sample(cfg.batch_size).items()}
        pred = model(**batch, return_dict=True).action_preds
        loss = action_loss(pred, batch["actions"], batch["attention_mask"], discrete)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        if not np.isfinite(losses[-1]):  # never save or export a diverged model
            raise UsageError(f"training diverged at step {step} (loss {losses[-1]}); the last checkpoint in {out} is "
                             "kept: lower --lr or raise --warmup, in a new --out")
        bar.update(1)
        if step % 500 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-500:]):.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            evals.append({"step": step, **run_eval(cfg.eval_episodes)})
            print(f"\n[eval] step {step}: " + ", ".join(
                f"{k}: return {v['return_mean']:.3g}, " + ", ".join(f"{n} {v[f'score_{n}_mean']:.1f}" for n in refs)
                for k, v in evals[-1].items() if k != "step"), flush=True)
        out_of_time = cfg.time_limit > 0 and time.time() - t0 > cfg.time_limit
        if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
            save_ckpt()
        if out_of_time:
            print(f"\ntime limit reached at step {step}; rerun the same command to resume", flush=True)
            break
    bar.close()
    print(f"trained to step {step} in {time.time() - t0:.0f}s (this session)", flush=True)

    final = out / "final"
    model.cpu().save_pretrained(final)
    if cfg.export:
        shutil.copytree(final, cfg.export, dirs_exist_ok=True)
    result = {"step": step, "dataset": data.name, "dataset_source": data.source}
    if cfg.eval_episodes > 0:
        result["eval"] = run_eval(cfg.eval_episodes)
        for k, v in result["eval"].items():
            scores = ", ".join(f"{n} score {v[f'score_{n}_mean']:.1f} ± {v[f'score_{n}_std']:.1f}" for n in refs)
            print(f"[final eval] {k}: return {v['return_mean']:.3g} ± {v['return_std']:.3g}, {scores}", flush=True)
    write_json(out / "final_eval.json", result)
    return result


if __name__ == "__main__":
    main()
