"""Scoring NAMM population members on language samples, with the shared first block computed once.

A sample's task score is the teacher-forced probability of its gold answer tokens (mean over tokens):
continuous, so small populations get a usable signal from a 135M model whose exact-match is noisy.
All members see the same samples; each member's cache is its own batch row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.causal_lm import chunk_bounds, last_logits_only
from ..cache import MemoryCache
from ..policies import HoldPolicy, MemoryPolicy, values_at_positions


@dataclass
class EncodedSample:
    key: str
    task: str
    stream: torch.Tensor  # (1, P + A - 1): prompt then the answer without its last token (teacher forcing)
    answer: torch.Tensor  # (A,)
    evict_until: int | None = None  # eviction steps only at token counts <= this (None: anywhere)

    @property
    def length(self) -> int:
        return self.stream.shape[1]


def encode_sample(sample, tokenizer, style: str = "raw", tokens: int | None = None,
                  protocol: str = "anywhere") -> EncodedSample:
    """Prompt + answer as one teacher-forced stream. `protocol`: where eviction steps may run — "anywhere"
    (every `delay` tokens, into the question and the answer), or one of language.tasks.PROTOCOLS
    ("context-only": while the context is read, as eval_language.py evaluates by default)."""
    prompt = tokenizer(sample.prompt(tokenizer, style), return_tensors="pt").input_ids
    answer = tokenizer(sample.continuation, add_special_tokens=False, return_tensors="pt").input_ids[0]
    key = f"{sample.task}/{sample.seed}/{tokens or prompt.shape[1]}/{style}"  # the full-cache reference's key
    until = None
    if protocol != "anywhere":
        from ..language.tasks import eviction_limit
        until = eviction_limit(sample, tokenizer, protocol, style)
    return EncodedSample(key, sample.task, torch.cat([prompt, answer[None, :-1]], dim=1), answer, until)


@dataclass
class MemberScores:
    score: torch.Tensor  # (rows,) mean p(gold answer token)
    token_accuracy: torch.Tensor  # (rows,) fraction of answer tokens that are the argmax
    cache_fraction: torch.Tensor  # (rows,) stored / seen tokens at the end, mean over layers and KV heads
    kept_fraction: torch.Tensor  # (rows,) stored / seen right after each layer's last eviction step, mean over
    #                              layers (MemoryCache.kept_fractions); 1 when nothing was evicted
    retained_mass: torch.Tensor | None = None  # (rows,) with an oracle table: see retained_mass


@torch.no_grad()
def score_rows(model, sample: EncodedSample, policy: MemoryPolicy, rows: int, chunk: int = 128,
               share_prefix: bool = True, oracle: list[torch.Tensor] | None = None) -> MemberScores:
    """Run `sample` with `rows` batch rows under `policy` (row b = population member b of the policy).

    With `share_prefix`, the tokens before the first eviction step are identical for every member, so they run
    once at batch 1 (HoldPolicy buffers the attention) and the cache is forked to `rows` rows at the boundary.
    With `oracle` (per layer (H_kv, L): language.benchmark.future_attention_from_ids of this sample's stream from its
    eviction limit), each row's retained_mass at the end is returned too.
    """
    if oracle is not None and sample.evict_until is None:
        raise ValueError(f"{sample.key}: retained oracle mass needs an eviction limit (a context-only or query-aware "
                         "sample): it scores what the cache holds when the question is read")
    n = sample.length
    a = sample.answer.numel()
    device = next(model.parameters()).device
    stream = sample.stream.to(device)
    fork_at = policy.delay if (share_prefix and rows > 1 and policy.evicts and n > policy.delay) else 0
    if fork_at and fork_at % chunk:
        raise ValueError(f"delay {policy.delay} must be a multiple of the chunk size {chunk} to share the prefix")
    cache = MemoryCache(HoldPolicy(policy) if fork_at else policy, evict_until=sample.evict_until)
    # the output head only where answer tokens are predicted (one position elsewhere): see last_logits_only
    answer_logits = []
    for s, e in chunk_bounds(0, n, chunk):
        if fork_at and s == fork_at:
            cache = cache.fork(policy, rows)
        b = 1 if (fork_at and s < fork_at) else rows
        pos = torch.arange(s, e, device=device)[None].expand(b, -1)
        lo = max(s, n - a)
        keep = last_logits_only(model, max(e - lo, 1))
        logits = model(input_ids=stream[:, s:e].expand(b, -1), cache=cache, use_cache=True,
                       position_ids=pos, **keep).logits
        if lo < e:
            answer_logits.append(logits[:, lo - e:].float().expand(rows, -1, -1))  # the last e - lo
    cache.assert_captured()
    mass = None if oracle is None else retained_mass(cache, oracle, sample.evict_until)
    logp = torch.cat(answer_logits, dim=1).log_softmax(-1)  # (rows, A, V)
    gold = sample.answer.to(device)
    p = logp.gather(-1, gold.view(1, -1, 1).expand(rows, -1, 1)).squeeze(-1).exp()
    acc = (logp.argmax(-1) == gold[None]).float()
    frac = torch.stack([l.valid.float().sum(-1).mean(-1) for l in cache.kv_layers]).mean(0) / cache.tokens_seen
    return MemberScores(p.mean(-1).cpu(), acc.mean(-1).cpu(), frac.cpu(), torch.tensor(cache.kept_fractions()), mass)


def retained_mass(cache: MemoryCache, oracle: list[torch.Tensor], first_query: int) -> torch.Tensor:
    """(rows,) share of the oracle's attention mass on the tokens before `first_query` that each row's cache still
    holds, mean over layers and KV heads. `oracle[l]` (H_kv, L): the mass each position received from the queries
    at positions >= first_query in the unmodified model (language.benchmark.future_attention_from_ids)."""
    if len(oracle) != len(cache.kv_layers):
        raise ValueError(f"oracle scores for {len(oracle)} layers, the cache has {len(cache.kv_layers)}")
    shares = []
    for layer, mass in zip(cache.kv_layers, oracle):
        pos, valid = layer.positions, layer.valid  # (B, H, N)
        mass = mass.to(pos.device, torch.float64)
        if mass.shape[0] != pos.shape[1]:
            raise ValueError(f"oracle scores for {mass.shape[0]} KV heads, the cache has {pos.shape[1]}")
        inside = valid & (pos >= 0) & (pos < first_query)
        kept = values_at_positions(mass, pos)
        total = mass[:, :first_query].sum(-1).clamp_min(1e-30)  # (H,)
        shares.append(((kept * inside).sum(-1) / total).mean(-1))  # (B,)
    return torch.stack(shares).mean(0).float().cpu()
