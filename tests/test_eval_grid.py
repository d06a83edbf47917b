"""scripts/eval_grid.py, the "Decision Transformer grid" section of make_tables (namm_transfer/reporting/dt_grid.py)
and run_dt's Minari reference scores, on tiny random DTs in temp dirs (independent of envs/checkpoints)."""
import csv
import json
import math
import re
import shutil

import pytest
import torch
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from helpers_inputs import script as _script
from namm_transfer import save_namm
from namm_transfer.reporting.dt_grid import POLICIES, VERSUS, fmt, mean_interval, paired_difference
from namm_transfer.reporting.intervals import Z95


def _tiny_dt(path, task, dataset_id=None, source="local"):
    torch.manual_seed(0)
    env, _, quality = task.partition("-")
    cfg = DecisionTransformerConfig(state_dim=11, act_dim=3, hidden_size=16, n_layer=1, n_head=1, n_inner=32,
                                    max_ep_len=1000, n_positions=64, bos_token_id=None, eos_token_id=None,
                                    state_mean=[0.0] * 11, state_std=[1.0] * 11, return_scale=1000.0,
                                    context_length=4, env_name=task, gym_id="Hopper-v5",
                                    dataset_id=dataset_id or f"namm_transfer/{env}/{quality}-v0",
                                    dataset_source=source)
    DecisionTransformerModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Two hopper DTs in a checkpoints dir (hopper-medium-replay deliberately absent), a random NAMM, and one
    eval_grid run over three tasks."""
    root = tmp_path_factory.mktemp("grid")
    for task in ("hopper-expert", "hopper-medium"):
        _tiny_dt(root / "ckpts" / f"dt-{task}", task)
    save_namm(root / "namm", torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5, None,
              meta={"note": "random test NAMM"})
    return root


def _run_grid(grid, capsys, out, tasks="hopper-expert,hopper-medium-replay,hopper-medium"):
    eval_grid = _script("eval_grid")
    code = eval_grid.main(["--tasks", tasks, "--checkpoints-dir", str(grid / "ckpts"), "--namm", str(grid / "namm"),
                           "--episodes", "2", "--max-steps", "30", "--out", str(out)])
    return code, capsys.readouterr()


def _section(md):
    """{task: {"scores": [cells], "diffs": [cells]}} from the grid section of table.md."""
    sec = md.split("## Decision Transformer grid", 1)[1]
    tables = [[line for line in block.splitlines() if line.startswith("| ")]
              for block in sec.split("\n\n") if block.lstrip().startswith("| ")]
    assert len(tables) == 2
    parse = lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")]  # noqa: E731
    out = {}
    for line in tables[0][1:]:
        cells = parse(line)
        out.setdefault(cells[0], {})["scores"] = cells
    for line in tables[1][1:]:
        cells = parse(line)
        out[cells[0]]["diffs"] = cells
    return out


def _cell(mean, lo, hi, mark=False):
    text = f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"
    return f"{text} n.s." if mark and lo <= 0 <= hi else text


def test_eval_grid_runs_tasks_skips_a_missing_dt_and_tabulates(grid, tmp_path, capsys):
    out = tmp_path / "grid"
    code, printed = _run_grid(grid, capsys, out)
    assert code == 0
    assert "hopper-medium-replay: skipped" in printed.out and "scripts/make_grid.py" in printed.out
    assert "[1/3] hopper-expert: done" in printed.out and "[3/3] hopper-medium: done" in printed.out
    assert not (out / "hopper-medium-replay").exists()
    for task in ("hopper-expert", "hopper-medium"):
        recs = [json.loads(line) for line in (out / task / "episodes.jsonl").read_text().splitlines()]
        assert sorted({r["policy"] for r in recs}) == sorted(POLICIES)
        assert {r["rollout"] for r in recs} == {"kv-cache"} and len(recs) == 2 * len(POLICIES)
    md = (out / "table.md").read_text()
    assert "## Decision Transformer grid" in md and (out / "dt_grid.csv").is_file() and (out / "table.csv").is_file()

    # every number of the section equals what the episodes give: mean ± 1.96 SE, paired by (seed, episode)
    section = _section(md)
    assert list(section) == ["hopper-expert", "hopper-medium"]  # grid order (expert, medium, medium-replay)
    rows = list(csv.DictReader((out / "dt_grid.csv").open()))
    assert [r["task"] for r in rows] == ["hopper-expert", "hopper-medium"]
    for task, csv_row in zip(section, rows):
        recs = [json.loads(line) for line in (out / task / "episodes.jsonl").read_text().splitlines()]
        scores = {p: {(r["seed"], r["episode"]): r["scores"]["d4rl"] for r in recs if r["policy"] == p}
                  for p in POLICIES}
        cells = section[task]["scores"]
        assert cells[3] == "2"  # episodes
        for i, p in enumerate(POLICIES):
            x = list(scores[p].values())
            mean, sd = sum(x) / 2, math.sqrt(sum((v - sum(x) / 2) ** 2 for v in x))  # ddof 1, n = 2
            half = Z95 * sd / math.sqrt(2)
            assert cells[4 + 2 * i] == _cell(mean, mean - half, mean + half)
            cache = 100 * sum(r["realised_fraction"] for r in recs if r["policy"] == p) / 2
            assert cells[5 + 2 * i] == f"{cache:.1f}"
            assert float(csv_row[f"{p}_mean"]) == pytest.approx(mean)
            assert float(csv_row[f"{p}_ci_hi"]) == pytest.approx(mean + half)
        diffs = section[task]["diffs"]
        assert diffs[2] == "2"  # pairs
        for j, b in enumerate(VERSUS):
            d = [scores["namm"][k] - scores[b][k] for k in scores["namm"]]
            m = sum(d) / 2
            half = Z95 * math.sqrt(sum((v - m) ** 2 for v in d)) / math.sqrt(2)
            assert diffs[3 + j] == _cell(m, m - half, m + half, mark=True)
            assert float(csv_row[f"namm_minus_{b}_mean"]) == pytest.approx(m)
            assert csv_row[f"namm_minus_{b}_contains_zero"] == str(m - half <= 0 <= m + half)
    # the cross-domain table keeps its rows (per task: the d4rl and local scales)
    assert md.count("| decision transformer |") == 4

    # a rerun resumes: nothing new to run, same table
    code, printed = _run_grid(grid, capsys, out)
    assert code == 0 and "10 episodes, 10 already in" in printed.err
    assert (out / "table.md").read_text() == md


def test_eval_grid_without_any_dt_fails_and_one_task_makes_no_grid_section(grid, tmp_path, capsys):
    code, printed = _run_grid(grid, capsys, tmp_path / "none", tasks="hopper-medium-replay,walker2d-medium-replay")
    assert code == 1 and printed.out.count("skipped") == 2 and not (tmp_path / "none" / "table.md").exists()
    code, printed = _run_grid(grid, capsys, tmp_path / "one", tasks="hopper-medium")
    assert code == 0 and "Decision Transformer grid" not in (tmp_path / "one" / "table.md").read_text()
    assert not (tmp_path / "one" / "dt_grid.csv").exists()


def test_grid_without_episodes_shows_unpaired_intervals(grid, tmp_path, capsys):
    out = tmp_path / "grid"
    assert _run_grid(grid, capsys, out, tasks="hopper-expert,hopper-medium")[0] == 0
    copy = tmp_path / "copy"
    for task in ("hopper-expert", "hopper-medium"):
        shutil.copytree(out / task, copy / task)
    (copy / "hopper-medium" / "episodes.jsonl").unlink()
    md, _, code = _script("make_tables").make_tables([str(copy / "hopper-expert"), str(copy / "hopper-medium")],
                                                     tmp_path / "t")
    assert code == 0
    section = _section(md)
    summary = json.loads((out / "hopper-medium" / "summary.json").read_text())
    namm = next(r for r in summary["rows"] if r["policy"] == "namm")
    lo, hi = namm["score_d4rl_ci95"]
    assert section["hopper-medium"]["scores"][6] == _cell(namm["score_d4rl_mean"], lo, hi)
    assert section["hopper-medium"]["diffs"][3:] == ["pairing unavailable"] * 4
    assert "pairing unavailable: no episodes.jsonl" in md
    assert "pairing unavailable" not in " ".join(section["hopper-expert"]["diffs"])


def test_paired_difference_by_hand():
    a = {(0, 0): 1.0, (0, 1): 3.0, (0, 2): 5.0, (1, 0): 7.0}
    b = {(0, 2): 2.0, (0, 0): 0.0, (0, 1): 1.0, (0, 3): 9.0}  # pairs by key, not by position; unpaired keys ignored
    d = paired_difference(a, b)  # differences 1, 2, 3: mean 2, sample std 1
    half = 1.959964 / math.sqrt(3)
    assert (d.n, d.mean) == (3, pytest.approx(2.0))
    assert (d.lo, d.hi) == (pytest.approx(2 - half), pytest.approx(2 + half)) and d.contains_zero is False
    assert d.cell(mark=True) == "2.0 [0.9, 3.1]"
    e = paired_difference({1: 1.0, 2: -1.0, 3: 0.5}, {1: 0.0, 2: 0.0, 3: 0.0})  # 1, -1, 0.5: inside the noise
    assert e.contains_zero is True and e.cell(mark=True).endswith(" n.s.")
    assert paired_difference({1: 1.0}, {2: 1.0}) is None
    one = paired_difference({1: 4.0}, {1: 1.0})
    assert (one.mean, one.lo, one.contains_zero) == (3.0, None, None) and "no interval" in one.cell()
    assert mean_interval([1.0, 2.0, 3.0]).hi == pytest.approx(2 + half)
    assert (fmt(0.0), fmt(-0.0012), fmt(0.05), fmt(-3.14159)) == ("0.0", "-0.0012", "0.1", "-3.1")


def test_run_dt_reports_minari_reference_scores(tmp_path, monkeypatch, capsys):
    from test_envs_data import _make_minari

    run_dt = _script("run_dt")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    ckpt = _tiny_dt(tmp_path / "dt", "hopper-medium", dataset_id="mujoco/hopper/tiny-v0", source="minari")
    args = ["--checkpoint", str(ckpt), "--policies", "full", "--rollout", "kv", "--episodes", "1", "--max-steps", "5",
            "--no-progress"]
    # the dataset is not here: d4rl scale only, and the header says why
    assert run_dt.main([*args, "--out", str(tmp_path / "absent")]) == 0
    summary = json.loads((tmp_path / "absent" / "summary.json").read_text())
    assert "score_minari_mean" not in summary["rows"][0] and "score_d4rl_mean" in summary["rows"][0]
    assert any("not under" in n and "mujoco/hopper/tiny-v0" in n for n in summary["notes"])
    capsys.readouterr()
    # a local copy with ref_min_score 10 / ref_max_score 3000: also scored on it
    _make_minari("mujoco/hopper/tiny-v0", [5, 7, 3])
    assert run_dt.main([*args, "--out", str(tmp_path / "present")]) == 0
    assert "minari-normalised" in capsys.readouterr().out
    rec = json.loads((tmp_path / "present" / "episodes.jsonl").read_text().splitlines()[0])
    assert set(rec["scores"]) == {"d4rl", "minari"}
    assert rec["scores"]["minari"] == pytest.approx(100 * (rec["ret"] - 10.0) / 2990.0)
    notes = json.loads((tmp_path / "present" / "summary.json").read_text())["notes"]
    assert any("minari refs 10 / 3000" in n for n in notes)
