"""Causal-LM adapter: chunked prefill + greedy generation with any memory policy."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from ..attention import enable_memory_attention
from ..cache import MemoryCache
from ..policies import MemoryPolicy


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per batch row
    text: list[str] | None
    cache_lengths: list[float]  # per layer, valid slots at the end (mean over rows and KV heads)
    tokens_seen: int
    realised_fraction: float  # mean over layers of stored / seen at the end
    mean_fraction: float  # the same, averaged over every forward call (prefill chunks and decode steps)
    prefill_seconds: float
    decode_seconds: float
    last_logits: torch.Tensor = field(repr=False, default=None)
    step_logits: list[torch.Tensor] = field(repr=False, default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        n = len(self.tokens[0]) if self.tokens else 0
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def chunk_bounds(start: int, end: int, chunk: int, delay: int | None = None) -> list[tuple[int, int]]:
    """Split [start, end) at multiples of `chunk` (and of `delay`, so every eviction step sees exactly
    `delay` new tokens) of the absolute token count."""
    bounds, s = [], start
    while s < end:
        e = min(end, (s // chunk + 1) * chunk)
        if delay:
            e = min(e, (s // delay + 1) * delay)
        bounds.append((s, e))
        s = e
    return bounds


def last_logits_only(model, last: int = 1) -> dict:
    """Keyword arguments that make the model's output head run on the last `last` positions only
    (transformers' `logits_to_keep`; {} for a model without it, which computes every position). The head is a
    large share of a small model's forward (SmolLM2-135M: 49,152 x 576, ~1/5 of the matmuls); the rows it keeps
    equal those of the full head."""
    return {"logits_to_keep": last} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def own_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's own position of every column of a (B, L) 0/1 mask (padding gets 0), as transformers does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache: MemoryCache, chunk_size: int = 128,
            keep_logits: bool = False, attention_mask: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """Feed `input_ids` (B, L) in chunks; returns the last position's logits (B, V), optional per-chunk logits,
    and the realised cache fraction after each chunk. `attention_mask` (B, L): 0 marks left padding of a batch of
    prompts of different lengths (each row then runs at its own positions and its own eviction steps)."""
    start = cache.tokens_seen
    if attention_mask is not None and start:
        raise ValueError("attention_mask is for a prompt fed from the start of a fresh cache")
    all_logits, fractions, logits = [], [], None
    head = {} if keep_logits else last_logits_only(model)
    for s, e in chunk_bounds(start, start + input_ids.shape[1], chunk_size, cache.policy.delay):
        if attention_mask is None:  # every new token is real: each row continues at its own count
            mask = None
            pos = torch.tensor(cache.row_tokens_seen() or [0] * input_ids.shape[0], device=input_ids.device)
            pos = pos[:, None] + torch.arange(e - s, device=input_ids.device)
        else:
            mask = attention_mask[:, :e]
            pos = own_positions(mask)[:, s:]
        out = model(input_ids=input_ids[:, s - start:e - start], cache=cache, use_cache=True, position_ids=pos,
                    attention_mask=mask, **head)
        cache.assert_captured()
        logits = out.logits[:, -1].float()
        if keep_logits:
            all_logits.append(out.logits.float())
        fractions.append(cache.realised_fraction())
    return logits, all_logits, fractions


@torch.no_grad()
def greedy_decode(model, cache: MemoryCache, logits: torch.Tensor, max_new_tokens: int, eos: set[int], device,
                  fractions: list[float], keep_logits: bool = False, after_step=None,
                  attention_mask: torch.Tensor | None = None
                  ) -> tuple[list[list[int]], list[torch.Tensor], torch.Tensor]:
    """Greedy decoding from the prefill's last logits (B, V), one token per forward at each row's true position.
    A row stops after emitting a token in `eos`; `fractions` gets the realised cache fraction after each step;
    `after_step(cache)` runs after each forward; `attention_mask` (B, columns so far) is the prompt's padding
    mask. Returns (generated ids per row, step logits, last logits)."""
    batch = logits.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    step_logits = []
    for _ in range(max_new_tokens):
        if keep_logits:
            step_logits.append(logits)
        nxt = logits.argmax(-1)
        for b in range(batch):
            if not done[b]:
                generated[b].append(int(nxt[b]))
                done[b] = int(nxt[b]) in eos
        if all(done) or len(generated[0]) >= max_new_tokens:
            break
        pos = torch.tensor(cache.row_tokens_seen(), device=device)[:, None]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        out = model(input_ids=nxt[:, None].to(device), cache=cache, use_cache=True, position_ids=pos,
                    attention_mask=attention_mask)
        cache.assert_captured()
        logits = out.logits[:, -1].float()
        if after_step is not None:
            after_step(cache)
        fractions.append(cache.realised_fraction())
    return generated, step_logits, logits


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, policy: MemoryPolicy, max_new_tokens: int = 32,
             chunk_size: int = 128, eos_token_id: int | list[int] | None = None, tokenizer=None,
             keep_logits: bool = False, attention_mask: torch.Tensor | None = None) -> GenerationResult:
    """Greedy generation with `policy` managing the KV cache (eviction during prefill and decoding alike).
    A batch of prompts of different lengths is left-padded with `attention_mask` (0 = padding), as a
    tokenizer with padding_side="left" returns it; each row then gets what its prompt alone gets."""
    enable_memory_attention(model)
    cache = MemoryCache(policy)
    t0 = time.perf_counter()
    logits, _, fractions = prefill(model, input_ids, cache, chunk_size, attention_mask=attention_mask)
    t1 = time.perf_counter()
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    generated, step_logits, logits = greedy_decode(model, cache, logits, max_new_tokens, eos, input_ids.device,
                                                   fractions, keep_logits, attention_mask=attention_mask)
    t2 = time.perf_counter()
    text = None
    if tokenizer is not None:
        text = [tokenizer.decode([t for t in g if t not in eos], skip_special_tokens=True) for g in generated]
    return GenerationResult(generated, text, cache.cache_lengths(), cache.tokens_seen, cache.realised_fraction(),
                            sum(fractions) / len(fractions), t1 - t0, t2 - t1, logits, step_logits)
