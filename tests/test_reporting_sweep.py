"""Budget sweeps: the plan of harness calls, the score-vs-cache plot from result folders, and one tiny real sweep."""
import json

import torch
from test_reporting_tables import LANG, _script, write_dt, write_language

from namm_transfer.reporting import read_results
from namm_transfer.reporting.plots import sweep_groups


def lang_sweep(root):
    """A NAMM run plus two baseline-only runs at other budgets, as sweep_budgets.py lays them out."""
    write_language(root / "namm", {"full": LANG["full"], "namm": LANG["namm"]})
    for b, fr, ap in ((0.25, 0.26, 0.3), (0.5, 0.51, 0.6)):
        write_language(root / f"budget-{b:g}", {"h2o": (ap, 0.0, fr), "l2": (ap - 0.1, 0.0, fr)}, budget=b)
    return [root / "namm", root / "budget-0.25", root / "budget-0.5"]


def test_sweep_groups_and_png(tmp_path, capsys):
    folders = lang_sweep(tmp_path)
    groups = sweep_groups([r for f in folders for r in read_results(f)])
    panels = groups[("language", "tiny-llama", "answer p")]
    pts = panels["passkey (~300 tokens)"]
    assert sorted((p.cache_pct, p.score) for p in pts if p.method == "h2o") == [(26.0, 0.3), (51.0, 0.6)]
    assert [(p.cache_pct, p.score) for p in pts if p.method == "namm"] == [(40.0, 0.8)]  # one point: emergent
    code = _script("make_tables").main([*map(str, folders), "--out", str(tmp_path / "t")])
    assert code == 0
    pngs = sorted(p.name for p in (tmp_path / "t").glob("sweep_*.png"))
    assert pngs == ["sweep_language_tiny-llama_EM.png", "sweep_language_tiny-llama_answer-p.png"]
    assert (tmp_path / "t" / pngs[1]).read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "t" / "table.md").read_text()
    assert md.count("| language | tiny-llama | passkey") == 6 and "--budget 0.25" in md


def test_no_plot_without_a_sweep(tmp_path):
    dt = write_dt(tmp_path / "dt", {"full": (3000.0, 1.0), "namm": (2500.0, 0.1), "h2o": (2000.0, 0.11)})
    assert sweep_groups(read_results(dt)) == {}


def test_sweep_plan_dry_run(tmp_path, capsys):
    sb = _script("sweep_budgets")
    code = sb.main(["--domain", "dt", "--budgets", "0.1,0.5", "--out", str(tmp_path), "--dry-run", "--",
                    "--episodes", "1", "--max-steps", "2"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 0 and len(lines) == 3
    assert "--policies full,namm --episodes 1 --max-steps 2 --out" in lines[0]
    assert lines[0].endswith(str(tmp_path / "namm"))
    assert "--policies h2o,l2,recency --budget 0.1 --rollout kv --episodes 1" in lines[1]
    assert lines[2].endswith(str(tmp_path / "budget-0.5"))
    assert not any(tmp_path.iterdir())


def test_sweep_refuses_bad_arguments_and_other_settings(tmp_path, capsys):
    from helpers_inputs import refused, snapshot
    from namm_transfer.runs import open_run
    sb = _script("sweep_budgets")
    for bad, msg in ((["--budgets", "0.5,0.5"], "a value is repeated"), (["--budgets", "1.5"], "whole number"),
                     (["--methods", "h2o,lru"], "unknown ['lru']"), (["--", "--episodes", "0"], "an integer >= 1"),
                     (["--", "--frames", "4"], "unrecognized arguments: --frames 4"), (["--", "--budget", "0.3"], "sets --policies")):
        refused(sb.main, ["--domain", "dt", "--budgets", "0.5", "--out", str(tmp_path / "s"), *bad], capsys, msg)
    assert not (tmp_path / "s").exists()
    with open_run(tmp_path / "s", {"domain": "dt", "methods": ["h2o"], "namm": True, "harness_args": []}, "x", []):
        pass
    before = snapshot(tmp_path / "s")
    refused(sb.main, ["--domain", "dt", "--budgets", "0.5", "--methods", "h2o", "--out", str(tmp_path / "s"), "--",
                      "--episodes", "2"], capsys, "harness_args: recorded [], this run ['--episodes', '2']")
    assert snapshot(tmp_path / "s") == before


def test_language_sweep_end_to_end(tmp_path, capsys):
    """The real eval_language.py on a tiny model: NAMM once, H2O at two budgets, table and plot."""
    from namm_transfer import save_namm
    from namm_transfer.namm import NAMMConfig

    save_namm(tmp_path / "ck", torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5, None,
              NAMMConfig(delay=128))
    out = tmp_path / "sweep"
    code = _script("sweep_budgets").main([
        "--domain", "language", "--budgets", "0.3,0.6", "--methods", "h2o", "--out", str(out), "--",
        "--model", "tiny-llama", "--namm", str(tmp_path / "ck"), "--tasks", "passkey", "--tokens", "300", "--n", "1",
        "--delay", "128", "--no-progress"])
    assert code == 0, capsys.readouterr().err[-2000:]
    argv = json.loads((out / "budget-0.3" / "command.json").read_text())["argv"]
    assert argv[argv.index("--budget") + 1] == "0.3"
    caches = {r.source.result_file: r.methods for f in ("namm", "budget-0.3", "budget-0.6")
              for r in read_results(out / f) if r.metric.name == "answer p"}
    h2o = sorted(m["h2o"].cache_pct for m in caches.values() if "h2o" in m)
    assert len(h2o) == 2 and h2o[0] < h2o[1]
    assert (out / "sweep_language_tiny-llama_answer-p.png").is_file()
    md = (out / "table.md").read_text()
    assert "(recorded argv (command.json))" in md


def test_points_join_the_plot_without_their_baselines(tmp_path):
    """--points: another NAMM's run adds its NAMM point to the sweep plot; its matched-cache baselines stay in the
    table only, so the curves are the fixed-budget runs alone."""
    folders = lang_sweep(tmp_path / "sweep")
    other = write_language(tmp_path / "c50", {"full": LANG["full"], "namm": (0.85, 1.0, 0.7), "h2o": (0.2, 0.0, 0.7)},
                           namm=None)
    mt = _script("make_tables")
    plotted = []
    real_plot = mt.plot_sweep
    mt.plot_sweep = lambda panels, path, *a: plotted.append(panels) or real_plot(panels, path, *a)
    try:
        md, written, code = mt.make_tables(list(map(str, folders)), tmp_path / "t", points=[str(other)])
    finally:
        mt.plot_sweep = real_plot
    assert code == 0 and len(plotted) == 2
    pts = plotted[0]["passkey (~300 tokens)"]
    assert sorted(p.cache_pct for p in pts if p.method == "h2o") == [26.0, 51.0]  # not the 70% of the points run
    assert sorted((p.cache_pct, p.score) for p in pts if p.method == "namm") == [(40.0, 0.8), (70.0, 0.85)]
    assert "| 0.2 | 70.0 |" in md  # its baseline is still tabulated


def test_sweep_under_torchrun_plan(tmp_path, capsys):
    """--nproc-per-node 2: every call starts with torchrun (run as `python -m torch.distributed.run`), and the
    harness's own parser still checks what follows the script."""
    sb = _script("sweep_budgets")
    code = sb.main(["--domain", "language", "--budgets", "0.5", "--no-namm", "--nproc-per-node", "2", "--out",
                    str(tmp_path), "--dry-run", "--", "--n", "2", "--threads", "1"])
    (line,) = capsys.readouterr().err.splitlines()
    assert code == 0 and line.startswith("torchrun --standalone --nproc-per-node 2 ")
    cmd = line.split()
    assert sb.harness_argv(cmd)[:4] == ["--policies", "h2o,l2,recency", "--budget", "0.5"]
    run = sb.executable(cmd)
    assert run[1:4] == ["-m", "torch.distributed.run", "--standalone"] and run[-1] == str(tmp_path / "budget-0.5")
    assert sb.executable(["python", "x.py", "--a"])[1:] == ["x.py", "--a"]
    from helpers_inputs import refused
    refused(sb.main, ["--domain", "dt", "--budgets", "0.5", "--nproc-per-node", "0", "--out", str(tmp_path / "s")],
            capsys, "an integer >= 1")


def test_sweep_colours_keep_namm_points_apart_from_baseline_curves():
    """Every method keeps one colour across panels, and no NAMM variant takes the colour of a baseline's curve
    (the default cycle gave namm-c50 L2's orange)."""
    from namm_transfer.reporting.plots import sweep_colours
    methods = ["full", "h2o", "l2", "recency", "snapkv", "random", "namm", "namm-c50-g60", "namm-c50-g100"]
    colours = sweep_colours(methods)
    assert "full" not in colours and len(colours) == len(methods) - 1
    curves = {colours[m] for m in ("h2o", "l2", "recency", "snapkv", "random")}
    points = [colours[m] for m in ("namm", "namm-c50-g60", "namm-c50-g100")]
    assert len(set(points)) == 3 and not curves & set(points)
    assert [colours[m] for m in ("h2o", "l2", "recency", "snapkv")] == ["C0", "C1", "C2", "C3"]
