"""Decision Transformer with a KV-cache memory: full cache vs NAMM (zero-shot) vs eviction baselines.

    python scripts/run_dt.py                                    # hopper-medium, embedded DT, full vs namm, 3 episodes
    python scripts/run_dt.py --policies full,window,namm,h2o,l2 --episodes 5
    python scripts/run_dt.py --env walker2d-expert --checkpoint edbeeching/decision-transformer-gym-walker2d-expert
                                     # a public DT: Hub id (from the local Hub cache) or its downloaded folder
    python scripts/run_dt.py --policies full,namm,h2o --episodes 16 --batch 8   # 8 episodes per batched forward
    python scripts/run_dt.py --env minigrid-memory --policies full,namm,h2o,l2,recency,snapkv --episodes 200
    python scripts/run_dt.py --env minigrid-memory --policies full,window --window 4 --rollout kv   # memory check
    torchrun --nproc-per-node 8 scripts/run_dt.py --env minigrid-memory --episodes 300 --device cuda   # 8 GPUs

Two rollouts, named in every output:
  recompute-last-K  the standard DT rollout: the model re-run on the last K timesteps at every step (no policy);
  kv-cache          each timestep's tokens (a_{t-1}, R_t, s_t) fed once into a MemoryCache managed by a policy:
                    full    unbounded history (every token of the episode stays; longer than the DT's training K),
                    window  the recompute rollout's K-timestep window as a KV cache (keeps 3K-4 tokens;
                            --window N: the last N timesteps instead),
                    namm    the language-trained NAMM, zero-shot (--namm PATH; default: the shipped
                            namm_transfer/checkpoints/namm-smollm2),
                    h2o, l2, recency, snapkv, random   baselines.
Policies evict every --delay tokens (default: the task's, envs/registry.py dt_delay: 48 = 16 timesteps x 3 tokens for
MuJoCo, a multiple of NAMM's STFT hop of 16; 16 for minigrid-memory, whose choice comes ~15 steps in).
Baselines run at NAMM's realised cache fraction (its mean fraction right after eviction steps over this run's
NAMM episodes) when namm is in --policies, else at --budget (default 0.5); an explicit --budget always wins.

Default: 3 episodes per (rollout, policy) to stay fast on a CPU; use --episodes 10+ for real numbers.
Episode e of seed s resets the env with seed 1000*s + e. Scores: D4RL-normalised x100 with the D4RL refs (the
env is Hopper-v5, D4RL's data came from v3), plus the checkpoint's own dataset scale when it is `local`; success
rate % for minigrid-memory; a DT trained on official Minari data is also scored on that dataset's own refs
(`minari`, read from its local copy's metadata; the header says when that copy is absent). Every score has a 95%
interval (success: Wilson; returns: mean ± 1.96 standard errors).
The default checkpoint is the embedded envs/checkpoints/dt-<env>.
Writes --out (default <checkout>/runs/dt/<env>): episodes.jsonl (one line per episode; a rerun skips (rollout,
policy, seed, episode) already there), summary.json and table.md, and run.json: the settings, with content hashes of
the checkpoint, its state statistics and the NAMM. A rerun into the same --out with other settings is refused (the
differences listed) and a lock stops two runs writing one folder. --state-stats files are JSON, checked against the
checkpoint (length, finite, std > 0); checkpoints are loaded as data only and refused when not finite.
Public DTs (edbeeching/decision-transformer-gym-{hopper,walker2d,halfcheetah}-{medium,medium-replay,expert}; envs/hub.py):
--checkpoint takes the Hub id (read from the local Hub cache, no network) or the downloaded folder; the state
statistics of its model card are used (--state-stats JSON or the D4RL .hdf5 overrides them); a checkpoint trained on
another task than --env (its name, or env_name in its config) or with other state/action sizes is refused.
--batch N runs N kv-cache episodes in lockstep through one batched DT forward (see --help).
"""
from __future__ import annotations

import argparse
import copy
import json
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors import SafetensorError  # noqa: E402

from envs import hub  # noqa: E402
from namm_transfer.cli import (UsageError, budget, check_device, default_out, float_in, int_in,  # noqa: E402
                               load_namm_arg, name_list, number_list, out_help, run_cli)
from namm_transfer.records import read_json  # noqa: E402
from namm_transfer.runs import content_hash, json_hash, model_hash  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "envs" / "checkpoints"  # the embedded DTs: dt-<task name>
BASELINES = ("h2o", "l2", "recency", "snapkv", "random")
POLICY_NAMES = ("full", "window", "namm") + BASELINES
DEFAULT_DELAY = 48
SETTINGS = ("env", "checkpoint", "target_return", "delay", "namm", "budget", "max_steps", "device", "window",
            "checkpoint_hash", "state_stats_hash", "namm_hash")
LEGACY = {"window": None}  # what runs recorded before --window existed used


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="hopper-medium", help="task name, e.g. hopper-medium")
    ap.add_argument("--checkpoint", default=None, help="DT folder or Hub id (default: the embedded envs/checkpoints/"
                                                       "dt-<env>)")
    ap.add_argument("--state-stats", default=None, help="JSON with state_mean/state_std (checkpoints without them)")
    ap.add_argument("--policies", type=name_list(POLICY_NAMES, allow_empty=True), default="full,namm",
                    help=f"kv-cache policies: {','.join(POLICY_NAMES)}")
    ap.add_argument("--rollout", default="both", choices=["kv", "recompute", "both"])
    ap.add_argument("--episodes", type=int_in(1), default=3, help="episodes per seed (default 3: a quick look)")
    ap.add_argument("--seeds", type=number_list(int_in(0), "seeds"), default="0",
                    help="comma-separated, each once; episode e of seed s resets with 1000*s + e")
    ap.add_argument("--target-return", type=float_in(), default=None, help="default: the task's first target")
    ap.add_argument("--namm", default=None, help="NAMM checkpoint folder or official ckpt.pt")
    ap.add_argument("--budget", type=budget, default=None,
                    help="baseline budget: a fraction in (0, 1] (1 = keep all) or a whole token count >= 2")
    ap.add_argument("--delay", type=int_in(1), default=None,
                    help=f"eviction period in tokens (3 per timestep; default: the task's, {DEFAULT_DELAY} for MuJoCo)")
    ap.add_argument("--window", type=int_in(1), default=None,
                    help="policy window: the last N timesteps (default: the DT's K)")
    ap.add_argument("--max-steps", type=int_in(1), default=None, help="cap episode length (tests, smoke runs)")
    ap.add_argument("--batch", type=int_in(1), default=1,
                    help="kv-cache episodes run in lockstep through one batched DT forward (one cache row each; "
                         "finished episodes drop out). Same returns as one by one: bitwise for full, window and "
                         "token-budget baselines; NAMM to float rounding (its rows keep different counts)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int_in(1), default=1)
    ap.add_argument("--out", default=None, help=out_help("dt", "<env>"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.argv = argv  # as given (None: sys.argv[1:]); recorded in <out>/command.json
    args.policy_list = list(args.policies)
    if args.rollout != "recompute" and not args.policy_list:
        ap.error("--policies is empty")
    # NAMM before the baselines, so they can use its realised cache fraction
    args.policy_list.sort(key=lambda p: (p in BASELINES, POLICY_NAMES.index(p)))
    args.seed_list = args.seeds
    if args.delay is None:
        from envs.registry import TASKS

        task = TASKS.get(args.env.strip().lower())  # an unknown --env is reported by run()
        args.delay = task.dt_delay if task is not None else DEFAULT_DELAY
    return args


# ------------------------------------------------------------------------------------------------ setup


def load_checkpoint(args):
    from envs.rollout import load_dt
    from namm_transfer.records import in_repo

    given = args.checkpoint
    ckpt = hub.cached_snapshot(given) if given else str(CHECKPOINTS / f"dt-{args.env.strip().lower()}")
    local = Path(ckpt).exists()
    if not given and not local:
        raise UsageError(f"no embedded DT for --env {args.env} ({in_repo(ckpt)}): {how_to_make(args.env)}")
    if given and not local and (given.count("/") != 1 or given.startswith((".", "/", "~"))):  # a path, no Hub id
        raise UsageError(f"--checkpoint {given}: no such folder; pass a DT folder (save_pretrained: config.json + "
                         "model.safetensors) or a Hub id owner/name")
    check_trained_on(hub.trained_task(given or ""), given, args.env)
    stats = read_state_stats(args.state_stats) if args.state_stats else hub.card_stats(hub.trained_task(given or ""))
    try:
        dt = load_dt(ckpt, state_mean=stats.get("state_mean"), state_std=stats.get("state_std"))
    except OSError as err:
        where = "the folder" if local else "the Hugging Face Hub (is it reachable? HF_HUB_OFFLINE set?)"
        raise UsageError(f"cannot load DT checkpoint {ckpt!r} from {where}: {str(err).splitlines()[0]}\n"
                         f"Download it where the Hub is reachable (`huggingface-cli download {ckpt} --local-dir DIR`) "
                         "and pass --checkpoint DIR.") from None
    except ValueError as err:
        if "state_mean" not in str(err):
            raise UsageError(f"cannot load DT checkpoint {ckpt!r}: {str(err).splitlines()[0]}") from None
        raise UsageError(f"{err}\nPass --state-stats FILE: a JSON with state_mean and state_std, or the D4RL "
                         "dataset the DT was trained on (<env>-<quality>-v2.hdf5; mean and std + 1e-6 over its "
                         "states, as the official DT and Hugging Face's example compute them).") from None
    except pickle.UnpicklingError:
        raise UsageError(f"cannot load DT checkpoint {ckpt!r}: its pytorch_model.bin is damaged or holds Python "
                         "objects other than tensors (refused: unpickling those can run code); use a "
                         "model.safetensors checkpoint") from None
    except (KeyError, TypeError, RuntimeError, AttributeError, SafetensorError) as err:
        raise UsageError(f"cannot load DT checkpoint {ckpt!r}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from None
    check_trained_on(dt.meta.get("env_name"), given or in_repo(ckpt), args.env)
    check_dt(dt, ckpt, args.state_stats or ("the model card's statistics" if "trained_on" in stats
                                             else "the checkpoint's config (state_mean/state_std)"))
    args.checkpoint = given if given and not Path(given).exists() else in_repo(Path(ckpt).resolve()) if local else ckpt
    args.checkpoint_hash = model_hash(ckpt)
    args.state_stats_hash = json_hash([dt.state_mean.tolist(), dt.state_std.tolist()])
    dt.meta.setdefault("dataset_id", stats.get("trained_on", "unknown data"))
    if "dataset_source" in stats:
        dt.meta.setdefault("dataset_source", stats["dataset_source"])
    return dt


def how_to_make(env: str) -> str:
    """What makes the embedded DT of a task (grid tasks: data and DT in one resumable command)."""
    task = env.strip().lower()
    name, _, quality = task.partition("-")
    train = f"`python scripts/train_dt.py --env {task}` on its dataset"
    if name in ("hopper", "walker2d", "halfcheetah") and quality in ("medium", "medium-replay", "expert"):
        return (f"make its data and DT in place with `python scripts/make_grid.py --envs {name} --qualities {quality}`"
                f" (or {train}, then pass --checkpoint), or download the public one "
                f"(`huggingface-cli download {hub.hub_id(task)}`) and pass --checkpoint")
    return f"train one with {train} and pass --checkpoint"


def check_trained_on(task: str | None, checkpoint: str | None, env: str) -> None:
    """UsageError when a checkpoint was trained on another task than --env (both named): what a public checkpoint's
    name says, or the env_name in the config of one trained here."""
    if task is not None and task != env.strip().lower():
        raise UsageError(f"DT checkpoint {checkpoint} was trained on {task}, but --env is {env}: pass --env {task}, "
                         f"or a checkpoint trained on {env} (the public one: {hub.hub_id(env.strip().lower())})")


def read_state_stats(path: str) -> dict:
    """--state-stats: a JSON with state_mean and state_std, or a D4RL hdf5 dataset (its states' mean and std + 1e-6)."""
    if path.endswith((".hdf5", ".h5")):
        from envs.data import load_d4rl_hdf5

        try:
            mean, std = load_d4rl_hdf5(path).state_stats()
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"--state-stats {path}: {str(err).splitlines()[0]}") from None
        return {"state_mean": mean.tolist(), "state_std": std.tolist(), "trained_on": f"statistics of {path}"}
    stats = read_json(path, "state_mean and state_std")
    for key in ("state_mean", "state_std"):
        v = stats.get(key)
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise UsageError(f"--state-stats {path}: {key!r} must be a list of numbers")
    return stats


def check_dt(dt, ckpt: str, stats_from: str) -> None:
    """UsageError naming the file and field when the weights or state statistics are not finite, or the statistics
    do not fit the model's state size (or a std is <= 0)."""
    import numpy as np

    dim = dt.model.config.state_dim
    for name, v in (("state_mean", dt.state_mean), ("state_std", dt.state_std)):
        if v.shape != (dim,) or not np.isfinite(v).all():
            raise UsageError(f"{stats_from}: {name} must be {dim} finite numbers (the checkpoint's state_dim), got "
                             f"{v.size}{'' if np.isfinite(v).all() else ' with NaN/inf'}")
    if (dt.state_std <= 0).any():
        raise UsageError(f"{stats_from}: state_std has values <= 0")
    for name, t in dt.model.state_dict().items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise UsageError(f"DT checkpoint {ckpt}: weight {name!r} holds NaN or inf")


def load_namm_policy(args):
    from namm_transfer.records import in_repo

    namm = load_namm_arg(args.namm, args.delay)
    args.namm = in_repo(Path(namm.source).resolve())
    args.namm_hash = content_hash(namm.source)
    meta = {}
    cfg = Path(namm.source) / "config.json"
    if cfg.is_file():
        meta = json.loads(cfg.read_text()).get("meta", {})
    return namm, meta


def make_kv_policy(name: str, args, dt, namm, budget):
    from namm_transfer.adapters.decision_transformer import sliding_window
    from namm_transfer.policies import make_policy

    if name == "window":
        return sliding_window(args.window or dt.context)
    if name == "namm":
        return namm
    if name == "full":
        return make_policy("full")
    return make_policy(name, budget=budget, delay=args.delay, **({"seed": 0} if name == "random" else {}))


def baseline_budget(args, done: dict, keys: list[tuple]) -> tuple[float | int, str]:
    """(budget, where it came from) for the baselines: --budget, else NAMM's realised fraction over this run's
    NAMM episodes (`keys`), else 0.5."""
    if args.budget is not None:
        return args.budget, "--budget"
    if "namm" in args.policy_list:
        rs = [done[k] for k in keys if k in done and k[:2] == ("kv-cache", "namm")]
        fr = [r["eviction_fraction"] for r in rs if r["eviction_fraction"] is not None]
        if fr:
            return min(max(sum(fr) / len(fr), 1e-3), 1.0), "NAMM's realised cache fraction (after eviction steps)"
        if rs:
            return min(max(sum(r["realised_fraction"] for r in rs) / len(rs), 1e-3), 1.0), "NAMM's realised fraction"
    return 0.5, "default 0.5"


# ------------------------------------------------------------------------------------------------ summary


def summarise(records: list[dict]) -> list[dict]:
    import numpy as np

    from namm_transfer.reporting.intervals import interval95

    rows = []
    for key in dict.fromkeys((r["rollout"], r["policy"]) for r in records):
        rs = [r for r in records if (r["rollout"], r["policy"]) == key]
        rets = np.array([r["ret"] for r in rs])
        row = {"rollout": key[0], "policy": key[1], "episodes": len(rs), "budget": rs[0].get("budget"),
               "budget_source": rs[0].get("budget_source"), "return_mean": float(rets.mean()),
               "return_std": float(rets.std()), "length_mean": float(np.mean([r["length"] for r in rs])),
               "realised_cache_pct": 100 * float(np.mean([r["realised_fraction"] for r in rs])),
               "steps_per_s": float(np.mean([r["steps_per_s"] for r in rs])),
               "policy_ms": float(np.mean([r["policy_ms"] for r in rs])),
               "final_cache_tokens": float(np.mean([r["final_cache_tokens"] for r in rs]))}
        ev = [r["eviction_fraction"] for r in rs if r["eviction_fraction"] is not None]
        row["eviction_cache_pct"] = 100 * float(np.mean(ev)) if ev else None
        for scale in rs[0]["scores"]:
            s = np.array([r["scores"][scale] for r in rs])
            row[f"score_{scale}_mean"], row[f"score_{scale}_std"] = float(s.mean()), float(s.std())
            row[f"score_{scale}_ci95"] = list(interval95(s, 100.0 if scale == "success" else None))
        budgets = [r["budget"] for r in rs if r.get("budget") is not None]
        row["budget"] = sum(budgets) / len(budgets) if budgets else None  # per-episode budgets can differ on resume
        rows.append(row)
    return rows


def markdown(rows: list[dict], header: list[str], scales: list[str]) -> str:
    f = lambda x, fmt="{:.1f}": "-" if x is None else fmt.format(x)  # noqa: E731
    score_cols = "".join(" success % [95% CI] |" if s == "success" else
                         f" {s.upper() if s == 'd4rl' else s}-normalised ×100 |" for s in scales)
    lines = [*(f"> {h}" for h in header), "",
             f"| rollout | policy | budget | episodes | return |{score_cols} realised cache % | "
             "cache % after evictions | final cache tokens | steps/s | policy ms/step |",
             "|---|---|---|---|---|" + "---|" * len(scales) + "---|---|---|---|---|"]
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:.3g}"
        scores = "".join(f" {score_cell(r, s)} |" for s in scales)
        lines.append(f"| {r['rollout']} | {r['policy']} | {budget} | {r['episodes']} | "
                     f"{r['return_mean']:.1f} ± {r['return_std']:.1f} |{scores} {f(r['realised_cache_pct'])} | "
                     f"{f(r['eviction_cache_pct'])} | {f(r['final_cache_tokens'], '{:.0f}')} | "
                     f"{f(r['steps_per_s'], '{:.0f}')} | {f(r['policy_ms'], '{:.2f}')} |")
    lines += ["", "realised cache %: tokens stored (kv-cache; mean over layers) or attended by the state token "
              "(recompute-last-K) over tokens seen, averaged over steps. steps/s: env steps per wall-clock second, "
              "env included; policy ms/step: wall time minus env time."]
    return "\n".join(lines) + "\n"


def score_cell(row: dict, scale: str) -> str:
    """'52.0 [45.1, 58.8]' (success: rate and 95% interval) or '77.2 ± 1.0' (mean ± std over episodes)."""
    if scale == "success" and row.get("score_success_ci95"):
        lo, hi = row["score_success_ci95"]
        return f"{row['score_success_mean']:.1f} [{lo:.1f}, {hi:.1f}]"
    return f"{row[f'score_{scale}_mean']:.1f} ± {row[f'score_{scale}_std']:.1f}"


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


def run(args) -> int:
    import torch
    from transformers.utils import logging as transformers_logging

    from envs.kv_rollout import make_env
    from envs.registry import get_spec
    from namm_transfer import distributed

    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    try:
        spec = get_spec(args.env)
    except ValueError as err:
        raise UsageError(str(err)) from None
    check_device(args.device)
    world = distributed.init(args.device)  # under torchrun: this rank's share of the episodes, its own GPU
    args.namm_hash = None
    namm, namm_meta = load_namm_policy(args) if "namm" in args.policy_list and args.rollout != "recompute" \
        else (None, {})
    dt = load_checkpoint(args)
    max_steps = min(args.max_steps or dt.max_ep_len, dt.max_ep_len)
    env = make_env(spec.gym_id, max_steps)
    check_env_dims(dt, env, args.checkpoint, spec.gym_id)
    dt_recompute = dt
    if args.device != "cpu":  # envs.rollout.rollout_recompute builds its inputs on the CPU
        dt_recompute = copy.deepcopy(dt)
        dt.model.to(args.device)
    args.target_return = args.target_return if args.target_return is not None else spec.target_returns[0]
    from envs.data import dt_scorers

    refs, args.minari_note = dt_scorers(spec, dt.meta)  # the note goes into the run's header

    out = Path(args.out or default_out("dt", spec.name))
    settings = {k: getattr(args, k) for k in SETTINGS}
    with distributed.open_run(world, out, settings, "scripts/run_dt.py", args.argv, fillable=("namm", "namm_hash"),
                              legacy=LEGACY):
        return run_episodes(args, out, spec, dt, dt_recompute, namm, namm_meta, refs, env, max_steps, settings, world)


def check_env_dims(dt, env, checkpoint: str, gym_id: str) -> None:
    """UsageError when the DT's state/action sizes are not the env's (a checkpoint for another task)."""
    import numpy as np

    spaces = {"state": env.observation_space, "act": env.action_space}
    for what, space in spaces.items():
        want = int(np.prod(space.shape)) if space.shape else getattr(space, "n", None)
        have = getattr(dt.model.config, f"{what}_dim")
        if want is not None and have != want:
            raise UsageError(f"DT checkpoint {checkpoint} has {what}_dim {have}, but {gym_id} has {want}: a checkpoint "
                             "for another task? Pass --env or --checkpoint to match")


def batches(keys: list[tuple], size: int) -> list[list[tuple]]:
    """Consecutive kv-cache keys of one policy in groups of up to `size` (run as one batched rollout); every
    recompute key alone."""
    out: list[list[tuple]] = []
    for key in keys:
        last = out[-1] if out else None
        if last and key[0] != "recompute-last-K" and last[0][:2] == key[:2] and len(last) < size:
            last.append(key)
        else:
            out.append([key])
    return out


def run_episodes(args, out: Path, spec, dt, dt_recompute, namm, namm_meta, refs, env, max_steps, settings,
                 world) -> int:
    """Run the episodes episodes.jsonl does not hold yet (under torchrun: this rank's share); write summary.json
    and table.md (rank 0)."""
    from tqdm import tqdm

    from envs.kv_rollout import KV, RECOMPUTE, make_env, run_kv, run_kv_batch, run_recompute
    from namm_transfer.distributed import RankRecords
    from namm_transfer.records import write_json, write_text

    path = out / "episodes.jsonl"
    number = (int, float)
    journal = RankRecords(path, world, key=lambda r: (r["rollout"], r["policy"], r["seed"], r["episode"]),
                          fields={"seed": int, "episode": int, "ret": number, "length": int, "scores": dict,
                                  "realised_fraction": number, "steps_per_s": number, "policy_ms": number,
                                  "final_cache_tokens": number, "eviction_fraction": (*number, type(None))})
    done = journal.load()

    jobs = [(RECOMPUTE, "full")] if args.rollout in ("recompute", "both") else []
    jobs += [(KV, p) for p in args.policy_list] if args.rollout in ("kv", "both") else []
    keys = [(ro, p, s, e) for ro, p in jobs for s in args.seed_list for e in range(args.episodes)]
    todo = [k for k in keys if k not in done]
    notes = [f"checkpoint {args.checkpoint} (K={dt.context}, trained on {dt.meta['dataset_id']}); "
             f"{spec.gym_id}, target return {args.target_return:g}, eviction every {args.delay} tokens"]
    if args.device != "cpu" and args.rollout != "kv":
        notes.append("the recompute-last-K rollout runs on the CPU (envs.rollout builds its inputs there)")
    if getattr(args, "minari_note", ""):
        notes.append(args.minari_note)
    if namm is not None:
        notes.append(f"NAMM (zero-shot): {args.namm}" + (f" — {namm_meta}" if namm_meta else ""))
    quick = " (3 per policy by default: a quick look; use --episodes 10+ for reportable numbers)" \
        if args.episodes == 3 else ""
    if world.main:
        print(f"{len(keys)} episodes{quick}, {len(keys) - len(todo)} already in {path}"
              + (f"; {world.size} ranks" if world.size > 1 else ""), file=sys.stderr)
    # ranks share one process's groups (--batch), so each episode runs as it does there; the baselines run at NAMM's
    # fraction over all of this run's NAMM episodes: they start once every rank has finished its share of those
    baseline = [k[0] == KV and k[1] in BASELINES for k in todo]
    phases = [world.shard(batches([k for k, b in zip(todo, baseline) if b == later], args.batch))
              for later in (False, True)]
    envs = [env]  # the batched rollout's envs: env, then more as --batch needs them
    with tqdm(total=sum(len(g) for phase in phases for g in phase), disable=args.no_progress or not world.main,
              desc="DT episodes") as bar:
        for phase in phases:
            for group in phase:
                rollout, name = group[0][:2]
                budget = source = None
                if rollout == KV and name in BASELINES:
                    budget, source = baseline_budget(args, done, keys)
                reset_seeds = [1000 * seed + episode for _, _, seed, episode in group]
                if rollout == RECOMPUTE:
                    eps = [run_recompute(dt_recompute, env, args.target_return, reset_seeds[0], refs, max_steps)]
                elif len(group) == 1:
                    policy = make_kv_policy(name, args, dt, namm, budget)
                    eps = [run_kv(dt, env, policy, args.target_return, reset_seeds[0], refs, max_steps)]
                else:  # one batched DT forward per timestep, one cache row per episode (identical episodes)
                    envs += [make_env(spec.gym_id, max_steps) for _ in range(len(group) - len(envs))]
                    policy = make_kv_policy(name, args, dt, namm, budget)
                    eps = run_kv_batch(dt, envs[:len(group)], policy, args.target_return, reset_seeds, refs,
                                       max_steps)
                for (_, _, seed, episode), reset_seed, ep in zip(group, reset_seeds, eps):
                    journal.add({"rollout": rollout, "policy": name, "seed": seed, "episode": episode,
                                 "reset_seed": reset_seed, "budget": budget, "budget_source": source,
                                 **{k: v for k, v in ep.to_dict().items() if k != "rollout"}})
                    bar.update(1)
                    bar.set_postfix_str(f"{rollout}/{name} return {ep.ret:.0f}")
            journal.sync()  # every rank's episodes into `done` on every rank
    for e in envs:
        e.close()
    done = journal.merge(keys)
    if not world.main:
        return 0

    rows = summarise([done[k] for k in keys])
    header = [*notes]
    budgets = {r["budget_source"] for r in rows if r["budget_source"]}
    if budgets:
        b = next(r["budget"] for r in rows if r["budget_source"])
        header.append(f"baselines at budget {b:.3g} ({', '.join(sorted(budgets))})")
    scales = "; ".join(f"{n} refs {r.min:g} / {r.max:g}" if hasattr(r, "min") else f"{n}: return > 0"
                       for n, r in refs.items())
    header.append(f"{args.episodes} episode(s) x seeds {args.seed_list}; {scales} ({spec.gym_id})")
    table = markdown(rows, header, list(refs))
    write_json(out / "summary.json", {"settings": settings, "notes": header, "rows": rows})
    write_text(out / "table.md", table)
    print(table)
    print(f"wrote {path}, {out / 'summary.json'}, {out / 'table.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
