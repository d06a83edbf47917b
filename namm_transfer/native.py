"""Optional native CPU kernel for NAMM's streamed spectrogram, compiled on first use.

`SpectrogramEMA` folds each frame's windowed DFT, magnitudes and EMA into a slot's features. In torch that is
three passes over large intermediates (the DFT products, the magnitudes, the fold); `csrc/spectrogram_fold.c` does
the same arithmetic in one pass over the attention rows, keeping a tile's DFT in registers. It is plain C (no
torch headers, no build step): the first use compiles it with the system's C compiler (`$CC`, else cc, gcc or
clang) into a per-user cache keyed by the source, the compiler and the CPU, loads it with ctypes and checks it
against the torch path on a random input before using it.

    NAMM_TRANSFER_NATIVE=0   never use it (the torch path everywhere)
    NAMM_TRANSFER_NATIVE=1   require it: raise if it cannot be built or loaded
    (unset)                  use it on CPU when it builds, the torch path otherwise
    NAMM_TRANSFER_CACHE      where the compiled library goes (default: $XDG_CACHE_HOME/namm_transfer or
                             ~/.cache/namm_transfer)

The torch path and the kernel compute the same sums in a different order: features agree to float32 rounding
(relative ~1e-6), not bit for bit. `status()` says which one runs and why.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "spectrogram_fold.c"
ENV_SWITCH = "NAMM_TRANSFER_NATIVE"
N_FFT, HOP, BINS = 32, 16, 17  # the configuration the kernel is written for (NAMM's released one)
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # the first that compiles wins
LINK_FLAGS = ["-fno-math-errno", "-shared", "-fPIC"]  # after every flag set

_lock = threading.Lock()
_kernel = None
_status = "not loaded yet"
_forced_off = 0


def _cpu_signature() -> str:
    """What a -march=native build depends on: the machine, and the CPU's model and feature flags where readable."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    root = os.environ.get("NAMM_TRANSFER_CACHE")
    if root:
        return Path(root) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "namm_transfer" / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _build() -> Path:
    """Compile SOURCE (or find it compiled) and return the library's path; RuntimeError says why not."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        cmd_flags = [*flags, *LINK_FLAGS]
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(cmd_flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:20]
        suffix = ".dll" if sys.platform == "win32" else ".so"
        lib = cache_dir() / f"spectrogram_fold-{key}{suffix}"
        if lib.exists():
            return lib
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=suffix, dir=lib.parent)  # concurrent builders each write their own
        os.close(fd)
        try:
            res = subprocess.run([cc, *cmd_flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                 timeout=120)
            if res.returncode == 0:
                os.replace(tmp, lib)
                return lib
            errors.append(f"{' '.join(flags)}: {res.stderr.strip()[-500:]}")
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{' '.join(flags)}: {err}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} could not compile {SOURCE.name}: " + " | ".join(errors))


def _load():
    return bind(_build())


def bind(library: Path):
    """The kernel function of a compiled library, with its C signature."""
    fn = ctypes.CDLL(str(library)).namm_spectrogram_fold
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ctypes.c_float, ptr, ptr]
    fn.restype = None
    return fn


def kernel():
    """The loaded kernel, or None (torch path). Built and self-checked once per process."""
    global _kernel, _status
    if _forced_off:
        return None
    switch = os.environ.get(ENV_SWITCH, "").strip()
    if switch == "0":
        _status = f"off ({ENV_SWITCH}=0)"
        return None
    if _kernel is not None:
        return _kernel
    with _lock:
        if _kernel is None and not _status.startswith("unavailable"):
            try:
                fn = _load()
                _self_check(fn)
                _kernel, _status = fn, "native kernel (compiled C)"
            except Exception as err:  # noqa: BLE001 -- any failure means: use the torch path, say why
                _status = f"unavailable: {err}"
        if _kernel is None and switch == "1":
            raise RuntimeError(f"{ENV_SWITCH}=1 but the native spectrogram kernel is {_status}. Install a C "
                               f"compiler (gcc or clang), or unset {ENV_SWITCH} to use the torch path.")
    return _kernel


def status() -> str:
    """Which spectrogram path runs, and why."""
    kernel()
    return _status


@contextlib.contextmanager
def disabled():
    """Use the torch path inside the block (for comparisons and tests)."""
    global _forced_off
    _forced_off += 1
    try:
        yield
    finally:
        _forced_off -= 1


def usable(rows: torch.Tensor, n_fft: int, hop: int) -> bool:
    """Whether the kernel handles this fold: CPU tensors, NAMM's released STFT size, and the kernel available."""
    return rows.device.type == "cpu" and n_fft == N_FFT and hop == HOP and kernel() is not None


def spectrogram_fold(rows: torch.Tensor, first: int, frames: int, basis: torch.Tensor, weights: torch.Tensor,
                     decay: float, ema: torch.Tensor, fn=None) -> torch.Tensor:
    """Fold `frames` frames of each row's slots into its EMA with the kernel; returns the new EMA.

    rows (R, L, N) fp32 (frame j reads rows first + j * hop .. + n_fft - 1); basis (34, 32); weights (F,);
    ema (R, 17, N). Same result as features.fold_frames(ema, |basis @ frames|, a) up to float32 rounding."""
    fn = fn or kernel()
    if fn is None:
        raise RuntimeError(f"the native spectrogram kernel is {_status}")
    if rows.dim() != 3 or ema.shape != (rows.shape[0], BINS, rows.shape[2]):
        raise ValueError(f"rows {tuple(rows.shape)} and ema {tuple(ema.shape)} do not match (R, L, N) / (R, 17, N)")
    if frames < 0 or first < 0 or (frames and first + (frames - 1) * HOP + N_FFT > rows.shape[1]):
        raise ValueError(f"{frames} frames from row {first} do not fit in {rows.shape[1]} rows")
    if basis.shape != (2 * BINS, N_FFT) or weights.shape != (frames,):
        raise ValueError(f"basis {tuple(basis.shape)} / weights {tuple(weights.shape)} are not (34, 32) / ({frames},)")
    for t in (rows, basis, weights, ema):
        if t.device.type != "cpu":
            raise ValueError("the native spectrogram kernel runs on CPU tensors only")
    rows, basis, weights = (t.detach().float().contiguous() for t in (rows, basis, weights))
    ema_in = ema.detach().float().contiguous()
    out = torch.empty_like(ema_in)
    r, length, n = rows.shape
    fn(rows.data_ptr(), r, length, n, first, frames, basis.data_ptr(), weights.data_ptr(), float(decay),
       ema_in.data_ptr(), out.data_ptr())
    return out


def _self_check(fn) -> None:
    """The compiled kernel against the torch path on a random input with a partial tile; raise if they differ."""
    from . import features as feat
    g = torch.Generator().manual_seed(0)
    r, frames, n, a = 2, 3, 70, 0.99 ** HOP
    first = 5
    rows = torch.rand(r, first + (frames - 1) * HOP + N_FFT + 2, n, generator=g)
    ema = torch.rand(r, BINS, n, generator=g)
    basis = feat.dft_basis(N_FFT)
    weights = feat._fold_weights(frames, a, torch.device("cpu"))[0]
    got = spectrogram_fold(rows, first, frames, basis, weights, a ** frames, ema, fn=fn)
    want = feat.fold_row_frames(rows, first, frames, ema, a, N_FFT, HOP)
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise RuntimeError(f"self-check failed (max difference {(got - want).abs().max().item():.3g})")
