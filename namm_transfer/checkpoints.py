"""NAMM checkpoints: our format (safetensors + JSON config) and import of an official evo-memory ckpt.pt."""
from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .features import RECENCY_TABLES, RunningStats
from .namm import NAMMConfig
from .policies import NAMMPolicy

PACKAGE_CHECKPOINTS = Path(__file__).parent / "checkpoints"
DEFAULT_NAMM = PACKAGE_CHECKPOINTS / "namm-smollm2"  # the 45-generation NAMM every committed transfer table measures
# the second operating point: namm-c50's CMA-ES mean at generation 60 (training/namm-c50), picked on validation;
# on the test split 0.933 of the full cache's answer probability at 72.5% cache (results/language/eval-n50-c50-g60)
NAMM_C50 = PACKAGE_CHECKPOINTS / "namm-smollm2-c50"
# the low operating point: the same search's mean at generation 100, after it moved to the test protocol; on the
# test split 0.782 of the full cache's answer probability at 52.5% cache (results/language/eval-n50-c50-g100)
NAMM_C50_G100 = PACKAGE_CHECKPOINTS / "namm-smollm2-c50-g100"
# the 75% operating point that meets issue 16's goal: namm-c75's CMA-ES mean at generation 180 (training/namm-c75),
# picked on validation; on the test split 0.962 of the full cache's answer probability at 73.1% cache, above H2O, L2,
# recency and SnapKV at its cache with every paired interval above zero (results/language/eval-n50-c75-g180)
NAMM_C75 = PACKAGE_CHECKPOINTS / "namm-smollm2-c75"
_BUFFER_PREFIX = "stored_buffers_to_save.token_embedding_0_output_"


def save_namm(path: str | os.PathLike, params: torch.Tensor, stats: RunningStats | None,
              config: NAMMConfig | None = None, meta: dict | None = None) -> Path:
    """Write <path>/namm.safetensors and <path>/config.json (atomically: temp file + rename)."""
    path = Path(path)
    config = config or NAMMConfig()
    params = params.detach().float().reshape(-1).cpu()
    if params.numel() != config.num_params:
        raise ValueError(f"expected {config.num_params} parameters, got {params.numel()}")
    tensors = {"params": params.contiguous()}
    if stats is not None and stats.count > 0:
        tensors["norm_mean"] = stats.mean.float().contiguous()
        tensors["norm_var"] = stats.var.float().contiguous()
    for name, t in tensors.items():  # a NaN NAMM (e.g. a diverged search) is never written
        check_finite(t, f"NAMM {name} to save in {path}")
    path.mkdir(parents=True, exist_ok=True)
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
    """Load a NAMMPolicy from a folder written by `save_namm` (or an official `ckpt.pt` file). Nothing in the
    files is executed; a broken or non-finite checkpoint is a ValueError naming the file and what is wrong."""
    path = Path(path)
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"no NAMM checkpoint at {path}: no such file; pass a folder written by save_namm "
                                    "or scripts/train_namm.py (namm.safetensors + config.json), or an official "
                                    "evo-memory ckpt.pt that exists")
        return import_official(path, **policy_kwargs)
    if not (path / "namm.safetensors").exists() or not (path / "config.json").exists():
        raise FileNotFoundError(f"no NAMM checkpoint at {path}: expected namm.safetensors + config.json "
                                "(train one with scripts/train_namm.py, or pass an official ckpt.pt)")
    try:
        info = json.loads((path / "config.json").read_text())
        config = _config(info["config"])
        tensors = load_file(str(path / "namm.safetensors"))
        params = tensors["params"]
        count = info.get("norm_count", 1)
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a readable NAMM checkpoint ({type(err).__name__}: {err}); "
                         "expected what save_namm writes (config.json with 'config', namm.safetensors with "
                         "'params')") from None
    if isinstance(count, float) and count.is_integer():
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{path / 'config.json'} field 'norm_count' = {count!r} is not a whole number >= 0 (the "
                         "number of feature vectors the normalisation was measured on, as save_namm writes it)")
    for name, t in tensors.items():
        if name in ("params", "norm_mean", "norm_var") and (not t.is_floating_point() or t.dim() != 1):
            raise ValueError(f"{path / 'namm.safetensors'} field {name!r} is a {t.dim()}-D {t.dtype} tensor; "
                             "expected a 1-D float tensor (what save_namm writes)")
    if params.numel() != config.num_params:
        raise ValueError(f"{path}: {params.numel()} parameters but its config needs {config.num_params}")
    check_finite(params, f"{path / 'namm.safetensors'} field 'params'")
    stats = RunningStats(config.num_bins)
    if "norm_mean" in tensors:
        stats.set(*_checked_stats(tensors["norm_mean"], tensors.get("norm_var"), config, path / "namm.safetensors"),
                  count=max(count, 1))
    policy = NAMMPolicy(params, config, stats, **policy_kwargs)
    policy.source = str(path)
    return policy


def check_finite(t: torch.Tensor, where: str) -> None:
    """ValueError naming `where` when `t` holds NaN or inf."""
    bad = int((~torch.isfinite(t.float())).sum())
    if bad:
        raise ValueError(f"{where}: {bad} of {t.numel()} values are NaN or inf; a checkpoint must be finite")


def _config(d) -> NAMMConfig:
    """NAMMConfig from a JSON dict: known fields only, finite numbers > 0 of the default's type (threshold: any
    finite number; ema_coeff < 1; hop <= n_fft), attention_dtype a float dtype name or null."""
    if not isinstance(d, dict):
        raise ValueError(f"'config' is a {type(d).__name__}, not an object")
    defaults = {f.name: f.default for f in fields(NAMMConfig)}
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    for k, v in d.items():
        if k == "attention_dtype":
            ok = v in (None, "bfloat16", "float16", "float32")
        elif k == "recency_table":
            ok = v in RECENCY_TABLES
        else:
            kind = int if isinstance(defaults[k], int) else (int, float)
            ok = (isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) and (k == "threshold" or v > 0)
                  and (k != "ema_coeff" or v < 1))
        if not ok:
            raise ValueError(f"config field {k!r} = {v!r} is out of range")
    config = NAMMConfig(**d)
    if config.hop > config.n_fft:
        raise ValueError(f"config field 'hop' = {config.hop} is larger than 'n_fft' = {config.n_fft}")
    return config


def _checked_stats(mean, var, config: NAMMConfig, where) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation mean/var, each of num_bins finite values, var >= 0."""
    for name, t in (("norm_mean", mean), ("norm_var", var)):
        if t is None or t.numel() != config.num_bins:
            raise ValueError(f"{where}: {name} needs {config.num_bins} values, got "
                             f"{'none' if t is None else t.numel()}")
        check_finite(t, f"{where} field {name!r}")
    if bool((var < 0).any()):
        raise ValueError(f"{where}: norm_var has negative values")
    return mean.reshape(-1), var.reshape(-1)


_NUMPY_CORE = getattr(np, "_core", None) or np.core
SAFE_GLOBALS = [_NUMPY_CORE.multiarray.scalar, _NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype,
                *(getattr(np.dtypes, n) for n in getattr(np.dtypes, "__all__", ()))]


def _unsafe_globals(path) -> list[str]:
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                if not any(g == f"{x.__module__}.{x.__qualname__}" for x in SAFE_GLOBALS)]
    except Exception:  # not a zip checkpoint: nothing can be listed
        return []


def load_torch_file(path: str | os.PathLike, what: str):
    """`torch.load` that never runs code: tensors, numbers, strings, lists, dicts and numpy scalars/arrays only
    (weights_only). Anything else, or an unreadable file, is a ValueError naming the file and `what` it
    should be."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        found = _unsafe_globals(path)
        if not found:
            raise ValueError(f"{path} is not a readable torch file (damaged, or not written by torch.save "
                             f"as plain data); expected {what}") from None
        raise ValueError(f"{path}: refused to load {what}: the file holds Python objects other than tensors and "
                         f"plain data ({', '.join(found[:5])}), and unpickling those can run code") from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable torch file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); expected {what}") from None


def import_official(path: str | os.PathLike, config: NAMMConfig | None = None, **policy_kwargs) -> NAMMPolicy:
    """Import the released evo-memory format: evolution_state['mean'] + frozen normalisation mean/var; the recency
    embedding from evo-memory's float64 table (whatever `config` says about the rest of the geometry)."""
    config = replace(config or NAMMConfig(), recency_table="float64")
    ckpt = load_torch_file(path, "an evo-memory checkpoint (a dict with 'evolution_state')")
    state = ckpt.get("evolution_state", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.endswith("mean") for k in state):
        raise ValueError(f"{path} is not an evo-memory checkpoint: expected a dict with 'evolution_state' "
                         "holding 'mean' and the stored normalisation buffers")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if "mean" not in state:
        raise ValueError(f"{path}: evolution_state has no 'mean' (keys: {sorted(state)[:8]}...)")
    if not isinstance(state["mean"], torch.Tensor):
        raise ValueError(f"{path}: evolution_state['mean'] is a {type(state['mean']).__name__}, not a tensor")
    mean = state["mean"].float().reshape(-1)
    if mean.numel() != config.num_params:
        raise ValueError(f"{path}: evolution_state['mean'] has {mean.numel()} parameters, but the NAMM "
                         f"configuration expects {config.num_params} (the released BAM stage-1 layout)")
    check_finite(mean, f"{path} field evolution_state['mean']")
    stats = RunningStats(config.num_bins)
    mu, var = state.get(_BUFFER_PREFIX + "mean"), state.get(_BUFFER_PREFIX + "var")
    if mu is not None and var is not None:
        count = int(torch.as_tensor(state.get(_BUFFER_PREFIX + "num", 1)).reshape(-1)[0])
        if count < 0:
            raise ValueError(f"{path}: evolution_state[{_BUFFER_PREFIX + 'num'!r}] = {count} is negative; expected "
                             "the number of feature vectors the normalisation was measured on")
        stats.set(*_checked_stats(mu, var, config, path), count=max(count, 1))
    policy = NAMMPolicy(mean, config, stats, **policy_kwargs)
    policy.source = str(path)
    return policy
