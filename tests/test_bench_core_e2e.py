"""bench_core's issue-20 modes at tiny size: prefill ratios and one end-to-end policy run (tiny random Llama)."""
import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402
from helpers_core import tiny_model  # noqa: E402


def fake_loader(*args, **kwargs):
    tok = lambda text, return_tensors: SimpleNamespace(  # noqa: E731
        input_ids=torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(0)))
    return tiny_model("llama"), tok


def test_prefill_ratios_and_e2e_rows(monkeypatch):
    import namm_transfer.language.models as models
    monkeypatch.setattr(models, "load_causal_lm", fake_loader)
    a = argparse.Namespace(model="x", device="cpu", threads=1, prefill_length=200, prefill_chunk=64, repeats=1)
    res = bench_core.prefill_ratios(a)
    assert set(res["ratio_to_plain"]) == {"full", "l2", "recency"} and res["length"] == 200
    rows = {}
    for policy in ["plain", "full", "h2o"]:
        a = argparse.Namespace(model="x", device="cpu", threads=1, prompt_tokens=520, new_tokens=5, policy=policy,
                               budget=0.5, namm="")
        rows[policy] = bench_core.run_e2e(a)
    assert rows["plain"]["tokens"] == rows["full"]["tokens"] and len(rows["full"]["tokens"]) == 5
    assert rows["h2o"]["realised_fraction"] < 1 and rows["full"]["realised_fraction"] == 1
    assert rows["full"]["prefill_seconds"] > 0 and rows["full"]["decode_ms_per_token"] > 0


def _e2e_file(path, decode: dict[str, list[float]], namm_hash="sha256:x", tokens=(1, 2)):
    import json
    rows = {p: {"tokens": list(tokens), "realised_fraction": 1.0 if p == "full" else 0.5,
                "rounds": [{"decode_ms_per_token": d, "prefill_seconds": 10.0} for d in ds]}
            for p, ds in decode.items()}
    path.write_text(json.dumps({"prompt_tokens": 4096, "new_tokens": 256, "threads": 1, "device": "cpu",
                                "namm_hash": namm_hash, "rows": rows}))
    return str(path)


def test_pool_e2e_pools_within_round_ratios_of_several_runs(tmp_path):
    import pytest
    from namm_transfer.cli import UsageError
    a = _e2e_file(tmp_path / "a.json", {"full": [100, 80], "namm": [80, 72]})
    b = _e2e_file(tmp_path / "b.json", {"full": [90], "namm": [81]})
    pooled = bench_core.pool_e2e([a, b])
    namm = pooled["policies"]["namm"]["decode_ms_per_token"]
    assert namm["ratios"] == pytest.approx([0.8, 0.9, 0.9]) and namm["median"] == pytest.approx(0.9)
    assert pooled["rounds"] == 3 and namm["ci95"][0] <= 0.9 <= namm["ci95"][1]
    other = _e2e_file(tmp_path / "c.json", {"full": [90], "namm": [81]}, namm_hash="sha256:y")
    with pytest.raises(UsageError, match="must match"):
        bench_core.pool_e2e([a, other])
    retokened = _e2e_file(tmp_path / "d.json", {"full": [90], "namm": [81]}, tokens=(1, 3))
    with pytest.raises(UsageError, match="other tokens"):
        bench_core.pool_e2e([a, retokened])
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(UsageError, match="not a readable"):
        bench_core.pool_e2e([a, str(tmp_path / "bad.json")])


def test_bench_bam_memory_compares_both_calls_on_cpu(tmp_path):
    """scripts/bench_bam_memory.py: the shipped 4-D call and the former 3-D one score alike (same bits on CPU)."""
    import json
    import subprocess
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "scripts" / "bench_bam_memory.py"), "--device", "cpu", "--rows",
                          "4", "--slots", "300", "--repeats", "1", "--out", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["max_abs_score_difference"] == 0.0 and set(out["calls"]) == {"4-D (shipped)", "3-D (before)"}
    assert "| 3-D (before) | - |" in res.stdout
