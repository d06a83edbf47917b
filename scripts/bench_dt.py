"""KV-cache DT rollout vs the standard recompute-last-K rollout: speed per policy step, as ratios.

    python scripts/bench_dt.py                                  # embedded hopper-medium DT, 1 episode of 1000 steps
    python scripts/bench_dt.py --policies full,window,namm,h2o,l2 --max-steps 500 --repeats 3
    python scripts/bench_dt.py --policies full,namm,h2o --batch 8   # + batched rollout: episodes/s, 8 vs 1

For every policy one Hopper-v5 episode (reset seed --seed) runs with the KV-cache rollout; the recompute
rollout runs the same episode before and after each policy (their mean is the reference, which evens out drift
on a shared machine). Reported per policy: policy ms/step (wall time minus env time: input preparation,
model, eviction), the speed-up recompute ms / kv ms (goal >= 3x), and env steps/s with the env included
and their ratio.
A reference row, *plain KV loop*, times the same episode through the fast path's own arithmetic on one
preallocated key/value buffer per layer with SDPA and none of MemoryCache's machinery (no policy, no eviction
steps, no statistics): what a full-cache KV rollout of this DT costs at least on this machine, and so the highest
full-cache speed-up any cache implementation here could reach (it must take the full cache's actions: compared).
A second one runs the same loop attending only to the newest W tokens (W: the largest final cache of the evicting
policies benchmarked): the ceiling for a rollout that holds W tokens, whatever chooses them.
Baselines run at --budget (default: NAMM's realised fraction when namm is benchmarked, else 0.5); every
policy evicts every --delay tokens (48 = 16 timesteps), except `window` (the K-step window, every timestep).
With --repeats R each number is the median of R runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from envs.kv_rollout import timed_kv_episode  # noqa: E402
from namm_transfer.adapters.decision_transformer import TOKENS_PER_STEP, KVStepper, row_linear  # noqa: E402
from namm_transfer.attention import bottom_right_causal  # noqa: E402
from namm_transfer.cli import budget, float_in, int_in, name_list, run_cli  # noqa: E402
from namm_transfer.policies import FullCache  # noqa: E402
from run_dt import (BASELINES, DEFAULT_DELAY, POLICY_NAMES, UsageError, load_checkpoint,  # noqa: E402
                    load_namm_policy, make_kv_policy)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="hopper-medium")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--state-stats", default=None)
    ap.add_argument("--policies", type=name_list(POLICY_NAMES), default="full,window,namm,h2o,l2")
    ap.add_argument("--namm", default=None)
    ap.add_argument("--budget", type=budget, default=None)
    ap.add_argument("--delay", type=int_in(1), default=DEFAULT_DELAY)
    ap.add_argument("--max-steps", type=int_in(1), default=1000)
    ap.add_argument("--repeats", type=int_in(1), default=1)
    ap.add_argument("--seed", type=int_in(0), default=0)
    ap.add_argument("--target-return", type=float_in(), default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu"],
                    help="CPU only: envs.rollout's recompute rollout builds its inputs on the CPU")
    ap.add_argument("--threads", type=int_in(1), default=1)
    ap.add_argument("--batch", type=int_in(1), default=1,
                    help="also time N episodes (reset seeds seed..seed+N-1) one by one and as one batched kv-cache "
                         "rollout (run_dt.py --batch N): episodes/s of each, their ratio, whether returns match")
    ap.add_argument("--skip-missing-namm", action="store_true", help="drop namm when no checkpoint exists")
    ap.add_argument("--out", default=None, help="also write the results as JSON to this file (default: printed only)")
    args = ap.parse_args(argv)
    args.policy_list = list(args.policies)
    args.policy_list.sort(key=lambda p: (p in BASELINES, POLICY_NAMES.index(p)))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: bench(args) and 0)


def bench(args) -> dict:
    from transformers.utils import logging as transformers_logging

    from envs.kv_rollout import make_env, run_kv, run_recompute
    from envs.registry import get_spec

    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    try:
        spec = get_spec(args.env)
    except ValueError as err:
        raise UsageError(str(err)) from None
    namm = None
    if "namm" in args.policy_list:
        try:
            namm, _ = load_namm_policy(args)
        except UsageError:
            if not args.skip_missing_namm:
                raise
            print("note: no NAMM checkpoint: namm skipped", file=sys.stderr)
            args.policy_list.remove("namm")
    dt = load_checkpoint(args)
    target = args.target_return if args.target_return is not None else spec.target_returns[0]
    steps = min(args.max_steps, dt.max_ep_len)
    env = make_env(spec.gym_id, steps)
    median = statistics.median

    def recompute():
        return run_recompute(dt, env, target, args.seed, max_steps=steps)

    run_recompute(dt, env, target, args.seed, max_steps=min(steps, 50))  # warm-up
    budget = args.budget if args.budget is None or args.budget <= 1 else int(args.budget)
    rows = []
    plain_ms, plain_ref, plain_ret = [], [], None
    for _ in range(args.repeats):
        before = recompute()
        plain_ret, _, _, ms = timed_kv_episode(dt, env, PlainKVLoop(dt.model, steps), target, args.seed, steps)
        plain_ms.append(ms)
        plain_ref.append((before.policy_ms + recompute().policy_ms) / 2)
    for name in args.policy_list:
        if name in BASELINES and budget is None:
            budget = next((r["eviction_fraction"] for r in rows if r["policy"] == "namm"
                           and r["eviction_fraction"] is not None), 0.5)
        kv, ref = [], []
        for _ in range(args.repeats):
            before = recompute()
            kv.append(run_kv(dt, env, make_kv_policy(name, args, dt, namm, budget), target, args.seed,
                             max_steps=steps))
            after = recompute()
            ref.append((before, after))
        ref_ms = median((a.policy_ms + b.policy_ms) / 2 for a, b in ref)
        ref_sps = median((a.steps_per_s + b.steps_per_s) / 2 for a, b in ref)
        kv_ms, kv_sps = median(e.policy_ms for e in kv), median(e.steps_per_s for e in kv)
        if args.batch > 1:
            batch_row = time_batch(dt, spec.gym_id, lambda: make_kv_policy(name, args, dt, namm, budget), target,
                                   args.seed, args.batch, steps)
        rows.append({**(batch_row if args.batch > 1 else {}),
                     "policy": name, "budget": budget if name in BASELINES else None, "steps": kv[0].length,
                     "realised_cache_pct": 100 * kv[0].realised_fraction,
                     "eviction_fraction": kv[0].eviction_fraction, "kv_policy_ms": kv_ms,
                     "recompute_policy_ms": ref_ms, "speedup": ref_ms / kv_ms, "kv_steps_per_s": kv_sps,
                     "recompute_steps_per_s": ref_sps, "speedup_with_env": kv_sps / ref_sps, "return": kv[0].ret,
                     "final_cache_tokens": kv[0].final_cache_tokens})
    small = [r["final_cache_tokens"] for r in rows if r["policy"] not in ("full", "window")]
    plain_window = None
    if small:  # the same loop holding as many tokens as the largest evicting policy ended with
        window = max(1, round(max(small)))
        win_ms, win_ref = [], []
        for _ in range(args.repeats):
            before = recompute()
            win_ms.append(timed_kv_episode(dt, env, PlainKVLoop(dt.model, steps, window), target, args.seed, steps)[3])
            win_ref.append((before.policy_ms + recompute().policy_ms) / 2)
        plain_window = {"window": window, "kv_policy_ms": median(win_ms), "recompute_policy_ms": median(win_ref),
                        "speedup": median(win_ref) / median(win_ms)}
    env.close()
    full_ret = next((r["return"] for r in rows if r["policy"] == "full"), None)
    plain = {"kv_policy_ms": median(plain_ms), "recompute_policy_ms": median(plain_ref),
             "speedup": median(plain_ref) / median(plain_ms), "return": plain_ret,
             "same_return_as_full": None if full_ret is None else plain_ret == full_ret}

    device = f"cpu, {args.threads} thread(s)"
    print(f"{spec.gym_id}, {steps}-step episode (reset seed {args.seed}), {device}, checkpoint {args.checkpoint}"
          + (f", NAMM {args.namm}" if namm is not None else ""))
    print(f"| policy | budget | steps | realised cache % | kv-cache ms/step | recompute-last-K ms/step | speed-up "
          "(goal >= 3x) | kv steps/s (env incl.) | recompute steps/s | speed-up with env |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = "-" if r["budget"] is None else f"{r['budget']:.3g}"
        print(f"| {r['policy']} | {b} | {r['steps']} | {r['realised_cache_pct']:.1f} | {r['kv_policy_ms']:.3f} | "
              f"{r['recompute_policy_ms']:.3f} | {r['speedup']:.2f}x | {r['kv_steps_per_s']:.0f} | "
              f"{r['recompute_steps_per_s']:.0f} | {r['speedup_with_env']:.2f}x |")
    print(f"\nplain KV loop (reference: preallocated K/V + SDPA, no MemoryCache, no policy): {plain['kv_policy_ms']:.3f} "
          f"ms/step against recompute {plain['recompute_policy_ms']:.3f} = {plain['speedup']:.2f}x, the ceiling of a "
          f"full-cache KV rollout here" + ("" if plain["same_return_as_full"] is None else
                                            f"; same return as full: {plain['same_return_as_full']}"))
    if plain_window is not None:
        print(f"plain KV loop holding {plain_window['window']} tokens (a recency cache evicting every forward, the "
              f"largest final cache of the evicting policies above; no MemoryCache, no policy): "
              f"{plain_window['kv_policy_ms']:.3f} ms/step against recompute {plain_window['recompute_policy_ms']:.3f} "
              f"= {plain_window['speedup']:.2f}x, the ceiling of a KV rollout holding that many tokens here")
    if args.batch > 1:
        print(f"\n{args.batch} episodes (reset seeds {args.seed}..{args.seed + args.batch - 1}), env included:")
        print("| policy | one by one, episodes/s | batched, episodes/s | ratio | returns equal |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['policy']} | {r['seq_episodes_per_s']:.3f} | {r['batch_episodes_per_s']:.3f} | "
                  f"{r['batch_ratio']:.2f}x | {r['batch_returns_equal']} |")
    result = {"env": spec.gym_id, "steps": steps, "device": device, "checkpoint": args.checkpoint,
              "namm": args.namm if namm is not None else None, "rows": rows,
              "plain_kv_loop": plain, "plain_kv_loop_window": plain_window}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


class PlainKVLoop(KVStepper):
    """KVStepper's fast path with the MemoryCache replaced by one preallocated (B, heads, slots, head_dim) key and
    value buffer per layer and a direct SDPA call: the full cache's arithmetic with no bookkeeping (the plain KV
    loop of the module docstring). With `window` W, each forward attends over the newest W slots stored before it
    and its own: a recency cache of W tokens evicting after every forward (`Recency(W, sinks=0, delay=1)`'s
    arithmetic), the least a KV rollout holding W tokens can cost here."""

    def __init__(self, model, max_steps: int, window: int | None = None):
        self.slots, self.window = TOKENS_PER_STEP * max_steps, window
        super().__init__(model, FullCache())

    def reset(self) -> None:
        super().reset()
        self.buffers, self.n = None, 0

    def _feed(self, x: torch.Tensor) -> torch.Tensor:
        enc = self._weights or self._collect_weights()
        h = x + enc["wpe0"]
        b, n, d = h.shape
        if self.buffers is None:
            self.buffers = [tuple(x.new_empty(b, w["module"].num_heads, self.slots, w["module"].head_dim)
                                  for _ in range(2)) for w in enc["blocks"]]
        end = self.n + n
        start = 0 if self.window is None else max(0, self.n - self.window)
        corner = bottom_right_causal(end - start, n, x.device) if self.n and n > 1 else None
        for w, (keys, values) in zip(enc["blocks"], self.buffers):
            attn = w["module"]
            y = F.layer_norm(h, (d,), *w["ln_1"])
            qkv = row_linear(y, *w["c_attn"]).view(b, n, 3, attn.num_heads, attn.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            keys[:, :, self.n:end], values[:, :, self.n:end] = k, v
            o = F.scaled_dot_product_attention(q, keys[:, :, start:end], values[:, :, start:end], attn_mask=corner,
                                               is_causal=self.n == 0 and n > 1, scale=attn.scaling)
            h = h + row_linear(o.transpose(1, 2).reshape(b, n, d), *w["c_proj"])
            y = F.layer_norm(h, (d,), *w["ln_2"])
            h = h + row_linear(w["act"](row_linear(y, *w["c_fc"])), *w["mlp_proj"])
        self.n = end
        return F.layer_norm(h, (d,), *enc["ln_f"])

    def _track_fraction(self, n_new: int) -> None:
        pass


def time_batch(dt, gym_id: str, make_policy, target: float, seed: int, n: int, steps: int) -> dict:
    """Episodes/s of n kv-cache episodes one by one and as one batched rollout (env included), and whether the
    returns are bitwise equal."""
    import time

    from envs.kv_rollout import make_env, run_kv, run_kv_batch

    envs = [make_env(gym_id, steps) for _ in range(n)]
    t0 = time.perf_counter()
    one = [run_kv(dt, envs[0], make_policy(), target, seed + i, max_steps=steps) for i in range(n)]
    t1 = time.perf_counter()
    batched = run_kv_batch(dt, envs, make_policy(), target, list(range(seed, seed + n)), max_steps=steps)
    t2 = time.perf_counter()
    for env in envs:
        env.close()
    return {"batch": n, "seq_episodes_per_s": n / (t1 - t0), "batch_episodes_per_s": n / (t2 - t1),
            "batch_ratio": (t1 - t0) / (t2 - t1), "batch_returns_equal": [e.ret for e in one] == [e.ret for e in batched],
            "batch_max_return_diff": max(abs(a.ret - b.ret) for a, b in zip(one, batched))}


if __name__ == "__main__":
    sys.exit(main())
