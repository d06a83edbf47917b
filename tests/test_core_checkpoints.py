"""Save/load round trip and import of an official evo-memory ckpt.pt (made here in its layout)."""
import pytest
import torch

from namm_transfer import NAMMConfig, import_official, load_namm, save_namm
from namm_transfer.features import RunningStats
from namm_transfer.namm import unflatten

P = "stored_buffers_to_save.token_embedding_0_"


def official_ckpt(path, mean, mu, var, n=4172, prefix=""):
    state = {"mu_eff": torch.tensor(9.179), "weights": torch.zeros(32), "g": torch.tensor(7.0),
             "best_member": torch.randn(n), "mean": mean, "sigma": torch.tensor(0.06),
             "C": torch.eye(4), "x": torch.zeros(32, n), "y": torch.zeros(32, n)}
    for which in ["output", "online_new_output"]:
        state[P + f"{which}_mean"] = mu.view(1, 1, 1, 17)
        state[P + f"{which}_var"] = var.view(1, 1, 1, 17)
        state[P + f"{which}_num"] = torch.tensor([123], dtype=torch.int64)
    state = {prefix + k: v for k, v in state.items()}
    torch.save({"evolution_state": state, "iter_num": 7, "best_val_loss": 1.0}, path)


def test_official_ckpt_loads_the_mean_and_frozen_stats(tmp_path):
    mean = torch.randn(4172)
    mu, var = torch.rand(17), torch.rand(17) + 0.5
    official_ckpt(tmp_path / "ckpt.pt", mean, mu, var, prefix="_orig_mod.")
    policy = import_official(tmp_path / "ckpt.pt")
    assert torch.equal(policy.params[0], mean)  # the mean, not best_member
    w = unflatten(policy.params[0], NAMMConfig())
    assert torch.equal(w["w_qkv"][0], mean[:2400].view(25, 96))  # input-major
    assert torch.equal(w["b_score"][0], mean[4171:])
    assert torch.allclose(policy.stats.mean.float(), mu) and torch.allclose(policy.stats.var.float(), var)
    assert policy.stats.frozen and policy.stats.count == 123
    assert load_namm(tmp_path / "ckpt.pt").params.shape == (1, 4172)
    # evo-memory's float64 recency table; our own NAMMs keep float32, and a re-saved import keeps float64
    assert policy.config.recency_table == "float64" and NAMMConfig().recency_table == "float32"
    save_namm(tmp_path / "resaved", policy.params[0], policy.stats, policy.config)
    assert load_namm(tmp_path / "resaved").config.recency_table == "float64"


def test_official_ckpt_wrong_size_is_a_clear_error(tmp_path):
    official_ckpt(tmp_path / "ckpt.pt", torch.randn(2000), torch.rand(17), torch.rand(17), n=2000)
    with pytest.raises(ValueError, match="2000 parameters.*expects 4172"):
        import_official(tmp_path / "ckpt.pt")
    torch.save({"model": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an evo-memory checkpoint"):
        import_official(tmp_path / "other.pt")


def test_save_load_round_trip(tmp_path):
    stats = RunningStats(17)
    stats.update(torch.randn(100, 17))
    params = torch.randn(4172)
    save_namm(tmp_path / "m", params, stats, meta={"note": "test"})
    policy = load_namm(tmp_path / "m")
    assert torch.equal(policy.params[0], params)
    assert torch.allclose(policy.stats.mean, stats.mean.float().double()) and policy.stats.frozen


def test_missing_or_mismatched_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one"):
        load_namm(tmp_path / "nothing")
    save_namm(tmp_path / "m", torch.randn(4172), None)
    cfg = (tmp_path / "m" / "config.json")
    cfg.write_text(cfg.read_text().replace('"hidden": 32', '"hidden": 16'))
    with pytest.raises(ValueError, match="parameters but its config needs"):
        load_namm(tmp_path / "m")


class _Exploit:
    """Unpickling this runs a shell command (what a crafted checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def crafted_pickle(path, marker):
    torch.save({"evolution_state": {"mean": torch.zeros(4172)}, "payload": _Exploit(marker)}, path)
    return path


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path):
    from namm_transfer.checkpoints import load_torch_file
    marker = tmp_path / "pwned"
    crafted_pickle(tmp_path / "ckpt.pt", marker)
    with pytest.raises(ValueError, match="refused to load .*can run code"):
        load_namm(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="refused to load a resume file"):
        load_torch_file(tmp_path / "ckpt.pt", "a resume file")
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"\x00not a torch file")
    with pytest.raises(ValueError, match="junk.pt is not a readable torch file"):
        load_namm(tmp_path / "junk.pt")


def test_official_ckpt_with_numpy_scalars_loads(tmp_path):
    import numpy as np
    official_ckpt(tmp_path / "ckpt.pt", torch.randn(4172), torch.rand(17), torch.rand(17) + 0.5)
    from namm_transfer.checkpoints import load_torch_file
    ckpt = load_torch_file(tmp_path / "ckpt.pt", "test file")  # rewritten with numpy values below
    ckpt.update(iter_num=np.int64(7), best_val_loss=np.float64(0.5), history=np.zeros(3))
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert load_namm(tmp_path / "ckpt.pt").params.shape == (1, 4172)


def test_non_finite_namm_is_refused_everywhere(tmp_path):
    from namm_transfer import NAMMPolicy
    from safetensors.torch import load_file, save_file
    params = torch.randn(4172)
    params[5] = float("nan")
    with pytest.raises(ValueError, match="1 of 4172 values are NaN or inf"):
        save_namm(tmp_path / "m", params, None)
    with pytest.raises(ValueError, match="parameters contain NaN"):
        NAMMPolicy(params)
    save_namm(tmp_path / "m", torch.randn(4172), None)
    t = load_file(str(tmp_path / "m" / "namm.safetensors"))
    t["params"][0] = float("inf")
    save_file(t, str(tmp_path / "m" / "namm.safetensors"))
    with pytest.raises(ValueError, match=r"namm.safetensors field 'params': 1 of 4172 values are NaN or inf"):
        load_namm(tmp_path / "m")
    stats = RunningStats(17)
    stats.update(torch.randn(10, 17))
    save_namm(tmp_path / "s", torch.randn(4172), stats)
    t = load_file(str(tmp_path / "s" / "namm.safetensors"))
    t["norm_var"][3] = float("nan")
    save_file(t, str(tmp_path / "s" / "namm.safetensors"))
    with pytest.raises(ValueError, match="field 'norm_var': 1 of 17 values are NaN"):
        load_namm(tmp_path / "s")
    official_ckpt(tmp_path / "ckpt.pt", torch.full((4172,), float("nan")), torch.rand(17), torch.rand(17))
    with pytest.raises(ValueError, match=r"evolution_state\['mean'\]: 4172 of 4172 values are NaN"):
        load_namm(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("breakage", ["config not json", "no params", "truncated safetensors", "unknown field",
                                      "bad delay"])
def test_broken_namm_folder_is_a_clear_error(tmp_path, breakage):
    import json
    save_namm(tmp_path / "m", torch.randn(4172), None)
    cfg, st = tmp_path / "m" / "config.json", tmp_path / "m" / "namm.safetensors"
    info = json.loads(cfg.read_text())
    if breakage == "config not json":
        cfg.write_text("{oops")
    elif breakage == "no params":
        from safetensors.torch import save_file
        save_file({"weights": torch.zeros(3)}, str(st))
    elif breakage == "truncated safetensors":
        st.write_bytes(st.read_bytes()[:100])
    elif breakage == "unknown field":
        info["config"]["layers"] = 3
        cfg.write_text(json.dumps(info))
    else:
        info["config"]["delay"] = "512"
        cfg.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="is not a readable NAMM checkpoint"):
        load_namm(tmp_path / "m")


def test_shipped_operating_points_load_and_each_is_the_file_its_test_table_measured():
    """Every shipped NAMM loads as data; namm-smollm2-c50, namm-smollm2-c50-g100 and namm-smollm2-c75 are, byte for
    byte, the checkpoints the committed held-out tables of results/language/eval-n50-c50-g60 (and the e2e benchmark),
    eval-n50-c50-g100 and eval-n50-c75-g180 recorded by hash."""
    import json
    from pathlib import Path

    from namm_transfer.checkpoints import DEFAULT_NAMM, NAMM_C50, NAMM_C50_G100, NAMM_C75
    from namm_transfer.runs import content_hash
    root = Path(__file__).resolve().parents[1]
    for path in (DEFAULT_NAMM, NAMM_C50, NAMM_C50_G100, NAMM_C75):
        policy = load_namm(path)
        assert policy.params.shape == (1, 4172) and bool(policy.params.isfinite().all())
    for path, variant, generation, target, run in (
            (NAMM_C50, "namm-c50", 60, 0.5, "eval-n50-c50-g60"), (NAMM_C50_G100, "namm-c50", 100, 0.5, "eval-n50-c50-g100"),
            (NAMM_C75, "namm-c75", 180, 0.75, "eval-n50-c75-g180")):
        meta = json.loads((path / "config.json").read_text())["meta"]
        assert (meta["variant"], meta["generation"], meta["cache_target"]) == (variant, generation, target)
        assert load_namm(path).delay == 256
        recorded = json.loads((root / "results/language" / run / "run.json").read_text())["namm_hash"]
        assert content_hash(path) == recorded, path
    recorded = json.loads((root / "results/language/eval-n50-c50-g60/run.json").read_text())["namm_hash"]
    assert json.loads((root / "results/bench_core/e2e-c50.json").read_text())["namm_hash"] == recorded
