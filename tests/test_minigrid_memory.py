"""minigrid-memory: the scripted data agent, the dataset maker, the discrete DT and its rollouts."""
import gymnasium as gym
import numpy as np
import pytest
import torch

from envs.data import DTBatchSampler, SamplerConfig
from envs.kv_rollout import make_env, run_kv, run_recompute
from envs.minigrid_memory import GYM_ID, OBJECTS, ScriptedAgent
from envs.registry import get_spec
from envs.rollout import DTPolicy
from namm_transfer import FullCache
from namm_transfer.reporting.intervals import interval95, wilson
from test_dt_adapter import ActionLog
from test_envs_cli import _script

SPEC = get_spec("minigrid-memory")


def scripted_episode(env, agent, seed):
    obs, info = env.reset(seed=seed)
    agent.reset(env)
    infos, ret, done = [info], 0.0, False
    while not done:
        obs, r, term, trunc, info = env.step(agent.act(env))
        infos.append(info)
        ret, done = ret + r, term or trunc
    return ret, term, infos


@pytest.mark.parametrize("choose", [True, False])
def test_scripted_agent_reaches_the_object_it_is_told(choose):
    env = gym.make(GYM_ID)
    agent = ScriptedAgent(seed=0, choose=choose)
    for seed in range(12):
        ret, terminated, infos = scripted_episode(env, agent, seed)
        assert terminated and (ret > 0.9 if choose else ret == 0.0)
        assert len(infos) - 1 <= SPEC.max_ep_len
        # the task needs memory: the cue was seen, but not within the last 10 steps before the choice
        choice = next(t for t, i in enumerate(infos) if i["at_junction"])
        seen = [t for t, i in enumerate(infos) if i["cue_visible"]]
        assert seen and choice - max(seen) >= 10


def test_flat_observation_is_one_hot():
    env = gym.make(GYM_ID)
    obs, _ = env.reset(seed=1)
    assert obs.shape == (49 * len(OBJECTS) + 4,) and obs.dtype == np.uint8
    assert obs[: 49 * len(OBJECTS)].reshape(49, -1).sum(1).tolist() == [1] * 49  # one type per view cell
    assert obs[-4:].tolist() == [1, 0, 0, 0]  # MemoryEnv starts facing east


def test_make_dataset_minigrid_then_train_and_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    data_dir = ["--data-dir", str(tmp_path / "minari")]
    _script("make_dataset").main(["--env", "minigrid", "--quality", "memory", "--steps", "400", "--p-correct", "0.7",
                                  "--workdir", str(tmp_path / "w"), *data_dir])
    from envs.data import load_minari

    data = load_minari(SPEC.local_dataset_id)
    assert data.discrete_actions and data.act_dim == 7 and data.obs_dim == 249 and data.refs is None
    assert data.num_steps >= 400 and set(np.unique(np.concatenate([t.actions for t in data.trajectories]))) == {0, 1}
    success = np.mean([t.ret > 0 for t in data.trajectories])
    assert 0.5 < success < 0.9  # p_correct 0.7 over ~24 episodes

    res = _script("train_dt").main(["--env", "minigrid-memory", "--steps", "2", "--batch-size", "4", "--hidden", "16",
                                    "--layers", "1", "--eval-episodes", "2", "--out", str(tmp_path / "dt"), *data_dir])
    assert set(res["eval"]["target_1"]) >= {"score_success_mean", "return_mean"}

    from envs.rollout import load_dt

    pol = load_dt(tmp_path / "dt" / "final")
    assert pol.discrete_actions and pol.context == 24 and pol.max_ep_len == SPEC.max_ep_len
    assert not pol.model.config.action_tanh and np.all(pol.state_std == 1) and np.all(pol.state_mean == 0)

    run_dt = _script("run_dt")
    out = tmp_path / "run"
    assert run_dt.main(["--env", "minigrid-memory", "--checkpoint", str(tmp_path / "dt" / "final"), "--policies",
                        "full,window,recency", "--window", "4", "--budget", "0.3", "--episodes", "3", "--out",
                        str(out), "--no-progress"]) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["delay"] == SPEC.dt_delay and summary["settings"]["window"] == 4
    for row in summary["rows"]:
        lo, hi = row["score_success_ci95"]
        assert 0 <= lo <= row["score_success_mean"] <= hi <= 100
    assert "success % [95% CI]" in (out / "table.md").read_text()


def tiny_discrete_dt(layers=2, seed=0):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(seed)
    cfg = DecisionTransformerConfig(state_dim=249, act_dim=7, hidden_size=32, n_layer=layers, n_head=2, n_inner=64,
                                    max_ep_len=SPEC.max_ep_len, n_positions=64, action_tanh=False,
                                    bos_token_id=None, eos_token_id=None)
    model = DecisionTransformerModel(cfg).eval()
    return DTPolicy(model, np.zeros(249, np.float32), np.ones(249, np.float32), 1.0, SPEC.max_ep_len,
                    SPEC.max_ep_len, discrete_actions=True)


def test_keep_all_kv_rollout_equals_recompute_over_the_whole_episode():
    dt = tiny_discrete_dt()
    runs = []
    for run in (lambda env: run_recompute(dt, env, 1.0, seed=5), lambda env: run_kv(dt, env, FullCache(), 1.0, seed=5)):
        env = ActionLog(make_env(GYM_ID, SPEC.max_ep_len).env)
        ep = run(env)
        runs.append((env.actions, ep))
    (ref, ep_ref), (got, ep) = runs
    assert ep.length == ep_ref.length and ep.length > 8  # K = max_ep_len: recompute sees the whole history too
    assert np.array_equal(got, ref) and len(np.unique(got)) > 1


def test_one_training_step_lowers_the_discrete_loss():
    from envs.data import OfflineDataset, Trajectory, one_hot
    from envs.minigrid_memory import collect

    train_dt = _script("train_dt")
    trajs = [Trajectory(np.asarray(e["observations"][:-1], np.float32), one_hot(e["actions"], 7),
                        np.asarray(e["rewards"], np.float32), np.asarray(e["terminations"]),
                        np.asarray(e["truncations"])) for e in collect(300, 0.5)]
    data = OfflineDataset(trajs, "mem", "local", None, discrete_actions=True)
    sampler = DTBatchSampler(data, SamplerConfig(24, 1.0, SPEC.max_ep_len, from_start=True),
                             np.zeros(249, np.float32), np.ones(249, np.float32))
    batch = sampler.sample(16)
    torch.manual_seed(0)
    cfg = train_dt.Config(hidden=32, layers=2, heads=2, dropout=0.0)
    model = train_dt.build_model(cfg, 249, 7, {}, SPEC.max_ep_len, discrete=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss():
        return train_dt.action_loss(model(**batch).action_preds, batch["actions"], batch["attention_mask"], True)

    before = loss()
    assert before.item() == pytest.approx(np.log(7), rel=0.2)  # untrained: near uniform over 7 actions
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss().item() < before.item()


def test_whole_episode_windows_start_at_step_zero():
    from envs.data import OfflineDataset, Trajectory

    trajs = [Trajectory(np.arange(n, dtype=np.float32)[:, None], np.eye(3, dtype=np.float32)[np.zeros(n, int)],
                        np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool)) for n in (5, 8)]
    data = OfflineDataset(trajs, "x", "local", None, discrete_actions=True)
    b = DTBatchSampler(data, SamplerConfig(10, 1.0, 24, from_start=True), np.zeros(1, np.float32),
                       np.ones(1, np.float32)).sample(32)
    for states, mask in zip(b["states"][..., 0], b["attention_mask"]):
        real = states[mask > 0]
        assert real[0] == 0 and len(real) in (5, 8)  # the whole episode, from its first step


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    lo, hi = interval95([100.0] * 95 + [0.0] * 5, binary_scale=100.0)
    assert lo < 95 < hi and hi < 100
    lo, hi = interval95([1.0, 2.0, 3.0])
    assert lo < 2 < hi


EMBEDDED = "envs/checkpoints/dt-minigrid-memory"


def test_embedded_dt_follows_the_return_it_is_asked_for():
    from pathlib import Path

    from envs.rollout import evaluate, load_dt

    pol = load_dt(Path(__file__).resolve().parents[1] / EMBEDDED)
    assert pol.discrete_actions and pol.context == pol.max_ep_len == SPEC.max_ep_len
    for target, rate in ((1.0, 100.0), (0.0, 0.0)):
        out = evaluate(pol, SPEC.gym_id, target, episodes=6, refs=SPEC.scorers())
        assert out["score_success_mean"] == rate


def test_retention_maps_report_the_cue_per_policy(tmp_path):
    import json

    from test_envs_cli import ROOT

    rm = _script("retention_maps")
    out = tmp_path / "ret"
    assert rm.main(["--domain", "dt", "--env", "minigrid-memory", "--checkpoint", str(ROOT / EMBEDDED), "--policies",
                    "namm,window,recency", "--budget", "6", "--episodes", "2", "--out", str(out)]) == 0
    report = json.loads((out / "retention.json").read_text())["policies"]
    assert report["window"]["cue_kept_share_mean"] == 1.0  # the DT's K = the whole episode: keeps everything
    assert report["recency"]["cue_kept_share_mean"] == 0.0  # 4 sinks + the 2 newest tokens: the cue is gone
    for p in report.values():
        d = p["decision_step"]
        assert len(p["state_kept_entering_decision"]) == d and all(t < d for t in p["cue_steps"])
    assert (out / "policies_timesteps.png").exists()
