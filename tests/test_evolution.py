"""CMA-ES, trainer resume exactness, and torchrun sharding (2 CPU ranks == 1 rank)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from namm_transfer.evolution.cmaes import SepCMAES

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


def train(out, *extra, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "scripts/train_namm.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", "29533", str(ROOT / "scripts/train_namm.py")]
    res = subprocess.run(cmd + TINY + ["--out", str(out), *extra], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(out / "namm" / "namm.safetensors"))["params"]


def test_trainer_resume_is_identical_and_writes_outputs(tmp_path):
    full = train(tmp_path / "a")
    train(tmp_path / "b", "--max-generations", "1")  # "killed" after one generation
    resumed = train(tmp_path / "b")
    assert torch.equal(full, resumed)
    log = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in log] == [0, 1, 2]
    assert log[2]["stage_tasks"] == ["passkey", "kv_retrieval"]
    assert (tmp_path / "b" / "curve.png").stat().st_size > 1000
    assert not torch.equal(full, torch.zeros_like(full))


def test_torchrun_two_ranks_equals_one_rank(tmp_path):
    one = train(tmp_path / "one")
    two = train(tmp_path / "two", nproc=2)
    assert torch.equal(one, two)
