"""CMA-ES, trainer resume exactness, and torchrun sharding (2 CPU ranks == 1 rank)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from namm_transfer.evolution.cmaes import SepCMAES, random_selection_mean_drift, random_selection_path_norm

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-llama", "--stages", "passkey:2,passkey+kv_retrieval:1", "--tokens", "300",
        "--popsize", "4", "--delay", "128", "--chunk", "64", "--pool-per-task", "4", "--samples-per-task", "1",
        "--stats-samples-per-task", "1", "--member-batch", "2"]


def test_reference_rates():
    es = SepCMAES(4172, 32)
    assert es.mu == 16
    assert es.mu_eff == pytest.approx(9.179, abs=1e-3)
    assert es.c1 == pytest.approx(1.148e-7, rel=1e-3) and es.c_mu == pytest.approx(8.37e-7, rel=1e-3)
    assert es.c_sigma == pytest.approx(0.00267, rel=1e-2) and es.c_c == pytest.approx(0.000958, rel=1e-3)
    assert es.chi_n == pytest.approx(64.59, abs=1e-2)
    assert es.weights[:16].sum().item() == pytest.approx(1.0) and (es.weights[16:] < 0).all()


def _path_and_drift(fitness, reps=20, dim=400, gens=60):
    """Root-mean-square |p_sigma| and |m_T - m_0| over `reps` runs, and their random-selection expectations."""
    obs_p, obs_m, exp_p, exp_m = [], [], [], []
    for rep in range(reps):
        es = SepCMAES(dim, 16, sigma0=0.1, seed=rep)
        sigmas = []
        for _ in range(gens):
            sigmas.append(es.sigma)
            es.tell(fitness(es.ask(), rep))
        obs_p.append(float(es.p_sigma.norm()) ** 2)
        obs_m.append(float(es.mean.norm()) ** 2)
        exp_p.append(random_selection_path_norm(dim, es.c_sigma, gens) ** 2)
        exp_m.append(random_selection_mean_drift(sigmas, float(es.diag_c.sum()), es.mu_eff) ** 2)
    rms = lambda v: (sum(v) / len(v)) ** 0.5  # noqa: E731
    return rms(obs_p) / rms(exp_p), rms(obs_m) / rms(exp_m)


def test_random_selection_norms_match_a_search_whose_ranking_is_noise():
    gen = torch.Generator().manual_seed(0)
    path, drift = _path_and_drift(lambda x, rep: torch.rand(len(x), generator=gen))
    assert path == pytest.approx(1.0, abs=0.03) and drift == pytest.approx(1.0, abs=0.03)
    # a ranking with signal (one coordinate rewarded) makes both larger than selection at random
    path, drift = _path_and_drift(lambda x, rep: x[:, 0])
    assert path > 1.1 and drift > 1.1


def test_cmaes_optimises_and_resumes_exactly():
    def run(split):
        es = SepCMAES(10, 8, sigma0=0.5, seed=3, mean=torch.full((10,), 2.0))
        for g in range(60):
            if g == split:
                state = es.state_dict()
                es = SepCMAES(10, 8, sigma0=0.5, seed=99)
                es.load_state_dict(state)
            x = es.ask()
            es.tell(-(x ** 2).sum(1))
        return es
    a, b = run(None), run(25)
    assert torch.equal(a.mean, b.mean) and a.sigma == b.sigma
    assert a.mean.norm() < 0.1


def run_train(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "scripts/train_namm.py")]
    else:
        # --standalone: a free port each run (a fixed port collides with any other torchrun on the machine)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(ROOT / "scripts/train_namm.py")]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)


def train(out, *extra, nproc=1, flags=TINY):
    res = run_train([*flags, "--out", out, *extra], nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(out / "namm" / "namm.safetensors"))["params"]


VAL = ["--val-every", "1", "--val-per-task", "1"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Three uninterrupted generations with validation after each."""
    out = tmp_path_factory.mktemp("full") / "run"
    return out, train(out, *VAL)


def val_rows(out):
    """Validation rows without their timing."""
    return [{k: v for k, v in json.loads(l).items() if k != "seconds"}
            for l in (out / "val.jsonl").read_text().splitlines()]


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_trainer_resume_is_identical_and_writes_outputs(full_run, tmp_path):
    a, full = full_run
    train(tmp_path / "b", *VAL, "--max-generations", "1")  # "killed" after one generation
    resumed = train(tmp_path / "b", flags=[])  # --out alone resumes with the saved settings
    assert torch.equal(full, resumed)
    log = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in log] == [0, 1, 2]
    assert log[2]["stage_tasks"] == ["passkey", "kv_retrieval"]
    assert all(len(r["member_scores"]) == 4 and len(r["member_cache"]) == 4 for r in log)
    from namm_transfer.evolution.trainer import TrainConfig, load_state, new_es, restore_es
    prev_t, prev = load_state(tmp_path / "b", "prev.")  # the last generation, replayed from its recorded fitness
    cur_t, cur = load_state(tmp_path / "b")
    es = restore_es(new_es(TrainConfig.from_dict(cur["config"])), prev_t, prev)
    es.ask()
    es.tell(torch.tensor(log[-1]["member_fitness"], dtype=torch.float64))
    assert torch.equal(es.mean, cur_t["es_mean"]) and es.sigma == cur["es"]["sigma"]
    assert max(log[-1]["member_fitness"]) == log[-1]["fitness_max"]
    from namm_transfer.evolution.trainer import compute_platform
    assert all(r["platform"] == compute_platform("cpu") for r in log)  # what replaying these scores needs
    assert (tmp_path / "b" / "curve.png").stat().st_size > 1000
    assert not torch.equal(full, torch.zeros_like(full))
    assert val_rows(tmp_path / "b") == val_rows(a)
    names = sorted(p.name for p in a.iterdir())
    assert "state.safetensors" in names and "state.json" in names and not any(n.endswith(".pt") for n in names)


def test_validation_curve(full_run):
    a, _ = full_run
    val = [json.loads(l) for l in (a / "val.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in val] == [1, 2, 3]
    for r in val:
        assert r["n"] == 2  # one validation prompt for each of the two tasks
        for name in ("namm", "h2o", "recency"):
            assert 0 <= r[f"{name}_cache"] <= 1 and len(r[f"{name}_scores"]) == 2
            assert r[f"{name}_ratio"] == pytest.approx(r[f"{name}_ratio"])  # finite


def test_torchrun_two_ranks_equals_one_rank(full_run, tmp_path):
    a, one = full_run
    two = train(tmp_path / "two", *VAL, nproc=2)
    assert torch.equal(one, two)
    assert val_rows(tmp_path / "two") == val_rows(a)


def test_other_settings_are_refused_and_a_deliberate_change_recorded(full_run, tmp_path):
    out = copy_run(full_run[0], tmp_path / "run")
    before = (out / "state.json").read_text()
    res = run_train(["--out", out, "--sigma0", "0.2", "--seed", "5"])
    assert res.returncode == 2
    assert "sigma0: 0.065 (saved) != 0.2 (now)" in res.stderr and "seed: 0 (saved) != 5 (now)" in res.stderr
    assert "--change-settings" in res.stderr and "Traceback" not in res.stderr
    assert (out / "state.json").read_text() == before  # nothing written
    # extending the last stage is not a change; a new seed with --change-settings is accepted and recorded
    train(out, "--stages", "passkey:2,passkey+kv_retrieval:2", "--seed", "5", "--change-settings", flags=[])
    state = json.loads((out / "state.json").read_text())
    assert state["config"]["seed"] == 5 and state["es"]["generation"] == 4
    assert state["settings_changes"] == [{"generation": 3, "changes": ["seed: 0 (saved) != 5 (now)"]}]


def test_a_new_sigma0_restarts_the_step_size_of_a_resumed_search(full_run, tmp_path):
    """The CMA-ES step size lives in the state: a recorded sigma0 change must reach it, not only the config."""
    out = copy_run(full_run[0], tmp_path / "run")
    old_sigma = json.loads((out / "state.json").read_text())["es"]["sigma"]
    train(out, "--stages", "passkey:2,passkey+kv_retrieval:2", "--sigma0", "0.2", "--change-settings", flags=[])
    state = json.loads((out / "state.json").read_text())
    (change,) = state["settings_changes"]
    assert change["generation"] == 3 and change["changes"][0].startswith("sigma0: 0.065 (saved) != 0.2 (now)")
    assert f"step size restarted at 0.2 (it was {old_sigma:.6g})" in change["changes"][0]
    # one generation of step-size adaptation after the restart: within a few percent of 0.2, far from 0.065
    assert state["history"][-1]["sigma"] == pytest.approx(0.2, rel=0.05)


HEAD = ["w_score", "b_score", "b_out"]


def test_parameter_groups_and_embedding():
    from namm_transfer.evolution.subspace import embed, parameter_indices
    from namm_transfer.namm import NAMMConfig, unflatten
    cfg = NAMMConfig()
    head = parameter_indices(cfg, HEAD)
    assert torch.equal(head, torch.arange(4096, 4172))  # b_out (50), w_score (25), b_score (1): the layout's tail
    assert torch.equal(parameter_indices(cfg, []), torch.arange(4172))
    for bad in (["w_scores"], ["b_out", "b_out"]):
        with pytest.raises(ValueError, match="each once, from w_qkv"):
            parameter_indices(cfg, bad)
    base = torch.randn(4172, dtype=torch.float64)
    coords = torch.randn(3, 76, dtype=torch.float64)
    full = unflatten(embed(coords, base, head), cfg)
    frozen = unflatten(base, cfg)
    for name in ("w_qkv", "b_qkv", "w_out"):
        assert torch.equal(full[name], frozen[name].expand_as(full[name]))
    assert torch.equal(full["b_score"][:, 0], coords[:, -1]) and torch.equal(full["b_out"], coords[:, :50])
    with pytest.raises(ValueError, match="75 coordinates for a subspace of 76"):
        embed(coords[:, :75], base, head)


def test_a_start_must_match_the_search(tmp_path):
    from namm_transfer.checkpoints import save_namm
    from namm_transfer.evolution.trainer import load_start
    from namm_transfer.features import RunningStats
    from namm_transfer.namm import NAMMConfig
    stats = RunningStats(17)
    stats.set(torch.rand(17), torch.rand(17) + 0.5, count=10)
    params = torch.randn(4172)
    save_namm(tmp_path / "d256", params, stats, NAMMConfig(delay=256))
    got, got_stats, prov = load_start(tmp_path / "d256", NAMMConfig(delay=256))
    assert torch.equal(got, params.double()) and got_stats.frozen and prov["kind"] == "NAMM checkpoint"
    assert torch.allclose(got_stats.var, stats.var.float().double())
    with pytest.raises(ValueError, match="differs from this search's"):
        load_start(tmp_path / "d256", NAMMConfig(delay=128))
    save_namm(tmp_path / "nostats", params, None, NAMMConfig(delay=256))
    with pytest.raises(ValueError, match="never measured"):
        load_start(tmp_path / "nostats", NAMMConfig(delay=256))


def test_a_head_search_from_another_search_keeps_the_rest_fixed(full_run, tmp_path):
    """--init-from a search's folder + --evolve: the start is that search's mean (float64) and statistics, only
    the named groups move, and the search's space and start cannot change on resume."""
    src, src_params = full_run
    src_state = json.loads((src / "state.json").read_text())
    out = tmp_path / "head"
    params = train(out, "--init-from", src, "--evolve", ",".join(HEAD), "--max-generations", "2")
    state = json.loads((out / "state.json").read_text())
    assert state["es"]["dim"] == 76 and state["es"]["generation"] == 2
    assert state["init"]["kind"] == "search state" and state["init"]["generation"] == src_state["es"]["generation"]
    assert state["stats"] == src_state["stats"]
    t, t_src = load_file(str(out / "state.safetensors")), load_file(str(src / "state.safetensors"))
    assert torch.equal(t["base_params"], t_src["es_mean"]) and torch.equal(t["stats_mean"], t_src["stats_mean"])
    assert torch.equal(params[:4096], src_params[:4096]) and not torch.equal(params[4096:], src_params[4096:])
    assert torch.equal(params, t["base_params"].index_put((torch.arange(4096, 4172),), t["es_mean"]).float())
    resumed = train(out, "--max-generations", "3", flags=[])  # --out alone resumes the head search
    assert not torch.equal(resumed, params) and torch.equal(resumed[:4096], src_params[:4096])
    for change in (["--evolve", "all"], ["--init-from", str(tmp_path)]):
        res = run_train(["--out", out, *change, "--change-settings"])
        assert res.returncode == 2 and "fixed when a search is created" in res.stderr, res.stderr[-2000:]
        assert "Traceback" not in res.stderr


def test_an_oracle_mass_search_ranks_members_by_the_mass_their_caches_keep(full_run, tmp_path):
    """--fitness oracle-mass: every member's retained oracle mass is logged; the fitness CMA-ES ranked by is that
    mass per task with the hinge (not the answer probability, which is still logged and validated); the last
    generation replays from prev.state; the signal cannot change on resume."""
    from namm_transfer.evolution.trainer import TrainConfig, fitness_from_scores, load_state, new_es, restore_es
    src, _ = full_run
    out = tmp_path / "mass"
    train(out, "--init-from", src, "--fitness", "oracle-mass", "--max-generations", "2", *VAL)
    cur_t, cur = load_state(out)
    cfg = TrainConfig.from_dict(cur["config"])
    assert cfg.fitness == "oracle-mass" and len(cur["history"]) == 2
    for row in cur["history"]:
        mass = torch.tensor(row["member_mass"], dtype=torch.float64)
        assert mass.shape == (cfg.popsize, len(row["samples"])) and ((mass > 0) & (mass <= 1)).all()
        frac = torch.tensor(row["member_cache"], dtype=torch.float64)[:, None]
        tasks = [k.split("/")[0] for k in row["samples"]]
        by_mass, _ = fitness_from_scores(mass, frac, tasks, [1.0] * len(tasks), cfg.cache_weight, cfg.cache_target)
        by_p, ratio = fitness_from_scores(torch.tensor(row["member_scores"], dtype=torch.float64), frac, tasks,
                                          [cur["refs"][k] for k in row["samples"]], cfg.cache_weight, cfg.cache_target)
        assert torch.allclose(torch.tensor(row["member_fitness"], dtype=torch.float64), by_mass, atol=1e-4)
        assert not torch.allclose(by_mass, by_p, atol=1e-3)
        # the answer p, as before (the tiny model's scores are ~2e-5: their 6 logged digits are ~2 significant ones)
        assert row["score_ratio_mean"] == pytest.approx(float(ratio.mean()), rel=0.05)
    prev_t, prev = load_state(out, "prev.")
    es = restore_es(new_es(cfg), prev_t, prev)
    es.ask()
    es.tell(torch.tensor(cur["history"][-1]["member_fitness"], dtype=torch.float64))
    assert torch.equal(es.mean, cur_t["es_mean"])
    assert [r["generation"] for r in cur["validation"]] == [1, 2] and "namm_ratio" in cur["validation"][0]
    res = run_train(["--out", out, "--fitness", "answer-p", "--change-settings"])
    assert res.returncode == 2 and "fixed when a search is created" in res.stderr and "Traceback" not in res.stderr


def test_torn_state_is_detected(full_run, tmp_path):
    out = copy_run(full_run[0], tmp_path / "run")
    # tensors from the previous generation beside the newer JSON: a pair from two different saves
    (out / "state.safetensors").write_bytes((out / "prev.state.safetensors").read_bytes())
    res = run_train(["--out", out])
    assert res.returncode == 2 and "different saves" in res.stderr and "Traceback" not in res.stderr


def test_pickle_state_is_refused(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    torch.save({"es": {}}, out / "state.pt")
    res = run_train([*TINY, "--out", out])
    assert res.returncode == 2 and "pickle" in res.stderr and "Traceback" not in res.stderr


def test_bad_settings_are_refused_before_any_work(tmp_path, capsys):
    """Refused while the flags are read, before the model loads (in-process: train_namm.main(argv))."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_namm", ROOT / "scripts" / "train_namm.py")
    train_namm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_namm)
    for bad, msg in [(["--popsize", "1"], "at least 2 members"), (["--delay", "100"], "multiple of"),
                     (["--stages", "passkey"], "TASK[+TASK...]:GENERATIONS"), (["--tokens", "0"], "tokens 0"),
                     (["--more-generations", "-1"], "--more-generations must be >= 0"),
                     (["--evolve", "w_score,scores"], "each once, from w_qkv"),
                     (["--init-from", str(tmp_path / "missing")], "neither a search folder"),
                     (["--fitness", "oracle-mass", "--protocol", "anywhere"], "needs an eviction limit")]:
        with pytest.raises(SystemExit) as exit_:
            train_namm.main([str(a) for a in [*TINY, *bad, "--out", tmp_path / "x"]])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and msg in err and "Traceback" not in err, err[-800:]
        assert not (tmp_path / "x").exists()


def test_spearman_matches_hand_values():
    from namm_transfer.evolution.trainer import spearman
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties get average ranks: ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4) -> 0.9486833
    assert spearman(torch.tensor([1.0, 1.0, 3.0, 4.0]), a) == pytest.approx(0.9486833, abs=1e-6)


def test_a_second_run_into_a_busy_folder_is_refused(full_run, tmp_path):
    from namm_transfer.runs import folder_lock
    out = copy_run(full_run[0], tmp_path / "run")
    with folder_lock(out):
        res = run_train(["--out", out])
    assert res.returncode == 2 and "being written by another run" in res.stderr and "Traceback" not in res.stderr


def test_other_model_files_under_the_same_name_are_refused(full_run, tmp_path):
    out = copy_run(full_run[0], tmp_path / "run")
    state = json.loads((out / "state.json").read_text())
    assert state["model_hash"] is None  # tiny test models are built from a config: nothing to hash
    from namm_transfer.evolution import trainer as tr
    state["model_hash"] = "sha256:saved"
    info_tensors = load_file(str(out / "state.safetensors"))
    tr.save_state(out, info_tensors, {k: v for k, v in state.items() if k != "tensors_sha256"})

    class Probe(tr.Trainer):
        def __init__(self, model_hash):  # only what try_resume needs
            self.out, self.rank, self.model_hash = out, 0, model_hash
            self.cfg = tr.TrainConfig.from_dict({**state["config"], "out": str(out)})
            self.es = SepCMAES(4172, self.cfg.popsize, self.cfg.sigma0, self.cfg.elite_ratio, seed=self.cfg.seed)
            self.stats = tr.RunningStats(17)
    with pytest.raises(ValueError, match="model files: sha256:saved"):
        Probe("sha256:other").try_resume()
    assert Probe("sha256:saved").try_resume() and Probe(None).try_resume()


def test_switching_the_model_dtype_rescores_references_and_bridges_the_validation(full_run, tmp_path):
    """--dtype bfloat16 --change-settings on a float32 run: refused without the flag; with it, the change is
    recorded, the full-cache references are scored again in bfloat16, the mean is validated again at the switch
    (a second row at the same generation, tagged with its dtype), and the search goes on in bfloat16."""
    out = copy_run(full_run[0], tmp_path / "run")
    old = json.loads((out / "state.json").read_text())
    res = run_train(["--out", out, "--dtype", "bfloat16"])
    assert res.returncode == 2 and "dtype: 'float32' (saved) != 'bfloat16' (now)" in res.stderr
    train(out, "--dtype", "bfloat16", "--change-settings", "--stages", "passkey:2,passkey+kv_retrieval:2", flags=[])
    state = json.loads((out / "state.json").read_text())
    assert state["config"]["dtype"] == "bfloat16" and state["es"]["generation"] == 4
    assert state["settings_changes"][-1]["changes"] == ["dtype: 'float32' (saved) != 'bfloat16' (now)"]
    shared = set(old["refs"]) & set(state["refs"])
    assert shared and any(old["refs"][k] != state["refs"][k] for k in shared)  # rescored, not reused
    rows = [(r["generation"], r.get("dtype")) for r in state["validation"]]
    assert rows == [(1, "float32"), (2, "float32"), (3, "float32"), (3, "bfloat16"), (4, "bfloat16")]
    sys.path.insert(0, str(ROOT / "scripts"))
    from training_report import validation_trend
    assert "(gen 3 -> 4, bfloat16, context-only, ~300 tokens)" in validation_trend(state["validation"])  # one dtype
    assert "(gen 2 -> 3, float32, context-only, ~300 tokens)" in validation_trend(state["validation"][:4])  # switch


def test_context_only_training_scores_what_eval_language_scores():
    """A member's training score under protocol context-only is the answer probability eval_language's
    evaluate_batch gives the same NAMM on the same prompt with its context-only limit (eviction steps stop where
    the question starts), with the shared prefix or without; 'anywhere' keeps evicting into the question."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_namm import load_model
    from namm_transfer.evolution.fitness import encode_sample, score_rows
    from namm_transfer.language.benchmark import evaluate_batch
    from namm_transfer.language.tasks import eviction_limit, make_sample
    from namm_transfer.namm import NAMMConfig
    from namm_transfer import enable_memory_attention
    from namm_transfer.policies import NAMMPolicy
    torch.manual_seed(0)
    model, tok = load_model("tiny-llama", "cpu")
    enable_memory_attention(model)
    sample = make_sample("passkey", 2_000_003, 300, tok)
    limit = eviction_limit(sample, tok, "context-only")
    enc = encode_sample(sample, tok, "raw", 300, "context-only")
    assert enc.evict_until == limit and 192 < limit < 288 < enc.length  # a step at 288 would fall in the question
    assert encode_sample(sample, tok, "raw", 300).key == enc.key  # one full-cache reference for every protocol
    assert encode_sample(sample, tok, "raw", 300).evict_until is None
    params = torch.randn(4172, generator=torch.Generator().manual_seed(3)) * 0.5
    namm = lambda: NAMMPolicy(params, NAMMConfig(delay=96))  # noqa: E731
    shared = score_rows(model, enc, namm(), 2, 32, share_prefix=True)
    alone = score_rows(model, enc, namm(), 1, 32, share_prefix=False)
    (rec,) = evaluate_batch(model, tok, [sample], namm(), "namm", ["k"], chunk=32, max_new_tokens=1,
                            evict_until=[limit])
    assert float(shared.score[0]) == pytest.approx(float(alone.score[0]), abs=1e-6)
    assert float(shared.score[0]) == pytest.approx(rec.answer_prob, abs=1e-4)
    assert float(shared.kept_fraction[0]) == pytest.approx(rec.kept_fraction, abs=1e-6)
    anywhere = score_rows(model, encode_sample(sample, tok, "raw", 300), namm(), 1, 32)
    assert float(anywhere.cache_fraction[0]) < float(shared.cache_fraction[0])  # one more step, in the question


def test_switching_the_protocol_and_length_bridges_the_validation(full_run, tmp_path):
    """A search saved before --protocol existed resumes as 'anywhere' (no settings change; its validation rows get
    the saved protocol and length); --protocol context-only --tokens 320 --change-settings is recorded, the mean
    is validated again in the new mode at the switch, and the trend pairs points of one mode only."""
    out = copy_run(full_run[0], tmp_path / "run")
    state = json.loads((out / "state.json").read_text())
    state["config"].pop("protocol")  # as written before the setting existed
    for r in state["validation"]:
        r.pop("protocol"), r.pop("tokens")
    (out / "state.json").write_text(json.dumps(state))
    # one more generation, same settings (validation every 5: none at generation 4)
    train(out, "--stages", "passkey:2,passkey+kv_retrieval:2", "--val-every", "5", flags=[])
    state = json.loads((out / "state.json").read_text())
    assert state["config"]["protocol"] == "anywhere" and state["settings_changes"] == []
    assert [(r["generation"], r["protocol"], r["tokens"]) for r in state["validation"]] == [
        (g, "anywhere", 300) for g in (1, 2, 3)]
    train(out, "--more-generations", "0", "--validate-now", flags=[])  # a point at the switch, old settings
    state = json.loads((out / "state.json").read_text())
    assert state["es"]["generation"] == 4 and state["validation"][-1]["generation"] == 4
    train(out, "--protocol", "context-only", "--tokens", "320", "--change-settings", "--stages",
          "passkey:2,passkey+kv_retrieval:3", flags=[])
    state = json.loads((out / "state.json").read_text())
    assert state["settings_changes"][-1] == {"generation": 4, "changes": [
        "tokens: 300 (saved) != 320 (now)", "protocol: 'anywhere' (saved) != 'context-only' (now)"]}
    modes = [(r["generation"], r["protocol"], r["tokens"]) for r in state["validation"]]
    assert modes[-3:] == [(4, "anywhere", 300), (4, "context-only", 320), (5, "context-only", 320)]
    sys.path.insert(0, str(ROOT / "scripts"))
    from training_report import validation_trend
    assert validation_trend(state["validation"]).endswith("(gen 4 -> 5, float32, context-only, ~320 tokens)")
    assert validation_trend(state["validation"][:-1]).endswith("(gen 3 -> 4, float32)")
    res = run_train(["--out", out, "--protocol", "everywhere"])
    assert res.returncode == 2 and "invalid choice: 'everywhere'" in res.stderr


def test_emulated_bfloat16_is_named_with_what_to_do(monkeypatch, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_namm_script", ROOT / "scripts" / "train_namm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for native, dtype, warned in [(False, "bfloat16", True), (False, "float32", False), (True, "bfloat16", False)]:
        monkeypatch.setattr(mod, "bfloat16_is_native", lambda device, n=native: n)
        mod.warn_if_bfloat16_is_emulated(dtype, "cpu")
        err = capsys.readouterr().err
        assert ("--dtype float32 --change-settings" in err) == warned, (native, dtype, err)


def test_platform_names_the_kernels():
    from namm_transfer.evolution.trainer import compute_platform
    platform = compute_platform("cpu")
    assert platform.startswith(f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()} (bf16 ")
    assert platform.endswith(("native)", "emulated)"))


def test_answer_scores_need_the_output_head_only_on_answer_positions():
    """score_rows asks the model for logits only where answer tokens are predicted (logits_to_keep); a model
    without that argument gets every position's logits. Both give the same scores, token accuracies and caches."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_namm import load_model
    from namm_transfer.evolution.fitness import encode_sample, score_rows
    from namm_transfer.language.tasks import make_sample
    from namm_transfer.namm import NAMMConfig
    from namm_transfer import enable_memory_attention
    from namm_transfer.policies import NAMMPolicy

    class FullHead(torch.nn.Module):  # the same model behind a forward without logits_to_keep
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, cache, use_cache, position_ids):
            return self.model(input_ids=input_ids, cache=cache, use_cache=use_cache, position_ids=position_ids)

    torch.manual_seed(0)
    model, tok = load_model("tiny-llama", "cpu")
    enable_memory_attention(model)
    enc = encode_sample(make_sample("kv_retrieval", 2_000_011, 300, tok), tok, "raw", 300)
    assert enc.answer.numel() > 1
    params = torch.randn(3, 4172, generator=torch.Generator().manual_seed(5)) * 0.5
    got = score_rows(model, enc, NAMMPolicy(params, NAMMConfig(delay=96)), 3, 32)
    want = score_rows(FullHead(model), enc, NAMMPolicy(params, NAMMConfig(delay=96)), 3, 32)
    for name in ("score", "token_accuracy", "cache_fraction", "kept_fraction"):
        assert torch.allclose(getattr(got, name), getattr(want, name), rtol=0, atol=1e-6), name
    assert float(got.cache_fraction.min()) < 1  # members did evict


def test_ranked_signal_picks_what_a_search_ranks_by():
    """One function names the signal for the trainer, the replay test and training_report.py: the answer
    probability over each sample's full-cache reference, or the retained oracle mass over 1; a missing signal or
    reference, or an unknown kind, is refused."""
    from namm_transfer.evolution.trainer import ranked_signal
    score, mass = torch.rand(4, 3), torch.rand(4, 3)
    values, refs = ranked_signal("answer-p", score, mass, [0.5, 0.25, 1.0])
    assert values is score and refs == [0.5, 0.25, 1.0]
    values, refs = ranked_signal("oracle-mass", score, mass, [None, None, None])
    assert values is mass and refs == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="retained oracle mass"):
        ranked_signal("oracle-mass", score, None, [1.0] * 3)
    with pytest.raises(ValueError, match="full-cache reference"):
        ranked_signal("answer-p", score, None, [1.0, None, 1.0])
    with pytest.raises(ValueError, match="unknown fitness signal"):
        ranked_signal("answer-q", score, mass, [1.0] * 3)
