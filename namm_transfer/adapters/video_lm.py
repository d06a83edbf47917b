"""Llava-Next-Video adapter: multimodal embeddings once, chunked prefill through a MemoryCache, greedy decoding.

    enc = processor(text=prompt, videos=frames, return_tensors="pt")
    res = generate_video(model, enc, H2O(0.25, delay=512), max_new_tokens=32, tokenizer=processor.tokenizer)
    res.text[0], res.realised_fraction, res.video_kept_fraction, res.peak_memory_bytes

The vision tower runs once (`model.get_video_features`) and its features are scattered into the token embeddings
with the model's own placeholder mask. The language model then sees the sequence in chunks cut at absolute
multiples of `chunk_size` and of `policy.delay`, with explicit position_ids, so the policy evicts video tokens
while the prompt is still being read and the cache never holds more than the kept tokens plus one block.
Only the language model's attention is switched to the memory attention; the vision tower is untouched.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from ..attention import enable_memory_attention
from .causal_lm import chunk_bounds, greedy_decode
from ..cache import MemoryCache
from ..policies import MemoryPolicy


EVICT_DURING = ("prompt", "video")


@dataclass
class VideoGenerationResult:
    tokens: list[list[int]]  # generated ids per batch row (eos included when produced)
    text: list[str] | None  # decoded replies (special tokens skipped) when a tokenizer is given
    cache_lengths: list[float]  # per layer, valid slots at the end (mean over rows and KV heads)
    tokens_seen: int  # prompt + generated tokens fed to the language model
    prompt_tokens: int
    video_tokens: int  # video placeholder tokens in the prompt (row 0)
    realised_fraction: float  # mean over layers of stored / seen at the end
    mean_fraction: float  # the same, averaged over every forward (prefill chunks and decode steps)
    step_fraction: float  # mean over layers of kept / seen right after each layer's last eviction step (1.0 if
    #                       none ran): the float budget under which a budget policy would keep as much
    video_kept_fraction: float  # mean over layers, rows and KV heads of video tokens still stored at the end
    peak_cache_bytes: int  # max bytes the cache held (K, V, positions, policy state, buffered attention)
    peak_kv_bytes: int  # max bytes of keys + values alone
    peak_memory_bytes: int  # CUDA: torch.cuda.max_memory_allocated during the call; CPU: process peak RSS
    vision_seconds: float
    prefill_seconds: float
    decode_seconds: float
    prefill_logits: torch.Tensor | None = field(repr=False, default=None)  # (B, L, V) when keep_logits
    step_logits: list[torch.Tensor] = field(repr=False, default_factory=list)  # (B, V) per generated token

    @property
    def seconds(self) -> float:
        return self.vision_seconds + self.prefill_seconds + self.decode_seconds


def to_model(model, inputs) -> dict[str, torch.Tensor]:
    """Processor outputs -> tensors on the model's device; pixel values in the model's dtype."""
    out = {}
    for key in ("input_ids", "attention_mask", "pixel_values_videos"):
        value = inputs.get(key) if hasattr(inputs, "get") else getattr(inputs, key, None)
        if value is None:
            continue
        value = torch.as_tensor(value).to(model.device)
        out[key] = value.to(model.dtype) if value.is_floating_point() else value
    if "input_ids" not in out:
        raise ValueError("inputs need input_ids (the processor's output)")
    mask = out.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("padded batches are not supported: run one video at a time (or rows of equal length)")
    return out


@torch.no_grad()
def embed_inputs(model, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with the video features in the placeholder slots, via the model's public methods."""
    embeds = model.get_input_embeddings()(input_ids)
    if pixel_values_videos is None:
        return embeds
    features = model.get_video_features(pixel_values_videos, return_dict=True).pooler_output
    features = features.reshape(-1, embeds.shape[-1]).to(embeds.device, embeds.dtype)
    _, video_mask = model.model.get_placeholder_mask(input_ids, inputs_embeds=embeds, video_features=features)
    return embeds.masked_scatter(video_mask, features)


def video_positions(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: which prompt positions hold video tokens."""
    return input_ids == model.config.video_token_id


class MemoryMeter:
    """Peak bytes: the cache's stored bytes and its keys + values alone (sampled right before each eviction and after each forward, which is
    where its maximum lies) and the device peak (CUDA max allocated, or the process's peak RSS on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak_cache = self.peak_kv = 0
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def sample(self, cache: MemoryCache) -> None:
        self.peak_cache = max(self.peak_cache, cache.stored_bytes())
        kv = sum(t.numel() * t.element_size() for l in cache.layers for t in (l.keys, l.values) if t is not None)
        self.peak_kv = max(self.peak_kv, kv)

    def device_peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_embeds(model, embeds: torch.Tensor, cache: MemoryCache, chunk_size: int = 128,
                   keep_logits: bool = False, meter: MemoryMeter | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, list[float]]:
    """Feed inputs_embeds (B, L, D) in chunks. Returns the last position's logits (B, V), all logits (B, L, V)
    when `keep_logits`, and the realised cache fraction after each chunk."""
    start, b = cache.tokens_seen, embeds.shape[0]
    logits, all_logits, fractions = None, [], []
    for s, e in chunk_bounds(start, start + embeds.shape[1], chunk_size, cache.policy.delay):
        pos = torch.arange(s, e, device=embeds.device)[None].expand(b, -1)
        out = model(inputs_embeds=embeds[:, s - start:e - start], cache=cache, use_cache=True, position_ids=pos,
                    logits_to_keep=0 if keep_logits else 1)
        cache.assert_captured()
        logits = out.logits[:, -1].float()
        if keep_logits:
            all_logits.append(out.logits.float())
        if meter is not None:
            meter.sample(cache)
        fractions.append(cache.realised_fraction())
    return logits, (torch.cat(all_logits, dim=1) if keep_logits else None), fractions


def _step_fraction(cache: MemoryCache) -> float:
    last = {r.layer: r for r in cache.log}
    return sum(r.after / r.tokens_seen for r in last.values()) / len(last) if last else 1.0


def _kept_video_fraction(cache: MemoryCache, is_video: torch.Tensor) -> float:
    """Mean over layers (and rows, KV heads) of the share of video tokens still stored."""
    n_video = is_video.sum(-1).clamp(min=1).float()  # (B,)
    shares = []
    for layer in cache.kv_layers:
        pos = layer.positions.clamp(max=is_video.shape[1] - 1)
        hit = is_video.gather(1, pos.flatten(1)).view_as(pos) & layer.valid & (layer.positions < is_video.shape[1])
        shares.append((hit.sum(-1).float() / n_video[:, None]).mean())
    return float(torch.stack(shares).mean()) if shares else 1.0


@torch.no_grad()
def generate_video(model, inputs, policy: MemoryPolicy, max_new_tokens: int = 32, chunk_size: int = 128,
                   eos_token_id: int | list[int] | None | str = "auto", tokenizer=None, keep_logits: bool = False,
                   on_evict=None, inputs_embeds: torch.Tensor | None = None,
                   evict_during: str = "prompt") -> VideoGenerationResult:
    """Greedy video QA with `policy` managing the language model's KV cache.

    inputs: the processor's output (input_ids, pixel_values_videos, attention_mask), moved to the model's device.
    eos_token_id: "auto" = the model's generation_config.eos_token_id; None = never stop early.
    on_evict(layer, keep): called before each pruning (retention maps, tests).
    inputs_embeds: precomputed `embed_inputs(...)` to skip the vision tower (vision_seconds is then 0).
    evict_during: "prompt" = eviction steps all through prefill and decoding; "video" = only at steps that fall
        within the video (the schedule's multiples of `policy.delay` up to the last video token), so the policy
        decides over the video and the text after it is read into the pruned cache and kept.
    """
    if evict_during not in EVICT_DURING:
        raise ValueError(f"evict_during must be one of {EVICT_DURING}, got {evict_during!r}")
    enc = to_model(model, inputs)
    input_ids, device = enc["input_ids"], model.device
    enable_memory_attention(model.model.language_model)
    if eos_token_id == "auto":
        eos_token_id = model.generation_config.eos_token_id
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))

    meter = MemoryMeter(device)

    def _on_evict(layer, keep):  # reads the cache through the layer: a closure over `cache` would be a cycle
        meter.sample(layer.cache)  # the layer still holds its new block: the cache's peak is reached here
        if on_evict is not None:
            on_evict(layer, keep)

    is_video = video_positions(model, input_ids)
    until = None
    if evict_during == "video":
        until = int(is_video.any(0).nonzero().max()) + 1 if bool(is_video.any()) else 0
    cache = MemoryCache(policy, on_evict=_on_evict, evict_until=until)
    t0 = time.perf_counter()
    if inputs_embeds is None:
        inputs_embeds = embed_inputs(model, input_ids, enc.get("pixel_values_videos"))
    _sync(device)
    t1 = time.perf_counter()
    logits, prefill_logits, fractions = prefill_embeds(model, inputs_embeds, cache, chunk_size, keep_logits, meter)
    _sync(device)
    t2 = time.perf_counter()

    generated, step_logits, logits = greedy_decode(model, cache, logits, max_new_tokens, eos, device, fractions,
                                                   keep_logits, after_step=meter.sample)
    _sync(device)
    t3 = time.perf_counter()

    text = None
    if tokenizer is not None:
        text = [tokenizer.decode([t for t in g if t not in eos], skip_special_tokens=True) for g in generated]
    return VideoGenerationResult(
        tokens=generated, text=text, cache_lengths=cache.cache_lengths(), tokens_seen=cache.tokens_seen,
        prompt_tokens=input_ids.shape[1], video_tokens=int(is_video[0].sum()),
        realised_fraction=cache.realised_fraction(), mean_fraction=sum(fractions) / len(fractions),
        step_fraction=_step_fraction(cache), video_kept_fraction=_kept_video_fraction(cache, is_video), peak_cache_bytes=meter.peak_cache,
        peak_kv_bytes=meter.peak_kv,
        peak_memory_bytes=meter.device_peak(), vision_seconds=t1 - t0, prefill_seconds=t2 - t1,
        decode_seconds=t3 - t2, prefill_logits=prefill_logits, step_logits=step_logits)
