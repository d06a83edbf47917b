"""Does a family give the same logits when a prompt is fed in chunks as in one forward, under transformers' own cache?

    python scripts/chunked_vs_oneshot.py --families jamba,mamba,falcon_mamba,olmo_hybrid,qwen3_next

Each family is built tiny and random as `check_families.py` builds it (its `FAMILY_TINY` settings included), then
a --tokens prompt runs once in one forward and once in --chunk-token pieces through a `DynamicCache` (no
namm_transfer code in either run), in float32 and float64; printed: the largest logit difference per family and
dtype. A difference that stays put in float64 is not rounding: such a family cannot be run exactly with chunked
prefill by any cache, so namm_transfer refuses it (`attention.HYBRID_FAMILIES` lists the hybrids it runs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from check_families import causal_lm_families, tiny_model  # noqa: E402


def chunked_vs_oneshot(model, ids: torch.Tensor, chunk: int) -> float:
    """max |logits fed in `chunk`-token pieces through a DynamicCache - logits of one forward|."""
    from transformers import DynamicCache
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        cache, parts = DynamicCache(config=model.config), []
        for s in range(0, ids.shape[1], chunk):
            parts.append(model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True).logits)
    return float((torch.cat(parts, 1) - whole).abs().max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", required=True, help="comma-separated model types")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--chunk", type=int, default=40)
    args = ap.parse_args(argv)
    known = causal_lm_families()
    unknown = [f for f in args.families.split(",") if f not in known]
    if unknown:
        sys.exit(f"unknown model type(s) {unknown}: pick from transformers' causal-LM families")
    torch.set_num_threads(1)
    ids = torch.randint(3, 128, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    print(f"| family | layer types | float32 | float64 |  ({args.tokens} tokens, chunks of {args.chunk})")
    print("|---|---|---|---|")
    for family in args.families.split(","):
        try:
            model = tiny_model(family, 150e6)  # seeded: float64 runs the same weights, cast
        except Exception as e:  # noqa: BLE001 - reported per family
            print(f"| {family} | not buildable tiny: {type(e).__name__}: {str(e)[:60]} | | |", flush=True)
            continue
        cells = []
        for dtype in (torch.float32, torch.float64):
            try:
                cells.append(f"{chunked_vs_oneshot(model.to(dtype), ids, args.chunk):.2e}")
            except Exception as e:  # noqa: BLE001 - reported per family (e.g. a kernel without float64)
                cells.append(f"{type(e).__name__}: {str(e)[:60]}")
        types = getattr(model.config, "layer_types", None) or getattr(model.config, "layers_block_type", None)
        print(f"| {family} | {types} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
