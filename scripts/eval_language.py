"""Held-out language evaluation: full cache vs NAMM vs H2O / L2 / recency / SnapKV at NAMM's cache size.

    python scripts/eval_language.py [--namm PATH] [--tasks passkey,kv_retrieval,passage_retrieval]
        [--tokens 1024] [--n 8] [--policies full,namm,h2o,l2,recency,snapkv] [--out runs/eval_language]

Samples come from the test split (seeds disjoint from training). Baselines run, per sample, at the realised
cache fraction NAMM reached on that sample (or at --budget when NAMM is not in the list). Where eviction happens
(--protocol): "context-only" (default) runs eviction steps only while the context is read, then reads the question
and the answer into the pruned cache; "query-aware" compresses the question too. Eviction never runs inside the
answer. Rerunning the same command resumes from <out>/records.jsonl. Writes summary.json / summary.md (means with
bootstrap 95% intervals) and paired.json (NAMM - each baseline on the same samples, paired 95% intervals).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer import load_namm, make_policy  # noqa: E402
from namm_transfer.checkpoints import DEFAULT_NAMM  # noqa: E402
from namm_transfer.language.benchmark import (append_record, evaluate_sample, paired_differences,  # noqa: E402
                                               summarise)
from namm_transfer.records import in_repo, read_records, record_command  # noqa: E402
from namm_transfer.language.tasks import PROTOCOLS, eviction_limit, make_split  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--namm", default=str(DEFAULT_NAMM))
    ap.add_argument("--tasks", default="passkey,kv_retrieval,passage_retrieval")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--n", type=int, default=8, help="test samples per task")
    ap.add_argument("--policies", default="full,namm,h2o,l2,recency,snapkv")
    ap.add_argument("--budget", type=float, default=0.5, help="baseline budget when NAMM is not evaluated")
    ap.add_argument("--delay", type=int, default=512, help="baseline eviction period when NAMM is not evaluated")
    ap.add_argument("--protocol", default="context-only", choices=PROTOCOLS,
                    help="where eviction steps may run: while the context is read, or through the question too")
    ap.add_argument("--style", default="raw")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--out", default="runs/eval_language")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    policies = args.policies.split(",")
    namm = None
    if "namm" in policies:
        try:
            namm = load_namm(args.namm)
        except FileNotFoundError as err:
            sys.exit(f"error: {err}")
    if args.model.startswith(("tiny-", "random-")):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train_namm import load_model
        model, tok = load_model(args.model, args.device)
    else:
        from namm_transfer.language.models import load_causal_lm
        model, tok = load_causal_lm(args.model, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    namm_path = in_repo(Path(args.namm).resolve())  # load_namm's source is this same path
    run = {**vars(args), "namm": namm_path, "namm_source": namm_path if namm else None}
    (out / "run.json").write_text(json.dumps(run, indent=2))
    record_command(out, "scripts/eval_language.py", argv)
    records_path = out / "records.jsonl"
    done = {(r["policy"], r["key"]): r for r in read_records(records_path)}
    samples = [(task, i, s) for task in args.tasks.split(",")
               for i, s in enumerate(make_split(task, "test", args.n, args.tokens, tok))]
    from tqdm import tqdm
    bar = tqdm(total=len(samples) * len(policies), disable=args.no_progress, desc="eval", unit="run")
    for task, i, sample in samples:
        key = f"{task}/{sample.seed}/{args.tokens}"
        for name in policies:
            bar.update(1)
            if (name, key) in done:
                continue
            budget = None
            if name == "full" or name == "namm":
                policy = make_policy("full") if name == "full" else namm
            else:
                ref = done.get(("namm", key))
                budget = min(max(ref["kept_fraction"], 1e-3), 1.0) if ref else args.budget
                policy = make_policy(name, budget=float(budget), delay=namm.delay if namm else args.delay)
            rec = evaluate_sample(model, tok, sample, policy, name, key, args.style, args.chunk,
                                  args.max_new_tokens, budget,
                                  evict_until=eviction_limit(sample, tok, args.protocol, args.style))
            append_record(records_path, rec)
            done[(name, key)] = rec.__dict__
    bar.close()
    rows = read_records(records_path)
    table, md = summarise(rows, policies)
    if "namm" in policies:
        paired, paired_md = paired_differences(rows, "namm", [p for p in policies if p not in ("full", "namm")])
        (out / "paired.json").write_text(json.dumps(paired, indent=2))
        md += "\nPaired differences, NAMM - baseline at NAMM's cache (same samples):\n\n" + paired_md
    note = (f"\nModel {args.model}; NAMM {run['namm_source'] or '-'}; test split, {args.n} samples per task of "
            f"~{args.tokens} prompt tokens; protocol {args.protocol}; baselines at the cache fraction NAMM kept "
            f"after its last eviction step on each sample; 95% intervals: bootstrap over samples (10,000 "
            f"resamples, stratified by task for 'all').\n")
    (out / "summary.json").write_text(json.dumps(table, indent=2))
    (out / "summary.md").write_text(md + note)
    print(md + note)


if __name__ == "__main__":
    main()
