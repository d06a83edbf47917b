"""scripts/make_tables.py and namm_transfer.reporting: tables from small result folders written here.

The fixtures are summarised by each harness's own `summarise`, so they have the format the current code writes.
"""
import csv
import importlib.util
import io
import json
import subprocess
from pathlib import Path

import pytest

from namm_transfer.reporting import ResultFormatError, build_rows, read_results, to_csv, to_markdown
from namm_transfer.reporting.tables import HEADER

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(folder: Path, records: list[dict], summary, run: dict | None, records_name="records.jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / records_name).write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    if run is not None:
        (folder / "run.json").write_text(json.dumps(run, indent=2))
    return folder


def write_language(folder: Path, scores: dict, budget: float = 0.5, namm: str | None = "ck/namm",
                   tasks=("passkey",), summary=True, run=True) -> Path:
    """scores: {policy: (answer_prob, em, realised_fraction)}, one sample per task, as eval_language.py writes."""
    from namm_transfer.language.benchmark import summarise

    records = [{"policy": p, "task": t, "key": f"{t}/2000000/300", "prompt_tokens": 299, "answer": "1",
                "prediction": "1", "em": em, "char_acc": em, "answer_prob": ap, "realised_fraction": fr,
                "kept_fraction": fr, "budget": None if p in ("full", "namm") else budget,
                "prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": 100.0}
               for t in tasks for p, (ap, em, fr) in scores.items()]
    table, _ = summarise(records, list(scores))
    args = {"model": "tiny-llama", "namm": namm, "tasks": ",".join(tasks), "tokens": 300, "n": 1,
            "policies": ",".join(scores), "budget": budget, "delay": 128, "style": "raw", "chunk": 128,
            "max_new_tokens": 8, "out": str(folder), "threads": 1, "device": "cpu", "no_progress": True,
            "namm_source": namm if "namm" in scores else None}
    return _write(folder, records, table if summary else None, args if run else None)


def write_video(folder: Path, scores: dict, budget: float | None = None) -> Path:
    """scores: {policy: (list of correct bools, realised_fraction)}, as run_video.py writes."""
    rv = _script("run_video")
    records = []
    for p, (correct, fr) in scores.items():
        for i, ok in enumerate(correct):
            records.append({"policy": p, "sample_index": i, "budget": budget if p not in ("full", "namm") else None,
                            "budget_source": "--budget" if budget and p not in ("full", "namm") else None,
                            "id": f"s{i}", "dataset": "synthetic", "answer": "A", "prediction": "A" if ok else "B",
                            "parsed": True, "category": "count", "duration_group": 8, "error": None,
                            "response": "A", "correct": ok, "realised_fraction": fr, "video_kept_fraction": fr,
                            "peak_kv_bytes": 1, "peak_cache_bytes": 1, "peak_memory_bytes": 1, "seconds": 0.1})
    settings = {"dataset": "synthetic", "split": "test", "data_root": "/data/x", "model": "tiny-random",
                "namm": "ck/namm", "frames": 32, "chunk": 128, "delay": 64, "budget": budget, "seed": 0,
                "dtype": "float32"}
    summary = {"settings": settings, "notes": [], "policies": rv.summarise(records, list(scores), "synthetic")}
    return _write(folder, records, summary, settings)


def write_dt(folder: Path, scores: dict, budget: float | None = None, recompute: float | None = 2000.0) -> Path:
    """scores: {policy: (return, realised_fraction)} for the kv-cache rollout (+ recompute-last-K), as run_dt.py
    writes: episodes.jsonl, summary.json {settings, notes, rows}, run.json."""
    rd = _script("run_dt")
    runs = ([("recompute-last-K", "full", recompute, 0.1)] if recompute is not None else [])
    runs += [("kv-cache", p, r, fr) for p, (r, fr) in scores.items()]
    episodes = []
    for rollout, p, r, fr in runs:
        base = rollout == "kv-cache" and p in ("h2o", "l2", "recency")
        episodes.append({"rollout": rollout, "policy": p, "seed": 0, "episode": 0, "reset_seed": 0,
                         "budget": budget if base else None, "budget_source": "--budget" if base else None,
                         "ret": r, "length": 1000, "scores": {"d4rl": r / 32.0}, "realised_fraction": fr,
                         "eviction_fraction": fr if rollout == "kv-cache" else None, "final_cache_tokens": 10.0,
                         "steps_per_s": 100.0, "policy_ms": 1.0})
    settings = {"env": "hopper-medium", "checkpoint": "/x/dt-hopper-medium", "target_return": 3600.0, "delay": 48,
                "namm": "ck/namm", "budget": budget, "max_steps": None, "device": "cpu"}
    summary = {"settings": settings, "notes": [], "rows": rd.summarise(episodes)}
    return _write(folder, episodes, summary, settings, "episodes.jsonl")


LANG = {"full": (0.9, 1.0, 1.0), "namm": (0.8, 1.0, 0.4), "h2o": (0.7, 0.0, 0.41), "l2": (0.5, 0.0, 0.41),
        "recency": (0.6, 0.0, 0.41)}


def run_make_tables(capsys, *args):
    """scripts/make_tables.py main() in-process (a subprocess would spend seconds importing torch)."""
    capsys.readouterr()
    code = _script("make_tables").main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_cross_domain_table_all_domains(tmp_path):
    lang = write_language(tmp_path / "lang", LANG)
    video = write_video(tmp_path / "video", {"full": ([True, True], 1.0), "namm": ([True, False], 0.3),
                                             "h2o": ([False, False], 0.31)})
    dt = write_dt(tmp_path / "dt", {"full": (3000.0, 1.0), "namm": (2500.0, 0.1), "l2": (2000.0, 0.11),
                                    "window": (2900.0, 0.2)})
    rows = build_rows(read_results(lang) + read_results(video) + read_results(dt))
    cells = {(r.result.domain, r.result.benchmark, r.result.metric.name): dict(zip(HEADER, r.cells())) for r in rows}
    p = cells[("language", "passkey (~300 tokens)", "answer p")]
    assert (p["full"], p["NAMM"], p["NAMM cache %"], p["H2O"], p["H2O cache %"]) == ("0.9", "0.8", "40.0", "0.7", "41.0")
    assert p["baselines at"] == "NAMM's kept fraction, per sample"
    assert cells[("language", "passkey (~300 tokens)", "EM %")]["NAMM"] == "100.0"
    v = cells[("video", "synthetic (test, 32 frames)", "accuracy %")]
    assert (v["full"], v["NAMM"], v["NAMM cache %"], v["H2O"], v["L2"]) == ("100.0", "50.0", "30.0", "0.0", "-")
    k = cells[("dt", "hopper-medium [kv-cache]", "d4rl-normalised x100")]
    assert (k["full"], k["NAMM"], k["NAMM cache %"], k["L2"]) == ("93.8", "78.1", "10.0", "62.5")
    assert k["other methods"] == "window 90.6 @ 20.0%"
    r = cells[("dt", "hopper-medium [recompute-last-K]", "d4rl-normalised x100")]
    assert (r["full"], r["NAMM"]) == ("62.5", "-")
    # every row names its result file and a command from run.json
    for row in rows:
        assert Path(row.result.source.result_file).name == "summary.json"
        assert row.result.source.command.startswith("python scripts/")
    assert "--policies full,namm,h2o,l2,recency" in rows[0].result.source.command


def test_markdown_matches_csv_and_stdout(tmp_path, capsys):
    lang = write_language(tmp_path / "lang", LANG)
    dt = write_dt(tmp_path / "dt", {"full": (3000.0, 1.0), "namm": (2500.0, 0.1)})
    out = tmp_path / "tables"
    res = run_make_tables(capsys, lang, dt, "--out", out)
    assert res.returncode == 0, res.stderr
    md = (out / "table.md").read_text()
    assert res.stdout == md
    assert "video: no results given" in md
    table = [l for l in md.splitlines() if l.startswith("| ")]
    md_rows = [[c.strip() for c in l.strip("|").split(" | ")] for l in table]
    csv_rows = list(csv.reader(io.StringIO((out / "table.csv").read_text())))
    assert md_rows[0][:-1] == csv_rows[0][:len(HEADER)]
    assert len(md_rows) == len(csv_rows)
    for m, c in zip(md_rows[1:], csv_rows[1:]):
        assert m[:-1] == c[:len(HEADER)]
        ref = m[-1].strip("[]")
        source = next(l for l in md.splitlines() if l.startswith(f"[{ref}] "))
        assert f"`{c[-3]}`" in source and f"`{c[-2]}`" in source  # same file and command as the CSV row
    assert "none is a number from the NAMM paper" in md


def test_missing_domains_and_malformed_file(tmp_path, capsys):
    lang = write_language(tmp_path / "lang", LANG)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text('{"policies": {"full": {"n": 3}}}')  # a video summary without headline
    torn = tmp_path / "torn.jsonl"
    torn.write_text("not json at all\n{}\n")
    res = run_make_tables(capsys, lang, bad, torn, tmp_path / "nowhere", "--out", tmp_path / "t")
    assert res.returncode == 0, res.stderr
    assert "video: no results given" in res.stdout and "decision transformer: no results given" in res.stdout
    assert "language: no results given" not in res.stdout
    assert f"error: {bad / 'summary.json'}: expected" in res.stdout and "headline" in res.stdout
    assert f"error: {torn}: expected" in res.stdout
    assert f"error: {tmp_path / 'nowhere'}: expected" in res.stdout
    # nothing readable: non-zero exit, still says why
    res = run_make_tables(capsys, bad, "--out", tmp_path / "t2")
    assert res.returncode == 1 and "No results could be read." in res.stdout and "headline" in res.stdout


def test_records_only_and_command_sources(tmp_path):
    """records.jsonl alone is summarised with the harness's own code; command.json wins; no run.json -> unknown."""
    full = read_results(write_language(tmp_path / "a", LANG))
    only = write_language(tmp_path / "b", LANG, summary=False, run=False)
    got = read_results(only / "records.jsonl")
    assert [r.methods["h2o"].score for r in got] == [r.methods["h2o"].score for r in full]
    assert got[0].source.command == "command unknown"
    (only / "command.json").write_text(json.dumps({"argv": ["python", "scripts/eval_language.py", "--n", "1"]}))
    assert read_results(only)[0].source.command == "python scripts/eval_language.py --n 1"
    dt = write_dt(tmp_path / "dt", {"full": (3000.0, 1.0), "namm": (2500.0, 0.1)})
    from_episodes = read_results(dt / "episodes.jsonl")
    assert [r.methods.get("namm") for r in from_episodes] == [r.methods.get("namm") for r in read_results(dt)]


def test_malformed_inputs_raise_named_errors(tmp_path):
    f = tmp_path / "summary.json"
    f.write_text("[{\"task\": \"passkey\"}]")
    with pytest.raises(ResultFormatError, match=r"summary.json: expected a JSON list of rows with task"):
        read_results(f)
    f.write_text("{oops")
    with pytest.raises(ResultFormatError, match="invalid JSON"):
        read_results(f)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(ResultFormatError, match="notes.txt"):
        read_results(tmp_path / "d")
    dt = write_dt(tmp_path / "dt", {"full": (1.0, 1.0)})
    summary = json.loads((dt / "summary.json").read_text())
    for row in summary["rows"]:
        del row["score_d4rl_mean"]
    (dt / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ResultFormatError, match=r"format v1.*no score_<scale>_mean"):
        read_results(dt)


def test_renorm_results_get_their_own_named_row(tmp_path):
    import torch
    from namm_transfer import NAMMPolicy
    from namm_transfer.features import RunningStats
    from namm_transfer.reporting.calibration import save_renormalised, with_stats

    collector = NAMMPolicy(torch.zeros(4172), stats=RunningStats(17), collect_stats=True)
    collector.stats.update(torch.rand(50, 17))
    ckpt = save_renormalised(with_stats(NAMMPolicy(torch.randn(4172)), collector), tmp_path / "renorm")
    a = write_language(tmp_path / "default", LANG)
    b = write_language(tmp_path / "renorm-run", LANG, namm=str(ckpt))
    md = to_markdown(build_rows(read_results(a) + read_results(b)))
    rows = [l for l in md.splitlines() if l.startswith("| language") and "answer p" in l]
    assert len(rows) == 2 and "| namm |" in rows[0] and "| namm-renorm |" in rows[1]
    assert "namm-renorm: the language NAMM with normalisation statistics re-estimated" in md
    assert to_csv(build_rows(read_results(b))).splitlines()[1].split(",")[4] == "namm-renorm"


def test_paths_inside_the_checkout_are_recorded_relative_to_it(tmp_path, monkeypatch):
    """Result files name checkpoints of this checkout relative to it (same text from any clone); other paths and
    hub ids are kept; a recorded relative NAMM path is still recognised as a renormalised one from another cwd."""
    from namm_transfer.records import REPO_ROOT, in_repo
    from namm_transfer.reporting.results import namm_variant

    assert in_repo(REPO_ROOT / "video" / "checkpoints" / "llava-tiny-synth") == "video/checkpoints/llava-tiny-synth"
    assert in_repo(f"{REPO_ROOT}/namm_transfer/checkpoints/x (renormalised on 8 token-steps)") == \
        "namm_transfer/checkpoints/x (renormalised on 8 token-steps)"
    assert in_repo(tmp_path / "ckpt") == str(tmp_path / "ckpt")
    assert in_repo("llava-hf/LLaVA-NeXT-Video-7B-hf") == "llava-hf/LLaVA-NeXT-Video-7B-hf"
    monkeypatch.chdir(tmp_path)
    assert namm_variant("results/video/namm-renorm-video") == "namm-renorm"
    assert namm_variant("namm_transfer/checkpoints/namm-smollm2") == "namm"


def test_named_namm_variants_are_read_tabled_and_plotted(tmp_path):
    """A NAMM from a search toward a cache target is named in its meta (namm-c50) and keeps that name in tables
    and sweeps, as a point of emergent cache size."""
    import torch
    from namm_transfer import save_namm
    from namm_transfer.reporting.plots import is_fixed
    from namm_transfer.reporting.results import REPO_ROOT, is_namm, namm_variant
    from namm_transfer.reporting.tables import TableRow
    folder = tmp_path / "namm"
    save_namm(folder, torch.zeros(4172), None, meta={"variant": "namm-c50", "cache_target": 0.5})
    assert namm_variant(str(folder)) == "namm-c50"  # an absolute path: REPO_ROOT / abs = abs
    save_namm(folder, torch.zeros(4172), None, meta={"variant": "not-a-namm"})
    assert namm_variant(str(folder)) == "namm"
    assert is_namm("namm-c75") and is_namm("namm") and not is_namm("h2o") and not is_namm("nammx")
    assert is_fixed("namm-c50") and is_fixed("full") and not is_fixed("recency")
    assert REPO_ROOT.is_dir()
    from namm_transfer.reporting.results import MethodScore
    row = TableRow.__new__(TableRow)
    row.result = type("R", (), {"methods": {"full": MethodScore("full", 1.0, 100.0),
                                            "namm-c50": MethodScore("namm-c50", 0.9, 50.0),
                                            "h2o": MethodScore("h2o", 0.8, 50.0)}})()
    assert row.namm.method == "namm-c50"


def test_a_search_mean_is_named_with_its_generation(tmp_path):
    """One search ships several means: a checkpoint whose meta records the generation is named variant-gN;
    a renormalised copy keeps 'namm-renorm' (its meta carries the base's generation); no variant stays 'namm'."""
    import torch
    from namm_transfer import save_namm
    from namm_transfer.reporting.results import namm_variant
    for meta, name in (({"variant": "namm-c50", "generation": 100}, "namm-c50-g100"),
                       ({"variant": "namm-renorm", "generation": 45}, "namm-renorm"),
                       ({"generation": 45}, "namm"), ({"variant": "namm-c50", "generation": "100"}, "namm-c50")):
        save_namm(tmp_path / name, torch.zeros(4172), None, meta=meta)
        assert namm_variant(str(tmp_path / name)) == name, meta
    assert namm_variant("namm_transfer/checkpoints/namm-smollm2-c50") == "namm-c50-g60"


def test_searched_variant_notes_name_the_target_and_generation():
    from namm_transfer.reporting.tables import searched_variant_note
    assert searched_variant_note("namm-c50-g100") == ("- NAMM variant namm-c50-g100: evolved on language toward a "
                                                      "realised cache of 50% (hinge term; the CMA-ES mean at "
                                                      "generation 100).")
    assert searched_variant_note("namm-c75") == ("- NAMM variant namm-c75: evolved on language toward a realised "
                                                 "cache of 75% (hinge term).")
    assert "see its checkpoint's meta" in searched_variant_note("namm-cx")
