"""Held-out language evaluation: full cache vs NAMM vs H2O / L2 / recency / SnapKV at NAMM's cache size.

    python scripts/eval_language.py [--namm PATH] [--tasks passkey,kv_retrieval,passage_retrieval]
        [--tokens 1024] [--n 8] [--policies full,namm,h2o,l2,recency,snapkv] [--out runs/eval_language]
    torchrun --nproc-per-node 8 scripts/eval_language.py --device cuda --samples-per-task 64 ...  # over 8 GPUs

Samples come from the test split (seeds disjoint from training), or with --split validation from the split the
search validates on (to pick a NAMM under this protocol without touching the test split). Baselines run, per
sample, at the realised cache fraction NAMM reached on that sample (or at --budget when NAMM is not in the list).
Where eviction happens (--protocol): "context-only" (default) runs eviction steps only while the context is read,
then reads the question and the answer into the pruned cache; "query-aware" compresses the question too.
Eviction never runs inside the answer. `oracle` (not in the default list) is an upper reference, not a policy: it
keeps the tokens that the question and the gold answer attend to most in the unmodified model (it knows what will
be asked and answered). Rerunning the same command resumes from <out>/records.jsonl. Writes
summary.json / summary.md (means with bootstrap 95% intervals) and paired.json (NAMM - each baseline on the same
samples, paired 95% intervals).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer import distributed, make_policy  # noqa: E402
from namm_transfer.cli import (UsageError, budget, check_device, check_model_path, default_out, int_in,  # noqa: E402
                               load_namm_arg, name_list, out_help, run_cli)
from namm_transfer.language.benchmark import (evaluate_batch, future_attention_scores, paired_differences,  # noqa: E402
                                              summarise)
from namm_transfer.language.tasks import PROTOCOLS, SPLIT_SIZE, STYLES, TASKS, eviction_limit, make_split  # noqa: E402
from namm_transfer.policies import POLICIES  # noqa: E402
from namm_transfer.records import in_repo, write_json, write_text  # noqa: E402
from namm_transfer.runs import content_hash, model_hash  # noqa: E402

# protocol of runs recorded before --protocol existed: eviction steps anywhere, the answer included
LEGACY = {"protocol": "anywhere (before --protocol)", "split": "test"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--namm", default=None, help="NAMM checkpoint folder or official ckpt.pt (default: the shipped "
                                                 "namm_transfer/checkpoints/namm-smollm2)")
    ap.add_argument("--tasks", type=name_list(TASKS), default=list(TASKS), help=", ".join(TASKS))
    ap.add_argument("--split", default="test", choices=("test", "validation"),
                    help="prompts from the held-out test split (default) or the search's validation split")
    ap.add_argument("--tokens", type=int_in(64), default=1024, help="target prompt length in tokens (>= 64)")
    ap.add_argument("--n", "--samples-per-task", dest="n", type=int_in(1, SPLIT_SIZE), default=8,
                    help="samples per task (under torchrun write --samples-per-task: torchrun reads --n as an "
                         "abbreviation of its own options)")
    ap.add_argument("--policies", type=name_list(sorted(POLICIES)), default="full,namm,h2o,l2,recency,snapkv")
    ap.add_argument("--budget", type=budget, default=0.5, help="baseline budget when NAMM is not evaluated")
    ap.add_argument("--delay", type=int_in(1), default=512, help="baseline eviction period when NAMM is not evaluated")
    ap.add_argument("--protocol", default="context-only", choices=PROTOCOLS,
                    help="where eviction steps may run: while the context is read, or through the question too")
    ap.add_argument("--style", default="raw", choices=STYLES)
    ap.add_argument("--chunk", type=int_in(1), default=128)
    ap.add_argument("--max-new-tokens", type=int_in(1), default=8)
    ap.add_argument("--batch-size", type=int_in(1), default=1,
                    help="samples evaluated together in one left-padded batch (results do not depend on it)")
    ap.add_argument("--out", default=None, help=out_help("eval_language"))
    ap.add_argument("--threads", type=int_in(1), default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.argv = argv  # as given (None: sys.argv[1:]); recorded in <out>/command.json
    return args


def load_model(name: str, device: str):
    """(model, tokenizer, content hash): tiny-/random- models are generated with a fixed seed."""
    if name.startswith(("tiny-", "random-")):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train_namm import load_model as load_generated
        try:
            return (*load_generated(name, device), "generated (seed 0)")
        except ValueError as err:  # tiny-<unknown arch>, random-<not smollm2>
            raise UsageError(f"--model {name}: {err}") from None
    from namm_transfer.language.models import load_causal_lm, resolve_model_path
    check_model_path(name)
    try:
        model, tok = load_causal_lm(name, device=device)
    except (OSError, ValueError) as err:  # not found; no tokenizer or not a causal LM in the folder
        raise UsageError(f"cannot load model {name!r}: {str(err).splitlines()[0]}\nPass a Hub id or a folder "
                         "holding a causal LM and its tokenizer, smollm2-135m, tiny-<arch> or random-smollm2.") from None
    return model, tok, model_hash(resolve_model_path(name))


def position_limit(model) -> int | None:
    """The longest sequence a model with learned absolute position embeddings (GPT-2, OPT, ...) can read; None for
    the others (RoPE and the like have no hard limit)."""
    cfg = model.config
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    words = model.get_input_embeddings()
    learned = limit is not None and any(isinstance(m, torch.nn.Embedding) and m is not words
                                        and limit <= m.num_embeddings <= limit + 2 for m in model.modules())
    return limit if learned else None


def check_fits(args, model, tok) -> None:
    """UsageError before any work when --style chat meets a tokenizer without a chat template, or a prompt plus its
    answer (or the generated tokens) would run past the model's learned position embeddings."""
    if args.style == "chat" and not getattr(tok, "chat_template", None):
        raise UsageError(f"--style chat: the tokenizer of {args.model} has no chat template; use --style raw")
    limit = position_limit(model)
    if limit is None:
        return
    longest = max(len(tok(s.prompt(tok, args.style)).input_ids)
                  + max(len(tok(s.continuation, add_special_tokens=False).input_ids), args.max_new_tokens)
                  for task in args.tasks for s in make_split(task, args.split, args.n, args.tokens, tok))
    if longest > limit:
        raise UsageError(f"--tokens {args.tokens}: prompts plus answers reach {longest} tokens, but {args.model} has "
                         f"learned position embeddings for {limit}; use --tokens {max(64, args.tokens - (longest - limit))}"
                         " or less")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


def run(args) -> int:
    torch.set_num_threads(args.threads)
    check_device(args.device)
    world = distributed.init(args.device)  # under torchrun: this rank's share of the samples, its own GPU
    policies = args.policies
    namm = load_namm_arg(args.namm) if "namm" in policies else None
    namm_path = in_repo(Path(namm.source).resolve()) if namm else None
    model, tok, model_sha = world.in_turn(lambda: load_model(args.model, args.device))  # a first load fills a cache
    check_fits(args, model, tok)
    settings = {"model": args.model, "model_hash": model_sha, "namm": namm_path,
                "namm_hash": content_hash(namm.source) if namm else None, "split": args.split, "tokens": args.tokens,
                "protocol": args.protocol, "style": args.style, "chunk": args.chunk,
                "max_new_tokens": args.max_new_tokens, "budget": args.budget, "delay": args.delay,
                "device": args.device}
    info = {"tasks": ",".join(args.tasks), "n": args.n, "policies": ",".join(policies),
            "batch_size": args.batch_size}
    out = Path(args.out or default_out("eval_language"))
    with distributed.open_run(world, out, settings, "scripts/eval_language.py", args.argv,
                              fillable=("namm", "namm_hash"), legacy=LEGACY, info=info):
        evaluate(args, out, model, tok, namm, namm_path, world)
    return 0


def evaluate(args, out: Path, model, tok, namm, namm_path: str | None, world: distributed.World) -> None:
    """Run what records.jsonl does not hold yet (under torchrun: this rank's share of the batches); write
    summary.json / summary.md / paired.json of this command's samples and policies (rank 0)."""
    policies = args.policies
    journal = distributed.RankRecords(out / "records.jsonl", world, key=lambda r: (r["policy"], r["key"]))
    done = journal.load()
    samples = [(task, i, s) for task in args.tasks
               for i, s in enumerate(make_split(task, args.split, args.n, args.tokens, tok))]
    keys = [(name, f"{task}/{sample.seed}/{args.tokens}") for task, _, sample in samples for name in policies]
    # the unit of work is one process's batch with all its policies: baselines take NAMM's cache on the same sample
    batches = [[(f"{task}/{sample.seed}/{args.tokens}", sample) for task, _, sample in
                samples[first:first + args.batch_size]] for first in range(0, len(samples), args.batch_size)]
    order = [(name, key) for batch in batches for name in policies for key, _ in batch]  # one process's order
    mine = world.shard([b for b in batches if any((name, key) not in done for name in policies for key, _ in b)])
    from tqdm import tqdm
    bar = tqdm(total=sum(map(len, mine)) * len(policies), disable=args.no_progress or not world.main, desc="eval",
               unit="run")
    for batch in mine:
        for name in policies:  # NAMM before the baselines matched to its cache on each sample
            todo = [(key, sample) for key, sample in batch if (name, key) not in done]
            bar.update(len(batch) - len(todo))
            if not todo:
                continue
            budgets = [None] * len(todo)
            until = [eviction_limit(s, tok, args.protocol, args.style) for _, s in todo]
            if name == "full" or name == "namm":
                policy = make_policy("full") if name == "full" else namm
            else:
                refs = [done.get(("namm", key)) for key, _ in todo]
                budgets = [min(max(ref["kept_fraction"], 1e-3), 1.0) if ref else args.budget for ref in refs]
                extra = {} if name != "oracle" else {"scores": [
                    future_attention_scores(model, tok, s, u, args.style, args.chunk) for (_, s), u in zip(todo, until)]}
                policy = make_policy(name, budget=budgets, delay=namm.delay if namm else args.delay, **extra)
            recs = evaluate_batch(model, tok, [s for _, s in todo], policy, name, [k for k, _ in todo], args.style,
                                  args.chunk, args.max_new_tokens, budgets, until)
            for rec in recs:
                journal.add(asdict(rec))
            bar.update(len(todo))
    bar.close()
    done = journal.merge(order)
    if not world.main:
        return
    rows = [done[k] for k in keys]  # exactly this command's samples and policies
    table, md = summarise(rows, policies)
    if "namm" in policies:
        paired, paired_md = paired_differences(rows, "namm", [p for p in policies if p not in ("full", "namm")])
        write_json(out / "paired.json", paired)
        md += "\nPaired differences, NAMM - baseline at NAMM's cache (same samples):\n\n" + paired_md
    baselines = ("baselines at the cache fraction NAMM kept after its last eviction step on each sample"
                 if "namm" in policies else f"baselines at --budget {args.budget:g} (kept after each eviction "
                 f"step, every {args.delay} tokens; the realised cache also counts what is read after the last one)")
    oracle = ("; oracle: an upper reference that knows the question and the gold answer (keeps the tokens they "
              "attend to most in the unmodified model), not a policy" if "oracle" in policies else "")
    note = (f"\nModel {args.model}; NAMM {namm_path or '-'}; {args.split} split, {args.n} samples per "
            f"task of ~{args.tokens} prompt tokens; protocol {args.protocol}; {baselines}{oracle}; 95% intervals: "
            f"bootstrap over samples (10,000 resamples, stratified by task for 'all').\n")
    write_json(out / "summary.json", table)
    write_text(out / "summary.md", md + note)
    print(md + note)


if __name__ == "__main__":
    sys.exit(main())
