"""make_dataset.py and train_dt.py end to end on tiny settings (in-process, temp dirs)."""

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the script is being executed
    spec.loader.exec_module(mod)
    return mod


TINY_PPO = ["--max-train-steps", "1", "--eval-every", "64", "--eval-episodes", "1"]


def test_make_dataset_then_train_dt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    data_dir = ["--data-dir", str(tmp_path / "minari")]
    _script("make_dataset").main(["--env", "hopper", "--quality", "medium", "--steps", "300",
                                  "--workdir", str(tmp_path / "ppo"), *TINY_PPO, *data_dir])
    assert (tmp_path / "ppo" / "policy.pt").exists()
    state = json.loads((tmp_path / "ppo" / "train_state.json").read_text())
    assert state["done"] and state["timesteps"] >= 1

    import minari

    ds = minari.load_dataset("namm_transfer/hopper/medium-v0")
    assert ds.total_steps >= 300 and ds.storage.metadata["ref_max_score"] == 3234.3
    assert _script("make_dataset").main(["--env", "hopper", "--steps", "10", "--workdir", str(tmp_path / "ppo"),
                                         *data_dir]) == 2
    assert "already exists (pass --force to overwrite)" in capsys.readouterr().err

    train = _script("train_dt")
    args = ["--env", "hopper-medium", "--steps", "3", "--ckpt-every", "2", "--batch-size", "4", "--hidden", "16",
            "--layers", "1", "--warmup", "2", "--eval-episodes", "1", "--out", str(tmp_path / "dt"),
            "--export", str(tmp_path / "export"), *data_dir]
    res = train.main(args)
    assert res["step"] == 3 and res["dataset_source"] == "local"
    ev = res["eval"]["target_3600"]
    assert {k for k in ev if k.startswith("score_")} == {
        "score_d4rl_mean", "score_d4rl_std", "score_local_mean", "score_local_std"}
    assert (tmp_path / "dt" / "loss.png").exists() and (tmp_path / "export" / "model.safetensors").exists()

    from envs.rollout import load_dt

    pol = load_dt(tmp_path / "export")
    assert pol.context == 20 and pol.model.config.dataset_id == "namm_transfer/hopper/medium-v0"

    # resume: the checkpoint holds step 3, so asking for 4 trains exactly one more step
    args[args.index("--steps") + 1] = "4"
    args[args.index("--eval-episodes") + 1] = "0"
    assert train.main(args)["step"] == 4
    assert json.loads((tmp_path / "dt" / "final_eval.json").read_text())["step"] == 4


def test_make_dataset_medium_replay_and_medium_expert(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # SB3 would put its log folders here
    md = _script("make_dataset")
    common = ["--env", "hopper", "--data-dir", str(tmp_path / "minari"), *TINY_PPO]
    md.main([*common, "--quality", "medium-replay", "--workdir", str(tmp_path / "r")])
    md.main([*common, "--quality", "medium", "--steps", "100", "--workdir", str(tmp_path / "m")])
    md.main([*common, "--quality", "expert", "--steps", "100", "--workdir", str(tmp_path / "e")])
    md.main([*common, "--quality", "medium-expert", "--workdir", str(tmp_path / "me")])

    from envs.data import load_minari

    replay = load_minari("namm_transfer/hopper/medium-replay-v0")
    assert replay.num_steps > 0  # the PPO training episodes
    med, exp = load_minari("namm_transfer/hopper/medium-v0"), load_minari("namm_transfer/hopper/expert-v0")
    both = load_minari("namm_transfer/hopper/medium-expert-v0")
    assert len(both.trajectories) == len(med.trajectories) + len(exp.trajectories)
    assert both.num_steps == med.num_steps + exp.num_steps
    assert not list((tmp_path / "tmp").glob("SB3-*"))  # policy training leaves no empty log folders behind


def test_train_dt_rejects_two_sources(tmp_path, capsys):
    from helpers_inputs import refused
    refused(_script("train_dt").main, ["--dataset-id", "a/b/c-v0", "--d4rl-file", "x.hdf5", "--out", str(tmp_path)],
            capsys, "not both")


@pytest.mark.parametrize("env", ["walker2d", "halfcheetah"])
def test_make_dataset_other_envs(env, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.chdir(tmp_path)  # MuJoCo 4 writes MUJOCO_LOG.TXT (a 'settotalmass' warning) into the cwd
    _script("make_dataset").main(["--env", env, "--steps", "50", "--workdir", str(tmp_path / "ppo"),
                                  "--data-dir", str(tmp_path / "minari"), *TINY_PPO])
    from envs.data import load_minari
    from envs.registry import get_spec

    ds = load_minari(f"namm_transfer/{env}/medium-v0")
    assert ds.obs_dim == 17 and ds.act_dim == 6 and ds.num_steps >= 50
    assert ds.refs == get_spec(f"{env}-medium").refs("local")


def test_train_dt_refuses_bad_input_before_any_work(tmp_path, capsys):
    """Bad flags, unusable D4RL files, a crafted resume file, other settings or data: exit 2, the reason, and the
    output folder as it was."""
    import os

    import numpy as np
    import torch
    from helpers_inputs import refused, snapshot
    from test_envs_data import _d4rl
    train = _script("train_dt")
    out = tmp_path / "dt"
    for bad, msg in ((["--steps", "0"], "'0' is not an integer >= 1"), (["--warmup", "0"], "an integer >= 1"),
                     (["--dropout", "1"], "< 1"), (["--lr", "0"], "> 0"), (["--device", "tpu"], "invalid choice"),
                     (["--hidden", "10", "--heads", "3"], "--hidden 10 must be a multiple of --heads 3")):
        refused(train.main, ["--out", str(out), *bad], capsys, msg)
    d4rl = tmp_path / "hopper-medium-v2.hdf5"
    args = ["--env", "hopper-medium", "--d4rl-file", str(d4rl), "--steps", "1", "--batch-size", "2", "--hidden", "8",
            "--layers", "1", "--warmup", "1", "--eval-episodes", "0", "--out", str(out)]
    for override, msg in (({"rewards": np.full(12, np.nan, np.float32)}, "field 'rewards' has NaN/inf"),
                          ({"actions": np.zeros((10, 3), np.float32)}, "field 'actions' has shape (10, 3)"),
                          ({"observations": np.zeros((12, 5), np.float32)}, "observation dimension 5, but the env "
                                                                             "has 11")):
        _d4rl(d4rl, **override)
        refused(train.main, args, capsys, str(d4rl) if "field" in msg else "hopper-medium-v2.hdf5", msg)
    assert not out.exists()
    _d4rl(d4rl)
    assert train.main(args)["step"] == 1
    before = snapshot(out)
    refused(train.main, [*args, "--lr", "0.001"], capsys, "other settings", "lr: recorded 0.0001, this run 0.001")
    _d4rl(d4rl, rewards=np.full(12, 2.0, np.float32))  # the same file name, other data
    refused(train.main, args, capsys, "data_hash: recorded 'sha256:")
    _d4rl(d4rl)

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    torch.save({"model": {}, "x": Exploit()}, out / "ckpt.pt")
    before["ckpt.pt"] = (out / "ckpt.pt").read_bytes()
    refused(train.main, args, capsys, "ckpt.pt: refused to load", "can run code")
    assert not (tmp_path / "pwned").exists() and snapshot(out) == before


def test_make_dataset_resumes_from_data_only_files_and_refuses_code(tmp_path, monkeypatch, capsys):
    import os

    import torch
    from helpers_inputs import refused
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    md = _script("make_dataset")
    for bad, msg in ((["--eval-every", "0"], "an integer >= 1"), (["--steps", "0"], "an integer >= 1"),
                     (["--env", "minigrid", "--p-correct", "1.5"], "<= 1"),
                     (["--quality", "memory"], "--quality memory goes with --env minigrid")):
        refused(md.main, ["--workdir", str(tmp_path / "w"), *bad], capsys, msg)
    assert not (tmp_path / "w").exists()
    args = ["--env", "hopper", "--quality", "medium-replay", "--workdir", str(tmp_path / "w"),
            "--data-dir", str(tmp_path / "minari"), *TINY_PPO]
    assert md.main(args) == 0 and sorted(p.name for p in (tmp_path / "w").glob("replay_*")) == ["replay_0001.npz"]
    more = [*args[:-6], "--max-train-steps", "3000", "--eval-every", "64", "--eval-episodes", "1", "--force"]
    assert md.main(more) == 0  # resumed from policy.pt (PPO's first rollout: 2048 steps), one more period
    assert "resumed ppo policy at 2048 steps" in capsys.readouterr().out
    assert len(list((tmp_path / "w").glob("replay_*.npz"))) == 2

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    torch.save({"params": Exploit()}, tmp_path / "w" / "policy.pt")
    refused(md.main, [*more[:-1], "--force"], capsys, "policy.pt: refused to load", "can run code")
    assert not (tmp_path / "pwned").exists()


def test_train_dt_stops_when_the_loss_diverges(tmp_path, capsys):
    import numpy as np
    from helpers_inputs import refused
    from test_envs_data import _d4rl
    d4rl = _d4rl(tmp_path / "hopper-medium-v2.hdf5", actions=np.full((12, 3), 1e30, np.float32))  # finite, huge
    out = tmp_path / "dt"
    refused(_script("train_dt").main, ["--env", "hopper-medium", "--d4rl-file", str(d4rl), "--steps", "2",
                                       "--batch-size", "2", "--hidden", "8", "--layers", "1", "--warmup", "1",
                                       "--eval-episodes", "0", "--out", str(out)], capsys, "training diverged at step 1")
    assert not (out / "ckpt.pt").exists() and not (out / "final").exists()
