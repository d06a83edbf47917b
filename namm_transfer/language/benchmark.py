"""Held-out language evaluation of memory policies: greedy answer + teacher-forced answer probability.

Per sample and policy: one chunked prefill with the policy managing the cache, then the cache is forked:
one branch scores the gold answer teacher-forced (mean p of its tokens), the other decodes greedily
(exact match / character accuracy of the answer). Results are appended to a JSONL file as they come, so an
interrupted evaluation resumes without redoing work. Baselines can be matched, per sample, to the realised
cache fraction of a reference policy (NAMM).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..adapters.causal_lm import prefill
from ..attention import enable_memory_attention
from ..cache import MemoryCache
from ..policies import MemoryPolicy
from .. import records
from .tasks import TaskSample, score_generation


@dataclass
class Record:
    policy: str
    task: str
    key: str
    prompt_tokens: int
    answer: str
    prediction: str
    em: float
    char_acc: float
    answer_prob: float
    realised_fraction: float  # stored / seen tokens at the end (mean over layers)
    kept_fraction: float  # stored / seen right after the last eviction step (what baselines are matched to)
    budget: float | None
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


@torch.no_grad()
def evaluate_sample(model, tok, sample: TaskSample, policy: MemoryPolicy, label: str, key: str,
                    style: str = "raw", chunk: int = 128, max_new_tokens: int = 8,
                    budget: float | None = None) -> Record:
    enable_memory_attention(model)
    device = next(model.parameters()).device
    ids = tok(sample.prompt(tok, style), return_tensors="pt").input_ids.to(device)
    answer = tok(sample.continuation, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    cache = MemoryCache(policy)
    t0 = time.perf_counter()
    logits, _, _ = prefill(model, ids, cache, chunk)
    t1 = time.perf_counter()
    # teacher-forced branch (a copy of the cache; nothing is due for eviction right after the prefill)
    tf_cache = cache.fork(policy, 1)
    n = ids.shape[1]
    tf_logits = [logits]
    if answer.shape[1] > 1:  # chunks cut at eviction boundaries, like the prompt
        _, chunks, _ = prefill(model, answer[:, :-1], tf_cache, chunk, keep_logits=True)
        tf_logits += [row for c in chunks for row in c[0]]
    logp = torch.stack([l.reshape(-1) for l in tf_logits]).log_softmax(-1)
    answer_prob = float(logp.gather(-1, answer[0][:, None]).exp().mean())
    # greedy branch
    generated, eos = [], tok.eos_token_id
    t2 = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = int(logits.argmax(-1)[0])
        if nxt == eos:
            break
        generated.append(nxt)
        if step + 1 == max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]], device=device), cache=cache, use_cache=True,
                    position_ids=torch.tensor([[cache.tokens_seen]], device=device))
        logits = out.logits[:, -1].float()
    t3 = time.perf_counter()
    prediction = tok.decode(generated, skip_special_tokens=True)
    scores = score_generation(prediction, sample.answer)
    last = {r.layer: r.after / r.tokens_seen for r in cache.log}
    kept = sum(last.values()) / len(last) if last else 1.0
    return Record(label, sample.task, key, n, sample.answer, prediction, scores["em"], scores["char_acc"],
                  answer_prob, cache.realised_fraction(), kept, budget, n / (t1 - t0),
                  len(generated) / (t3 - t2) if generated else float("nan"))


def append_record(path: Path, rec: Record) -> None:
    records.append_record(path, asdict(rec))


def summarise(rows: list[dict], policies: list[str]) -> tuple[list[dict], str]:
    """Per (task, policy) and overall means; markdown table with each policy's score relative to full cache."""
    tasks = sorted({r["task"] for r in rows})
    table, lines = [], ["| task | policy | n | EM | char acc | answer p | answer p / full | realised cache % "
                        "| prefill tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks + ["all"]:
        full = [r for r in rows if r["policy"] == "full" and (task == "all" or r["task"] == task)]
        full_p = sum(r["answer_prob"] for r in full) / len(full) if full else float("nan")
        for pol in policies:
            sel = [r for r in rows if r["policy"] == pol and (task == "all" or r["task"] == task)]
            if not sel:
                continue
            m = lambda k: sum(r[k] for r in sel) / len(sel)  # noqa: E731
            row = {"task": task, "policy": pol, "n": len(sel), "em": m("em"), "char_acc": m("char_acc"),
                   "answer_prob": m("answer_prob"), "relative_to_full": m("answer_prob") / full_p if full else None,
                   "realised_cache_pct": 100 * m("realised_fraction"), "prefill_tokens_per_s": m("prefill_tokens_per_s")}
            table.append(row)
            rel = f"{row['relative_to_full']:.3f}" if row["relative_to_full"] is not None else "-"
            lines.append(f"| {task} | {pol} | {row['n']} | {row['em']:.3f} | {row['char_acc']:.3f} | "
                         f"{row['answer_prob']:.3f} | {rel} | {row['realised_cache_pct']:.1f} | "
                         f"{row['prefill_tokens_per_s']:.0f} |")
    return table, "\n".join(lines) + "\n"
