"""Video QA pipeline: sample -> frames -> processor -> memory-policy generation -> parsed answer -> record.

    model, processor = load_video_model("llava-hf/LLaVA-NeXT-Video-7B-hf", device="cuda", dtype=torch.float16)
    inputs = prepare_inputs(sample, processor, num_frames=32)          # raises VideoDecodeError
    record = answer(model, processor, sample, inputs, H2O(0.25), index=0)

Prompts and parsing are the official evaluators' (video.prompts). Frames: `sampling` "lmms-eval" (default) always
takes num_frames uniform indices, repeating frames of a shorter video, "unique" never repeats (video.decoding).
`subtitles=True` (LongVideoBench) interleaves the subtitles with the frames: each frame is then its own one-frame
video at its place in the text (the vision features of a frame do not depend on the others).

`run_sample` wraps both and turns a VideoDecodeError, a malformed annotation entry (SampleError) or a CUDA
out-of-memory into a per-sample error record: the run continues, and the record has no prediction (scored wrong,
counted in the error column).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from namm_transfer.adapters.video_lm import generate_video
from namm_transfer.policies import MemoryPolicy
from video.datasets import SampleError, VideoQASample
from video.decoding import VideoDecodeError, read_video
from video.prompts import ParsedAnswer, chat_text, parse_answer, read_subtitles, video_prompt
from video.scoring import QARecord, make_record

TINY_SYNTH_MODEL = Path(__file__).parent / "checkpoints" / "llava-tiny-synth"
DEFAULT_MODEL = "llava-hf/LLaVA-NeXT-Video-7B-hf"
MAX_NEW_TOKENS = {"mlvu": 16, "synthetic": 48}  # greedy. lmms-eval: mlvu_dev 16, longvideobench 32 (MLVU's own
# run samples at temperature 0.1 up to 1024 tokens; its check_ans reads only up to the first ")"); synthetic: the
# small model's reasoned replies (video.training.reply_text): up to 36 tokens over 400 training samples
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class VideoInputs:
    """Processor outputs for one sample, plus what was decoded."""

    enc: dict  # input_ids, attention_mask, pixel_values_videos
    num_frames: int
    backend: str
    decode_seconds: float


def load_video_model(name_or_path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """LlavaNextVideoForConditionalGeneration + LlavaNextVideoProcessor from a Hub id or a local folder. A folder
    holding another kind of model is a ValueError (from_pretrained would build a default 7B model instead)."""
    from transformers import AutoConfig, LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type != "llava_next_video":
        raise ValueError(f"{name_or_path} holds a {config.model_type!r} model, not Llava-Next-Video (model_type "
                         "'llava_next_video'); pass a LlavaNextVideoForConditionalGeneration folder or Hub id")
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(name_or_path, config=config, dtype=dtype)
    return model.to(device).eval(), LlavaNextVideoProcessor.from_pretrained(name_or_path)


def max_new_tokens_for(sample: VideoQASample) -> int:
    return MAX_NEW_TOKENS.get(sample.dataset, 32)


def prepare_inputs(sample: VideoQASample, processor, num_frames: int = 32, backend: str = "auto",
                   sampling: str = "lmms-eval", subtitles: bool = False) -> VideoInputs:
    """Decode `num_frames` uniform frames and build the chat prompt through the processor's chat template.
    Raises VideoDecodeError (the video) or SampleError (a malformed annotation entry, a missing or unreadable
    subtitle file)."""
    if sample.problem:
        raise SampleError(sample.problem)
    subs = _subtitles(sample) if subtitles else None
    t0 = time.perf_counter()
    clip = read_video(sample.video_path, num_frames=num_frames, backend=backend, sampling=sampling)
    t1 = time.perf_counter()
    try:
        prompt = video_prompt(sample, clip.timestamps.tolist(), subs)
    except (KeyError, TypeError, ValueError) as err:  # a subtitle item of neither official format
        raise SampleError(f"subtitles of {sample.id}: {type(err).__name__}: {err}") from None
    videos = [frame[None] for frame in clip.frames] if prompt.frames_inline else clip.frames
    enc = processor(text=chat_text(processor, prompt), videos=videos, return_tensors="pt")
    return VideoInputs(dict(enc), len(clip.frames), clip.backend, t1 - t0)


def _subtitles(sample: VideoQASample) -> list[dict]:
    try:
        return read_subtitles(sample)
    except (OSError, ValueError) as err:  # missing file, bad JSON, not a list
        raise SampleError(f"subtitles: {err}") from None


def record_dict(record: QARecord, **extra) -> dict:
    """A JSON-ready record: the QARecord fields, `correct`, and whatever the run adds."""
    return {**asdict(record), "correct": record.correct, **extra}


def answer(model, processor, sample: VideoQASample, inputs: VideoInputs, policy: MemoryPolicy, index: int = 0,
           seed: int = 0, chunk_size: int = 128, max_new_tokens: int | None = None,
           evict_during: str = "prompt") -> dict:
    """Run one policy on prepared inputs; returns the JSON record."""
    res = generate_video(model, inputs.enc, policy, max_new_tokens=max_new_tokens or max_new_tokens_for(sample),
                         chunk_size=chunk_size, tokenizer=processor.tokenizer, evict_during=evict_during)
    reply = res.text[0]
    parsed = parse_answer(sample, reply, seed=seed, index=index)
    return record_dict(
        make_record(sample, reply, parsed), parse_reason=parsed.reason, guess=parsed.guess,
        num_frames=inputs.num_frames, prompt_tokens=res.prompt_tokens, video_tokens=res.video_tokens,
        realised_fraction=res.realised_fraction, mean_fraction=res.mean_fraction, step_fraction=res.step_fraction,
        video_kept_fraction=res.video_kept_fraction, cache_lengths=res.cache_lengths,
        peak_cache_bytes=res.peak_cache_bytes, peak_kv_bytes=res.peak_kv_bytes, peak_memory_bytes=res.peak_memory_bytes,
        seconds=inputs.decode_seconds + res.seconds, decode_video_seconds=inputs.decode_seconds,
        vision_seconds=res.vision_seconds, prefill_seconds=res.prefill_seconds, generate_seconds=res.decode_seconds)


def error_record(sample: VideoQASample, err: BaseException) -> dict:
    """A record for a sample that could not be run: no reply, no prediction, the error named."""
    rec = make_record(sample, "", ParsedAnswer(None, "error"), error=f"{type(err).__name__}: {err}")
    return record_dict(rec, parse_reason="error", guess=None)


def run_sample(model, processor, sample: VideoQASample, policies: list[MemoryPolicy], index: int = 0,
               num_frames: int = 32, seed: int = 0, chunk_size: int = 128, evict_during: str = "prompt",
               sampling: str = "lmms-eval", subtitles: bool = False) -> list[dict]:
    """All policies on one sample (the video is decoded once); errors become records, never exceptions."""
    try:
        inputs = prepare_inputs(sample, processor, num_frames, sampling=sampling, subtitles=subtitles)
    except (VideoDecodeError, SampleError) as err:
        return [error_record(sample, err) for _ in policies]
    out = []
    for policy in policies:
        out.append(run_policy(model, processor, sample, inputs, policy, index, seed, chunk_size, evict_during))
    return out


def run_policy(model, processor, sample: VideoQASample, inputs: VideoInputs, policy: MemoryPolicy, index: int = 0,
               seed: int = 0, chunk_size: int = 128, evict_during: str = "prompt") -> dict:
    """`answer`, with a CUDA out-of-memory recorded as this sample's error (the cache is freed, the run goes on)."""
    try:
        return answer(model, processor, sample, inputs, policy, index, seed, chunk_size, evict_during=evict_during)
    except torch.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return error_record(sample, err)
