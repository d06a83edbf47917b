"""Language demo: SmolLM2-135M answers a long-context question with full cache vs NAMM vs H2O.

    python scripts/demo_language.py [--model smollm2-135m] [--tokens 1536] [--namm PATH] [--seed 0]

Prints each policy's answer, realised cache % (stored / seen tokens, mean over layers) and speed.
H2O runs at NAMM's realised cache size (or 50% if no trained NAMM is available).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer import H2O, FullCache  # noqa: E402
from namm_transfer.adapters.causal_lm import generate  # noqa: E402
from namm_transfer.checkpoints import DEFAULT_NAMM  # noqa: E402
from namm_transfer.cli import UsageError, int_in, load_namm_arg, run_cli  # noqa: E402
from namm_transfer.language.models import load_causal_lm  # noqa: E402
from namm_transfer.language.tasks import SPLIT_SIZE, TASKS, make_split  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="passkey", choices=TASKS)
    ap.add_argument("--tokens", type=int_in(64), default=1536)
    ap.add_argument("--seed", type=int_in(0, SPLIT_SIZE - 1), default=0, help="test-split sample index")
    ap.add_argument("--namm", default=str(DEFAULT_NAMM))
    ap.add_argument("--threads", type=int_in(1), default=1)
    args = ap.parse_args(argv)
    return run_cli(lambda: demo(args))


def demo(args) -> int:
    """Prints the comparison (nothing is written)."""
    torch.set_num_threads(args.threads)
    try:
        namm = load_namm_arg(args.namm)
    except UsageError as err:
        if "no NAMM checkpoint" not in str(err):
            raise
        namm = None
        print(f"note: {err}\n      -> showing full cache and H2O only\n")
    model, tok = load_causal_lm(args.model)
    sample = make_split(args.task, "test", 1, target_tokens=args.tokens, tokenizer=tok, start=args.seed)[0]
    ids = tok(sample.prompt(tok), return_tensors="pt").input_ids
    print(f"{args.task} sample (test split, seed {args.seed}): {ids.shape[1]} prompt tokens; "
          f"question: {sample.question!r}; gold answer: {sample.answer!r}\n")

    runs = [("full cache", FullCache())] + ([(f"NAMM ({Path(args.namm).name})", namm)] if namm else [])
    rows = []
    for label, policy in runs:
        res = generate(model, ids, policy, max_new_tokens=8, eos_token_id=tok.eos_token_id, tokenizer=tok)
        rows.append((label, res))
        if policy.name == "namm":
            budget = max(min(res.realised_fraction, 1.0), 0.01)
            rows.append((f"H2O @ NAMM's cache", generate(model, ids, H2O(float(budget)), max_new_tokens=8,
                                                          eos_token_id=tok.eos_token_id, tokenizer=tok)))
    if namm is None:
        rows.append(("H2O @ 50%", generate(model, ids, H2O(0.5), max_new_tokens=8,
                                           eos_token_id=tok.eos_token_id, tokenizer=tok)))
    print(f"| policy | answer | correct | realised cache % | prefill s | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for label, res in rows:
        answer = res.text[0].strip()
        print(f"| {label} | {answer!r} | {sample.answer in answer} | {100 * res.realised_fraction:.1f} | "
              f"{res.prefill_seconds:.1f} | {res.decode_tokens_per_second:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
