"""Full-cache reference evaluation of the language tasks: one prefill per sample gives the teacher-forced
answer log-likelihood and the greedy generation.

    python -m namm_transfer.language.evaluate --task passkey --tokens 1024 --n 16 [--style chat]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch

from .tasks import (DEFAULT_STYLE, TASKS, TaskSample, answer_logprob_from_logits, encode_prompt_answer,
                    make_split, score_generation)


@dataclass
class SampleResult:
    task: str
    seed: int
    prompt_tokens: int
    answer: str
    prediction: str
    em: float
    char_acc: float
    logprob: float
    token_accuracy: float
    greedy_match: bool
    seconds: float


@torch.no_grad()
def evaluate_sample(model, tokenizer, sample: TaskSample, style: str = DEFAULT_STYLE,
                    max_new_tokens: int = 8) -> SampleResult:
    """Prefill the prompt into a DynamicCache, score the gold continuation teacher-forced, crop the cache back
    and decode greedily."""
    from transformers import DynamicCache
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    p, a = encode_prompt_answer(tokenizer, sample.prompt(tokenizer, style), sample.continuation)
    n = len(p)
    cache = DynamicCache(config=model.config)
    last = model(input_ids=p[None].to(device), cache=cache, use_cache=True).logits[0, -1]
    pos = torch.arange(n, n + len(a), device=device)[None]
    ans_logits = model(input_ids=a[None].to(device), cache=cache, use_cache=True, position_ids=pos).logits[0]
    ll = answer_logprob_from_logits(torch.cat([last[None], ans_logits[:-1]]), a)
    cache.crop(-len(a))  # drop the teacher-forced answer again (5.x: negative = tokens to remove)
    eos = tokenizer.eos_token_id
    out, logits = [], last
    for step in range(max_new_tokens):
        tok = int(logits.argmax())
        if tok == eos:
            break
        out.append(tok)
        pos = torch.tensor([[n + step]], device=device)
        logits = model(input_ids=torch.tensor([[tok]], device=device), cache=cache, use_cache=True,
                       position_ids=pos).logits[0, -1]
    pred = tokenizer.decode(out, skip_special_tokens=True)
    s = score_generation(pred, sample.answer)
    return SampleResult(sample.task, sample.seed, n, sample.answer, pred, s["em"], s["char_acc"], ll.logprob,
                        ll.token_accuracy, ll.greedy_match, time.perf_counter() - t0)


def summarize(results: list[SampleResult]) -> dict[str, float]:
    k = max(len(results), 1)
    return {"n": len(results), "em": sum(r.em for r in results) / k, "char_acc": sum(r.char_acc for r in results) / k,
            "tf_em": sum(r.greedy_match for r in results) / k, "logprob": sum(r.logprob for r in results) / k,
            "prompt_tokens": sum(r.prompt_tokens for r in results) / k,
            "seconds_per_sample": sum(r.seconds for r in results) / k}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", choices=TASKS, default="passkey")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--style", choices=["raw", "chat"], default=DEFAULT_STYLE)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--option", action="append", default=[], help="task option key=value (int if numeric)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .models import load_causal_lm
    model, tok = load_causal_lm(args.model, attn_implementation="sdpa")
    options = {k: (int(v) if v.isdigit() else v) for k, v in (o.split("=", 1) for o in args.option)}
    samples = make_split(args.task, args.split, args.n, args.tokens, tok, **options)
    results = []
    for s in samples:
        results.append(evaluate_sample(model, tok, s, args.style, args.max_new_tokens))
        if args.verbose:
            print(json.dumps(asdict(results[-1])), flush=True)
    print(json.dumps({"task": args.task, "tokens": args.tokens, "style": args.style, "options": options,
                      **summarize(results)}), flush=True)


if __name__ == "__main__":
    main()
