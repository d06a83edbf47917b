"""The committed language-NAMM searches (training/): their state loads, and the last generation replays exactly.

From prev.state.* (the state one generation back) the CMA-ES draws the same population, the recorded member
scores give the recorded ranking, and tell() lands bit for bit on the committed state; the population re-scored
with SmolLM2 on one of that generation's prompts gives every member its recorded score. So a fresh clone continues the run exactly.
"""
from pathlib import Path

import pytest
import torch

from namm_transfer.evolution.subspace import embed
from namm_transfer.evolution.trainer import (TrainConfig, fitness_from_scores, load_state, new_es, ranked_signal,
                                             restore_es, search_space)
from namm_transfer.namm import NAMMConfig

ROOT = Path(__file__).resolve().parents[1]
RUNS = sorted(p for p in (ROOT / "training").glob("namm-*") if (p / "state.json").exists())


def test_training_state_is_committed():
    assert RUNS, "training/ holds no search state (training/run.sh creates it; commit it at the end of a period)"


# Rows written before the platform was recorded (up to generation 120 / 105) were all scored on AVX512 CPUs with
# native bfloat16 (AMD EPYC, Zen 4; README, "Generation 30"); their scores replayed there in every CI run.
LEGACY_PLATFORM = "torch 2.14.1+cu130, cpu AVX512 (bf16 native)"


def replay(run: Path):
    prev_t, prev = load_state(run, "prev.")
    cur_t, cur = load_state(run)
    cfg = TrainConfig.from_dict(cur["config"])
    es = restore_es(new_es(cfg), prev_t, prev)
    row = cur["history"][-1]
    assert row["generation"] == es.generation == cur["es"]["generation"] - 1
    population = embed(es.ask(), *search_space(cfg, cur_t))  # full parameters (searches of some groups: --evolve)
    frac = torch.tensor(row["member_cache"], dtype=torch.float64)[:, None]
    tasks = [k.split("/")[0] for k in row["samples"]]
    logged = lambda key: torch.tensor(row[key], dtype=torch.float64) if key in row else None  # noqa: E731
    score, refs = ranked_signal(cfg.fitness, logged("member_scores"), logged("member_mass"),
                                [cur["refs"].get(k) for k in row["samples"]])
    fit, _ = fitness_from_scores(score, frac, tasks, refs, cfg.cache_weight, cfg.cache_target)
    assert float(fit.max()) == pytest.approx(row["fitness_max"], abs=1e-4)
    if "member_fitness" in row:  # the exact fitness the run ranked by (recorded from 2026-12-04); the scores
        recorded = torch.tensor(row["member_fitness"], dtype=torch.float64)  # are rounded to 6 digits and the
        assert torch.allclose(recorded, fit, atol=1e-4, rtol=0)  # cache to 5, which can swap a near-tie
        fit = recorded
    es.tell(fit)
    return es, cur_t, cur, cfg, row, population


@pytest.mark.parametrize("run", RUNS, ids=[p.name for p in RUNS])
def test_last_generation_replays_exactly(run):
    es, cur_t, cur, _, _, _ = replay(run)
    assert torch.equal(es.mean, cur_t["es_mean"]) and torch.equal(es.diag_c, cur_t["es_diag_c"])
    assert torch.equal(es.p_sigma, cur_t["es_p_sigma"]) and torch.equal(es.p_c, cur_t["es_p_c"])
    assert es.sigma == cur["es"]["sigma"] and torch.equal(es.gen.get_state(), cur_t["es_rng"])


@pytest.mark.parametrize("run", RUNS[:1], ids=[p.name for p in RUNS[:1]])
def test_recorded_member_scores_are_reproduced(run):
    """The generation's population scored again on its first prompt as the trainer scored it (shared prefix, the
    search's model dtype) gives its members their recorded scores. In bfloat16 a member's score depends on the batch
    it was scored in — one member alone can land 0.1 away, once an eviction decision flips — so there the replay
    scores every member in the trainer's batches; in float32 the batch does not matter at this tolerance (four
    members as one batch reproduce their scores recorded in a batch of 16 to ~1e-6), so four members across the
    population are scored."""
    from namm_transfer.evolution.fitness import encode_sample, score_rows
    from namm_transfer.evolution.trainer import MODEL_DTYPES
    from namm_transfer.features import RunningStats
    from namm_transfer.language.models import load_causal_lm
    from namm_transfer.language.tasks import make_sample
    from namm_transfer.policies import NAMMPolicy
    from namm_transfer.attention import enable_memory_attention
    from namm_transfer.evolution.trainer import compute_platform
    torch.set_num_threads(1)
    es, cur_t, cur, cfg, row, population = replay(run)
    if cfg.model != "smollm2-135m":
        pytest.skip(f"search on {cfg.model}")
    here = compute_platform("cpu")
    recorded = row.get("platform", LEGACY_PLATFORM)
    if recorded != here:
        pytest.skip(f"generation {row['generation']} was scored on {recorded!r}, this machine is {here!r}: "
                    f"{cfg.dtype} scores replay to the digit only on the same kernels (the CMA-ES replay above is "
                    "exact everywhere)")
    model, tok = load_causal_lm("smollm2-135m", dtype=MODEL_DTYPES[cfg.dtype])
    enable_memory_attention(model)
    namm_cfg = NAMMConfig(delay=cfg.delay)
    stats = RunningStats(namm_cfg.num_bins)
    stats.count, stats.mean, stats.m2, stats.frozen = cur["stats"]["count"], cur_t["stats_mean"], \
        cur_t["stats_m2"], True
    task, seed, tokens, style = row["samples"][0].split("/")
    sample = encode_sample(make_sample(task, int(seed), int(tokens), tok), tok, style, int(tokens), cfg.protocol)
    if cfg.dtype == "float32":  # four members across the population, one batch: a quarter of the time
        groups = [sorted({0, cfg.popsize // 3, 2 * cfg.popsize // 3, cfg.popsize - 1})]
    else:  # bfloat16: the trainer's own member batches
        batch = cfg.member_batch or cfg.popsize
        groups = [list(range(start, min(start + batch, cfg.popsize))) for start in range(0, cfg.popsize, batch)]
    for group in groups:
        res = score_rows(model, sample, NAMMPolicy(population[group].float(), namm_cfg, stats), len(group),
                         cfg.chunk, cfg.share_prefix)
        for i, member in enumerate(group):
            assert float(res.score[i]) == pytest.approx(row["member_scores"][member][0], abs=2e-4), member


def test_readme_training_report_is_current():
    import importlib.util
    spec = importlib.util.spec_from_file_location("training_report", ROOT / "scripts" / "training_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    block = readme.split(mod.BEGIN, 1)[1].split(mod.END, 1)[0].strip("\n") + "\n"
    assert block == mod.report(), "run: python scripts/training_report.py --write-readme"


def test_validation_trend_is_the_paired_change_of_the_last_two_points():
    import importlib.util
    spec = importlib.util.spec_from_file_location("training_report", ROOT / "scripts" / "training_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = [0.2, 0.5, 0.4, 0.9, 0.1, 0.3]
    after = [b + d for b, d in zip(before, [0.10, 0.05, 0.12, 0.08, 0.11, 0.06])]  # every prompt up: CI above 0
    text = mod.validation_trend([{"generation": 10, "namm_scores": before}, {"generation": 20, "namm_scores": after}])
    mean, lo, hi = (float(x.strip("[],")) for x in text.split()[:3])
    assert mean == pytest.approx(0.0867, abs=5e-4) and 0.05 <= lo < mean < hi <= 0.12
    assert text.endswith("(gen 10 -> 20, float32)")
    assert mod.validation_trend([{"generation": 10, "namm_scores": before}]) == "-"
    mixed = [b + d for b, d in zip(before, [0.3, -0.3, 0.2, -0.2, 0.1, -0.1])]  # no change on average
    mean, lo, hi = (float(x.strip("[],")) for x in mod.validation_trend(
        [{"generation": 1, "namm_scores": before}, {"generation": 2, "namm_scores": mixed}]).split()[:3])
    assert lo < 0 < hi


def test_baseline_gaps_pair_namm_with_each_baseline_by_prompt():
    import importlib.util
    spec = importlib.util.spec_from_file_location("training_report", ROOT / "scripts" / "training_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    namm = [0.2, 0.5, 0.4, 0.9, 0.1, 0.3]
    h2o = [x - d for x, d in zip(namm, [0.10, 0.05, 0.12, 0.08, 0.11, 0.06])]  # NAMM above on every prompt
    rec = [x + d for x, d in zip(namm, [0.3, -0.3, 0.2, -0.2, 0.1, -0.1])]  # level on average
    text = mod.baseline_gaps({"generation": 5, "namm_scores": namm, "h2o_scores": h2o, "recency_scores": rec,
                              "namm_ratio": 0.9})
    first, second = text.split("], ")
    assert first.startswith("NAMM - h2o +0.087 [") and second.startswith("NAMM - recency +0.000 [")
    lo, hi = (float(x.strip("[],")) for x in first.split()[4:6])
    assert 0.05 <= lo < 0.087 < hi <= 0.12
    lo, hi = (float(x.strip("[],")) for x in second.split()[4:6])
    assert lo < 0 < hi
    assert mod.baseline_gaps({"namm_scores": namm}) == "-"


def test_settings_segments_follow_the_recorded_cache_changes():
    import importlib.util
    spec = importlib.util.spec_from_file_location("training_report", ROOT / "scripts" / "training_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    info = {"config": {"cache_target": 0.74, "cache_weight": 3.0}, "es": {"generation": 145},
            "settings_changes": [
                {"generation": 30, "changes": ["dtype: 'float32' (saved) != 'bfloat16' (now)",
                                               "cache_weight: 1.0 (saved) != 3.0 (now)"]},
                {"generation": 74, "changes": ["tokens: 768 (saved) != 1024 (now)"]},
                {"generation": 80, "changes": ["cache_target: 0.75 (saved) != 0.72 (now)"]},
                {"generation": 111, "changes": ["cache_target: 0.72 (saved) != 0.74 (now)"]}]}
    assert mod.settings_segments(info) == [(0, 29, 0.75, 1.0), (30, 73, 0.75, 3.0), (74, 79, 0.75, 3.0),
                                           (80, 110, 0.72, 3.0), (111, 144, 0.74, 3.0)]
    assert mod.settings_segments({**info, "settings_changes": []}) == [(0, 144, 0.74, 3.0)]
    segments = mod.settings_segments(info)
    assert mod.settings_at(segments, 29) == (0.75, 1.0) and mod.settings_at(segments, 111) == (0.74, 3.0)
    with pytest.raises(ValueError):
        mod.settings_at(segments, 145)


def test_fork_comparison_pairs_a_forked_search_with_its_source_in_the_same_mode(tmp_path):
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("training_report", ROOT / "scripts" / "training_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = [0.2, 0.5, 0.4, 0.9, 0.1, 0.3]
    mode = {"dtype": "bfloat16", "protocol": "context-only", "tokens": 1024, "tasks": ["a", "b"]}

    def point(gen, scores, **extra):
        return {"generation": gen, "namm_scores": scores, "namm_ratio": 0.9, "namm_cache": 0.7, **mode, **extra}
    src, fork = tmp_path / "training" / "namm-src", tmp_path / "training" / "namm-fork"
    src.mkdir(parents=True), fork.mkdir()
    (src / "state.json").write_text(json.dumps({"validation": [
        point(140, [0.0] * 6), point(150, base, dtype="float32"), point(150, base), point(160, base)]}))
    up = [x + d for x, d in zip(base, [0.10, 0.05, 0.12, 0.08, 0.11, 0.06])]
    (fork / "state.json").write_text(json.dumps({"init": {"kind": "search state", "from": "training/namm-src",
                                                          "generation": 149}, "validation": [point(10, up)]}))
    first, latest = mod.fork_comparison(fork, tmp_path)
    assert "- training/namm-src gen 150 (first point after the fork" in first
    assert "- training/namm-src gen 160 (latest point" in latest
    for line in (first, latest):
        mean, lo, hi = (float(x.strip("[],")) for x in line.split("answer p ")[1].split()[:3])
        assert mean == pytest.approx(0.0867, abs=5e-4) and 0.05 <= lo < mean < hi <= 0.12
    (fork / "state.json").write_text(json.dumps({"init": {"kind": "search state", "from": "training/namm-src",
                                                          "generation": 149},
                                                 "validation": [point(10, up, dtype="float16")]}))
    (only,) = mod.fork_comparison(fork, tmp_path)
    assert "no validation point in the same mode" in only
    # forked after the source's last point: paired with its nearest point before the fork (gen 160, not 140)
    (fork / "state.json").write_text(json.dumps({"init": {"kind": "search state", "from": "training/namm-src",
                                                          "generation": 161}, "validation": [point(10, up)]}))
    (before,) = mod.fork_comparison(fork, tmp_path)
    assert "- training/namm-src gen 160 (last point before the fork" in before
    assert float(before.split("answer p ")[1].split()[0]) == pytest.approx(0.0867, abs=5e-4)
    (fork / "state.json").write_text(json.dumps({"init": {"kind": "NAMM checkpoint", "from": "x"}}))
    assert mod.fork_comparison(fork, tmp_path) == []


def test_matched_cache_check_of_a_mass_ranked_search_reports_both_signals(tmp_path):
    """A search ranked by the retained oracle mass: the check reports the answer probability's agreement and the
    mass's; members whose mass ranks the same on every prompt agree perfectly on it."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("training_report", ROOT / "scripts" / "training_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    samples = [f"{t}/{i}/1024/raw" for t in ("a", "b") for i in range(4)]
    quality = torch.linspace(0.5, 0.9, 8)  # a member's mass: its quality on every prompt, plus a little noise
    rows = []
    for gen in range(3):
        mass = quality[:, None] + 0.001 * torch.rand(8, len(samples), generator=g)
        rows.append({"generation": gen, "samples": samples, "member_cache": [0.7] * 8,
                     "member_scores": torch.rand(8, len(samples), generator=g).tolist(), "member_mass": mass.tolist()})
    folder = tmp_path / "namm-mass"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({
        "config": {"cache_target": 0.75, "cache_weight": 3.0, "fitness": "oracle-mass"}, "es": {"generation": 3},
        "refs": {k: 1.0 for k in samples}, "history": rows, "settings_changes": []}))
    line = mod.matched_cache_check(folder)
    assert "answer p: fitness" in line and "retained oracle mass (what it ranks by): fitness 1.00 +- 0.00" in line
