"""Distilling a NAMM from the oracle (namm_transfer/evolution/distill.py, scripts/distill_namm.py)."""
import json
import math
from pathlib import Path

import pytest
import torch

from namm_transfer.evolution.distill import (StepFeatures, agreement, calibrate, distill_loss, fit,
                                             top_share_labels)
from namm_transfer.namm import NAMMConfig, bam_scores

ROOT = Path(__file__).resolve().parents[1]
CFG = NAMMConfig(delay=256)


def test_labels_mark_the_top_share_by_position():
    table = torch.tensor([[0.0, 5, 1, 4, 2, 3], [6.0, 5, 4, 3, 2, 1]])
    pos = torch.tensor([[5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]])
    valid = torch.tensor([[True] * 5 + [False]] * 2)
    labels = top_share_labels(table, pos, valid, 0.5)  # ceil(0.5 * 5) = 3 of the valid slots per head
    assert labels.tolist() == [[1, 0, 1, 0, 1, 0], [1, 1, 1, 0, 0, 0]]  # row 0 reads 3, 2, 4, 1, 5
    with pytest.raises(ValueError, match="keep must be in"):
        top_share_labels(table, pos, valid, 0.0)


def synthetic_steps(n_steps=24, seed=0):
    """Tokens whose label is set by the sign of one input feature (a separable problem the scorer can learn)."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for i in range(n_steps):
        n = 40 + i
        x = torch.randn(3, n, CFG.d_in, generator=g)
        valid = torch.ones(3, n, dtype=torch.bool)
        valid[:, :3] = i % 2 == 0  # left padding on some steps
        steps.append(StepFeatures(i % 4, x, valid, ((x[..., 10] > 0.3) & valid).float()))
    return steps


def test_fit_learns_a_separable_rule_and_calibrate_sets_the_kept_share():
    train, held = synthetic_steps(), synthetic_steps(8, seed=1)
    start = torch.zeros(CFG.num_params, dtype=torch.float64)
    before = float(distill_loss(start.float(), held, CFG))
    params, log = fit(start, train, CFG, steps=150, lr=2e-2, batch=8, held_out=held, every=50)
    assert params.dtype == torch.float64 and [r["step"] for r in log if "held_out_loss" in r] == [50, 100, 150]
    after = float(distill_loss(params.float(), held, CFG))
    assert after < 0.6 * before, (before, after)
    share = float(sum(s.labels.sum() for s in train) / sum(s.valid.sum() for s in train))
    tuned = calibrate(params, train, CFG, share)
    assert torch.equal(tuned[:-1], params[:-1])  # only the score's bias moves
    got = agreement(tuned, train, CFG)
    assert got["kept_share"] == pytest.approx(share, abs=2e-3)
    assert got["recall"] > 0.9 and agreement(tuned, held, CFG)["recall"] > 0.85
    for keep in (0.3, 0.8):
        assert agreement(calibrate(params, train, CFG, keep), train, CFG)["kept_share"] == pytest.approx(keep, abs=2e-3)


def test_loss_is_the_mean_logistic_loss_over_valid_slots():
    steps = synthetic_steps(3)
    params = torch.randn(CFG.num_params, generator=torch.Generator().manual_seed(3)) * 0.05
    total = count = 0.0
    for st in steps:
        logits = bam_scores(st.x, st.valid, params[None].expand(3, -1), CFG)
        for r in range(3):
            for j in range(st.x.shape[1]):
                if st.valid[r, j]:
                    z, y = float(logits[r, j]), float(st.labels[r, j])
                    total += -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
                    count += 1
    assert float(distill_loss(params, steps, CFG)) == pytest.approx(total / count, rel=1e-5)


def test_distill_script_writes_a_loadable_namm_and_reuses_features(tmp_path, capsys):
    from helpers_inputs import script
    from namm_transfer import load_namm
    mod = script("distill_namm")
    args = ["--init-from", str(ROOT / "namm_transfer/checkpoints/namm-smollm2-c50"), "--model", "tiny-llama",
            "--tokens", "600", "--samples-per-task", "2", "--tasks", "passkey,kv_retrieval", "--steps", "6",
            "--keep", "0.6", "--out", str(tmp_path / "d")]
    assert mod.main(args) == 0
    feats = sorted(p.name for p in (tmp_path / "d" / "features").iterdir())
    assert feats == ["kv_retrieval-0.safetensors", "kv_retrieval-1.safetensors", "passkey-0.safetensors",
                     "passkey-1.safetensors"]
    fit_info = json.loads((tmp_path / "d" / "fit.json").read_text())
    assert fit_info["distilled_from"]["kind"] == "NAMM checkpoint" and len(fit_info["log"]) == 6
    assert fit_info["agreement_after"]["train"]["kept_share"] == pytest.approx(0.6, abs=0.01)
    policy = load_namm(tmp_path / "d" / "namm")
    assert policy.config.delay == 256 and json.loads((tmp_path / "d" / "namm" / "config.json").read_text())[
        "meta"]["variant"] == "distill-k60"
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "d" / "features").iterdir()}
    assert mod.main(args) == 0  # features are reused, not recomputed
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "d" / "features").iterdir()}
    capsys.readouterr()
    longer = [a if a != "600" else "650" for a in args]  # other prompts under the same seeds: not reused
    assert mod.main([*longer[:-1], str(tmp_path / "d2"), "--features", str(tmp_path / "d" / "features")]) == 2
    assert "features made under other settings (tokens)" in capsys.readouterr().err
    assert mod.main([*args[:1], str(tmp_path / "missing"), *args[2:]]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert mod.main(["--init-from", str(ROOT / "namm_transfer/checkpoints/namm-smollm2"), *args[2:]]) == 2
    assert "differs from" in capsys.readouterr().err  # the default NAMM evicts every 512 tokens, not 256


def test_mass_weights_weigh_slots_by_the_oracle_score():
    from namm_transfer.evolution.distill import mass_weights
    table = torch.tensor([[1.0, 3.0, 0.0, 8.0]])
    pos = torch.tensor([[0, 1, 2, 3]])
    valid = torch.tensor([[True, True, True, False]])
    assert mass_weights(table, pos, valid, 1.0).tolist() == [[0.75, 2.25, 0.0, 0.0]]  # mean of 1, 3, 0 is 4/3
    assert mass_weights(table, pos, valid, 0.5).tolist() == [[0.875, 1.625, 0.5, 0.0]]
    st = synthetic_steps(2)
    flat = distill_loss(torch.zeros(CFG.num_params), st, CFG)
    ones = [StepFeatures(s.layer, s.x, s.valid, s.labels, torch.ones_like(s.labels)) for s in st]
    assert float(distill_loss(torch.zeros(CFG.num_params), ones, CFG)) == pytest.approx(float(flat))
    with pytest.raises(ValueError, match="mass_weight"):
        mass_weights(table, pos, valid, 1.5)
