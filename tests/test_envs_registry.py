import numpy as np
import pytest

from envs.registry import D4RL_REF, LOCAL_REF, TASKS, get_spec, normalized_score, ref_scores


def test_get_spec_hopper_medium():
    s = get_spec("hopper-medium")
    assert s.gym_id == "Hopper-v5"
    assert s.minari_id == "mujoco/hopper/medium-v0"
    assert s.local_dataset_id == "namm_transfer/hopper/medium-v0"
    assert s.d4rl_file == "hopper-medium-v2.hdf5"
    assert s.target_returns == (3600.0, 1800.0)
    assert s.return_scale == 1000.0
    assert s.hf_checkpoint == "edbeeching/decision-transformer-gym-hopper-medium"


def test_all_twelve_mujoco_tasks():
    assert len([t for t in TASKS.values() if t.env in ("hopper", "walker2d", "halfcheetah")]) == 12
    assert get_spec("halfcheetah-expert").target_returns == (12000.0, 6000.0)
    assert get_spec("walker2d-medium-replay").minari_id is None  # no official Minari medium-replay
    assert get_spec("hopper-medium-expert").hf_checkpoint is None


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="hopper-medium-replay"):
        get_spec("hopper-mediocre")


def test_d4rl_refs_and_normalisation():
    assert D4RL_REF["hopper"].min == -20.272305 and D4RL_REF["hopper"].max == 3234.3
    assert normalized_score("hopper", -20.272305, "d4rl") == pytest.approx(0.0)
    assert normalized_score("hopper", 3234.3, "d4rl") == pytest.approx(100.0)
    np.testing.assert_allclose(normalized_score("walker2d", np.array([1.629008, 4592.3]), "d4rl"), [0, 100])


def test_sources_never_mix():
    assert normalized_score("hopper", 1000.0, "d4rl") != normalized_score("hopper", 1000.0, "local")
    assert LOCAL_REF["hopper"].source == "local" and D4RL_REF["hopper"].source == "d4rl"
    with pytest.raises(ValueError, match="metadata"):
        ref_scores("hopper", "minari")
    with pytest.raises(ValueError, match="source"):
        ref_scores("hopper", "v5")
    with pytest.raises(ValueError, match="unknown env"):
        ref_scores("ant", "d4rl")


def test_minigrid_memory_entry():
    from envs.minigrid_memory import GYM_ID
    from envs.registry import SuccessRate

    s = get_spec("minigrid-memory")
    assert s.gym_id == GYM_ID and s.local_dataset_id == "namm_transfer/minigrid/memory-v0"
    assert s.metric == "success" and s.discrete_actions and not s.normalize_states
    assert s.target_returns[0] == 1.0 and s.return_scale == 1.0
    assert s.dt_delay % 16 == 0 and dict(s.dt_train)["context"] >= s.max_ep_len  # the whole episode in context
    scorers = s.scorers("local")
    assert list(scorers) == ["success"] and isinstance(scorers["success"], SuccessRate)
    np.testing.assert_array_equal(scorers["success"].normalize(np.array([0.0, 0.98, 0.0])), [0, 100, 0])
    with pytest.raises(ValueError, match="success rate"):
        s.refs("d4rl")
    # MuJoCo tasks keep their reference-return scales
    assert list(get_spec("hopper-medium").scorers("local")) == ["d4rl", "local"]
    assert list(get_spec("hopper-medium").scorers("d4rl")) == ["d4rl"]


@pytest.mark.parametrize("env, ref_min, ref_max", [("hopper", -20.272305, 3234.3),
                                                    ("halfcheetah", -280.178953, 12135.0),
                                                    ("walker2d", 1.629008, 4592.3)])
def test_d4rl_reference_scores_are_infos_py(env, ref_min, ref_max):
    """D4RL d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE of '<env>-random-v0' / '<env>-expert-v0', which every
    -v2 dataset of the env (medium, medium-replay, expert) uses; normalized score = 100 (ret - min) / (max - min)."""
    assert (D4RL_REF[env].min, D4RL_REF[env].max) == (ref_min, ref_max)
    assert normalized_score(env, ref_min, "d4rl") == pytest.approx(0.0, abs=1e-9)
    assert normalized_score(env, 0.25 * ref_min + 0.75 * ref_max, "d4rl") == pytest.approx(75.0)
