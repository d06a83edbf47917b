"""Core benchmark: NAMM's measured cost vs its arithmetic share, memory, realised cache (SmolLM2-135M).

    python scripts/bench_core.py [--lengths 1024,2048] [--namm PATH] [--device cpu|cuda] [--out runs/bench_core]
    python scripts/bench_core.py --prefill-ratios [--prefill-length 1024] [--repeats 5]
    python scripts/bench_core.py --e2e [--prompt-tokens 4096] [--new-tokens 256] [--e2e-repeats 3]
    python scripts/bench_core.py --pool-e2e RUN1/e2e.json RUN2/e2e.json --out DIR    # rounds of several runs pooled

For each prompt length and policy (full cache, NAMM with delay 512 -- the --namm checkpoint, or zero parameters
(keep-all, the largest N) when --namm names no checkpoint, e.g. `--namm none` --, H2O at 50%) one chunked prefill
(chunk 128) runs in its own subprocess, so peak RSS is per configuration. Reported:
  * forward s: the whole prefill; NAMM s: NAMM's own time: the spectrogram folded as the queries arrive (the
    policy's attention stream) + the eviction steps (features, scorer, selection);
  * NAMM % of forward: NAMM s / (prefill s - NAMM s);
  * FLOP share: NAMM FLOPs (spectrogram + scorer with its full N x N backward attention, every layer x KV
    head x eviction step) / model forward FLOPs at that context; ratio = measured % / FLOP share (goal <= 1.3);
  * peak cache MB (keys, values, per-token state, buffered attention), peak RSS MB, realised cache %.
Writes JSON + a markdown table.

--prefill-ratios: one process, interleaved and repeated: the unmodified model (transformers' SDPA, DynamicCache)
against the memory attention with FullCache, L2 (50%) and recency (50%), one-shot prefill of --prefill-length
tokens (--prefill-chunk N: chunked); median seconds and median of the per-repeat ratios to the unmodified model.

--e2e: what users evict for. A --prompt-tokens prompt, chunked prefill (128), --new-tokens greedy tokens, each
policy in its own process: the unmodified model, full cache, NAMM (the shipped checkpoint), H2O at NAMM's realised
cache. Prefill s, decode ms/token, peak RSS, peak cache MB, realised cache, tokens equal to the full cache's; and
the ratios to the full cache. Times come from --e2e-repeats rounds, each running every policy once in turn: the
medians are reported, and the ratios to the full cache are medians of the within-round ratios with their range
(decode at 4K tokens is memory-bound and drifts with the machine's load). Writes e2e.json + e2e.md.

Peak RSS is measured from the loaded model on (the loading peak is reset with clear_refs). In --e2e each policy
runs timed with the default allocator (once per round), and once more with glibc's mmap threshold fixed (`memory_env`) for
its peak RSS, which then follows live memory rather than heap fragmentation (the two must generate the same tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def memory_env() -> dict:
    """Environment of the child that measures a policy's memory: glibc's mmap threshold fixed at 128 KiB (unless
    the caller set one), so large tensors are mapped and unmapped as they are allocated and freed, and peak RSS
    follows live memory rather than how the heap fragmented after the policy's temporary buffers (glibc's default
    raises the threshold after the first large free; the heap then keeps freed space, differently for each policy).
    Mapping every large tensor slows a run down (page faults), so times come from a separate child with the
    default allocator."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    return env


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def start_peak_rss() -> float:
    """Reset the process's peak-RSS mark (Linux: clear_refs 5) so the peak measured next is the run's, not the
    model loading's; return the RSS now (MB). Elsewhere the lifetime peak (ru_maxrss) is all there is."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    now = _status_mb("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss() -> float:
    """Peak RSS (MB) since start_peak_rss() (since the process started where it cannot be reset)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def forward_flops(cfg, length: int, chunk: int) -> float:
    """Analytic FLOPs of a chunked prefill of `length` tokens (all logits computed, as HF does)."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q_dim, kv_dim = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_token = layers * 2 * (h * q_dim * 2 + h * kv_dim * 2 + 3 * h * inter) + 2 * h * cfg.vocab_size
    attn = layers * 2 * 2 * q_dim * sum(t + 1 for t in range(length))  # QK^T and AV, causal
    return per_token * length + attn


def namm_flops(log, kv_heads: int, frame_slots: int) -> float:
    """Implemented arithmetic of NAMM over a run: the streamed spectrogram (frame_slots = (row, head, frame, slot)
    spectra computed, each a windowed DFT as a matmul + magnitude + EMA fold) and, at every eviction step, the
    scorer over the slots of that step (QK^T and AV over all N^2 pairs)."""
    from namm_transfer.features import flop_counts
    per_frame_slot = flop_counts(1, 16)["stft"]  # one frame of one slot
    return frame_slots * per_frame_slot + sum(kv_heads * flop_counts(rec.before, 16)["scorer"] for rec in log)


def run_one(args) -> dict:
    from namm_transfer import H2O, FullCache, MemoryCache, NAMMPolicy, enable_memory_attention, load_namm
    from namm_transfer import policies as pol
    from namm_transfer.adapters.causal_lm import chunk_bounds
    from namm_transfer.language.models import load_causal_lm
    import pydoc_data.topics

    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model, device=args.device)
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tok(text, return_tensors="pt").input_ids[:, :args.length].to(args.device)
    namm_source = "zero parameters (keep-all: the largest N, worst case)"
    if args.policy == "full":
        policy = FullCache()
    elif args.policy == "h2o":
        policy = H2O(0.5)
    else:
        try:
            policy, namm_source = load_namm(args.namm), args.namm
        except FileNotFoundError:
            policy = NAMMPolicy()
    timer = {"namm": 0.0}

    def timed(fn):  # fn's time (device work included) adds to NAMM's
        def wrapper(*a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **k)
            if args.device == "cuda":
                torch.cuda.synchronize()
            timer["namm"] += time.perf_counter() - t
            return out
        return wrapper

    policy.step = timed(policy.step)
    streams = []
    make_stream = policy.attention_stream

    def timed_stream():  # the spectrogram is folded as the queries arrive: its time is NAMM's too
        stream = make_stream()
        if stream is not None and args.policy == "namm":
            stream.add = timed(stream.add)
            streams.append(stream)
        return stream

    policy.attention_stream = timed_stream
    enable_memory_attention(model)
    cache = MemoryCache(policy)
    rss0 = start_peak_rss()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    peak_cache = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for s, e in chunk_bounds(0, ids.shape[1], 128):
            model(input_ids=ids[:, s:e], cache=cache, use_cache=True,
                  position_ids=torch.arange(s, e, device=ids.device)[None])
            peak_cache = max(peak_cache, cache.stored_bytes())
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"length": args.length, "policy": args.policy, "seconds": seconds, "namm_seconds": timer["namm"],
           "peak_cache_mb": peak_cache / 2**20, "realised_fraction": cache.realised_fraction(),
           "peak_rss_mb": peak_rss(), "rss_before_mb": rss0,
           "forward_flops": forward_flops(model.config, args.length, 128), "device": args.device}
    if args.device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if args.policy == "namm":
        out["namm_flops"] = namm_flops(cache.log, model.config.num_key_value_heads,
                                       sum(st.frame_slots for st in streams))
        out["namm_source"] = namm_source
    return out


def prompt_ids(tok, length: int, device: str) -> torch.Tensor:
    import pydoc_data.topics
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tok(text, return_tensors="pt").input_ids[:, :length].to(device)
    if ids.shape[1] < length:
        raise ValueError(f"the benchmark text has only {ids.shape[1]} tokens")
    return ids


def prefill_ratios(args) -> dict:
    """Unmodified model vs memory attention (FullCache, L2, recency), interleaved in one process."""
    import statistics

    from transformers import DynamicCache

    from namm_transfer import FullCache, L2Norm, MemoryCache, Recency, enable_memory_attention
    from namm_transfer.adapters.causal_lm import chunk_bounds
    from namm_transfer.language.models import load_causal_lm

    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model, device=args.device)
    ids = prompt_ids(tok, args.prefill_length, args.device)
    chunk = args.prefill_chunk or ids.shape[1]
    makers = {"plain": None, "full": FullCache, "l2": lambda: L2Norm(0.5), "recency": lambda: Recency(0.5)}

    def run(name):
        if name == "plain":
            model.set_attn_implementation("sdpa")
            cache, delay = DynamicCache(), None
        else:
            enable_memory_attention(model)
            cache = MemoryCache(makers[name]())
            delay = cache.policy.delay
        t = time.perf_counter()
        with torch.no_grad():
            for s, e in chunk_bounds(0, ids.shape[1], chunk, delay):
                model(input_ids=ids[:, s:e], cache=cache, use_cache=True,
                      position_ids=torch.arange(s, e, device=ids.device)[None])
        return time.perf_counter() - t

    for name in makers:  # warm-up
        run(name)
    times = {n: [] for n in makers}
    for _ in range(args.repeats):
        for name in makers:
            times[name].append(run(name))
    out = {"length": ids.shape[1], "chunk": chunk, "repeats": args.repeats, "threads": args.threads,
           "median_seconds": {n: statistics.median(t) for n, t in times.items()}, "seconds": times,
           "ratio_to_plain": {n: statistics.median(a / b for a, b in zip(times[n], times["plain"]))
                              for n in makers if n != "plain"}}
    return out


def run_e2e(args) -> dict:
    """One policy of the end-to-end benchmark (own process: peak RSS is this configuration's)."""
    from transformers import DynamicCache

    from namm_transfer import H2O, FullCache, MemoryCache, enable_memory_attention, load_namm
    from namm_transfer.adapters.causal_lm import chunk_bounds, greedy_decode, last_logits_only, prefill
    from namm_transfer.language.models import load_causal_lm

    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model, device=args.device)
    ids = prompt_ids(tok, args.prompt_tokens, args.device)
    peak = [0]
    rss0 = start_peak_rss()
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.policy == "plain":
            model.set_attn_implementation("sdpa")
            cache, head = DynamicCache(), last_logits_only(model)  # the output head on the last position, as prefill()
            for s, e in chunk_bounds(0, ids.shape[1], 128):
                out = model(input_ids=ids[:, s:e], cache=cache, use_cache=True, **head)
            t1 = time.perf_counter()
            logits, generated = out.logits[:, -1], []
            for i in range(args.new_tokens):
                nxt = logits.argmax(-1)
                generated.append(int(nxt[0]))
                if i + 1 == args.new_tokens:
                    break
                logits = model(input_ids=nxt[:, None], cache=cache, use_cache=True).logits[:, -1]
            t2 = time.perf_counter()
            peak[0] = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
            realised = 1.0
        else:
            policy = {"full": FullCache, "h2o": lambda: H2O(args.budget)}.get(args.policy, lambda: load_namm(args.namm))()
            enable_memory_attention(model)
            cache = MemoryCache(policy)

            def track(c):
                peak[0] = max(peak[0], c.stored_bytes())
            fractions = []
            logits, _, fractions = prefill(model, ids, cache, 128)
            track(cache)
            t1 = time.perf_counter()
            gen, _, _ = greedy_decode(model, cache, logits, args.new_tokens, set(), ids.device, fractions,
                                      after_step=track)
            t2 = time.perf_counter()
            generated, realised = gen[0], cache.realised_fraction()
    return {"policy": args.policy, "prompt_tokens": ids.shape[1], "new_tokens": len(generated),
            "prefill_seconds": t1 - t0, "decode_ms_per_token": 1000 * (t2 - t1) / max(1, len(generated) - 1),
            "peak_rss_mb": peak_rss(), "rss_before_mb": rss0, "peak_rss_above_start_mb": peak_rss() - rss0,
            "peak_cache_mb": peak[0] / 2**20,
            "realised_fraction": realised, "tokens": generated, "budget": args.budget}


def _ratio(row: dict, key: str) -> str:
    """'0.87 [0.79, 0.94]': the median within-round ratio to the full cache and its range (the full cache: 1.00)."""
    text = f"{row[f'{key}_vs_full']:.2f}"
    if row["policy"] == "full":
        return text
    lo, hi = row[f"{key}_vs_full_range"]
    return f"{text} [{lo:.2f}, {hi:.2f}]"


def e2e(args) -> int:
    from namm_transfer.cli import UsageError
    from namm_transfer.records import write_json, write_text
    from namm_transfer.runs import content_hash

    policies = ["plain", "full", "namm", "h2o"]

    def child(policy: str, budget: float, env) -> dict:
        cmd = [sys.executable, __file__, "--one-e2e", "--policy", policy, "--model", args.model, "--namm", args.namm,
               "--device", args.device, "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--budget", repr(budget)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            raise UsageError(f"the {policy} end-to-end run failed:\n{res.stderr[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    # times: --e2e-repeats rounds, each running every policy once in turn (a slow spell of the machine then hits
    # all policies of a round alike; ratios to the full cache are taken within a round, their median reported)
    budgets = {p: 1.0 for p in policies}
    timed: dict[str, list[dict]] = {p: [] for p in policies}
    for rnd in range(args.e2e_repeats):
        for policy in policies:
            if policy == "h2o":  # NAMM's realised cache (its runs generate the same tokens, so the same cache)
                budgets["h2o"] = timed["namm"][0]["realised_fraction"]
            timed[policy].append(t := child(policy, budgets[policy], None))
            if t["tokens"] != timed[policy][0]["tokens"]:
                raise UsageError(f"the {policy} runs generated different tokens")
            print(f"  round {rnd + 1}/{args.e2e_repeats} {policy:5s} prefill {t['prefill_seconds']:.1f}s decode "
                  f"{t['decode_ms_per_token']:.1f} ms/token", file=sys.stderr)
    rows = {}
    for policy in policies:  # memory: once per policy with a fixed mmap threshold (same tokens required)
        measured = child(policy, budgets[policy], memory_env())
        if measured["tokens"] != timed[policy][0]["tokens"]:
            raise UsageError(f"the {policy} memory run generated other tokens than its timed run")
        runs = timed[policy]
        rows[policy] = {**runs[0], **{k: measured[k] for k in ("peak_rss_mb", "rss_before_mb",
                                                               "peak_rss_above_start_mb", "peak_cache_mb")},
                        "prefill_seconds": statistics.median(r["prefill_seconds"] for r in runs),
                        "decode_ms_per_token": statistics.median(r["decode_ms_per_token"] for r in runs),
                        "rounds": [{k: r[k] for k in ("prefill_seconds", "decode_ms_per_token")} for r in runs]}
    full = rows["full"]
    for r in rows.values():
        same = 0
        for a, b in zip(r["tokens"], full["tokens"]):
            if a != b:
                break
            same += 1
        r["tokens_equal_to_full"] = same
        r["answer_equal_to_full"] = r["tokens"] == full["tokens"]
        for key in ("peak_rss_mb", "peak_rss_above_start_mb", "peak_cache_mb"):
            r[f"{key}_vs_full"] = r[key] / full[key]
        for key in ("prefill_seconds", "decode_ms_per_token"):  # within-round ratios: median, and their range
            ratios = [a[key] / b[key] for a, b in zip(r["rounds"], full["rounds"])]
            r[f"{key}_vs_full"] = statistics.median(ratios)
            r[f"{key}_vs_full_range"] = [min(ratios), max(ratios)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    namm_hash = content_hash(args.namm) if Path(args.namm).exists() else None
    write_json(out / "e2e.json", {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                  "threads": args.threads, "device": args.device, "rounds": args.e2e_repeats,
                                  "namm": args.namm, "namm_hash": namm_hash, "rows": rows})
    lines = ["| policy | prefill s | decode ms/token | peak RSS MB | RSS growth MB | peak cache MB | realised cache % "
             "| prefill / full | decode / full | peak RSS / full | RSS growth / full | peak cache / full "
             "| first tokens equal to full |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['prefill_seconds']:.1f} | {r['decode_ms_per_token']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_above_start_mb']:.0f} | {r['peak_cache_mb']:.0f} | {100 * r['realised_fraction']:.1f} | "
                     f"{_ratio(r, 'prefill_seconds')} | {_ratio(r, 'decode_ms_per_token')} | "
                     f"{r['peak_rss_mb_vs_full']:.2f} | {r['peak_rss_above_start_mb_vs_full']:.2f} | "
                     f"{r['peak_cache_mb_vs_full']:.2f} | "
                     f"{r['tokens_equal_to_full']}/{r['new_tokens']} |")
    table = "\n".join(lines) + (f"\n\n{args.prompt_tokens}-token prompt + {args.new_tokens} greedy tokens; device "
                                 f"{args.device}, {args.threads} thread(s); times: median of {args.e2e_repeats} "
                                 "rounds (each running every policy once in turn), ratios to full: median of the "
                                 "within-round ratios [lowest, highest]; "
                                 f"NAMM {args.namm} ({namm_hash}); H2O at NAMM's realised cache. Peak RSS "
                                 "from the model loaded on (the loading's own peak reset); RSS growth = that peak "
                                 "minus the RSS before the prompt (the first forward also pages in the weights); "
                                 "memory from a second run with glibc's mmap threshold at 128 KiB, times from a run "
                                 "with the default allocator.\n")
    write_text(out / "e2e.md", table)
    print(table)
    return 0


def pool_e2e(paths: list[str]) -> dict:
    """The within-round ratios to the full cache of several --e2e result files (same prompt, tokens, device and
    NAMM), pooled: per policy, every round's ratio, their median and a bootstrap 95% interval of the median over
    rounds (decoding at 4K tokens drifts with the machine: more rounds pin the median down)."""
    from namm_transfer.cli import UsageError
    from namm_transfer.reporting.bootstrap import median_ci

    runs = []
    for path in paths:
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"{path}: not a readable bench_core --e2e result ({err})") from None
    keys = ("prompt_tokens", "new_tokens", "threads", "device", "namm_hash")
    for path, run in zip(paths, runs):
        if "rows" not in run or any(run.get(k) != runs[0].get(k) for k in keys):
            raise UsageError(f"{path} is not an --e2e result measured like {paths[0]} (these must match: "
                             f"{', '.join(keys)})")
        if any(run["rows"][p]["tokens"] != runs[0]["rows"][p]["tokens"] for p in runs[0]["rows"]):
            raise UsageError(f"{path}: a policy generated other tokens than in {paths[0]}")
    pooled = {"files": list(paths), **{k: runs[0].get(k) for k in keys}, "policies": {}}
    for policy in runs[0]["rows"]:
        entry = {"realised_fraction": runs[0]["rows"][policy]["realised_fraction"]}
        for key in ("decode_ms_per_token", "prefill_seconds"):
            ratios = [a[key] / b[key] for run in runs
                      for a, b in zip(run["rows"][policy]["rounds"], run["rows"]["full"]["rounds"])]
            median, lo, hi = median_ci(ratios)
            entry[key] = {"ratios": ratios, "median": median, "ci95": [lo, hi]}
        pooled["policies"][policy] = entry
    pooled["rounds"] = len(pooled["policies"]["full"]["decode_ms_per_token"]["ratios"])
    return pooled


def pool_report(args) -> int:
    from namm_transfer.records import write_json, write_text
    pooled = pool_e2e(args.pool_e2e)
    lines = ["| policy | realised cache % | rounds | decode / full: median [95% CI] | decode / full, every round | "
             "prefill / full: median [95% CI] |", "|---|---|---|---|---|---|"]
    for name, e in pooled["policies"].items():
        if name == "full":
            continue
        d, p = e["decode_ms_per_token"], e["prefill_seconds"]
        lines.append(f"| {name} | {100 * e['realised_fraction']:.1f} | {len(d['ratios'])} | {d['median']:.2f} "
                     f"[{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}] | {', '.join(f'{r:.2f}' for r in d['ratios'])} | "
                     f"{p['median']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] |")
    table = "\n".join(lines) + (f"\n\nWithin-round ratios to the full cache pooled over {pooled['rounds']} rounds of "
                                 f"{len(pooled['files'])} runs ({', '.join(pooled['files'])}); median and a percentile "
                                 "bootstrap 95% interval over rounds.\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "e2e-pooled.json", pooled)
    write_text(out / "e2e-pooled.md", table)
    print(table)
    return 0


def main(argv=None) -> int:
    from namm_transfer.checkpoints import DEFAULT_NAMM
    from namm_transfer.cli import default_out, int_in, number_list, out_help, run_cli
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=number_list(int_in(16), "lengths"), default="1024,2048")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--namm", default=str(DEFAULT_NAMM))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int_in(1), default=1)
    ap.add_argument("--out", default=str(default_out("bench_core")), help=out_help("bench_core"))
    ap.add_argument("--prefill-ratios", action="store_true",
                    help="unmodified model vs FullCache / L2 / recency prefill, interleaved in one process")
    ap.add_argument("--prefill-length", type=int_in(16), default=1024)
    ap.add_argument("--prefill-chunk", type=int_in(0), default=0, help="0 = one-shot prefill")
    ap.add_argument("--repeats", type=int_in(1), default=5)
    ap.add_argument("--e2e", action="store_true", help="end-to-end: long prompt + generation, full vs NAMM vs H2O")
    ap.add_argument("--prompt-tokens", type=int_in(16), default=4096)
    ap.add_argument("--new-tokens", type=int_in(1), default=256)
    ap.add_argument("--e2e-repeats", type=int_in(1), default=3,
                    help="--e2e: rounds of timed runs (every policy once per round); medians are reported")
    ap.add_argument("--pool-e2e", nargs="+", metavar="E2E_JSON", default=None,
                    help="pool the rounds of several --e2e results (e2e.json files of the same settings): median "
                         "within-round ratios with bootstrap 95%% intervals -> <out>/e2e-pooled.json/.md")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one-e2e", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    if args.one_e2e:
        print(json.dumps(run_e2e(args)))
        return 0
    if args.pool_e2e:
        return run_cli(lambda: pool_report(args))
    if args.prefill_ratios:
        return run_cli(lambda: prefill_report(args))
    if args.e2e:
        return run_cli(lambda: e2e(args))
    return run_cli(lambda: bench(args))


def prefill_report(args) -> int:
    from namm_transfer.records import write_json
    res = prefill_ratios(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "prefill_ratios.json", res)
    print(f"prefill of {res['length']} tokens (chunk {res['chunk']}), median of {res['repeats']} interleaved repeats:")
    print(f"  plain {res['median_seconds']['plain']:.3f}s")
    for n, r in res["ratio_to_plain"].items():
        print(f"  {n:8s} {res['median_seconds'][n]:.3f}s  {r:.3f}x plain")
    return 0


def bench(args) -> int:
    """Each (length, policy) in its own process (clean peak memory), then the table."""
    from namm_transfer.cli import UsageError, check_device, load_namm_arg
    from namm_transfer.records import write_json, write_text

    check_device(args.device)
    try:
        load_namm_arg(args.namm)  # a bad --namm is reported here, not as a child's traceback
    except UsageError as err:
        if "no NAMM checkpoint" not in str(err):  # a missing one is measured with zero parameters
            raise
    rows = []
    for length in args.lengths:
        for policy in ["full", "namm", "h2o"]:
            cmd = [sys.executable, __file__, "--one", "--length", str(length), "--policy", policy, "--model",
                   args.model, "--namm", args.namm, "--device", args.device, "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise UsageError(f"the {policy} run at {length} tokens failed:\n{res.stderr[-2000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  {length:5d} {policy:5s} {rows[-1]['seconds']:.1f}s", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench_core.json", rows)
    lines = ["| tokens | policy | forward s | NAMM s | NAMM % of forward | FLOP share % | measured / FLOP share "
             "| peak cache MB | peak RSS MB | realised cache % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = measured = ratio = ""
        if r["policy"] == "namm":
            m = 100 * r["namm_seconds"] / (r["seconds"] - r["namm_seconds"])
            f = 100 * r["namm_flops"] / r["forward_flops"]
            share, measured, ratio = f"{f:.1f}", f"{m:.1f}", f"{m / f:.2f}"
        lines.append(f"| {r['length']} | {r['policy']} | {r['seconds']:.1f} | {r['namm_seconds']:.2f} | {measured} | "
                     f"{share} | {ratio} | {r['peak_cache_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{100 * r['realised_fraction']:.1f} |")
    namm_src = next((r["namm_source"] for r in rows if r["policy"] == "namm"), "")
    table = "\n".join(lines) + f"\n\nNAMM: {namm_src}; device {args.device}, {args.threads} thread(s).\n"
    write_text(out / "bench_core.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
