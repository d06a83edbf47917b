"""Every causal-LM family of the installed transformers, built tiny and random, through the memory attention.

    python scripts/check_families.py                       # all families -> results/families/
    python scripts/check_families.py --families gemma2,lfm2,deepseek_v4 --out /tmp/fam

For each `*ForCausalLM` that transformers' auto classes list, a forked process (time and memory capped, so one
family that hangs or needs gigabytes cannot stop the sweep) builds the family's default config shrunk to 2 layers
of width 64 (FAMILY_TINY: a few families' own settings to fit that width; per-layer lists keep one layer of each
of the first two layer kinds; a multimodal config's sub-configs shrunk alike; the causal-LM class's own config
class when it has one; families whose config rejects that keep their default layer count; > --max-params
parameters are skipped), then:
  1. runs it plainly (no cache, no position ids: the model numbers positions itself, as under its own `generate`);
     a family whose tiny config does not run plainly is `not runnable here`;
  2. `enable_memory_attention` and a keep-everything NAMM over 200 tokens in 40-token chunks then single tokens
     (eviction steps every 64 tokens run and keep all): logits against the plain forward and against the
     family's own eager attention (`tests/helpers_families.eager_logits`);
  3. a random NAMM that evicts (~95% of the cache): logits against the family's eager attention with exactly
     the evicted keys hidden from the step that evicted them on.
Outcome per family: `equal` (both within --atol), `MISMATCH`, `refused` (an UnsupportedAttention / CaptureError
raised before any output, its message recorded), `error` (any other exception: a gap to fix), `not runnable here`.
Records go to OUT/families.jsonl as each family ends (a rerun skips the families recorded there), then
OUT/summary.md and OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

L, DELAY, CHUNK, DECODE_FROM = 200, 64, 40, 190
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            head_dim=16, initializer_range=0.2, n_embd=64, d_model=64, n_layer=2, num_layers=2, n_layers=2,
            n_head=4, num_heads=4, n_heads=4)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Families whose defaults do not fit TINY, with what makes them build at that width: MLA families rotate only
# qk_rope_head_dim of each head (transformers builds their rotary table from head_dim), partial-rotary families
# rotate rotary_dim <= head_dim, encoder-decoder decoders count heads per stack, small routed-expert counts.
MLA = dict(head_dim=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=32,
           n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32,
           first_k_dense_replace=1, num_key_value_heads=4)
FAMILY_TINY = {
    "deepseek_v2": MLA, "deepseek_v3": MLA, "glm4_moe_lite": MLA, "minicpm3": MLA, "sarvam_mla": MLA, "youtu": MLA,
    "axk1": MLA, "axk2": MLA, "deepseek_v32": MLA, "glm_moe_dsa": MLA, "dots3_note_text": {**MLA, "head_dim": 16},
    "gptj": dict(rotary_dim=8), "codegen": dict(rotary_dim=8),
    "whisper": dict(encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2, decoder_layers=2,
                    encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=64,
                    max_target_positions=4096),
    "plbart": dict(encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2, decoder_layers=2,
                   encoder_ffn_dim=128, decoder_ffn_dim=128),
    "blenderbot": dict(encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2, decoder_layers=2,
                       encoder_ffn_dim=128, decoder_ffn_dim=128),
    "reformer": dict(is_decoder=True),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, num_experts=1),  # a Mamba layer, then attention
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2)),
    "dots1": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                  first_k_dense_replace=1, n_group=1, topk_group=1),
    "lfm2_moe": dict(layer_types=["full_attention", "conv"], num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32, num_dense_layers=1),
}


def causal_lm_families() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return {k: (v[0] if isinstance(v, (list, tuple)) else v) for k, v in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())}


def tiny_model(family: str, max_params: float, keep_layers: bool = False):
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_cls = getattr(transformers, causal_lm_families()[family])
    # the config the causal-LM class is built from (a multimodal family's text config for its text-only class)
    cfg_cls = getattr(model_cls, "config_class", None) or CONFIG_MAPPING[family]
    cfg = cfg_cls(**tiny_fields(cfg_cls(), FAMILY_TINY.get(family, {}), keep_layers))  # re-validated, fresh
    with torch.device("meta"):
        n = sum(p.numel() for p in model_cls(cfg).parameters())
    if n > max_params:
        raise MemoryError(f"{n / 1e6:.0f}M parameters at the tiny settings (over --max-params)")
    torch.manual_seed(0)
    return model_cls(cfg).eval().float()


def tiny_fields(cfg, own: dict, keep_layers: bool) -> dict:
    """The fields of `cfg` shrunk to TINY (and `own` on top), 2 layers unless keep_layers; a composite config's
    sub-configs (text, vision, audio of a multimodal model) are shrunk the same way."""
    n_layers = next((getattr(cfg, k) for k in LAYER_KEYS if isinstance(getattr(cfg, k, None), int)), None)
    per_layer = {k: v for k, v in vars(cfg).items() if isinstance(v, list) and len(v) == n_layers}
    for key, value in {**TINY, **own}.items():
        if keep_layers and key in LAYER_KEYS or key in per_layer:
            continue
        try:
            if hasattr(cfg, key) or key in own:
                setattr(cfg, key, value)
        except Exception:  # noqa: BLE001 - a read-only property or a per-layer attribute of this config
            pass
    fields = cfg.to_dict()
    for name in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, name, None)
        if sub is not None and hasattr(sub, "to_dict") and isinstance(fields.get(name), dict):
            fields[name] = tiny_fields(sub, {}, keep_layers)
    if not keep_layers and n_layers:
        keep = tiny_layers(per_layer["layer_types"]) if "layer_types" in per_layer else [0, 1]
        for key, values in per_layer.items():  # layer_types, mlp_layer_types, per-layer head counts, ...
            fields[key] = [values[i] for i in keep]
        plc = fields.get("per_layer_config")
        if isinstance(plc, dict):  # {layer index: overrides}: the kept layers' entries, renumbered
            fields["per_layer_config"] = {new: plc[k] for new, old in enumerate(keep) for k in (old, str(old))
                                          if k in plc}
    return fields


def tiny_layers(layer_types: list) -> list[int]:
    """Which 2 of a family's layers a 2-layer model keeps: the first layer of each of the first two kinds in
    layer_types (a hybrid keeps one layer of each kind, so its refusal or check sees both), else layers 0, 1."""
    firsts = [layer_types.index(t) for t in dict.fromkeys(layer_types)]
    return sorted(firsts[:2]) if len(firsts) > 1 else [0, 1]


def _plain_logits(model, ids):
    """The unmodified model (its default attention), numbering positions itself (no position ids passed, as its
    own `generate` runs it for families such as RoBERTa, whose first token sits at padding_idx + 1)."""
    import torch
    with torch.no_grad():
        return model(input_ids=ids).logits


def _compare(model, ids, plain) -> dict:
    """enable_memory_attention, then the keep-all and evict runs against the plain and eager references."""
    import torch

    from helpers_core import run_with_policy
    from helpers_families import eager_logits
    from namm_transfer import NAMMPolicy, enable_memory_attention

    out = {}
    enable_memory_attention(model)
    got, _, _ = run_with_policy(model, ids, NAMMPolicy(delay=DELAY), chunk=CHUNK, decode_from=DECODE_FROM)
    out["keep_all_vs_plain"] = float((got - plain).abs().max())
    try:
        ref = eager_logits(model, ids)
    except Exception as e:  # noqa: BLE001 - e.g. a family without an eager_attention_forward in its module
        return {**out, "detail": f"no eager reference: {type(e).__name__}: {str(e)[:200]}"}
    out["eager_vs_plain"] = float((ref - plain).abs().max())
    out["keep_all_vs_eager"] = float((got - ref).abs().max())
    namm = NAMMPolicy(torch.randn(4172, generator=torch.Generator().manual_seed(1)) * 0.5, delay=DELAY)
    got, cache, events = run_with_policy(model, ids, namm, chunk=CHUNK, decode_from=DECODE_FROM)
    out["evict_vs_eager_masked"] = float((got - eager_logits(model, ids, events)).abs().max())
    out["realised_fraction"] = round(cache.realised_fraction(), 3)
    return out


def _outcome(d: dict, atol: float) -> str:
    if d["keep_all_vs_plain"] > atol:
        return "MISMATCH"
    if "eager_vs_plain" not in d:
        return "keep-all equal, no eager reference"
    if d["eager_vs_plain"] > atol:  # the family's eager function is not its default attention: no evict reference
        return "keep-all equal, eager differs from the model"
    return "equal" if max(d["keep_all_vs_eager"], d["evict_vs_eager_masked"]) <= atol else "MISMATCH"


def check_one(family: str, atol: float = 1e-4, max_params: float = 150e6) -> dict:
    """The checks for one family, in this process: in float32, and again in float64 when float32 does not pass
    (deep random models amplify float32 rounding: a chunked run can land far from a one-shot one)."""
    import torch

    from namm_transfer import CaptureError, UnsupportedAttention

    torch.set_num_threads(1)
    rec = {"family": family, "class": causal_lm_families()[family]}
    ids = torch.randint(3, 128, (1, L), generator=torch.Generator().manual_seed(0))
    plain, failures, keep_layers = None, [], False
    for keep_layers in (False, True):  # 2 layers first; else the default layer count (e.g. a fixed layer pattern)
        try:
            model = tiny_model(family, max_params, keep_layers)
            plain = _plain_logits(model, ids)
            break
        except Exception as e:  # noqa: BLE001 - the family's own tiny config: not a finding about namm_transfer
            failures.append(f"{'default layers' if keep_layers else '2 layers'}: {type(e).__name__}: {str(e)[:200]}")
            if isinstance(e, MemoryError):
                break
    if plain is None:
        return {**rec, "outcome": "not runnable here", "detail": "; ".join(failures)}
    rec["layers"] = "default" if keep_layers else 2
    try:
        rec.update(_compare(model, ids, plain), precision="float32")
        if _outcome(rec, atol) != "equal":
            model = tiny_model(family, max_params, keep_layers).double()
            rec["float32"] = {k: rec[k] for k in ("keep_all_vs_plain", "eager_vs_plain", "keep_all_vs_eager",
                                                  "evict_vs_eager_masked") if k in rec}
            rec.update(_compare(model, ids, _plain_logits(model, ids)), precision="float64")
        rec["outcome"] = _outcome(rec, atol)
    except (UnsupportedAttention, CaptureError) as e:
        rec.update(outcome="refused", detail=str(e)[:300])
    except Exception as e:  # noqa: BLE001
        rec.update(outcome="error", detail=f"{type(e).__name__}: {str(e)[:300]}")
    return rec


def _child(family: str, args, conn) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (int(args.max_memory_gb * 2**30),) * 2)
    try:
        conn.send(check_one(family, args.atol, args.max_params))
    except BaseException as e:  # noqa: BLE001 - e.g. MemoryError past the cap: reported, the sweep goes on
        conn.send({"family": family, "outcome": "not runnable here", "detail": f"{type(e).__name__}: {str(e)[:200]}"})


def run_isolated(family: str, args) -> dict:
    """check_one in a forked process (torch and transformers imported once, in the parent), with an address-space
    cap and a time limit, so one family that hangs or needs gigabytes cannot stop the sweep."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    t0 = time.time()
    proc = ctx.Process(target=_child, args=(family, args, child))
    proc.start()
    child.close()
    rec = None
    if parent.poll(args.timeout):
        try:
            rec = parent.recv()
        except EOFError:
            pass
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if rec is None:
        why = f"over --timeout {args.timeout} s" if time.time() - t0 >= args.timeout else \
            f"process ended with {proc.exitcode} (memory cap?)"
        rec = {"family": family, "outcome": "not runnable here", "detail": why}
    return {**rec, "seconds": round(time.time() - t0, 1)}


def summarise(records: list[dict], out: Path) -> None:
    import transformers
    order = ["error", "MISMATCH", "equal", "keep-all equal, eager differs from the model",
             "keep-all equal, no eager reference", "refused", "not runnable here"]
    counts = {o: sum(r["outcome"] == o for r in records) for o in order}
    (out / "summary.json").write_text(json.dumps({"transformers": transformers.__version__, "counts": counts,
                                                   "families": len(records)}, indent=1))
    lines = [f"# Causal-LM families through the memory attention (transformers {transformers.__version__})", "",
             "`python scripts/check_families.py`: " + ", ".join(f"{n} {o}" for o, n in counts.items()), "",
             "| family | outcome | precision | keep-all vs plain | keep-all vs eager | evict vs eager (evicted hidden) | "
             "cache kept | detail |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.1e}"  # noqa: E731
    for r in sorted(records, key=lambda r: (order.index(r["outcome"]), r["family"])):
        detail = r.get("detail", "").replace("|", "/").replace("\n", " ")[:300]
        lines.append(f"| {r['family']} | {r['outcome']} | {r.get('precision', '')} | {fmt(r.get('keep_all_vs_plain'))} | "
                     f"{fmt(r.get('keep_all_vs_eager'))} | {fmt(r.get('evict_vs_eager_masked'))} | "
                     f"{r.get('realised_fraction', '')} | {detail} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", help="comma-separated model types (default: all causal-LM families)")
    ap.add_argument("--out", default="results/families")
    ap.add_argument("--redo", action="store_true", help="check the --families given again, replacing their records")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per family")
    ap.add_argument("--max-memory-gb", type=float, default=8.0, help="address-space cap per family process")
    ap.add_argument("--max-params", type=float, default=150e6, help="skip families larger than this at the tiny settings")
    args = ap.parse_args()
    import torch  # noqa: F401 - imported once here; every family runs in a fork of this process
    import transformers  # noqa: F401

    from helpers_core import run_with_policy  # noqa: F401
    known = causal_lm_families()
    wanted = args.families.split(",") if args.families else list(known)
    unknown = [f for f in wanted if f not in known]
    if unknown:
        sys.exit(f"unknown model type(s) {unknown}: pick from transformers' causal-LM families, e.g. "
                 f"{', '.join(list(known)[:5])} ...")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "families.jsonl"
    done = {json.loads(ln)["family"]: json.loads(ln) for ln in path.read_text().splitlines()} if path.exists() else {}
    todo = [f for f in wanted if f not in done or args.redo]
    if args.redo:
        if not args.families:
            sys.exit("--redo needs --families (to check every family again, start a new --out folder)")
        done = {f: r for f, r in done.items() if f not in todo}
        path.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
        wanted = [f for f in known if f in done or f in todo]  # the summary covers every recorded family
    print(f"{len(todo)} families to check ({len(done)} recorded in {path})", flush=True)
    with path.open("a") as fh:
        for i, family in enumerate(todo, 1):
            rec = run_isolated(family, args)
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done[family] = rec
            print(f"[{i}/{len(todo)}] {family}: {rec['outcome']} {rec.get('detail', '')[:100]}", flush=True)
    summarise([done[f] for f in wanted], out)


if __name__ == "__main__":
    main()
