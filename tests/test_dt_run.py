"""scripts/run_dt.py and scripts/bench_dt.py end to end on a tiny DT checkpoint (in-process, temp dirs)."""
import json

import pytest
import torch
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from helpers_inputs import save_tiny_dt
from helpers_inputs import script as _script
from namm_transfer import save_namm


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random 1-layer DT saved like scripts/train_dt.py does, plus a random NAMM."""
    root = tmp_path_factory.mktemp("dt")
    save_tiny_dt(root / "ckpt")
    params = torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5
    save_namm(root / "namm", params, None, meta={"note": "random test NAMM"})
    return root


def test_run_dt_end_to_end_and_resume(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    run_dt = _script("run_dt")
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_checkpoint / "ckpt"), "--namm", str(tiny_checkpoint / "namm"),
            "--policies", "full,h2o,window,namm,l2", "--episodes", "1", "--max-steps", "40", "--out", str(out),
            "--no-progress"]
    assert run_dt.main(args) == 0
    printed = capsys.readouterr().out
    assert "recompute-last-K" in printed and "kv-cache" in printed and "random test NAMM" in printed
    recs = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert [(r["rollout"], r["policy"]) for r in recs] == [
        ("recompute-last-K", "full"), ("kv-cache", "full"), ("kv-cache", "window"), ("kv-cache", "namm"),
        ("kv-cache", "h2o"), ("kv-cache", "l2")]
    by = {r["policy"]: r for r in recs if r["rollout"] == "kv-cache"}
    assert by["namm"]["eviction_fraction"] is not None
    assert by["h2o"]["budget"] == pytest.approx(by["namm"]["eviction_fraction"])
    assert "NAMM" in by["h2o"]["budget_source"]
    assert set(recs[0]["scores"]) == {"d4rl", "local"}
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 6 and (out / "table.md").read_text().count("| kv-cache |") == 5

    # a rerun with one more episode runs only the new (rollout, policy, seed, episode) keys
    import envs.kv_rollout as kv

    calls = []
    real_kv, real_re = kv.run_kv, kv.run_recompute
    monkeypatch.setattr(kv, "run_kv", lambda *a, **k: calls.append("kv") or real_kv(*a, **k))
    monkeypatch.setattr(kv, "run_recompute", lambda *a, **k: calls.append("re") or real_re(*a, **k))
    args[args.index("--episodes") + 1] = "2"
    assert run_dt.main(args) == 0
    assert calls == ["re", "kv", "kv", "kv", "kv", "kv"]
    recs2 = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert recs2[:6] == recs and {r["episode"] for r in recs2[6:]} == {1}
    calls.clear()
    assert run_dt.main(args) == 0 and calls == []
    # other settings in the same folder are refused
    assert run_dt.main([*args, "--target-return", "1800"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_run_dt_clear_errors(tiny_checkpoint, tmp_path, capsys):
    run_dt = _script("run_dt")
    assert run_dt.main(["--env", "hopper-nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'hopper-nope'" in err and "hopper-medium" in err and "walker2d-expert" in err
    assert run_dt.main(["--checkpoint", str(tiny_checkpoint / "ckpt"), "--namm", str(tmp_path / "none"),
                        "--out", str(tmp_path)]) == 2
    assert "no NAMM checkpoint" in capsys.readouterr().err
    # the Hub is not reachable in tests (HF_HUB_OFFLINE=1): a clear message instead of a traceback
    assert run_dt.main(["--checkpoint", "edbeeching/decision-transformer-gym-hopper-medium", "--policies", "full",
                        "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot load DT checkpoint" in err and "huggingface-cli download" in err


def test_bench_dt_tiny(tiny_checkpoint, tmp_path, capsys):
    bench = _script("bench_dt")
    assert bench.main(["--checkpoint", str(tiny_checkpoint / "ckpt"), "--namm", str(tiny_checkpoint / "namm"),
                       "--policies", "full,namm,l2", "--max-steps", "20", "--out", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert [r["policy"] for r in res["rows"]] == ["full", "namm", "l2"]
    assert all(r["speedup"] > 0 for r in res["rows"]) and "speed-up" in capsys.readouterr().out
    # the plain KV loop (the speed ceiling of a full-cache rollout) takes the full cache's actions
    assert res["plain_kv_loop"]["same_return_as_full"] is True and res["plain_kv_loop"]["speedup"] > 0
    # ... and the loop holding as many tokens as the evicting policies' largest final cache (the small-cache ceiling)
    held = max(r["final_cache_tokens"] for r in res["rows"] if r["policy"] != "full")
    assert res["plain_kv_loop_window"]["window"] == max(1, round(held)) and res["plain_kv_loop_window"]["speedup"] > 0


def test_plain_kv_loop_with_a_window_computes_the_recency_cache_it_stands_for():
    """bench_dt's bounded reference loop attends to the newest W stored tokens and its own: on a 3-layer DT it takes
    the actions of KVStepper with Recency(W, sinks=0, delay=1), the K-step sliding window (W = 3K - 4), once the
    window binds, and of the full cache while it does not."""
    from namm_transfer.adapters.decision_transformer import KVStepper, sliding_window
    bench = _script("bench_dt")
    torch.manual_seed(0)
    cfg = DecisionTransformerConfig(state_dim=5, act_dim=2, hidden_size=32, n_layer=3, n_head=2, max_ep_len=64)
    model = DecisionTransformerModel(cfg).eval()
    window = sliding_window(5)
    plain, stepper = bench.PlainKVLoop(model, 40, window=window.budget), KVStepper(model, window)
    for t in range(40):
        state, rtg = torch.randn(5), float(torch.randn(()))
        a, b = plain.step(state, rtg, t), stepper.step(state, rtg, t)
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (t, (a - b).abs().max())
    assert stepper.cache.tokens_seen == 3 * 40 - 1 and max(stepper.cache.cache_lengths()) == window.budget


def test_run_dt_refuses_bad_arguments_before_any_work(tiny_checkpoint, tmp_path, capsys):
    from helpers_inputs import refused
    run_dt = _script("run_dt")
    out = tmp_path / "out"
    base = ["--checkpoint", str(tiny_checkpoint / "ckpt"), "--out", str(out), "--no-progress"]
    for bad, msg in ((["--episodes", "0"], "'0' is not an integer >= 1"), (["--seeds", "0,0"], "a value is repeated"),
                     (["--seeds", "-1"], "an integer >= 0"), (["--max-steps", "0"], "an integer >= 1"),
                     (["--budget", "1.5"], "whole number of tokens"), (["--delay", "0"], "an integer >= 1"),
                     (["--threads", "0"], "an integer >= 1"), (["--window", "0"], "an integer >= 1"),
                     (["--target-return", "nan"], "a finite number"), (["--policies", "full,lru"], "unknown ['lru']")):
        refused(run_dt.main, base + bad, capsys, msg)
    assert not out.exists()


def _stats(path, mean, std):
    path.write_text(json.dumps({"state_mean": mean, "state_std": std}))
    return str(path)


def test_run_dt_checks_state_stats_checkpoints_and_namms(tiny_checkpoint, tmp_path, capsys):
    import shutil

    from helpers_inputs import refused
    run_dt = _script("run_dt")
    out = tmp_path / "out"
    base = ["--checkpoint", str(tiny_checkpoint / "ckpt"), "--policies", "full", "--rollout", "kv", "--out", str(out),
            "--no-progress", "--max-steps", "5", "--episodes", "1"]
    stats = tmp_path / "stats.json"
    for content, msg in ((None, "cannot read"), ("{", "is not valid JSON"),
                         (json.dumps({"state_mean": [0.0] * 10, "state_std": [1.0] * 10}), "must be 11 finite numbers"),
                         (json.dumps({"state_mean": [float("nan")] * 11, "state_std": [1.0] * 11}), "with NaN/inf"),
                         (json.dumps({"state_mean": [0.0] * 11, "state_std": [0.0] * 11}), "state_std has values <= 0"),
                         (json.dumps({"state_mean": "zeros", "state_std": [1.0] * 11}), "'state_mean' must be a list")):
        stats.unlink(missing_ok=True)
        if content is not None:
            stats.write_text(content)
        refused(run_dt.main, [*base, "--state-stats", str(stats)], capsys, str(stats), msg)
    # broken, non-finite and wrong-task checkpoints
    for breakage, msg in (("truncated weights", "cannot load DT checkpoint"), ("nan weight", "holds NaN or inf"),
                          ("config not json", "cannot load DT checkpoint"), ("5-dim states", "has state_dim 5, but "
                                                                                              "Hopper-v5 has 11")):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(tiny_checkpoint / "ckpt", bad)
        if breakage == "truncated weights":
            (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:200])
        elif breakage == "config not json":
            (bad / "config.json").write_text("{")
        else:
            model = DecisionTransformerModel.from_pretrained(bad)
            if breakage == "nan weight":
                model.embed_state.weight.data[0, 0] = float("nan")
            else:  # a DT for 5-dim states
                cfg = model.config.to_dict()
                cfg.update(state_dim=5, state_mean=[0.0] * 5, state_std=[1.0] * 5)
                model = DecisionTransformerModel(DecisionTransformerConfig(**cfg))
            model.save_pretrained(bad)
        refused(run_dt.main, [*base[:1], str(bad), *base[2:]], capsys, msg)
    params = torch.zeros(4172)
    save_namm(tmp_path / "namm", params, None)
    (tmp_path / "namm" / "config.json").write_text("[]")
    refused(run_dt.main, [*base, "--policies", "full,namm", "--namm", str(tmp_path / "namm")], capsys,
            f"--namm {tmp_path / 'namm'}: ", "not a readable NAMM checkpoint")
    save_namm(tmp_path / "namm", params, None)
    refused(run_dt.main, [*base, "--policies", "full,namm", "--namm", str(tmp_path / "namm"), "--delay", "50"],
            capsys, "delay 50 must be a multiple of hop 16")
    assert not out.exists()


def test_run_dt_refuses_other_settings_rewritten_files_and_a_second_writer(tiny_checkpoint, tmp_path, capsys):
    import shutil

    from helpers_inputs import refused, snapshot
    from namm_transfer.runs import folder_lock
    run_dt = _script("run_dt")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint / "ckpt", ckpt)
    stats = _stats(tmp_path / "stats.json", [0.0] * 11, [1.0] * 11)
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--state-stats", stats, "--policies", "full", "--rollout", "kv",
            "--out", str(out), "--no-progress", "--max-steps", "5", "--episodes", "1"]
    assert run_dt.main(args) == 0
    capsys.readouterr()
    before = snapshot(out)
    refused(run_dt.main, [*args, "--max-steps", "6"], capsys, "other settings", "max_steps: recorded 5, this run 6")
    _stats(tmp_path / "stats.json", [0.0] * 11, [2.0] * 11)  # the same path, other statistics
    refused(run_dt.main, args, capsys, "state_stats_hash: recorded 'sha256:")
    _stats(tmp_path / "stats.json", [0.0] * 11, [1.0] * 11)
    model = DecisionTransformerModel.from_pretrained(ckpt)
    model.embed_state.weight.data *= 2
    model.save_pretrained(ckpt)  # a checkpoint rewritten at the same path
    refused(run_dt.main, args, capsys, "checkpoint_hash: recorded 'sha256:")
    with folder_lock(out):
        refused(run_dt.main, [*args, "--checkpoint", str(tiny_checkpoint / "ckpt")], capsys,
                "is being written by another run")
    assert snapshot(out) == before
