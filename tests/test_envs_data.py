import re

import h5py
import numpy as np
import pytest

from envs.data import (DTBatchSampler, OfflineDataset, SamplerConfig, Trajectory, export_d4rl_layout, load_d4rl_hdf5,
                       load_minari)


def _episodes(lengths, obs_dim=11, act_dim=3, seed=0):
    rng = np.random.default_rng(seed)
    return [dict(obs=rng.normal(size=(n + 1, obs_dim)), act=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
                 rew=rng.uniform(0, 2, n), term=[False] * (n - 1) + [i % 2 == 0],
                 trunc=[False] * (n - 1) + [i % 2 == 1])
            for i, n in enumerate(lengths)]


def _make_minari(dataset_id, lengths):
    import minari
    from minari.data_collector import EpisodeBuffer

    bufs = [EpisodeBuffer(id=i, seed=i, observations=e["obs"], actions=e["act"], rewards=list(e["rew"]),
                          terminations=e["term"], truncations=e["trunc"], infos={})
            for i, e in enumerate(_episodes(lengths))]
    minari.create_dataset_from_buffers(dataset_id=dataset_id, buffer=bufs, env="Hopper-v5", eval_env="Hopper-v5",
                                       algorithm_name="test", author="test", author_email="test@localhost",
                                       description="tiny test dataset", code_permalink="tests",
                                       ref_min_score=10.0, ref_max_score=3000.0)


def test_minari_loader_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    _make_minari("namm_transfer/hopper/tiny-v0", [5, 7, 3])
    ds = load_minari("namm_transfer/hopper/tiny-v0")
    assert ds.source == "local" and [len(t) for t in ds.trajectories] == [5, 7, 3]
    assert ds.refs.min == 10.0 and ds.refs.max == 3000.0 and ds.refs.source == "local"
    t = ds.trajectories[1]
    assert t.observations.shape == (7, 11) and t.actions.shape == (7, 3) and t.next_observation.shape == (11,)
    assert t.timeouts[-1] and not t.terminals[-1]
    mean, std = ds.state_stats()
    allobs = np.concatenate([x.observations for x in ds.trajectories])
    np.testing.assert_allclose(mean, allobs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, allobs.std(0) + 1e-6, rtol=1e-5)


def test_minari_missing_dataset_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make_dataset.py --env hopper --quality medium"):
        load_minari("namm_transfer/hopper/medium-v0")
    with pytest.raises(FileNotFoundError, match="download"):
        load_minari("mujoco/hopper/medium-v0")


def test_d4rl_hdf5_split(tmp_path):
    n = 12
    term = np.zeros(n, bool); term[3] = True
    tout = np.zeros(n, bool); tout[8] = True  # steps 9..11 are an unfinished tail: dropped
    path = tmp_path / "hopper-medium-v2.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.arange(n * 11, dtype=np.float32).reshape(n, 11)
        f["next_observations"] = np.arange(n * 11, dtype=np.float32).reshape(n, 11) + 11
        f["actions"] = np.zeros((n, 3), np.float32)
        f["rewards"] = np.arange(n, dtype=np.float32)
        f["terminals"], f["timeouts"] = term, tout
    ds = load_d4rl_hdf5(path)
    assert ds.source == "d4rl" and ds.refs.min == -20.272305
    assert [len(t) for t in ds.trajectories] == [4, 5]
    assert ds.trajectories[0].terminals[-1] and ds.trajectories[1].timeouts[-1]
    assert ds.trajectories[1].ret == sum(range(4, 9))
    np.testing.assert_array_equal(ds.trajectories[1].next_observation, np.arange(9 * 11, 10 * 11))


def test_d4rl_hdf5_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="d4rl"):
        load_d4rl_hdf5(tmp_path / "nope.hdf5")
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f["observations"] = np.zeros((3, 2))
    with pytest.raises(ValueError, match="missing keys"):
        load_d4rl_hdf5(tmp_path / "bad.hdf5")


def _tiny_dataset(lengths):
    trajs = [Trajectory(e["obs"][:-1].astype(np.float32), e["act"], e["rew"].astype(np.float32), np.array(e["term"]),
                        np.array(e["trunc"])) for e in _episodes(lengths)]
    return OfflineDataset(trajs, "tiny", "local")


def test_export_roundtrip_keeps_source(tmp_path):
    from envs.registry import RefScores

    ds = _tiny_dataset([4, 6, 2])
    ds.refs = RefScores(1.0, 2.0, "local")
    back = load_d4rl_hdf5(export_d4rl_layout(ds, tmp_path / "x.hdf5"))
    assert back.source == "local" and back.name == "tiny" and back.refs == ds.refs
    assert [len(t) for t in back.trajectories] == [4, 6, 2]
    np.testing.assert_array_equal(back.trajectories[1].observations, ds.trajectories[1].observations)


def test_sampler_shapes_and_left_padding():
    ds = _tiny_dataset([3])  # shorter than K: every window is left-padded
    sampler = DTBatchSampler(ds, SamplerConfig(context=5, scale=10.0), seed=0)
    b = sampler.sample(8)
    assert b["states"].shape == (8, 5, 11) and b["actions"].shape == (8, 5, 3)
    assert b["rewards"].shape == (8, 5, 1) and b["returns_to_go"].shape == (8, 5, 1)
    assert b["timesteps"].shape == (8, 5) and b["attention_mask"].shape == (8, 5)
    tr = ds.trajectories[0]
    rtg = np.cumsum(tr.rewards[::-1])[::-1] / 10.0
    for i in range(8):
        n = int(b["attention_mask"][i].sum())
        si = 3 - n
        assert b["attention_mask"][i, : 5 - n].sum() == 0
        assert (b["actions"][i, : 5 - n] == -10).all() and (b["states"][i, : 5 - n] == 0).all()
        np.testing.assert_allclose(b["returns_to_go"][i, 5 - n :, 0], rtg[si:], rtol=1e-6)
        np.testing.assert_array_equal(b["timesteps"][i, 5 - n :], np.arange(si, 3))
        want = (tr.observations[-1] - sampler.state_mean) / sampler.state_std
        np.testing.assert_allclose(b["states"][i, -1], want, rtol=1e-5)


def test_sampler_length_proportional():
    ds = _tiny_dataset([2, 98])
    sampler = DTBatchSampler(ds, SamplerConfig(context=4), seed=1)
    np.testing.assert_allclose(sampler.p, [0.02, 0.98])
    b = sampler.sample(64)
    assert b["attention_mask"].sum(1).float().mean() > 3.5  # almost all windows come from the long episode


def _d4rl(path, n=12, obs_dim=11, act_dim=3, with_timeouts=True, **override):
    term = np.zeros(n, bool)
    term[3] = True
    arrays = {"observations": np.random.default_rng(0).normal(size=(n, obs_dim)).astype(np.float32),
              "actions": np.zeros((n, act_dim), np.float32), "rewards": np.ones(n, np.float32), "terminals": term}
    if with_timeouts:
        arrays["timeouts"] = np.arange(n) == n - 1
    arrays.update(override)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if v is not None:
                f[k] = v
    return path


@pytest.mark.parametrize("override, msg", [
    ({"rewards": np.r_[np.ones(5), np.nan, np.ones(6)].astype(np.float32)},
     "field 'rewards' has NaN/inf at 1 step(s), first at step 5"),
    ({"observations": np.full((12, 11), np.inf, np.float32)}, "field 'observations' has NaN/inf"),
    ({"actions": np.zeros((11, 3), np.float32)}, "field 'actions' has shape (11, 3); expected (12, dim)"),
    ({"terminals": np.zeros(13, bool)}, "field 'terminals' has shape (13,)"),
    ({"rewards": np.ones((12, 2), np.float32)}, "field 'rewards' has shape (12, 2)"),
    ({"observations": np.zeros(12, np.float32)}, "field 'observations' has shape (12,)"),
    ({"terminals": np.zeros(12, bool), "timeouts": np.zeros(12, bool)}, "no complete episode"),
])
def test_d4rl_files_are_checked(tmp_path, override, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        load_d4rl_hdf5(_d4rl(tmp_path / "hopper-medium-v2.hdf5", **override))


def test_d4rl_file_without_timeouts_is_cut_at_the_step_limit_as_the_official_script(tmp_path):
    path = _d4rl(tmp_path / "hopper-medium-v2.hdf5", n=14, with_timeouts=False)  # a terminal at step 3
    ds = load_d4rl_hdf5(path, max_ep_len=4)
    # gym/data/download_d4rl_datasets.py: episode_step restarts at 1 after a cut, so later episodes have 3 steps
    assert [len(t) for t in ds.trajectories] == [4, 3, 3, 3] and ds.trajectories[0].terminals[-1]
    assert all(t.timeouts[-1] for t in ds.trajectories[1:])


def test_dataset_checks_name_the_field_and_episode():
    from envs.data import check_dataset, dataset_hash
    ds = _tiny_dataset([3, 4])
    check_dataset(ds, ds.obs_dim, ds.act_dim)
    h = dataset_hash(ds)
    with pytest.raises(ValueError, match="has observation dimension 11, but the env has 17"):
        check_dataset(ds, 17, ds.act_dim)
    ds.trajectories[1].rewards[2] = np.nan
    assert dataset_hash(ds) != h
    with pytest.raises(ValueError, match="field 'rewards' of episode 1 holds NaN or inf"):
        check_dataset(ds)
