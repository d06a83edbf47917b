"""Batched DT rollouts (N episodes in lockstep, one cache row each) and the public Hub checkpoints' layout."""
import json

import numpy as np
import pytest
import torch
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from envs import hub
from envs.kv_rollout import make_env, run_kv, run_kv_batch
from envs.registry import TASKS
from envs.rollout import DTPolicy
from helpers_inputs import script as _script
from namm_transfer import load_namm, save_namm
from namm_transfer.policies import make_policy

STEPS = 40


class ActionLog:
    """An env that records the actions it is given."""

    def __init__(self, env):
        self.env, self.actions = env, []
        self.action_space, self.observation_space = env.action_space, env.observation_space

    def reset(self, **kw):
        return self.env.reset(**kw)

    def step(self, action):
        self.actions.append(np.array(action, copy=True))
        return self.env.step(action)


def tiny_dt(state_dim: int = 11, act_dim: int = 3, seed: int = 0, **extra) -> DecisionTransformerModel:
    torch.manual_seed(seed)
    cfg = DecisionTransformerConfig(state_dim=state_dim, act_dim=act_dim, hidden_size=16, n_layer=2, n_head=2,
                                    n_inner=32, max_ep_len=1000, n_positions=64, bos_token_id=None,
                                    eos_token_id=None, **extra)
    return DecisionTransformerModel(cfg).eval()


@pytest.fixture(scope="module")
def policy_dt():
    return DTPolicy(tiny_dt(), np.zeros(11, np.float32), np.ones(11, np.float32), context=4, max_ep_len=STEPS)


@pytest.fixture(scope="module")
def namm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("namm") / "namm"
    save_namm(path, torch.randn(4172, generator=torch.Generator().manual_seed(1)) * 0.5, None)
    return path


def _episodes(dt, make, seeds, batched: bool):
    envs = [ActionLog(make_env("Hopper-v5", STEPS)) for _ in seeds]
    if batched:
        eps = run_kv_batch(dt, envs, make(), 3600.0, seeds)
    else:
        eps = [run_kv(dt, env, make(), 3600.0, s) for env, s in zip(envs, seeds)]
    return eps, [np.stack(e.actions) for e in envs]


@pytest.mark.parametrize("name", ["full", "h2o", "namm"])
def test_batched_rollout_equals_episodes_one_by_one(policy_dt, namm_dir, name):
    torch.set_num_threads(1)
    make = {"full": lambda: make_policy("full"), "h2o": lambda: make_policy("h2o", budget=12, delay=6),
            "namm": lambda: load_namm(namm_dir, delay=16)}[name]
    seeds = [0, 1, 2, 3]
    one, acts_one = _episodes(policy_dt, make, seeds, batched=False)
    batch, acts_batch = _episodes(policy_dt, make, seeds, batched=True)
    lengths = [e.length for e in one]
    assert len(set(lengths)) > 1, "the test needs episodes that end at different steps (rows dropping out)"
    assert [e.length for e in batch] == lengths
    if name == "namm":  # rows keep different token counts: filler slots change float rounding, nothing else
        assert any(e.eviction_fraction is not None and e.eviction_fraction < 1 for e in batch)
        for a, b in zip(acts_one, acts_batch):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert [e.ret for e in batch] == pytest.approx([e.ret for e in one], abs=1e-4)
    else:  # bitwise
        assert all(np.array_equal(a, b) for a, b in zip(acts_one, acts_batch))
        assert [e.ret for e in batch] == [e.ret for e in one]
    for a, b in zip(one, batch):
        assert b.realised_fraction == pytest.approx(a.realised_fraction, abs=1e-6)
        assert b.final_cache_tokens == pytest.approx(a.final_cache_tokens, abs=1e-4)


def test_run_dt_batch_records_the_same_episodes(tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_dt(state_mean=[0.0] * 11, state_std=[1.0] * 11, context_length=4, env_name="hopper-medium").save_pretrained(ckpt)
    run_dt = _script("run_dt")
    rets = {}
    for b in (1, 3):
        out = tmp_path / f"b{b}"
        assert run_dt.main(["--checkpoint", str(ckpt), "--policies", "full,h2o", "--budget", "12", "--rollout", "kv",
                            "--episodes", "4", "--max-steps", "30", "--batch", str(b), "--out", str(out),
                            "--no-progress"]) == 0
        recs = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
        rets[b] = {(r["policy"], r["episode"]): (r["ret"], r["length"]) for r in recs}
    assert len(rets[1]) == 8 and rets[3] == rets[1]
    bench = _script("bench_dt")
    assert bench.main(["--checkpoint", str(ckpt), "--policies", "full", "--max-steps", "10", "--batch", "2",
                       "--out", str(tmp_path / "bench.json")]) == 0
    row = json.loads((tmp_path / "bench.json").read_text())["rows"][0]
    assert row["batch_ratio"] > 0 and row["batch_returns_equal"] is True


# ------------------------------------------------------------------------------------------------ Hub checkpoints


def test_card_statistics_fit_each_task():
    assert set(hub.CARD_STATS) == {n for n, t in TASKS.items() if t.hf_checkpoint}
    for task, (mean, std) in hub.CARD_STATS.items():
        dim = 11 if task.startswith("hopper") else 17
        assert len(mean) == len(std) == dim and min(std) > 0, task
        assert hub.trained_task(TASKS[task].hf_checkpoint) == task
    assert hub.trained_task("/x/models--edbeeching--decision-transformer-gym-hopper-medium-replay/snapshots/a") \
        == "hopper-medium-replay"
    assert hub.trained_task("/x/my-dt") is None


def _hub_standin(folder, state_dim=17, act_dim=6):
    """A DT saved in the public checkpoints' layout: config.json (model fields only, no statistics) + weights."""
    tiny_dt(state_dim, act_dim).save_pretrained(folder)
    assert "state_mean" not in json.loads((folder / "config.json").read_text())
    return folder


def test_run_dt_loads_a_public_checkpoint_layout(tmp_path, monkeypatch, capsys):
    run_dt = _script("run_dt")
    folder = _hub_standin(tmp_path / "decision-transformer-gym-walker2d-medium")
    common = ["--policies", "full", "--rollout", "kv", "--episodes", "1", "--max-steps", "5", "--no-progress"]
    assert run_dt.main(["--env", "walker2d-medium", "--checkpoint", str(folder), *common,
                        "--out", str(tmp_path / "o1")]) == 0
    summary = json.loads((tmp_path / "o1" / "summary.json").read_text())
    assert "walker2d-medium-v2" in summary["notes"][0] and "target return 5000" in summary["notes"][0]
    assert summary["settings"]["state_stats_hash"] is not None
    capsys.readouterr()

    # a Hub id found in the local Hub cache (no network)
    import huggingface_hub.constants as hc

    snap = tmp_path / "cache" / "models--edbeeching--decision-transformer-gym-hopper-expert"
    _hub_standin(snap / "snapshots" / "abc123", 11, 3)
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    hub_id = "edbeeching/decision-transformer-gym-hopper-expert"
    assert run_dt.main(["--env", "hopper-expert", "--checkpoint", hub_id, *common, "--out", str(tmp_path / "o2")]) == 0
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["settings"]["checkpoint"] == hub_id

    # a checkpoint trained on another task, by name or by state size, is refused with both named
    assert run_dt.main(["--env", "hopper-medium", "--checkpoint", str(folder), *common,
                        "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "trained on walker2d-medium" in err and "--env is hopper-medium" in err
    unnamed = _hub_standin(tmp_path / "unnamed")
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"state_mean": [0.0] * 17, "state_std": [1.0] * 17}))
    assert run_dt.main(["--env", "hopper-medium", "--checkpoint", str(unnamed), "--state-stats", str(stats),
                        *common, "--out", str(tmp_path / "o4")]) == 2
    assert "state_dim 17, but Hopper-v5 has 11" in capsys.readouterr().err
    # no statistics anywhere: refused, saying what to provide
    assert run_dt.main(["--env", "walker2d-medium", "--checkpoint", str(unnamed), *common,
                        "--out", str(tmp_path / "o5")]) == 2
    err = capsys.readouterr().err
    assert "--state-stats" in err and "hdf5" in err
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o5").exists()
    # ... which may be the D4RL dataset itself: mean and std + 1e-6 over its states
    from test_envs_data import _d4rl

    d4rl = _d4rl(tmp_path / "walker2d-medium-v2.hdf5", obs_dim=17, act_dim=6)
    assert run_dt.main(["--env", "walker2d-medium", "--checkpoint", str(unnamed), "--state-stats", str(d4rl),
                        *common, "--out", str(tmp_path / "o6")]) == 0
    from envs.data import load_d4rl_hdf5
    from namm_transfer.runs import json_hash

    mean, std = load_d4rl_hdf5(d4rl).state_stats()
    assert float(std.min()) > 1e-6
    settings = json.loads((tmp_path / "o6" / "summary.json").read_text())["settings"]
    assert settings["state_stats_hash"] == json_hash([mean.tolist(), std.tolist()])
