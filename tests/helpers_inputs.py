"""Helpers for the bad-input tests: load a script as a module, snapshot a folder, expect an exit code 2."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    """scripts/<name>.py as a module (its directory on sys.path, as when run)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes): 'nothing written or lost' is an equal snapshot."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(main, argv, capsys, *expected: str) -> str:
    """Run `main(argv)`; it must exit with code 2 (returned or raised by argparse) and print every `expected`
    part on stderr, without a traceback. Returns stderr."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err[-1500:]}"
    assert "Traceback" not in err
    for part in expected:
        assert part in err, f"{part!r} not in: {err[-1500:]}"
    return err


def save_tiny_dt(folder: Path) -> Path:
    """A random 1-layer hopper-medium Decision Transformer saved as scripts/train_dt.py saves one (seed 0)."""
    import torch
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(0)
    cfg = DecisionTransformerConfig(state_dim=11, act_dim=3, hidden_size=16, n_layer=1, n_head=1, n_inner=32,
                                    max_ep_len=1000, n_positions=64, bos_token_id=None, eos_token_id=None,
                                    state_mean=[0.0] * 11, state_std=[1.0] * 11, return_scale=1000.0,
                                    context_length=4, env_name="hopper-medium", gym_id="Hopper-v5",
                                    dataset_id="namm_transfer/hopper/medium-v0", dataset_source="local")
    DecisionTransformerModel(cfg).save_pretrained(folder)
    return folder
