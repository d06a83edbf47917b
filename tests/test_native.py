"""The compiled spectrogram kernel (namm_transfer/native.py) against the torch path it replaces."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from namm_transfer import features as feat
from namm_transfer import native
from namm_transfer.streams import SpectrogramEMA

ROOT = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(native.kernel() is None, reason=f"native kernel: {native.status()}")


@needs_kernel
@pytest.mark.parametrize("n", [1, 63, 64, 65, 200, 1024])
@pytest.mark.parametrize("frames,first", [(1, 0), (3, 15), (8, 7)])
def test_kernel_equals_torch_fold(n, frames, first):
    g = torch.Generator().manual_seed(n * 10 + frames)
    a = 0.99 ** 16
    rows = torch.softmax(torch.randn(3, first + (frames - 1) * 16 + 32 + 4, n, generator=g), -1)
    ema = torch.rand(3, 17, n, generator=g)
    weights = feat._fold_weights(frames, a, torch.device("cpu"))[0]
    got = native.spectrogram_fold(rows, first, frames, feat.dft_basis(32), weights, a ** frames, ema)
    want = feat.fold_row_frames(rows, first, frames, ema, a)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=2e-6, atol=1e-7), (got - want).abs().max()
    assert torch.equal(ema, ema.clone())  # input untouched (a new tensor is returned)


@needs_kernel
def test_kernel_row_result_does_not_depend_on_the_batch():
    """Every row is computed by the same instructions: a row alone equals it inside a batch, bit for bit."""
    g = torch.Generator().manual_seed(1)
    rows, ema = torch.rand(5, 90, 150, generator=g), torch.rand(5, 17, 150, generator=g)
    w = torch.rand(4, generator=g)
    batch = native.spectrogram_fold(rows, 2, 4, feat.dft_basis(32), w, 0.3, ema)
    for r in range(5):
        alone = native.spectrogram_fold(rows[r:r + 1], 2, 4, feat.dft_basis(32), w, 0.3, ema[r:r + 1])
        assert torch.equal(alone[0], batch[r])


@needs_kernel
def test_kernel_result_does_not_depend_on_the_tile_width(tmp_path):
    """The tile width is picked per instruction set (V = 4 vectors under AVX-512, 1 elsewhere, so the
    accumulators stay in registers); every width computes each slot by the same chain of multiply-adds, so all
    give the same bits, on full and partial tiles alike."""
    cc = native._compiler()
    g = torch.Generator().manual_seed(2)
    rows, ema = torch.rand(3, 7 + 5 * 16 + 32, 200, generator=g), torch.rand(3, 17, 200, generator=g)
    w = torch.rand(6, generator=g)
    outs = {}
    for v, kb in [(1, 3), (2, 1), (4, 3), (1, 2)]:
        lib = tmp_path / f"k{v}{kb}.so"
        subprocess.run([cc, *native.FLAG_SETS[0], *native.LINK_FLAGS, f"-DV={v}", f"-DKB={kb}", str(native.SOURCE),
                        "-o", str(lib)], check=True, capture_output=True)
        fn = native.bind(lib)
        outs[v, kb] = native.spectrogram_fold(rows, 7, 6, feat.dft_basis(32), w, 0.3, ema, fn=fn)
    default = native.spectrogram_fold(rows, 7, 6, feat.dft_basis(32), w, 0.3, ema)
    for key, out in outs.items():
        assert torch.equal(out, default), key


@needs_kernel
def test_kernel_rejects_bad_shapes():
    rows, ema, w = torch.rand(2, 40, 10), torch.rand(2, 17, 10), torch.rand(1)
    with pytest.raises(ValueError, match="do not fit"):
        native.spectrogram_fold(rows, 9, 1, feat.dft_basis(32), w, 0.5, ema)
    with pytest.raises(ValueError, match="do not match"):
        native.spectrogram_fold(rows, 0, 1, feat.dft_basis(32), w, 0.5, ema[:, :, :9])
    with pytest.raises(ValueError, match="weights"):
        native.spectrogram_fold(rows, 0, 1, feat.dft_basis(32), torch.rand(2), 0.5, ema)


@needs_kernel
def test_streamed_features_equal_on_both_paths():
    """A stream fed in pieces, with a left-padded row out of phase, holds the same EMA on the kernel and on
    the torch path."""
    torch.manual_seed(5)
    total = 150
    att = torch.softmax(torch.randn(2, 3, total, total), -1)
    real = torch.ones(2, total, dtype=torch.bool)
    real[1, :7] = False
    cuts = [(0, 40), (40, 41), (41, 128), (128, 150)]

    def run():
        s = SpectrogramEMA()
        for a, e in cuts:
            s.add(att[:, :, a:e, :e], real[:, a:e])
        return s
    fast = run()
    with native.disabled():
        assert not native.usable(torch.zeros(1), 32, 16)
        slow = run()
    assert fast.frame_slots == slow.frame_slots
    assert torch.allclose(fast.ema, slow.ema, rtol=1e-5, atol=1e-7), (fast.ema - slow.ema).abs().max()


def _child(env: dict, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_switch_off_and_required_without_compiler(tmp_path):
    """NAMM_TRANSFER_NATIVE=0 keeps the torch path; =1 with no usable compiler is a clear error; unset with no
    compiler falls back to the torch path and says why."""
    code = "from namm_transfer import native; print(native.status())"
    off = _child({"NAMM_TRANSFER_NATIVE": "0"}, code)
    assert off.returncode == 0 and "off" in off.stdout
    nocc = {"CC": str(tmp_path / "no-such-cc"), "NAMM_TRANSFER_CACHE": str(tmp_path / "cache")}
    auto = _child(nocc, code)
    assert auto.returncode == 0 and "unavailable" in auto.stdout, auto.stderr
    required = _child({**nocc, "NAMM_TRANSFER_NATIVE": "1"}, code)
    assert required.returncode != 0 and "NAMM_TRANSFER_NATIVE=1" in required.stderr
