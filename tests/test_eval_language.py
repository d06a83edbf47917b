"""scripts/eval_language.py end to end on a tiny model, matched baselines, and resume."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from namm_transfer import save_namm

ROOT = Path(__file__).resolve().parents[1]


def run(out, namm):
    cmd = [sys.executable, str(ROOT / "scripts/eval_language.py"), "--model", "tiny-llama", "--namm", str(namm),
           "--tasks", "passkey", "--tokens", "300", "--n", "2", "--policies", "full,namm,h2o,l2",
           "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_eval_language_matches_budgets_and_resumes(tmp_path):
    from namm_transfer.namm import NAMMConfig
    params = torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5
    save_namm(tmp_path / "namm", params, None, NAMMConfig(delay=128))
    out = tmp_path / "eval"
    stdout = run(out, tmp_path / "namm")
    rows = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and "| all | namm |" in stdout
    by = {(r["policy"], r["key"]): r for r in rows}
    for (pol, key), r in by.items():
        if pol in ("h2o", "l2"):
            assert r["budget"] == by[("namm", key)]["kept_fraction"]
            assert abs(r["kept_fraction"] - r["budget"]) < 0.02
    assert by[next(k for k in by if k[0] == "full")]["realised_fraction"] == 1.0
    # resume: drop the last record, rerun, only it is recomputed
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    run(out, tmp_path / "namm")
    again = (out / "records.jsonl").read_text().splitlines()
    assert again[:-1] == lines[:-1] and len(again) == 8
    assert json.loads((out / "summary.json").read_text())


def test_teacher_forcing_across_an_eviction_boundary():
    """A prompt ending just before a delay multiple: the answer chunk must be cut at the boundary."""
    from namm_transfer import NAMMPolicy
    from namm_transfer.language.benchmark import evaluate_sample
    from namm_transfer.language.models import tiny_random_lm, tiny_tokenizer
    from namm_transfer.language.tasks import TaskSample
    model, tok = tiny_random_lm("llama"), tiny_tokenizer()
    for pad in range(4):
        sample = TaskSample("passkey", "test", 0, "x" * (118 + pad), "q?", "a", "12345")
        n = tok(sample.prompt(tok), return_tensors="pt").input_ids.shape[1]
        rec = evaluate_sample(model, tok, sample, NAMMPolicy(torch.randn(4172) * 0.3, delay=128), "namm", "k")
        assert 0 <= rec.answer_prob <= 1 and n > 0
