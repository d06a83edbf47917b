"""The shipped NAMM with the GQA mean taken in bf16 (issue 14) vs in fp32 (before), on the 18 samples of
results/language/eval under the settings recorded there (eviction steps anywhere, the answer included; chunk 128,
8 new tokens), then H2O / L2 / recency / SnapKV at the new NAMM's kept fraction on each sample.

    python results/language/gqa-bf16/rerun.py            # writes records.jsonl and summary.md beside this file

"fp32-mean" reproduces the committed NAMM rows (a check that nothing else changed); "namm" is the new default.
"""
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from namm_transfer import features, load_namm, make_policy  # noqa: E402
import namm_transfer.cache as cache_module  # noqa: E402
from namm_transfer.language.benchmark import evaluate_sample  # noqa: E402
from namm_transfer.language.models import load_causal_lm  # noqa: E402
from namm_transfer.language.tasks import make_split  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_causal_lm("smollm2-135m")
    namm = load_namm(ROOT / "namm_transfer/checkpoints/namm-smollm2")
    committed = {(r["policy"], r["key"]): r for r in map(json.loads, open(ROOT / "results/language/eval/records.jsonl"))}
    out = HERE / "records.jsonl"
    done = {(r["policy"], r["key"]): r for r in map(json.loads, open(out))} if out.exists() else {}
    samples = [(f"{t}/{s.seed}/1024", s) for t in ("passkey", "kv_retrieval", "passage_retrieval")
               for s in make_split(t, "test", 6, 1024, tok)]
    bf16_mean = cache_module.gqa_mean
    for key, sample in samples:
        for label in ("fp32-mean", "namm", "h2o", "l2", "recency", "snapkv"):
            if (label, key) in done:
                continue
            cache_module.gqa_mean = (lambda a, h: features.gqa_mean(a.float(), h)) if label == "fp32-mean" \
                else bf16_mean
            budget = None
            policy = namm
            if label not in ("fp32-mean", "namm"):
                budget = min(max(done[("namm", key)]["kept_fraction"], 1e-3), 1.0)
                policy = make_policy(label, budget=budget, delay=namm.delay)
            t0 = time.perf_counter()
            rec = asdict(evaluate_sample(model, tok, sample, policy, label, key, "raw", 128, 8, budget))
            print(label, key, f"{time.perf_counter() - t0:.1f}s", flush=True)
            done[(label, key)] = rec
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    cache_module.gqa_mean = bf16_mean
    keys = [k for k, _ in samples]
    lines = ["| policy | n | EM | answer p | kept after last step % | realised cache % | committed row (fp32 mean) |",
             "|---|---|---|---|---|---|---|"]
    for label, old in (("fp32-mean", "namm"), ("namm", "namm"), ("h2o", "h2o"), ("l2", "l2"), ("recency", "recency"),
                       ("snapkv", "snapkv")):
        rows, ref = [done[(label, k)] for k in keys], [committed[(old, k)] for k in keys]
        m = lambda rs, f: sum(r[f] for r in rs) / len(rs)  # noqa: E731
        lines.append(f"| {label} | {len(rows)} | {m(rows, 'em'):.3f} | {m(rows, 'answer_prob'):.3f} | "
                     f"{100 * m(rows, 'kept_fraction'):.1f} | {100 * m(rows, 'realised_fraction'):.1f} | "
                     f"EM {m(ref, 'em'):.3f}, p {m(ref, 'answer_prob'):.3f}, cache {100 * m(ref, 'realised_fraction'):.1f}% |")
    same = sum(done[("fp32-mean", k)]["answer_prob"] == committed[("namm", k)]["answer_prob"] for k in keys)
    diff = [abs(done[("fp32-mean", k)]["answer_prob"] - committed[("namm", k)]["answer_prob"]) for k in keys]
    moved = sum(done[("namm", k)]["kept_fraction"] != done[("fp32-mean", k)]["kept_fraction"] for k in keys)
    lines += ["", f"fp32-mean vs the committed NAMM rows: {same}/18 answer p identical, max |diff| {max(diff):.2e}.",
              f"bf16 mean vs fp32 mean: kept fraction changed on {moved}/18 samples."]
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
