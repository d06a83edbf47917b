"""Evolve a NAMM with CMA-ES on offline long-memory language tasks (SmolLM2-135M by default).

    python scripts/train_namm.py --out runs/namm-smollm2 --stages passkey:20,passkey+kv_retrieval:20
    torchrun --nproc_per_node 2 scripts/train_namm.py ...        # members sharded across ranks (gloo / nccl)

`--out DIR` alone resumes whatever DIR holds (its saved settings are the defaults; a flag that changes the search
is refused unless --change-settings; <out>/.lock stops a second run into DIR). State: <out>/state.safetensors +
state.json (data only), saved every generation. Outputs: <out>/namm (safetensors + JSON, the CMA-ES mean),
<out>/log.jsonl, <out>/val.jsonl (validation curve), <out>/curve.png. `--ship` copies the result into namm_transfer/checkpoints/namm-smollm2.
`--init-from SRC --evolve w_score,b_score,b_out` starts a new search at another search's mean (SRC: its folder or a
NAMM checkpoint) that evolves only the named parameter groups (here the scorer's 76-number output head).
`--measure-speedup` prints the throughput ratio of batched + shared-prefix evaluation vs member-by-member.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer.checkpoints import DEFAULT_NAMM  # noqa: E402
from namm_transfer.evolution.trainer import (FITNESS_SIGNALS, MODEL_DTYPES, TRAIN_PROTOCOLS, Stage, TrainConfig, Trainer,  # noqa: E402
                                             bfloat16_is_native, compute_platform, load_start, setup_distributed,
                                             world)
from namm_transfer.namm import NAMMConfig  # noqa: E402


def smollm2_tokenizer_and_config():
    """SmolLM2's tokenizer and config without loading its weights (from the converted cache folder)."""
    from transformers import AutoConfig, AutoTokenizer
    from namm_transfer.language.models import SMOLLM2_CACHE_NAME, cache_dir, convert_smollm2
    folder = cache_dir() / SMOLLM2_CACHE_NAME
    if not (folder / "tokenizer.json").exists():
        folder = convert_smollm2()
    return AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)


def load_model(name: str, device: str, dtype: torch.dtype = torch.float32):
    """A model name, or "tiny-<arch>" (tiny random LM) / "random-smollm2" (SmolLM2's shape, random weights):
    both use SmolLM2's tokenizer, for tests, smoke runs and timing where the weights cannot travel."""
    from transformers import AutoModelForCausalLM
    from namm_transfer.language.models import load_causal_lm, tiny_config
    if name.startswith(("tiny-", "random-")):
        tok, smol_cfg = smollm2_tokenizer_and_config()
        if name.startswith("tiny-"):
            cfg = tiny_config(name.removeprefix("tiny-"))
            cfg.vocab_size = len(tok)
        elif name == "random-smollm2":
            cfg = smol_cfg
        else:
            raise ValueError(f"unknown model {name!r}: use an HF id/path, smollm2-135m, tiny-<arch> or random-smollm2")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        return model.to(device=device, dtype=dtype).eval(), tok
    return load_causal_lm(name, device=device, dtype=dtype)


def warn_if_bfloat16_is_emulated(dtype: str, device: str) -> None:
    """bfloat16 on a CPU without oneDNN's bf16 kernels (e.g. AVX2) is emulated: say so once, it costs ~5x."""
    if dtype == "bfloat16" and not bfloat16_is_native(device) and world()[0] == 0:
        print(f"warning: bfloat16 is emulated on this machine ({compute_platform(device)}): a SmolLM2 forward "
              "takes ~5x the float32 time here; --dtype float32 --change-settings runs the search faster (recorded)",
              file=sys.stderr)


def model_files_hash(name: str) -> str | None:
    """Content hash of the model's files (None for the tiny/random test models, built from a config)."""
    if name.startswith(("tiny-", "random-")):
        return None
    from namm_transfer.language.models import resolve_model_path
    from namm_transfer.runs import model_hash
    return model_hash(resolve_model_path(name))


def measure_speedup(trainer: Trainer, n_samples: int = 2) -> None:
    from namm_transfer.evolution.fitness import score_rows
    from namm_transfer.policies import NAMMPolicy
    cfg = trainer.cfg
    stage = cfg.stages[0]
    samples = trainer.generation_samples(0, stage.tasks)[:n_samples]
    pop = trainer.member_params(trainer.es.ask()).float()
    policy = NAMMPolicy(pop, trainer.namm_cfg, trainer.stats)
    t0 = time.perf_counter()
    batched = [score_rows(trainer.model, s, policy, cfg.popsize, cfg.chunk, share_prefix=True) for s in samples]
    t1 = time.perf_counter()
    single = [[score_rows(trainer.model, s, NAMMPolicy(pop[p], trainer.namm_cfg, trainer.stats), 1, cfg.chunk)
               for p in range(cfg.popsize)] for s in samples]
    t2 = time.perf_counter()
    diff = max(float((b.score[p] - single[i][p].score[0]).abs()) for i, b in enumerate(batched)
               for p in range(cfg.popsize))
    print(f"member evaluations: {cfg.popsize} members x {len(samples)} samples of ~{samples[0].length} tokens")
    print(f"  batched + shared prefix: {t1 - t0:.1f}s   member by member: {t2 - t1:.1f}s   "
          f"throughput ratio {(t2 - t1) / (t1 - t0):.2f}x   (max score difference {diff:.2e})")


SEARCH_FLAGS = {  # flag -> TrainConfig field; each defaults to the saved run's value when --out holds one
    "model": "model", "stages": "stages", "tokens": "tokens", "popsize": "popsize", "sigma0": "sigma0",
    "elite_ratio": "elite_ratio", "samples_per_task": "samples_per_task", "pool_per_task": "pool_per_task",
    "stats_samples_per_task": "stats_samples_per_task", "member_batch": "member_batch", "chunk": "chunk",
    "delay": "delay", "style": "style", "cache_weight": "cache_weight", "cache_target": "cache_target",
    "seed": "seed", "threads": "threads", "dtype": "dtype", "protocol": "protocol", "val_every": "val_every",
    "val_per_task": "val_per_task",
    "val_baselines": "val_baselines", "evolve": "evolve", "init_from": "init_from", "fitness": "fitness",
}


def build_config(args) -> TrainConfig:
    """Settings = TrainConfig defaults, overridden by the run saved in --out (if any), overridden by the flags
    given on this command line. `--out DIR` alone therefore resumes whatever DIR holds."""
    import json
    base = TrainConfig().to_dict()
    state = Path(args.out) / "state.json"
    if state.exists():
        try:
            base = json.loads(state.read_text())["config"]
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{state}: unreadable ({err}); restore it from git or use another --out") from err
    given = {k: v for k, v in vars(args).items() if k in SEARCH_FLAGS and v is not None}
    if "stages" in given:
        given["stages"] = [{"tasks": s.tasks, "generations": s.generations}
                           for s in TrainConfig.parse_stages(given["stages"])]
    if "evolve" in given:
        given["evolve"] = [] if given["evolve"] in ("", "all") else given["evolve"].split(",")
    if "val_baselines" in given:
        given["val_baselines"] = [b for b in given["val_baselines"].split(",") if b]
    if args.no_share_prefix:
        given["share_prefix"] = False
    return TrainConfig.from_dict({**base, **given, "out": args.out})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    ap.add_argument("--out", default=d.out, help=f"run folder (default {d.out}); resumed if it holds a run")
    ap.add_argument("--model", help=f"default {d.model}")
    ap.add_argument("--stages", help='curriculum, e.g. "passkey:10,passkey+kv_retrieval:20" (default passkey:10)')
    ap.add_argument("--tokens", type=int, help=f"prompt length (default {d.tokens})")
    ap.add_argument("--popsize", type=int, help=f"default {d.popsize}")
    ap.add_argument("--sigma0", type=float, help=f"initial CMA-ES step size (default {d.sigma0}); on a resumed run, "
                    "with --change-settings, restarts the step size at this value (recorded)")
    ap.add_argument("--elite-ratio", type=float, help=f"default {d.elite_ratio}")
    ap.add_argument("--samples-per-task", type=int, help=f"prompts per task per generation (default {d.samples_per_task})")
    ap.add_argument("--pool-per-task", type=int, help=f"default {d.pool_per_task}")
    ap.add_argument("--stats-samples-per-task", type=int, help=f"default {d.stats_samples_per_task}")
    ap.add_argument("--member-batch", type=int, help="members per batched forward (default 0 = all)")
    ap.add_argument("--chunk", type=int, help=f"default {d.chunk}")
    ap.add_argument("--delay", type=int, help=f"eviction period in tokens (default {d.delay})")
    ap.add_argument("--no-share-prefix", action="store_true")
    ap.add_argument("--style", help=f"default {d.style}")
    ap.add_argument("--protocol", choices=TRAIN_PROTOCOLS,
                    help=f"where eviction steps run on a prompt (default {d.protocol}: while the context is read, "
                         "as eval_language.py evaluates; 'anywhere': every --delay tokens, the answer included)")
    ap.add_argument("--cache-weight", type=float,
                    help="memory pressure: fitness -= W * max(0, realised cache - target) (default 0 = reference)")
    ap.add_argument("--cache-target", type=float, help=f"default {d.cache_target}")
    ap.add_argument("--seed", type=int, help=f"default {d.seed}")
    ap.add_argument("--threads", type=int, help=f"default {d.threads}")
    ap.add_argument("--dtype", choices=sorted(MODEL_DTYPES),
                    help=f"the model's dtype (default {d.dtype}; bfloat16 runs ~2.6x faster on CPUs with AVX512-BF16 "
                         "and ~5x slower where it is emulated, e.g. AVX2; changing it on resume rescores the "
                         "full-cache references)")
    ap.add_argument("--val-every", type=int, help=f"validation every N generations (default {d.val_every}; 0 = off)")
    ap.add_argument("--val-per-task", type=int, help=f"validation prompts per task (default {d.val_per_task})")
    ap.add_argument("--val-baselines", help="baselines scored at the NAMM's cache in validation (default h2o,recency)")
    ap.add_argument("--evolve", help="parameter groups the search evolves, comma-separated, from w_qkv, b_qkv, "
                    "w_out, b_out, w_score, b_score (default all; e.g. w_score,b_score,b_out: the scorer's 76-number "
                    "output head); the rest stay at the start (--init-from). Fixed when the search is created")
    ap.add_argument("--init-from", help="start a new search from another search's folder (its CMA-ES mean and "
                    "normalisation, copied in) or a NAMM checkpoint folder (default: zeros = keep-all, statistics "
                    "from a generation-0 pass). Fixed when the search is created")
    ap.add_argument("--fitness", choices=FITNESS_SIGNALS,
                    help=f"what members are ranked by (default {d.fitness}: answer probability over the full cache's; "
                         "oracle-mass: the share of what the question and gold answer attend to in the unmodified model "
                         "that a member's cache still holds when the question is read, a dense signal). Fixed when "
                         "the search is created; validation always scores the answer probability")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-generations", type=int, default=None, help="stop at this generation (resumable)")
    ap.add_argument("--more-generations", type=int, default=None,
                    help="stop after this many more generations (for runs done in pieces)")
    ap.add_argument("--change-settings", action="store_true",
                    help="continue a saved search under changed settings (the change is recorded in its state)")
    ap.add_argument("--validate-now", action="store_true",
                    help="score the CMA-ES mean on the validation prompts at the current generation (once per "
                         "dtype/protocol/length), e.g. with --more-generations 0 before a --change-settings that "
                         "changes them, so the switch has a validation point in both settings")
    ap.add_argument("--measure-speedup", action="store_true")
    ap.add_argument("--ship", action="store_true", help=f"copy <out>/namm to {DEFAULT_NAMM}")
    args = ap.parse_args(argv)
    for flag in ("max_generations", "more_generations"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            ap.error(f"--{flag.replace('_', '-')} must be >= 0")
    try:
        cfg = build_config(args)
        if cfg.init_from and not (Path(cfg.out) / "state.json").exists():  # a new search: check its start now
            load_start(Path(cfg.init_from), NAMMConfig(delay=cfg.delay))
    except ValueError as err:
        ap.error(str(err))
    torch.set_num_threads(cfg.threads)
    setup_distributed(args.device)
    device = args.device
    if device == "cuda" and world()[1] > 1:
        device = f"cuda:{world()[0] % torch.cuda.device_count()}"
    warn_if_bfloat16_is_emulated(cfg.dtype, device)
    model, tok = load_model(cfg.model, device, MODEL_DTYPES[cfg.dtype])
    trainer = Trainer(cfg, model, tok, device, model_hash=model_files_hash(cfg.model))
    from contextlib import nullcontext
    from namm_transfer.cli import UsageError
    from namm_transfer.runs import folder_lock
    if world()[0] == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    try:
        lock = folder_lock(Path(cfg.out)) if world()[0] == 0 else nullcontext()  # rank 0 holds it for all
        with lock:
            run(args, trainer, cfg)
    except (ValueError, UsageError, FloatingPointError) as err:  # refused settings, unreadable state, busy
        ap.exit(2, f"error: {err}\n")                            # folder, non-finite fitness: a message


def run(args, trainer: Trainer, cfg: TrainConfig) -> None:
    """Train (or measure the population speed-up), then report and optionally ship the CMA-ES mean."""
    if args.measure_speedup:
        if not trainer.try_resume(args.change_settings):
            trainer.start_from(cfg.init_from) if cfg.init_from else trainer.measure_stats()
        measure_speedup(trainer)
        return
    t0 = time.time()
    trainer.train(args.max_generations, accept_changes=args.change_settings, more_generations=args.more_generations,
                  validate_now=args.validate_now)
    if world()[0] == 0:
        print(f"done: generation {trainer.es.generation}/{trainer.total_generations} in {time.time() - t0:.0f}s; "
              f"NAMM (CMA-ES mean) at {Path(cfg.out) / 'namm'}")
        if args.ship:
            if DEFAULT_NAMM.exists():
                shutil.rmtree(DEFAULT_NAMM)
            shutil.copytree(Path(cfg.out) / "namm", DEFAULT_NAMM)
            print(f"shipped to {DEFAULT_NAMM}")


if __name__ == "__main__":
    main()
