"""Issue 17 grid: each of the nine {hopper,walker2d,halfcheetah}-{medium,medium-replay,expert} tasks has a dataset
recipe that loads (made here at tiny size by scripts/make_grid.py, as a clean clone has no datasets) and a DT that
runs one step: the committed envs/checkpoints/dt-<task>, or, while it is missing, run_dt's refusal naming the command
that makes it."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from envs.registry import D4RL_REF, get_spec

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "envs" / "checkpoints"
QUALITIES = ("medium", "medium-replay", "expert")
NINE = [f"{e}-{q}" for e in ("hopper", "walker2d", "halfcheetah") for q in QUALITIES]
MAX_FILE = 4 * 1024 * 1024


def _script(name):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _one_step(folder: Path, task: str) -> None:
    """The DT in `folder` was trained on `task`'s local dataset, fits its env, and acts for one step."""
    import gymnasium as gym

    from envs.rollout import load_dt, rollout_recompute

    spec = get_spec(task)
    assert all(f.stat().st_size <= MAX_FILE for f in folder.iterdir()), "checkpoint files must stay <= 4 MB"
    pol = load_dt(folder)
    assert pol.meta["env_name"] == task and pol.meta["dataset_id"] == spec.local_dataset_id
    assert pol.meta["dataset_source"] == "local" and pol.meta["gym_id"] == spec.gym_id
    env = gym.make(spec.gym_id)
    assert pol.state_mean.shape == env.observation_space.shape
    assert pol.model.config.act_dim == env.action_space.shape[0]
    pol.max_ep_len = 1
    res = rollout_recompute(pol, env, spec.target_returns[0], seed=0)
    assert res.length == 1 and np.isfinite(res.ret)


@pytest.mark.parametrize("task", NINE)
def test_embedded_dt_runs_one_step_or_is_refused_with_the_command(task, tmp_path, capsys):
    folder = CHECKPOINTS / f"dt-{task}"
    if (folder / "config.json").exists():
        _one_step(folder, task)
        return
    code = _script("run_dt").main(["--env", task, "--episodes", "1", "--max-steps", "1", "--out", str(tmp_path / "o")])
    env, quality = task.split("-", 1)
    assert code == 2
    err = capsys.readouterr().err
    assert f"no embedded DT for --env {task}" in err and f"make_grid.py --envs {env} --qualities {quality}" in err
    assert not (tmp_path / "o" / "episodes.jsonl").exists()


def test_medium_snapshot_choice():
    md = _script("make_dataset")
    ev = lambda *scores: [{"score_local": s} for s in scores]  # noqa: E731
    assert md.medium_eval(ev(5, 30, 50, 80, 95), 45) == 2  # the first at the target, not the last
    assert md.medium_eval(ev(5, 10, 20, 30), 45) == 2  # never reached: the first at half the final score
    assert md.medium_eval(ev(-3, -1, -0.5), 45) == 2  # a final score <= 0: at worst the last one
    with pytest.raises(ValueError):
        md.medium_eval([], 45)


TINY = ["--ppo-steps", "4096", "--ppo-eval-every", "64", "--ppo-eval-episodes", "1", "--steps", "50",
        "--dt-steps", "2", "--dt-warmup", "1", "--dt-hidden", "16", "--dt-layers", "1", "--dt-ckpt-every", "1",
        "--dt-eval-episodes", "1"]


# hopper by default (~12 s); the 17-dim envs under -m slow (their datasets also in test_envs_cli)
@pytest.mark.parametrize("env", ["hopper", pytest.param("walker2d", marks=pytest.mark.slow),
                                 pytest.param("halfcheetah", marks=pytest.mark.slow)])
def test_grid_makes_each_dataset_and_dt_then_skips_them(env, tmp_path, monkeypatch, capsys):
    """make_grid at tiny size: the env's three datasets load with the local and D4RL refs, each DT runs one step
    with a README and its evaluation; a rerun does nothing (everything done)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the cwd
    ckpts = tmp_path / "ckpt"
    args = ["--envs", env, *TINY, "--data-dir", str(tmp_path / "minari"), "--checkpoints", str(ckpts),
            "--work", str(tmp_path / "runs")]
    grid = _script("make_grid")
    assert grid.main(args) == 0

    import minari

    from envs.data import load_minari

    work = tmp_path / "runs" / "make_dataset" / env
    state = json.loads((work / "train_state.json").read_text())
    assert len(state["evals"]) == 2 and (work / "snapshots" / "policy_0001.pt").exists()
    md = _script("make_dataset")
    medium_at = md.medium_eval(state["evals"], md.medium_target(get_spec(f"{env}-medium"), 45.0, print))
    replay_eps = sum(len(np.load(work / f"replay_{k + 1:04d}.npz")["seeds"]) for k in range(medium_at + 1))
    for q in QUALITIES:
        spec = get_spec(f"{env}-{q}")
        data = load_minari(spec.local_dataset_id)
        assert data.source == "local" and data.refs == spec.refs("local")
        assert minari.load_dataset(spec.local_dataset_id).storage.metadata["ref_max_score"] == D4RL_REF[env].max
        if q == "medium-replay":
            assert len(data.trajectories) == replay_eps  # the training episodes up to the medium snapshot
        else:
            assert data.num_steps >= 50
        folder = ckpts / f"dt-{spec.name}"
        _one_step(folder, spec.name)
        assert "target_" + str(int(spec.target_returns[0])) in json.loads((folder / "eval_recompute_1ep.json").read_text())
        assert spec.local_dataset_id in (folder / "README.md").read_text()
    assert not list(ckpts.glob("*.tmp"))

    before = {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")}
    capsys.readouterr()
    assert grid.main(args) == 0
    out = capsys.readouterr().out
    assert "start" not in out and "grid complete" in out
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")} == before
    # a fresh clone of a finished env (DTs committed, no datasets): nothing to make
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "empty"))
    assert grid.main([*args[:-6], "--data-dir", str(tmp_path / "empty"), "--checkpoints", str(ckpts), "--work",
                      str(tmp_path / "runs2"), "--dry-run"]) == 0
    assert "to do" not in capsys.readouterr().out


def test_grid_refuses_unknown_names(capsys):
    from helpers_inputs import refused

    refused(_script("make_grid").main, ["--envs", "ant"], capsys, "unknown ['ant']")
    refused(_script("make_grid").main, ["--qualities", "medium-expert"], capsys, "unknown ['medium-expert']")


def test_medium_target_is_capped_at_half_the_expert_dataset(tmp_path, monkeypatch):
    """Without the env's expert dataset the medium target is the target; with it, at most half its mean score."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.chdir(tmp_path)
    md = _script("make_dataset")
    spec = get_spec("hopper-medium")
    assert md.medium_target(spec, 45.0, print) == 45.0
    assert md.main(["--env", "hopper", "--quality", "expert", "--steps", "30", "--workdir", str(tmp_path / "w"),
                    "--data-dir", str(tmp_path / "minari"), "--max-train-steps", "1", "--eval-every", "64",
                    "--eval-episodes", "1"]) == 0
    from envs.data import load_minari
    from envs.registry import normalized_score

    score = float(normalized_score("hopper", load_minari(get_spec("hopper-expert").local_dataset_id).returns().mean(),
                                   "local"))
    assert score < 90 and md.medium_target(spec, 45.0, print) == pytest.approx(min(45.0, 0.5 * score))


def test_a_killed_dataset_write_is_redone(tmp_path, monkeypatch):
    """A folder left by a write killed before Minari's metadata blocks create_dataset_from_buffers: it is removed."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.chdir(tmp_path)
    partial = tmp_path / "minari" / "namm_transfer" / "hopper" / "medium-v0" / "data"
    partial.mkdir(parents=True)
    (partial / "main_data.hdf5").write_bytes(b"cut short")
    assert _script("make_dataset").main(["--env", "hopper", "--steps", "30", "--workdir", str(tmp_path / "w"),
                                         "--data-dir", str(tmp_path / "minari"), "--max-train-steps", "1",
                                         "--eval-every", "64", "--eval-episodes", "1"]) == 0
    from envs.data import load_minari

    assert load_minari("namm_transfer/hopper/medium-v0").num_steps >= 30
