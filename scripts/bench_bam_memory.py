"""Peak memory and time of one NAMM scoring step (the backward-attention scorer, `namm.bam_scores`) over N slots.

    python scripts/bench_bam_memory.py --device cuda --rows 32 --slots 4700     # a 7B layer's cache (32 heads)

Compares the scorer as shipped (4-D inputs to SDPA: CUDA picks a fused kernel) with the same attention called on
3-D inputs, as before (CUDA falls back to the math kernel, R x N x N scores): peak memory above the inputs (CUDA
max allocated; not measured on CPU, where both shapes run the same fused kernel) and median seconds, plus their
largest score difference. Prints a markdown table and writes --out (JSON) when given.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from namm_transfer.checkpoints import DEFAULT_NAMM, load_namm  # noqa: E402
from namm_transfer.cli import int_in  # noqa: E402
from namm_transfer.namm import bam_scores  # noqa: E402
from namm_transfer.records import write_json  # noqa: E402


def three_d_sdpa_of(sdpa):
    """SDPA as the scorer called it before: the (R, 1, N, h) call's head axis taken away again."""
    def call(q, k, v, **kwargs):
        return sdpa(q[:, 0], k[:, 0], v[:, 0], **kwargs)[:, None] if q.dim() == 4 and q.shape[1] == 1 else \
            sdpa(q, k, v, **kwargs)
    return call


def measure(fn, device: torch.device, repeats: int) -> tuple[torch.Tensor, float | None, float]:
    """(output, peak MiB above what was allocated before (CUDA; None on CPU), median seconds)."""
    out = fn()  # warm-up (kernel choice, allocator)
    times, peak = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = max(peak or 0.0, (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20)
        times.append(time.perf_counter() - t)
    return out, peak, statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rows", type=int_in(1), default=32, help="batch rows x KV heads scored at once (default 32)")
    ap.add_argument("--slots", type=int_in(1), default=4700, help="cache slots N (default 4700)")
    ap.add_argument("--repeats", type=int_in(1), default=5)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")
    policy = load_namm(DEFAULT_NAMM)
    cfg = policy.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.slots, cfg.d_in, generator=g).to(device)
    valid = torch.ones(args.rows, args.slots, dtype=torch.bool, device=device)
    params = policy.row_params(torch.arange(1), args.rows, device)
    shipped = lambda: bam_scores(x, valid, params, cfg)  # noqa: E731
    rows = {}
    s_new, peak, sec = measure(shipped, device, args.repeats)
    rows["4-D (shipped)"] = {"peak_mib": peak, "seconds": sec}
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = three_d_sdpa_of(original)  # the scorer's one SDPA call, on 3-D inputs
    try:
        s_old, peak, sec = measure(shipped, device, args.repeats)
    finally:
        F.scaled_dot_product_attention = original
    rows["3-D (before)"] = {"peak_mib": peak, "seconds": sec}
    diff = float((s_new - s_old).abs().max())
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "rows": args.rows, "slots": args.slots, "repeats": args.repeats,
              "calls": rows, "max_abs_score_difference": diff,
              "peak_ratio_3d_over_4d": None if device.type != "cuda" else
              rows["3-D (before)"]["peak_mib"] / max(rows["4-D (shipped)"]["peak_mib"], 1e-9)}
    print(f"bam_scores, {args.rows} rows x {args.slots} slots on {device} ({result['gpu'] or 'CPU'}), "
          f"median of {args.repeats}\n\n| SDPA inputs | peak MiB | seconds |\n|---|---|---|")
    for name, r in rows.items():
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        print(f"| {name} | {peak} | {r['seconds']:.4f} |")
    ratio = result["peak_ratio_3d_over_4d"]
    print(f"\nlargest score difference {diff:.2e}" + ("" if ratio is None else f"; peak 3-D / 4-D {ratio:.1f}x"))
    if args.out:
        write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
