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
import torch.nn.functional as F

from ..adapters.causal_lm import prefill
from ..attention import enable_memory_attention
from ..cache import MemoryCache
from ..policies import LayerView, MemoryPolicy
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
    evict_until: int | None = None  # last token count at which an eviction step could run (protocol)


@torch.no_grad()
def evaluate_sample(model, tok, sample: TaskSample, policy: MemoryPolicy, label: str, key: str,
                    style: str = "raw", chunk: int = 128, max_new_tokens: int = 8,
                    budget: float | None = None, evict_until: int | None = None) -> Record:
    """`evict_until`: eviction steps only at token counts <= this (see tasks.eviction_limit); None = anywhere,
    the answer included."""
    return evaluate_batch(model, tok, [sample], policy, label, [key], style, chunk, max_new_tokens, [budget],
                          [evict_until])[0]


@torch.no_grad()
def evaluate_batch(model, tok, samples: list[TaskSample], policy: MemoryPolicy, label: str, keys: list[str],
                   style: str = "raw", chunk: int = 128, max_new_tokens: int = 8,
                   budgets: list[float | None] | None = None, evict_until: list[int | None] | None = None
                   ) -> list[Record]:
    """Evaluate several samples under one policy in one left-padded batch (row b = samples[b]; a baseline with
    per-sample budgets takes them as a list). Each row gets what the sample alone gets: its own positions,
    eviction steps and `evict_until`. Throughputs are the batch's: real prompt tokens / prefill time, generated
    tokens / decode time."""
    enable_memory_attention(model)
    device = next(model.parameters()).device
    b = len(samples)
    prompts = [tok(s.prompt(tok, style), return_tensors="pt").input_ids[0] for s in samples]
    answers = [tok(s.continuation, add_special_tokens=False, return_tensors="pt").input_ids[0].to(device)
               for s in samples]
    width = max(len(p) for p in prompts)
    ids = torch.stack([F.pad(p, (width - len(p), 0)) for p in prompts]).to(device)
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long().to(device)
    until = None if evict_until is None or all(u is None for u in evict_until) else list(evict_until)
    cache = MemoryCache(policy, evict_until=until)
    t0 = time.perf_counter()
    logits, _, _ = prefill(model, ids, cache, chunk, attention_mask=None if b == 1 else mask)
    t1 = time.perf_counter()
    # teacher-forced branch, row by row on a copy of its cache (nothing is due for eviction right after the prefill)
    answer_probs = []
    for r, answer in enumerate(answers):
        row_logits = [logits[r]]
        if len(answer) > 1:  # chunks cut at eviction boundaries, like the prompt
            _, chunks, _ = prefill(model, answer[None, :-1], cache.fork(policy, 1, rows=[r]), chunk, keep_logits=True)
            row_logits += [row for c in chunks for row in c[0]]
        logp = torch.stack(row_logits).log_softmax(-1)
        answer_probs.append(float(logp.gather(-1, answer[:, None]).exp().mean()))
    # greedy branch, all rows together
    t2 = time.perf_counter()
    generated, done, eos = [[] for _ in range(b)], [False] * b, tok.eos_token_id
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        for r in range(b):
            done[r] = done[r] or int(nxt[r]) == eos
            if not done[r]:
                generated[r].append(int(nxt[r]))
        if all(done) or step + 1 == max_new_tokens:
            break
        pos = torch.tensor(cache.row_tokens_seen(), device=device)[:, None]
        logits = model(input_ids=nxt[:, None], cache=cache, use_cache=True, position_ids=pos).logits[:, -1].float()
    t3 = time.perf_counter()
    realised, kept = cache.row_fractions(), cache.kept_fractions()
    n_generated = sum(len(g) for g in generated)
    prefill_speed = sum(len(p) for p in prompts) / (t1 - t0)
    decode_speed = n_generated / (t3 - t2) if n_generated else float("nan")
    out = []
    for r, sample in enumerate(samples):
        prediction = tok.decode(generated[r], skip_special_tokens=True)
        scores = score_generation(prediction, sample.answer)
        out.append(Record(label, sample.task, keys[r], len(prompts[r]), sample.answer, prediction, scores["em"],
                          scores["char_acc"], answer_probs[r], realised[r], kept[r],
                          None if budgets is None else budgets[r], prefill_speed, decode_speed,
                          None if evict_until is None else evict_until[r]))
    return out


class _AttentionRecorder(MemoryPolicy):
    """Keeps everything; at its one step (after `length` tokens) stores, per layer, the attention mass each slot
    received from the queries at positions >= `first_query`, summed over those queries (GQA-mean per KV head)."""

    name = "attention-recorder"
    needs_attention = True  # evicts stays True: the cache runs the step (which keeps every slot)

    def __init__(self, length: int, first_query: int):
        super().__init__(delay=length)
        self.first_query, self.scores = first_query, {}

    def step(self, view: LayerView):
        t0 = view.tokens_seen - view.n_new  # position of the first buffered query
        self.scores[view.layer_idx] = view.attention[0, :, max(0, self.first_query - t0):, :].float().sum(1).cpu()
        return view.valid.clone(), {}


@torch.no_grad()
def future_attention_scores(model, tok, sample: TaskSample, first_query: int, style: str = "raw",
                            chunk: int = 128) -> list[torch.Tensor]:
    """The oracle's scores for one sample: read the prompt and the gold answer (teacher-forced, as the answer
    probability is scored) with the full cache and return, per layer, the (H_kv, L) attention mass each position
    receives from the queries at positions >= `first_query` (the tokens read after the last eviction step: the
    question and the answer under context-only). Uses the gold answer: an upper reference, not a policy."""
    prompt = tok(sample.prompt(tok, style), return_tensors="pt").input_ids[0]
    answer = tok(sample.continuation, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return future_attention_from_ids(model, torch.cat([prompt, answer[:-1]])[None], first_query, chunk)


@torch.no_grad()
def future_attention_from_ids(model, ids: torch.Tensor, first_query: int, chunk: int = 128) -> list[torch.Tensor]:
    """future_attention_scores for a token stream `ids` (1, n) already built (prompt + gold answer but its last
    token, as evolution.fitness.EncodedSample.stream)."""
    enable_memory_attention(model)
    ids = ids.to(next(model.parameters()).device)
    if not 0 <= first_query < ids.shape[1]:
        raise ValueError(f"first_query {first_query} is outside the {ids.shape[1]} tokens read")
    recorder = _AttentionRecorder(ids.shape[1], first_query)
    prefill(model, ids, MemoryCache(recorder), chunk)
    layers = sorted(recorder.scores)
    if layers != list(range(len(layers))):
        raise RuntimeError(f"attention was captured for layers {layers}, not for every layer from 0")
    return [recorder.scores[i] for i in layers]


def append_record(path: Path, rec: Record) -> None:
    records.append_record(path, asdict(rec))


def _paired(rows: list[dict], policy: str, task: str) -> dict[str, dict]:
    return {r["key"]: r for r in rows if r["policy"] == policy and (task == "all" or r["task"] == task)}


def summarise(rows: list[dict], policies: list[str]) -> tuple[list[dict], str]:
    """Per (task, policy) and overall means with bootstrap 95% intervals (stratified by task for "all"); the
    ratio to full cache is paired with full cache on the same samples. Markdown table."""
    from ..reporting.bootstrap import mean_ci, ratio_ci
    tasks = sorted({r["task"] for r in rows})
    table, lines = [], ["| task | policy | n | EM [95% CI] | char acc | answer p [95% CI] | answer p / full [95% CI] "
                        "| realised cache % | prefill tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks + ["all"]:
        full = _paired(rows, "full", task)
        for pol in policies:
            by_key = _paired(rows, pol, task)
            if not by_key:
                continue
            sel = list(by_key.values())
            groups = [r["task"] for r in sel]
            m = lambda k: sum(r[k] for r in sel) / len(sel)  # noqa: E731
            em, em_lo, em_hi = mean_ci([r["em"] for r in sel], groups=groups)
            p, p_lo, p_hi = mean_ci([r["answer_prob"] for r in sel], groups=groups)
            row = {"task": task, "policy": pol, "n": len(sel), "em": em, "em_ci95": [em_lo, em_hi],
                   "char_acc": m("char_acc"), "answer_prob": p, "answer_prob_ci95": [p_lo, p_hi],
                   "relative_to_full": None, "relative_to_full_ci95": None,
                   "realised_cache_pct": 100 * m("realised_fraction"), "prefill_tokens_per_s": m("prefill_tokens_per_s")}
            shared = [k for k in by_key if k in full]
            if shared:
                rel, lo, hi = ratio_ci([by_key[k]["answer_prob"] for k in shared],
                                       [full[k]["answer_prob"] for k in shared],
                                       groups=[by_key[k]["task"] for k in shared])
                row["relative_to_full"], row["relative_to_full_ci95"] = rel, [lo, hi]
            table.append(row)
            rel = (f"{row['relative_to_full']:.3f} [{row['relative_to_full_ci95'][0]:.3f}, "
                   f"{row['relative_to_full_ci95'][1]:.3f}]") if shared else "-"
            lines.append(f"| {task} | {pol} | {row['n']} | {em:.3f} [{em_lo:.3f}, {em_hi:.3f}] | "
                         f"{row['char_acc']:.3f} | {p:.3f} [{p_lo:.3f}, {p_hi:.3f}] | {rel} | "
                         f"{row['realised_cache_pct']:.1f} | {row['prefill_tokens_per_s']:.0f} |")
    return table, "\n".join(lines) + "\n"


def paired_differences(rows: list[dict], method: str, baselines: list[str]) -> tuple[list[dict], str]:
    """`method` - each baseline on the samples both ran (answer p and EM), with paired bootstrap 95% intervals
    (stratified by task for "all"). A difference whose interval holds 0 is inside the noise."""
    from ..reporting.bootstrap import paired_difference_ci
    tasks = sorted({r["task"] for r in rows})
    out, lines = [], [f"| task | {method} - baseline | n | answer p diff [95% CI] | EM diff [95% CI] | verdict |",
                      "|---|---|---|---|---|---|"]
    for task in tasks + ["all"]:
        mine = _paired(rows, method, task)
        for base in baselines:
            theirs = _paired(rows, base, task)
            shared = [k for k in mine if k in theirs]
            if not shared:
                continue
            groups = [mine[k]["task"] for k in shared]
            dp = paired_difference_ci([mine[k]["answer_prob"] for k in shared],
                                      [theirs[k]["answer_prob"] for k in shared], groups=groups)
            de = paired_difference_ci([mine[k]["em"] for k in shared], [theirs[k]["em"] for k in shared],
                                      groups=groups)
            verdict = ("above" if dp[1] > 0 else "below" if dp[2] < 0 else "inside the noise") + " (answer p)"
            out.append({"task": task, "method": method, "baseline": base, "n": len(shared),
                        "answer_prob_diff": dp[0], "answer_prob_diff_ci95": [dp[1], dp[2]],
                        "em_diff": de[0], "em_diff_ci95": [de[1], de[2]], "verdict": verdict})
            lines.append(f"| {task} | {base} | {len(shared)} | {dp[0]:+.3f} [{dp[1]:+.3f}, {dp[2]:+.3f}] | "
                         f"{de[0]:+.3f} [{de[1]:+.3f}, {de[2]:+.3f}] | {verdict} |")
    return out, "\n".join(lines) + "\n"
