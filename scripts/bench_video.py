"""Benchmarks for the video side: chunked prefill with NAMM vs full cache, and decord vs PyAV.

    python scripts/bench_video.py                       # CPU, tiny model + a bigger random config
    python scripts/bench_video.py --device cuda --dtype float16 --no-big

1. Prefill of a 32-frame prompt (chunks of 128, then one greedy token) on the tiny random Llava-Next-Video
   (4 tokens/frame) and, unless --no-big, on a bigger random config with the real model's video geometry
   (336 px, patch 14, 2x2 pool -> 144 tokens/frame -> 4,608 video tokens; small vision tower and a 4-layer,
   512-wide Llama). The NAMM is the shipped checkpoint when present, else random parameters (x0.5) that evict;
   the printout says which. Reported: seconds (best of --repeats), peak KV bytes (keys + values), peak cache
   bytes (+ NAMM state and buffered attention rows), CUDA max allocated on GPU, and NAMM/full ratios.
2. decord vs PyAV: seconds to sample 32 uniform frames from generated H.264 videos (best of --repeats).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer import FullCache, NAMMPolicy, load_namm  # noqa: E402
from namm_transfer.adapters.video_lm import generate_video  # noqa: E402
from namm_transfer.checkpoints import DEFAULT_NAMM  # noqa: E402
from video.prompts import conversation  # noqa: E402
from video.tiny_model import build_config, build_tiny_llava_next_video  # noqa: E402

PROMPT = ("What colour is the large shape on the left when the counter shows 3?\nA. red\nB. blue\nC. green\n"
          "D. cyan\nE. white\nAnswer with the option's letter from the given choices directly.\n")


def namm_policy(delay: int) -> tuple[NAMMPolicy, str]:
    if (DEFAULT_NAMM / "namm.safetensors").is_file():
        return load_namm(DEFAULT_NAMM, delay=delay), f"shipped NAMM ({DEFAULT_NAMM})"
    params = torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5
    return NAMMPolicy(params, delay=delay), "random NAMM (seed 0, N(0, 0.5^2) parameters; no shipped checkpoint yet)"


def tiny_inputs(frames: int):
    model, processor = build_tiny_llava_next_video(seed=0)
    text = processor.apply_chat_template(conversation(PROMPT), add_generation_prompt=True)
    video = np.random.default_rng(0).integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)
    return model, dict(processor(text=text, videos=video, return_tensors="pt"))


def big_inputs(frames: int):
    """Random model with the 7B's video geometry (144 tokens/frame) but small widths; inputs built by hand."""
    from transformers import LlavaNextVideoForConditionalGeneration
    from video.tiny_model import build_processor

    processor = build_processor()
    config = build_config(processor.tokenizer)
    v, t = config.vision_config, config.text_config
    v.image_size, v.hidden_size, v.intermediate_size, v.num_hidden_layers = 336, 64, 128, 1
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 512, 1024, 4
    t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.max_position_embeddings = 8, 4, 64, 8192
    config.image_grid_pinpoints = [[336, 336]]
    torch.manual_seed(0)
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    per_frame = (336 // 14 // 2) ** 2
    text = processor.apply_chat_template(conversation(PROMPT), add_generation_prompt=True)
    ids = processor.tokenizer(text).input_ids
    at = ids.index(config.video_token_index)
    ids = ids[:at] + [config.video_token_index] * (per_frame * frames) + ids[at + 1:]
    pixels = torch.randn(1, frames, 3, 336, 336)
    return model, {"input_ids": torch.tensor([ids]), "pixel_values_videos": pixels}


def bench_prefill(label: str, model, enc, delay: int, device: str, dtype: torch.dtype, repeats: int) -> None:
    model = model.to(device=device, dtype=dtype)
    policy, which = namm_policy(delay)
    rows = {}
    for name, pol in (("full", FullCache(delay=delay)), ("namm", policy)):
        best = None
        for _ in range(repeats):
            res = generate_video(model, enc, pol, max_new_tokens=1, chunk_size=128)
            if best is None or res.prefill_seconds < best.prefill_seconds:
                best = res
        rows[name] = best
    f, n = rows["full"], rows["namm"]
    print(f"\n## {label}: {f.prompt_tokens} prompt tokens ({f.video_tokens} video), {device}/{str(dtype)[6:]}, "
          f"chunk 128, delay {delay}\n{which}")
    print("| policy | prefill s | vision s | realised cache % | video kept % | peak KV MiB | peak cache MiB | "
          "CUDA max alloc MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        cuda = f"{r.peak_memory_bytes / 2 ** 20:.1f}" if device == "cuda" else "-"
        print(f"| {name} | {r.prefill_seconds:.3f} | {r.vision_seconds:.3f} | {100 * r.realised_fraction:.1f} | "
              f"{100 * r.video_kept_fraction:.1f} | {r.peak_kv_bytes / 2 ** 20:.2f} | "
              f"{r.peak_cache_bytes / 2 ** 20:.2f} | {cuda} |")
    print(f"NAMM / full: time {n.prefill_seconds / f.prefill_seconds:.2f}x, peak KV {n.peak_kv_bytes / f.peak_kv_bytes:.2f}x, "
          f"peak cache {n.peak_cache_bytes / f.peak_cache_bytes:.2f}x"
          + (f", CUDA max allocated {n.peak_memory_bytes / f.peak_memory_bytes:.2f}x" if device == "cuda" else ""))


def bench_decoding(repeats: int) -> None:
    from video.decoding import HAVE_DECORD, benchmark
    from video.synthetic import make_scene, render, write_mp4, Scene

    print("\n## decoding: 32 uniform frames (best of %d)" % repeats)
    print("| video | decord ms | PyAV ms | PyAV / decord |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for frames, size in ((256, 224), (1024, 112)):
            scene: Scene = make_scene(np.random.default_rng(0), frames, 16)
            path = Path(tmp) / f"v{frames}_{size}.mp4"
            write_mp4(path, render(scene, size), fps=8)
            t = benchmark(str(path), 32, repeats)
            d, p = t.get("decord"), t["pyav"]
            dec, ratio = ("-", "-") if d is None else (f"{1000 * d:.1f}", f"{p / d:.2f}x")
            print(f"| {frames} frames {size}x{size} H.264 | {dec} | {1000 * p:.1f} | {ratio} |")
    if not HAVE_DECORD:
        print("decord does not import here: only PyAV was timed")


def main(argv=None) -> int:
    from namm_transfer.cli import check_device, int_in, run_cli

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--frames", type=int_in(1), default=32)
    ap.add_argument("--repeats", type=int_in(1), default=3)
    ap.add_argument("--no-big", action="store_true", help="skip the bigger random config")
    ap.add_argument("--no-decoding", action="store_true")
    ap.add_argument("--threads", type=int_in(1), default=1)
    args = ap.parse_args(argv)
    return run_cli(lambda: check_device(args.device) or bench(args))


def bench(args) -> int:
    """Prints the tables (nothing is written)."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, enc = tiny_inputs(args.frames)
    bench_prefill("tiny Llava-Next-Video (4 tokens/frame)", model, enc, 64, args.device, dtype, args.repeats)
    if not args.no_big:
        model, enc = big_inputs(args.frames)
        bench_prefill("bigger random config (144 tokens/frame, 4x512 Llama)", model, enc, 512, args.device, dtype,
                      args.repeats)
    if not args.no_decoding:
        bench_decoding(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
