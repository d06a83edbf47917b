"""Distil a NAMM from the oracle reference (namm_transfer/evolution/distill.py), as a start for a search.

    python scripts/distill_namm.py --init-from training/namm-c75 --keep 0.7 --out runs/distill/namm-c75-k70

On training-split prompts (never validation or test), under the context-only protocol: the oracle's scores (what
the question and the gold answer attend to in the unmodified model) label, at every eviction step, the top --keep
share of the tokens read so far; the NAMM's features at that step come from a keep-all pass with --init-from's
frozen normalisation. The scorer is fitted from --init-from's parameters by Adam on the logistic loss (a held-out
quarter of the prompts reports its loss) and written as a NAMM checkpoint (<out>/namm) with the provenance in its
meta; <out>/fit.json holds the loss curve and the keep/recall agreement. Each prompt's features are kept under
<out>/features/ (not small: leave them out of git), so a rerun with other fitting flags reuses them.
Score the result with `eval_language.py --split validation --namm <out>/namm`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer import save_namm  # noqa: E402
from namm_transfer.cli import UsageError, int_in, name_list, run_cli  # noqa: E402
from namm_transfer.evolution.distill import (FeatureRecorder, agreement, calibrate, distill_loss, fit,  # noqa: E402
                                             label_steps)  # noqa: E402
from namm_transfer.evolution.trainer import load_start  # noqa: E402
from namm_transfer.language.benchmark import future_attention_scores  # noqa: E402
from namm_transfer.language.tasks import TASKS, eviction_limit, make_split  # noqa: E402
from namm_transfer.namm import NAMMConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init-from", required=True, help="a search folder (its CMA-ES mean) or a NAMM checkpoint folder")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", type=name_list(TASKS), default=list(TASKS))
    ap.add_argument("--samples-per-task", type=int_in(2), default=16, help="training prompts per task")
    ap.add_argument("--tokens", type=int_in(64), default=1024)
    ap.add_argument("--delay", type=int_in(1), default=256, help="eviction period (must equal --init-from's)")
    ap.add_argument("--keep", type=float, default=0.7, help="share of the tokens present labelled 'keep' per step")
    ap.add_argument("--mass-weight", type=float, default=0.0,
                    help="0..1: weigh each slot's loss by (1 - m) + m * its oracle score / the mean (0: all alike)")
    ap.add_argument("--steps", type=int_in(1), default=300, help="Adam steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int_in(1), default=64, help="layer-steps per minibatch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int_in(1), default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--features", default=None,
                    help="folder of the per-prompt features (default <out>/features; another run's to refit on them)")
    args = ap.parse_args(argv)
    if not 0 < args.keep <= 1:
        ap.error("--keep must be in (0, 1]")
    if not 0 <= args.mass_weight <= 1:
        ap.error("--mass-weight must be in [0, 1]")
    if args.lr <= 0:
        ap.error("--lr must be > 0")
    return args


def collect(model, tok, sample, cfg: NAMMConfig, stats, folder: Path, recipe: dict[str, str], chunk: int = 128) -> Path:
    """Features and oracle tables of one prompt -> folder/<task>-<seed>.safetensors, reused when present and made
    under the same `recipe` (model, prompt length, delay, normalisation; stored in the file's metadata)."""
    from safetensors import safe_open
    from namm_transfer.adapters.causal_lm import prefill
    from namm_transfer.cache import MemoryCache
    path = folder / f"{sample.task}-{sample.seed}.safetensors"
    if path.exists():
        with safe_open(str(path), "pt") as f:
            saved = f.metadata() or {}
        if saved != recipe:
            diff = [k for k in sorted(set(saved) | set(recipe)) if saved.get(k) != recipe.get(k)]
            raise UsageError(f"{path}: features made under other settings ({', '.join(diff)}); use another "
                             "--features folder")
        return path
    until = eviction_limit(sample, tok, "context-only")
    tables = future_attention_scores(model, tok, sample, until, chunk=chunk)
    recorder = FeatureRecorder(cfg, stats)
    ids = tok(sample.prompt(tok, "raw"), return_tensors="pt").input_ids[:, :until]  # the context: steps run there
    with torch.no_grad():
        prefill(model, ids, MemoryCache(recorder, evict_until=until), chunk)
    tensors = {f"table.{i}": t.contiguous() for i, t in enumerate(tables)}
    for j, (layer, x, pos, valid) in enumerate(recorder.records):
        tensors.update({f"step.{j}.x": x.contiguous(), f"step.{j}.pos": pos.contiguous(),
                        f"step.{j}.valid": valid.contiguous(), f"step.{j}.layer": torch.tensor(layer)})
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=recipe)
    tmp.rename(path)
    return path


def load_steps(path: Path, keep: float, mass_weight: float = 0.0):
    t = load_file(str(path))
    tables = [t[f"table.{i}"] for i in range(sum(k.startswith("table.") for k in t))]
    records = [(int(t[f"step.{j}.layer"]), t[f"step.{j}.x"], t[f"step.{j}.pos"], t[f"step.{j}.valid"])
               for j in range(sum(k.endswith(".layer") for k in t))]
    return label_steps(records, tables, keep, mass_weight)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


def run(args) -> int:
    torch.set_num_threads(args.threads)
    cfg = NAMMConfig(delay=args.delay)
    source = Path(args.init_from)
    if not source.exists():
        raise UsageError(f"--init-from {source}: no such folder")
    try:
        start, stats, prov = load_start(source, cfg)
    except ValueError as err:
        raise UsageError(str(err)) from None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_language import load_model
    model, tok, model_sha = load_model(args.model, "cpu")
    out = Path(args.out)
    samples = [s for task in args.tasks for s in make_split(task, "train", args.samples_per_task, args.tokens, tok)]
    stats_bytes = stats.mean.double().numpy().tobytes() + stats.var.double().numpy().tobytes()
    recipe = {"model_hash": str(model_sha), "tokens": str(args.tokens), "delay": str(args.delay),
              "normalisation_sha256": hashlib.sha256(stats_bytes).hexdigest()}
    t0 = time.time()
    paths = []
    for i, s in enumerate(samples):
        paths.append(collect(model, tok, s, cfg, stats, Path(args.features) if args.features else out / "features",
                             recipe))
        print(f"features {i + 1}/{len(samples)} ({s.task} seed {s.seed}) {time.time() - t0:.0f} s", flush=True)
    # a quarter of each task's prompts held out (the last ones), to see the fit generalise across prompts
    held = {str(p) for task in args.tasks for p in [q for q, s in zip(paths, samples) if s.task == task]
            [-max(1, args.samples_per_task // 4):]}
    train = [st for p in paths if str(p) not in held for st in load_steps(p, args.keep, args.mass_weight)]
    held_out = [st for p in paths if str(p) in held for st in load_steps(p, args.keep, args.mass_weight)]
    def measure(params: torch.Tensor) -> dict:
        with torch.no_grad():
            loss = float(distill_loss(params.float(), held_out, cfg))
        return {"train": agreement(params, train, cfg), "held_out": {**agreement(params, held_out, cfg), "loss": loss}}

    before = measure(start)
    fitted, log = fit(start, train, cfg, args.steps, args.lr, args.batch, args.seed, held_out,
                      progress=lambda r: print(json.dumps(r), flush=True) if r["step"] % 20 == 0 else None)
    params = calibrate(fitted, train, cfg, args.keep)  # score >= 0 on the --keep share of the training slots
    after = measure(params)
    meta = {"variant": f"distill-k{round(100 * args.keep)}" + (f"-m{args.mass_weight:g}" if args.mass_weight else ""),
            "distilled_from": prov, "keep": args.keep, "mass_weight": args.mass_weight,
            "bias_shift": float(params[-1] - fitted[-1]),
            "prompts": {"split": "train", "tasks": args.tasks, "per_task": args.samples_per_task,
                        "tokens": args.tokens, "protocol": "context-only"},
            "fit": {"steps": args.steps, "lr": args.lr, "batch": args.batch, "seed": args.seed},
            "model": args.model, "model_hash": model_sha}
    save_namm(out / "namm", params, stats, cfg, meta)
    (out / "fit.json").write_text(json.dumps({**meta, "agreement_before": before, "agreement_after": after,
                                              "log": log}, indent=1))
    print(f"held-out loss {before['held_out']['loss']:.4f} -> {after['held_out']['loss']:.4f}; kept share / recall on held-out steps: "
          f"{before['held_out']['kept_share']:.3f} / {before['held_out']['recall']:.3f} -> "
          f"{after['held_out']['kept_share']:.3f} / {after['held_out']['recall']:.3f}; NAMM in {out / 'namm'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
