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
