"""scripts/eval_language.py end to end on a tiny model, matched baselines, and resume."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from namm_transfer import save_namm

ROOT = Path(__file__).resolve().parents[1]


def run(out, namm):
    cmd = [sys.executable, str(ROOT / "scripts/eval_language.py"), "--model", "tiny-llama", "--namm", str(namm),
           "--tasks", "passkey", "--tokens", "300", "--n", "2", "--policies", "full,namm,h2o,l2",
           "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_eval_language_matches_budgets_and_resumes(tmp_path):
    from namm_transfer.namm import NAMMConfig
    params = torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5
    save_namm(tmp_path / "namm", params, None, NAMMConfig(delay=128))
    out = tmp_path / "eval"
    stdout = run(out, tmp_path / "namm")
    rows = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and "| all | namm |" in stdout
    by = {(r["policy"], r["key"]): r for r in rows}
    for (pol, key), r in by.items():
        if pol in ("h2o", "l2"):
            assert r["budget"] == by[("namm", key)]["kept_fraction"]
            assert abs(r["kept_fraction"] - r["budget"]) < 0.02
    assert by[next(k for k in by if k[0] == "full")]["realised_fraction"] == 1.0
    # resume: drop the last record, rerun, only it is recomputed
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    run(out, tmp_path / "namm")
    again = (out / "records.jsonl").read_text().splitlines()
    assert again[:-1] == lines[:-1] and len(again) == 8
    assert json.loads((out / "summary.json").read_text()) and json.loads((out / "paired.json").read_text())


def test_teacher_forcing_across_an_eviction_boundary():
    """A prompt ending just before a delay multiple: the answer chunk must be cut at the boundary."""
    from namm_transfer import NAMMPolicy
    from namm_transfer.language.benchmark import evaluate_sample
    from namm_transfer.language.models import tiny_random_lm, tiny_tokenizer
    from namm_transfer.language.tasks import TaskSample
    model, tok = tiny_random_lm("llama"), tiny_tokenizer()
    for pad in range(4):
        sample = TaskSample("passkey", "test", 0, "x" * (118 + pad), "q?", "a", "12345")
        n = tok(sample.prompt(tok), return_tensors="pt").input_ids.shape[1]
        rec = evaluate_sample(model, tok, sample, NAMMPolicy(torch.randn(4172) * 0.3, delay=128), "namm", "k")
        assert 0 <= rec.answer_prob <= 1 and n > 0


def test_protocols_say_where_eviction_steps_run():
    """context-only: no eviction step after the context; query-aware: none inside the answer; None: anywhere."""
    from namm_transfer import H2O
    from namm_transfer.language import benchmark
    from namm_transfer.language.models import tiny_random_lm, tiny_tokenizer
    from namm_transfer.language.tasks import context_token_count, eviction_limit, make_split
    model, tok = tiny_random_lm("llama"), tiny_tokenizer()
    sample = make_split("passkey", "test", 1, 300, tok)[0]
    n = len(tok(sample.prompt(tok)).input_ids)
    ctx = context_token_count(sample, tok)
    ids = tok(sample.prompt(tok)).input_ids
    assert tok.decode(ids[ctx:]).lstrip().startswith(sample.question.split()[0])
    assert sample.context.endswith(tok.decode(ids[:ctx]).strip()[-10:])
    seen = {}
    real = benchmark.MemoryCache

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["cache"] = self
    benchmark.MemoryCache = Spy
    try:
        for protocol, limit in (("context-only", ctx), ("query-aware", n)):
            assert eviction_limit(sample, tok, protocol) == limit
            benchmark.evaluate_sample(model, tok, sample, H2O(0.5, delay=16), "h2o", "k", max_new_tokens=4,
                                      evict_until=limit)
            steps = {r.tokens_seen for r in seen["cache"].log}
            assert steps and max(steps) <= limit and max(steps) > limit - 16
        benchmark.evaluate_sample(model, tok, sample, H2O(0.5, delay=16), "h2o", "k", max_new_tokens=16)
        assert max(r.tokens_seen for r in seen["cache"].log) > n  # unrestricted: steps run in the answer too
    finally:
        benchmark.MemoryCache = real
    with pytest.raises(ValueError, match="unknown protocol"):
        eviction_limit(sample, tok, "everywhere")


def test_summary_has_intervals_and_paired_differences():
    from namm_transfer.language.benchmark import paired_differences, summarise
    rows = []
    for i in range(20):
        for pol, p in (("full", 0.8), ("namm", 0.7), ("h2o", 0.5 + 0.4 * (i % 2))):
            rows.append({"policy": pol, "task": "passkey" if i < 10 else "kv", "key": f"k{i}", "em": float(p > 0.6),
                         "char_acc": p, "answer_prob": p, "realised_fraction": 0.5, "prefill_tokens_per_s": 1.0})
    table, md = summarise(rows, ["full", "namm", "h2o"])
    namm_all = next(r for r in table if r["task"] == "all" and r["policy"] == "namm")
    assert namm_all["relative_to_full"] == pytest.approx(0.875) and namm_all["relative_to_full_ci95"][0] == \
        pytest.approx(0.875)
    assert "[95% CI]" in md
    diffs, md2 = paired_differences(rows, "namm", ["h2o"])
    d = next(r for r in diffs if r["task"] == "all")
    assert d["answer_prob_diff"] == pytest.approx(0.0) and d["answer_prob_diff_ci95"][0] < 0 < \
        d["answer_prob_diff_ci95"][1] and d["verdict"] == "inside the noise (answer p)"


def test_eval_language_refuses_bad_arguments_and_other_settings(tmp_path, capsys):
    """Arguments are checked before any work; a rerun into the folder with another model, NAMM (even rewritten at
    the same path) or --tokens is refused with the difference named, and nothing there changes."""
    from helpers_inputs import refused, script, snapshot
    mod = script("eval_language")
    save_namm(tmp_path / "namm", torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5, None)
    out = tmp_path / "eval"
    base = ["--model", "tiny-llama", "--namm", str(tmp_path / "namm"), "--tasks", "passkey", "--tokens", "300",
            "--n", "2", "--policies", "full,namm", "--out", str(out), "--no-progress"]
    for bad, msg in ((["--n", "0"], "'0' is not an integer in [1, 1000000]"),
                     (["--budget", "1.5"], "whole number of tokens >= 2"),
                     (["--tasks", "passkey,passkey"], "repeated ['passkey']"),
                     (["--policies", "full,lru"], "unknown ['lru']"), (["--chunk", "0"], "an integer >= 1"),
                     (["--threads", "0"], "an integer >= 1"), (["--namm", str(tmp_path / "none")], "no NAMM checkpoint")):
        refused(mod.main, base + bad, capsys, msg)
    assert not out.exists()
    assert mod.main(base) == 0
    before = snapshot(out)
    assert json.loads((out / "run.json").read_text())["model_hash"] == "generated (seed 0)"
    refused(mod.main, [*base, "--tokens", "320"], capsys, "other settings", "tokens: recorded 300, this run 320")
    refused(mod.main, [*base, "--model", "tiny-qwen2"], capsys, "model: recorded 'tiny-llama', this run 'tiny-qwen2'")
    refused(mod.main, [*base, "--split", "validation"], capsys, "split: recorded 'test', this run 'validation'")
    save_namm(tmp_path / "namm", torch.randn(4172, generator=torch.Generator().manual_seed(1)) * 0.5, None)
    refused(mod.main, base, capsys, "namm_hash: recorded 'sha256:")
    assert snapshot(out) == before
    # a smaller scope reuses its records and summarises exactly them (not every record in the folder)
    smaller = [*base[:base.index("--n")], "--n", "1", "--policies", "full", "--out", str(out), "--no-progress"]
    assert mod.main(smaller) == 0  # no NAMM in this run: the rewritten one is not used
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["task"], r["policy"], r["n"]) for r in summary} == {("passkey", "full", 1), ("all", "full", 1)}
    assert len((out / "records.jsonl").read_text().splitlines()) == 4


def test_validation_split_runs_apart_from_test(tmp_path):
    """--split validation scores the search's validation prompts (seeds 1,000,000+), its rows are labelled so they
    never share a table row with test results, and a run recorded before --split existed resumes as a test run."""
    from helpers_inputs import script
    from namm_transfer.reporting import read_results
    mod = script("eval_language")
    base = ["--model", "tiny-llama", "--tasks", "passkey", "--tokens", "300", "--n", "1", "--policies", "full",
            "--no-progress"]
    assert mod.main([*base, "--split", "validation", "--out", str(tmp_path / "val")]) == 0
    (rec,) = [json.loads(l) for l in (tmp_path / "val" / "records.jsonl").read_text().splitlines()]
    assert rec["key"] == "passkey/1000000/300"
    md = (tmp_path / "val" / "summary.md").read_text()
    assert "validation split" in md and "baselines at --budget 0.5 (kept after each eviction step, every 512" in md
    assert {r.benchmark for r in read_results(tmp_path / "val")} == {"passkey (~300 tokens) [validation split]"}
    assert mod.main([*base, "--out", str(tmp_path / "test")]) == 0
    run_file = tmp_path / "test" / "run.json"
    legacy = {k: v for k, v in json.loads(run_file.read_text()).items() if k != "split"}
    run_file.write_text(json.dumps(legacy))
    assert mod.main([*base, "--out", str(tmp_path / "test")]) == 0
    (rec,) = [json.loads(l) for l in (tmp_path / "test" / "records.jsonl").read_text().splitlines()]
    assert rec["key"] == "passkey/2000000/300"
    assert {r.benchmark for r in read_results(tmp_path / "test")} == {"passkey (~300 tokens)"}
