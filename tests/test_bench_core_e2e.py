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
