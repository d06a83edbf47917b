"""How much do a search's members really differ, and can its prompts tell? (a measurement for issue #16)

Draws members around a training run's CMA-ES mean exactly as the search does (mean + s * sigma * sqrt(diag C) * z),
at one or more step-size multiples s with the same z (paired), scores them and the mean itself on prompts from the
run's training pool, and reports how repeatable the members' ranking is between two disjoint halves of those
prompts: of the search's fitness, of the score ratio, and of the score ratio at matched cache (the residual after
regressing it on the realised cache fraction across members, per half) — the part of a member's quality that a
cache target does not already explain. The run folder is only read.

    python scripts/member_spread.py --run training/namm-c75 --scales 1,2 --prompts-per-task 4 \\
        --out results/language/member-spread/namm-c75

With --oracle-mass, each member is also scored by a dense candidate fitness: the share of the oracle's attention
mass (what the question and gold answer attend to in the unmodified model, language.benchmark) that its cache still
holds when the question is read (evolution.fitness.retained_mass). The summary then reports that signal's split-half
agreement beside the answer probability's, and how the two rank the members at matched cache (correlation of their
residuals on the cache, over all prompts). Context-only or query-aware searches only (an eviction limit).

Scores are appended to <out>/scores.jsonl one prompt at a time (a rerun resumes; other settings are refused);
<out>/summary.json and summary.md are rewritten after every prompt and at the end of every run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer.evolution.agreement import (cache_slope, prompts_for_reliability, residual_on_cache,  # noqa: E402
                                               split_half_agreement)
from namm_transfer.evolution.trainer import TrainConfig, fitness_from_scores, search_space  # noqa: E402
from namm_transfer.records import write_text  # noqa: E402


def summarise(rows: list[dict], meta: dict) -> dict:
    """Per step-size multiple: members' mean score ratio and cache against the mean's, and split-half agreement."""
    tasks, refs = [r["task"] for r in rows], [r["ref"] for r in rows]
    score = torch.tensor([r["score"] for r in rows], dtype=torch.float64).T  # (members, prompts)
    frac = torch.tensor([r["cache"] for r in rows], dtype=torch.float64).T
    w, target, pop = meta["cache_weight"], meta["cache_target"], meta["popsize"]
    _, mean_ratio = fitness_from_scores(score[:1], frac[:1], tasks, refs)
    out = {"prompts": len(rows), "mean": {"ratio": float(mean_ratio[0]), "cache": float(frac[0].mean())},
           "scales": {}}
    for i, s in enumerate(meta["scales"]):
        rows_s = slice(1 + i * pop, 1 + (i + 1) * pop)
        sc, fr = score[rows_s], frac[rows_s]
        _, ratio = fitness_from_scores(sc, fr, tasks, refs)
        cache = fr.mean(1)
        entry = {"sigma": s * meta["sigma"], "ratio_mean": float(ratio.mean()), "ratio_sd": float(ratio.std()),
                 "cache_mean": float(cache.mean()), "cache_sd": float(cache.std()),
                 "corr_ratio_cache": float(torch.corrcoef(torch.stack([ratio, cache]))[0, 1])}
        # members at matched cache against the mean: their line (ratio on cache) at the mean's cache, and how many
        # members lie above the mean once moved along that line to its cache
        slope = cache_slope(ratio, cache)
        slope = 0.0 if math.isnan(slope) else slope  # all members at one cache: no line to move along
        line_at_mean = float(ratio.mean()) + slope * (out["mean"]["cache"] - float(cache.mean()))
        at_mean_cache = ratio + slope * (out["mean"]["cache"] - cache)
        entry["matched_cache_vs_mean"] = {"line_at_mean_cache": line_at_mean,
                                          "below_mean": out["mean"]["ratio"] - line_at_mean,
                                          "members_above_mean": int((at_mean_cache > out["mean"]["ratio"]).sum())}
        if all(tasks.count(t) >= 2 for t in set(tasks)):
            a = split_half_agreement(sc, fr, tasks, refs, w, target)
            a["prompts_for_reliability_0.5"] = prompts_for_reliability(a["matched_cache"], a["prompts_per_half"])
            entry["agreement"] = a
        if all("mass" in r for r in rows):  # the dense candidate signal (--oracle-mass), per task like the ratio
            mass = torch.tensor([r["mass"] for r in rows], dtype=torch.float64).T[rows_s]
            _, mass_task = fitness_from_scores(mass, fr, tasks, [1.0] * len(tasks))
            entry["mass_mean"], entry["mass_sd"] = float(mass_task.mean()), float(mass_task.std())
            entry["corr_mass_ratio"] = float(torch.corrcoef(torch.stack([mass_task, ratio]))[0, 1])
            entry["corr_mass_ratio_matched_cache"] = float(torch.corrcoef(torch.stack(
                [residual_on_cache(mass_task, cache), residual_on_cache(ratio, cache)]))[0, 1])
            if all(tasks.count(t) >= 2 for t in set(tasks)):
                m = split_half_agreement(mass, fr, tasks, [1.0] * len(tasks), w, target)
                m["prompts_for_reliability_0.5"] = prompts_for_reliability(m["matched_cache"], m["prompts_per_half"])
                entry["mass_agreement"] = m
        out["scales"][str(s)] = entry
    return out


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"Members around {meta['run']} generation {meta['generation']} (sigma {meta['sigma']:.4f}, "
             f"population {meta['popsize']}), {summary['prompts']} training-pool prompts; the mean itself: "
             f"score ratio {summary['mean']['ratio']:.3f} at {100 * summary['mean']['cache']:.1f}% cache.", "",
             "| step | members' score ratio (sd) | cache (sd) | corr(ratio, cache) | split-half rank agreement: "
             "fitness / ratio / ratio at matched cache | matched-cache spread: repeatable sd / noise sd (per half) | "
             "members' line at the mean's cache (below the mean; members above it) | prompts per member for a "
             "matched-cache reliability of 0.5 |",
             "|---|---|---|---|---|---|---|---|"]
    for s, e in summary["scales"].items():
        a = e.get("agreement")
        agr = (f"{a['fitness']:.2f} / {a['ratio']:.2f} / {a['matched_cache']:.2f} ({a['prompts_per_half']} prompts "
               f"per half)" if a else "-")
        spread = f"{a['true_sd']:.3f} / {a['noise_sd']:.3f}" if a else "-"
        vs = e["matched_cache_vs_mean"]
        line = (f"{vs['line_at_mean_cache']:.3f} ({vs['below_mean']:+.3f}; {vs['members_above_mean']} of "
                f"{meta['popsize']})")
        need = f"{a['prompts_for_reliability_0.5']:.0f}" if a else "-"
        lines.append(f"| {s} x sigma = {e['sigma']:.4f} | {e['ratio_mean']:.3f} ({e['ratio_sd']:.3f}) | "
                     f"{100 * e['cache_mean']:.1f}% ({100 * e['cache_sd']:.1f}) | {e['corr_ratio_cache']:+.2f} | "
                     f"{agr} | {spread} | {line} | {need} |")
    if any("mass_mean" in e for e in summary["scales"].values()):
        lines += ["", "Retained oracle attention mass (--oracle-mass) as a fitness signal, same members and prompts:", "",
                  "| step | members' retained mass (sd) | corr(mass, score ratio): raw / at matched cache | split-half "
                  "rank agreement of the mass: fitness / mass / mass at matched cache | prompts per member for a "
                  "matched-cache reliability of 0.5 |", "|---|---|---|---|---|"]
        for s, e in summary["scales"].items():
            m = e.get("mass_agreement")
            agr = f"{m['fitness']:.2f} / {m['ratio']:.2f} / {m['matched_cache']:.2f}" if m else "-"
            need = f"{m['prompts_for_reliability_0.5']:.0f}" if m else "-"
            lines.append(f"| {s} x sigma | {e['mass_mean']:.3f} ({e['mass_sd']:.3f}) | {e['corr_mass_ratio']:+.2f} / "
                         f"{e['corr_mass_ratio_matched_cache']:+.2f} | {agr} | {need} |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, rows: list[dict], meta: dict) -> str:
    """<out>/summary.json and summary.md from the rows so far; returns the markdown."""
    summary = summarise(rows, meta)
    text = markdown(summary, meta)
    write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_text(out / "summary.md", text)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a training folder (state.json + state.safetensors)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scales", default="1,2", help="step-size multiples, comma separated (default 1,2)")
    ap.add_argument("--prompts-per-task", type=int, default=4)
    ap.add_argument("--seed", type=int, default=12345, help="members' z and the prompts drawn (default 12345)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--oracle-mass", action="store_true",
                    help="also score each member's retained share of the oracle's attention mass (see above)")
    args = ap.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    if not (run / "state.json").exists() or not (run / "state.safetensors").exists():
        sys.exit(f"{run}: no training state (state.json + state.safetensors); pass a folder under training/")
    try:
        scales = [float(s) for s in args.scales.split(",") if s]
    except ValueError:
        sys.exit(f"--scales {args.scales!r}: comma-separated positive numbers, e.g. 1,2")
    if not scales or any(not s > 0 for s in scales) or args.prompts_per_task < 2:
        sys.exit("--scales must be positive numbers and --prompts-per-task at least 2 (split halves)")
    torch.set_num_threads(args.threads)

    from safetensors.torch import load as load_safetensors_bytes
    from namm_transfer.evolution.fitness import score_rows
    from namm_transfer.language.benchmark import future_attention_from_ids
    from namm_transfer.evolution.trainer import MODEL_DTYPES, Trainer
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_namm import load_model  # SmolLM2 by name, or the tiny test models
    from namm_transfer.policies import NAMMPolicy

    out.mkdir(parents=True, exist_ok=True)
    meta_path, snapshot = out / "meta.json", out / "state-snapshot.safetensors"
    settings = {"run": str(run), "scales": scales, "prompts_per_task": args.prompts_per_task, "seed": args.seed,
                "oracle_mass": args.oracle_mass}
    if meta_path.exists():  # resume against the snapshot taken when the measurement started
        meta = json.loads(meta_path.read_text())
        meta.setdefault("oracle_mass", False)  # measurements from before the flag
        if {k: meta.get(k) for k in settings} != settings:
            sys.exit(f"{out} holds a measurement with other settings ({meta_path}: "
                     f"{ {k: meta.get(k) for k in settings} }); use another --out")
        state_bytes, info = snapshot.read_bytes(), json.loads((out / "state-snapshot.json").read_text())
        if hashlib.sha256(state_bytes).hexdigest() != meta["state_sha256"]:
            sys.exit(f"{snapshot} does not match {meta_path}: delete {out} and start again")
    else:
        info = json.loads((run / "state.json").read_text())
        state_bytes = (run / "state.safetensors").read_bytes()
        if json.loads((run / "state.json").read_text()) != info:
            sys.exit(f"{run}: the run saved its state while it was read: run again")
        cfg0 = info["config"]
        meta = {**settings, "generation": info["es"]["generation"], "sigma": info["es"]["sigma"],
                "popsize": cfg0["popsize"], "cache_weight": cfg0["cache_weight"],
                "cache_target": cfg0["cache_target"], "protocol": cfg0.get("protocol", "anywhere"),
                "state_sha256": hashlib.sha256(state_bytes).hexdigest()}
        snapshot.write_bytes(state_bytes)
        write_text(out / "state-snapshot.json", json.dumps({k: info[k] for k in ("config", "es", "stats", "refs")},
                                                           indent=1) + "\n")
        write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    cfg = TrainConfig.from_dict({**info["config"], "out": str(out / "unused")})
    if args.oracle_mass and cfg.protocol == "anywhere":
        sys.exit(f"--oracle-mass: {run} evicts anywhere (into the question and answer), so no token count separates "
                 "what the oracle's queries read from what the policy compresses; use a context-only search")
    tensors = load_safetensors_bytes(state_bytes)

    model, tok = load_model(cfg.model, "cpu", MODEL_DTYPES[cfg.dtype])
    trainer = Trainer(cfg, model, tok, log=lambda *a: None)
    trainer.refs = dict(info.get("refs", {}))  # the run's full-cache references (the rest are scored here)
    trainer.stats.mean, trainer.stats.m2 = tensors["stats_mean"], tensors["stats_m2"]
    trainer.stats.count, trainer.stats.frozen = info["stats"]["count"], True
    mean, diag = tensors["es_mean"].double(), tensors["es_diag_c"].double()
    z = torch.randn(cfg.popsize, mean.numel(), generator=torch.Generator().manual_seed(args.seed),
                    dtype=torch.float64)
    pop = torch.cat([mean[None]] + [mean + s * meta["sigma"] * z * diag.sqrt() for s in scales])
    trainer.base = search_space(cfg, tensors)[0]  # a search of some parameter groups around a start (--evolve)
    pop = trainer.member_params(pop).float()
    policy = NAMMPolicy(pop, trainer.namm_cfg, trainer.stats)
    rng = random.Random(args.seed)
    samples = [s for t in trainer.tasks for s in rng.sample(trainer.pool[t], args.prompts_per_task)]

    scores_path = out / "scores.jsonl"
    rows = [json.loads(l) for l in scores_path.read_text().splitlines()] if scores_path.exists() else []
    done = {r["prompt"] for r in rows}
    print(f"{len(samples)} prompts x {pop.shape[0]} members (the mean + {cfg.popsize} per step {scales}); "
          f"{len(done)} already scored", flush=True)
    for j, sample in enumerate(samples):
        if sample.key in done:
            continue
        t0 = time.time()
        trainer.full_cache_refs([sample])
        oracle = (future_attention_from_ids(model, sample.stream, sample.evict_until, cfg.chunk)
                  if args.oracle_mass else None)
        res = score_rows(model, sample, policy, pop.shape[0], cfg.chunk, cfg.share_prefix, oracle=oracle)
        row = {"prompt": sample.key, "task": sample.task, "ref": trainer.refs[sample.key],
               "score": [round(float(x), 6) for x in res.score], "cache": [round(float(x), 5) for x in res.cache_fraction],
               **({"mass": [round(float(x), 6) for x in res.retained_mass]} if oracle is not None else {}),
               "seconds": round(time.time() - t0, 1)}
        with open(scores_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        write_summary(out, rows, meta)
        print(f"[{j + 1}/{len(samples)}] {sample.key}: {row['seconds']:.0f}s", flush=True)
    print(write_summary(out, rows, meta))  # again on a finished measurement: summaries of this code


if __name__ == "__main__":
    main()
