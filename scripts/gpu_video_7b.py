"""Prepared GPU check: run_video with a 7B-shaped (random) Llava-Next-Video in fp16, full cache vs NAMM.

    python scripts/gpu_video_7b.py                                   # on a GPU machine: 7B shape, fp16, 4 videos
    python scripts/gpu_video_7b.py --shape tiny --device cpu --dtype float32 --samples 2   # the same path on CPU
    python scripts/gpu_video_7b.py --data-root DIR     # videos made elsewhere (a GPU machine without PyAV/x264):
        python -c "from video.synthetic import generate_split; generate_split('DIR', 'test', num_samples=4)"

1. Builds a random LlavaNextVideoForConditionalGeneration with the real 7B-hf geometry (video.tiny_model.SEVEN_B:
   CLIP ViT-L/14 at 336 px -> 144 tokens per frame, Vicuna-7B-sized Llama; the synthetic set's small vocabulary),
   initialised directly on --device, cast to --dtype and saved with its processor under <out>/model.
2. Runs scripts/run_video.py on --samples synthetic test videos at --frames frames (32 x 144 = 4,608 video
   tokens), policies full and NAMM (the shipped language NAMM), into <out>/run.
3. Prints and writes <out>/gpu_check.json: seconds per sample and peak memory (CUDA max allocated) per policy,
   NAMM / full ratios, realised cache. Random weights: accuracies mean nothing here, cost does. The first sample
   pays the GPU's warm-up (kernel loading, cuBLAS handles) under the policy that runs first (full), so seconds
   are also given over the samples after the first ("warm"), and the warm ratio is the one to quote.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from namm_transfer.cli import default_out, int_in, out_help  # noqa: E402
from namm_transfer.records import write_json  # noqa: E402

SHAPES = ("7b", "tiny")


def build_model(shape: str, device: str, dtype: torch.dtype, folder: Path) -> dict:
    """Random model of `shape` made on `device`, saved in `dtype` with its processor; returns its size."""
    from transformers import LlavaNextVideoForConditionalGeneration
    from video.tiny_model import SEVEN_B, TINY, build_config, build_processor
    size = SEVEN_B if shape == "7b" else TINY
    processor = build_processor(image_size=size.image_size)
    config = build_config(processor.tokenizer, size)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlavaNextVideoForConditionalGeneration(config)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"parameters": n, "build_and_save_seconds": time.perf_counter() - t0}


def warm_timings(records: list[dict]) -> dict:
    """Mean seconds (whole sample, and its prefill) over the samples after the first; None with one sample."""
    warm = sorted(records, key=lambda r: r["sample_index"])[1:]
    mean = lambda key: statistics.fmean(r[key] for r in warm) if warm else None  # noqa: E731
    return {"warm_samples": len(warm), "warm_seconds_per_sample": mean("seconds"),
            "warm_prefill_seconds": mean("prefill_seconds")}


def _f(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=SHAPES)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--samples", type=int_in(1, 200), default=4, help="synthetic test videos (default 4; with --data-root: "
                    "that folder's)")
    ap.add_argument("--frames", type=int_in(1), default=32)
    ap.add_argument("--data-root", default=None, help="a synthetic split already written (generate_split, see "
                    "above); default: run_video.py writes one, which needs PyAV")
    ap.add_argument("--out", default=None, help=out_help("gpu-video-7b"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible; run on a GPU machine, or pass --device cpu "
                 "(with --shape tiny on a small machine)")
    if args.data_root and not (Path(args.data_root) / "lvb_test.json").is_file():
        ap.error(f"--data-root {args.data_root}: no synthetic test split there (lvb_test.json); write one with "
                 f"generate_split (see --help) or leave --data-root out")
    out = Path(args.out or default_out("gpu-video-7b"))
    (out / "model").mkdir(parents=True, exist_ok=True)
    info = build_model(args.shape, args.device, getattr(torch, args.dtype), out / "model")
    print(f"built a random {args.shape}-shaped Llava-Next-Video: {info['parameters'] / 1e9:.2f}B parameters "
          f"({info['build_and_save_seconds']:.0f}s)", flush=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "run_video.py"), "--dataset", "synthetic", "--split", "test",
           "--synthetic-samples", str(args.samples), "--model", str(out / "model"), "--frames", str(args.frames),
           "--policies", "full,namm", "--device", args.device, "--dtype", args.dtype, "--no-progress",
           "--out", str(out / "run")] + (["--data-root", args.data_root] if args.data_root else [])
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        sys.exit("error: run_video.py failed (its message above)")
    summary = json.loads((out / "run" / "summary.json").read_text())
    pols = summary["policies"]
    records = [json.loads(line) for line in (out / "run" / "records.jsonl").read_text().splitlines() if line.strip()]
    row = {p: {k: pols[p].get(k) for k in ("seconds_per_sample", "peak_memory_mib", "peak_kv_mib",
                                            "realised_cache_pct", "n", "n_errors")} for p in ("full", "namm")}
    for p in row:
        row[p].update(warm_timings([r for r in records if r["policy"] == p and r.get("error") is None]))
    ratio = {k: row["namm"][k] / row["full"][k]
             for k in ("seconds_per_sample", "warm_seconds_per_sample", "peak_memory_mib", "peak_kv_mib")
             if row["full"][k] and row["namm"][k] is not None}
    result = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "frames": args.frames,
              "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
              "torch": torch.__version__, "transformers": transformers.__version__, **info,
              "policies": row, "namm_over_full": ratio}
    write_json(out / "gpu_check.json", result)
    print("| policy | s/sample | warm s/sample | warm prefill s | peak memory MiB | peak KV MiB | realised cache % |\n"
          "|---|---|---|---|---|---|---|")
    for p, r in row.items():
        print(f"| {p} | {r['seconds_per_sample']:.2f} | {_f(r['warm_seconds_per_sample'])} | "
              f"{_f(r['warm_prefill_seconds'])} | {r['peak_memory_mib']:.0f} | {r['peak_kv_mib']:.1f} | "
              f"{r['realised_cache_pct']:.1f} |")
    print("NAMM / full: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))


if __name__ == "__main__":
    main()
