"""Frame sampling and error handling of video.decoding on small test-written mp4 files."""

import numpy as np
import pytest

from video.decoding import HAVE_DECORD, VideoDecodeError, read_video, sample_indices
from video.synthetic import write_mp4

BACKENDS = (["decord"] if HAVE_DECORD else []) + ["pyav"]


@pytest.fixture(scope="module")
def ramp_video(tmp_path_factory):
    """64 frames at 8 fps, 32x64 (decord 0.6.0 mis-sizes some widths, e.g. 48); frame i is flat with red = 4 * i (so the index can be read back)."""
    frames = np.zeros((64, 32, 64, 3), np.uint8)
    frames[..., 0] = (np.arange(64) * 4)[:, None, None]
    frames[..., 1] = 60
    path = tmp_path_factory.mktemp("vid") / "ramp.mp4"
    write_mp4(path, frames, fps=8, crf=0)
    return path


def test_sample_indices_uniform_and_fps():
    assert sample_indices(64, 8).tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    # lmms-eval (default): np.linspace(0, 4, 8, dtype=int) -> 8 indices, repeated on a 5-frame video
    assert sample_indices(5, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    assert sample_indices(5, 8, sampling="unique").tolist() == [0, 1, 2, 3, 4]  # never a frame twice
    assert sample_indices(64, 8, sampling="unique").tolist() == sample_indices(64, 8).tolist()
    assert sample_indices(64, 32, fps=8, target_fps=2).tolist() == list(range(0, 64, 4))
    capped = sample_indices(64, 5, fps=8, target_fps=2)
    assert capped.tolist() == [0, 12, 28, 44, 60]  # 5 of the 2-fps grid, spread over the whole video
    with pytest.raises(ValueError):
        sample_indices(64, 8, fps=0, target_fps=1)
    with pytest.raises(ValueError, match="sampling"):
        sample_indices(64, 8, sampling="random")


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_video_repeats_frames_like_lmms_eval(ramp_video, backend):
    clip = read_video(ramp_video, num_frames=70, backend=backend)  # 64 frames in the file
    assert len(clip.frames) == 70 and clip.indices.tolist() == np.linspace(0, 63, 70, dtype=int).tolist()
    red = clip.frames[..., 0].reshape(70, -1).mean(1)
    np.testing.assert_allclose(red, clip.indices * 4, atol=3)  # a repeated index is the same frame again
    unique = read_video(ramp_video, num_frames=70, backend=backend, sampling="unique")
    assert unique.indices.tolist() == list(range(64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_sampling(ramp_video, backend):
    clip = read_video(ramp_video, num_frames=8, backend=backend)
    assert clip.backend == backend
    assert clip.frames.shape == (8, 32, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.indices.tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    assert clip.total_frames == 64 and clip.fps == pytest.approx(8.0)
    np.testing.assert_allclose(clip.timestamps, clip.indices / 8.0, atol=1e-6)
    red = clip.frames[..., 0].reshape(8, -1).mean(1)
    np.testing.assert_allclose(red, clip.indices * 4, atol=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_sampling(ramp_video, backend):
    clip = read_video(ramp_video, num_frames=32, target_fps=2, backend=backend)
    assert clip.frames.shape == (16, 32, 64, 3)
    np.testing.assert_allclose(clip.timestamps, np.arange(16) * 0.5, atol=1e-6)
    capped = read_video(ramp_video, num_frames=4, target_fps=2, backend=backend)
    assert len(capped.frames) == 4 and capped.timestamps[-1] == pytest.approx(7.5)


def test_backends_agree(ramp_video):
    if not HAVE_DECORD:
        pytest.skip("decord not installed")
    a = read_video(ramp_video, 8, backend="decord")
    b = read_video(ramp_video, 8, backend="pyav")
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2
    np.testing.assert_allclose(a.timestamps, b.timestamps, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_missing_file_raises(tmp_path, backend):
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoDecodeError) as e:
        read_video(path, backend=backend)
    assert e.value.path == str(path) and e.value.reason == "file not found"


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_corrupt_files_raise(tmp_path, ramp_video, backend):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(ramp_video.read_bytes()[: ramp_video.stat().st_size // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for path in (garbage, truncated, empty):
        with pytest.raises(VideoDecodeError) as e:
            read_video(path, 8, backend=backend)
        assert e.value.path == str(path) and e.value.reason
        assert str(path) in str(e.value)


def test_auto_falls_back_to_pyav(ramp_video, monkeypatch):
    import video.decoding as dec

    def broken(path, *args):
        raise VideoDecodeError(path, "simulated decord failure")

    monkeypatch.setattr(dec, "_read_decord", broken)
    monkeypatch.setattr(dec, "HAVE_DECORD", True)
    clip = dec.read_video(ramp_video, 8, backend="auto")
    assert clip.backend == "pyav" and clip.frames.shape == (8, 32, 64, 3)
