"""NAMM checkpoints: our format (safetensors + JSON config) and import of an official evo-memory ckpt.pt."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .features import RunningStats
from .namm import NAMMConfig
from .policies import NAMMPolicy

PACKAGE_CHECKPOINTS = Path(__file__).parent / "checkpoints"
DEFAULT_NAMM = PACKAGE_CHECKPOINTS / "namm-smollm2"
_BUFFER_PREFIX = "stored_buffers_to_save.token_embedding_0_output_"


def save_namm(path: str | os.PathLike, params: torch.Tensor, stats: RunningStats | None,
              config: NAMMConfig | None = None, meta: dict | None = None) -> Path:
    """Write <path>/namm.safetensors and <path>/config.json (atomically: temp file + rename)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config or NAMMConfig()
    params = params.detach().float().reshape(-1).cpu()
    if params.numel() != config.num_params:
        raise ValueError(f"expected {config.num_params} parameters, got {params.numel()}")
    tensors = {"params": params.contiguous()}
    if stats is not None and stats.count > 0:
        tensors["norm_mean"] = stats.mean.float().contiguous()
        tensors["norm_var"] = stats.var.float().contiguous()
    tmp = path / "namm.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / "namm.safetensors")
    info = {"config": config.to_dict(), "num_params": config.num_params,
            "norm_count": stats.count if stats is not None else 0, "meta": meta or {}}
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path / "config.json")
    return path


def load_namm(path: str | os.PathLike = DEFAULT_NAMM, **policy_kwargs) -> NAMMPolicy:
    """Load a NAMMPolicy from a folder written by `save_namm` (or an official `ckpt.pt` file)."""
    path = Path(path)
    if path.suffix == ".pt":
        return import_official(path, **policy_kwargs)
    if not (path / "namm.safetensors").exists() or not (path / "config.json").exists():
        raise FileNotFoundError(f"no NAMM checkpoint at {path}: expected namm.safetensors + config.json "
                                "(train one with scripts/train_namm.py, or pass an official ckpt.pt)")
    info = json.loads((path / "config.json").read_text())
    config = NAMMConfig(**info["config"])
    tensors = load_file(str(path / "namm.safetensors"))
    if tensors["params"].numel() != config.num_params:
        raise ValueError(f"{path}: {tensors['params'].numel()} parameters but its config needs {config.num_params}")
    stats = RunningStats(config.num_bins)
    if "norm_mean" in tensors:
        stats.set(tensors["norm_mean"], tensors["norm_var"], count=max(int(info.get("norm_count", 1)), 1))
    policy = NAMMPolicy(tensors["params"], config, stats, **policy_kwargs)
    policy.source = str(path)
    return policy


def import_official(path: str | os.PathLike, config: NAMMConfig | None = None, **policy_kwargs) -> NAMMPolicy:
    """Import the released evo-memory format: evolution_state['mean'] + frozen normalisation mean/var."""
    config = config or NAMMConfig()
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("evolution_state", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.endswith("mean") for k in state):
        raise ValueError(f"{path} is not an evo-memory checkpoint: expected a dict with 'evolution_state' "
                         "holding 'mean' and the stored normalisation buffers")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if "mean" not in state:
        raise ValueError(f"{path}: evolution_state has no 'mean' (keys: {sorted(state)[:8]}...)")
    mean = state["mean"].float().reshape(-1)
    if mean.numel() != config.num_params:
        raise ValueError(f"{path}: evolution_state['mean'] has {mean.numel()} parameters, but the NAMM "
                         f"configuration expects {config.num_params} (the released BAM stage-1 layout)")
    stats = RunningStats(config.num_bins)
    mu, var = state.get(_BUFFER_PREFIX + "mean"), state.get(_BUFFER_PREFIX + "var")
    if mu is not None and var is not None:
        count = state.get(_BUFFER_PREFIX + "num", torch.tensor(1))
        stats.set(mu.reshape(-1), var.reshape(-1), count=max(int(count.reshape(-1)[0]), 1))
    policy = NAMMPolicy(mean, config, stats, **policy_kwargs)
    policy.source = str(path)
    return policy
