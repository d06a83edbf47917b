"""Frame sampling from video files: decord first, PyAV as a fallback.

    clip = read_video("v.mp4", num_frames=32)               # uniform over the whole video
    clip = read_video("v.mp4", num_frames=32, target_fps=1)  # 1 frame/s, at most 32 frames
    clip.frames     # (N, H, W, 3) uint8
    clip.timestamps # (N,) seconds

Uniform sampling (`sampling`): "lmms-eval" (default) is `np.linspace(0, total - 1, N).astype(int)` as lmms-eval's
Llava(-Next-Video) model wrapper decodes videos (EvolvingLMMs-Lab/lmms-eval 9c78edcf, models/simple/llava_hf.py
`load_video`; the same in model_utils/load_video.py `load_video_decord`): always N frames, so a video with fewer
than N frames gives repeated indices. "unique" is `linspace(0, total - 1, min(N, total))`: never a frame twice.
Both give the same frames when the video has at least N frames.
Any failure (missing file, unreadable container, no frames) raises `VideoDecodeError(path, reason)`, so a caller
can record a per-sample error instead of silently getting an empty clip.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

try:  # decord is optional: without it everything goes through PyAV
    import decord

    HAVE_DECORD = True
except Exception:  # pragma: no cover - depends on the install
    decord = None
    HAVE_DECORD = False

BACKENDS = ("auto", "decord", "pyav")
SAMPLING = ("lmms-eval", "unique")


class VideoDecodeError(RuntimeError):
    """A video could not be decoded; `path` and `reason` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")


@dataclass
class VideoClip:
    frames: np.ndarray  # (N, H, W, 3) uint8, RGB
    timestamps: np.ndarray  # (N,) float64 seconds: index / fps (see _seconds)
    indices: np.ndarray  # (N,) int64, frame index in the decoded stream
    fps: float  # average frame rate of the video
    total_frames: int  # number of frames in the video
    backend: str  # "decord" or "pyav"

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps if self.fps > 0 else 0.0


def sample_indices(total_frames: int, num_frames: int, fps: float = 0.0, target_fps: float | None = None,
                   sampling: str = "lmms-eval") -> np.ndarray:
    """Frame indices to decode.

    Uniform (target_fps None): `linspace(0, total-1, num_frames)` truncated to int ("lmms-eval": indices repeat
    when the video is shorter than num_frames) or `linspace(0, total-1, min(num_frames, total))` ("unique").
    fps-based: one frame every 1/target_fps seconds from t=0; if that gives more than num_frames, fall back
    to num_frames picked uniformly over that grid (so the cap keeps the whole video covered).
    """
    if total_frames <= 0:
        raise ValueError("total_frames must be positive")
    if num_frames <= 0:
        raise ValueError("num_frames must be positive")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    if target_fps is None:
        count = num_frames if sampling == "lmms-eval" else min(num_frames, total_frames)
        return np.linspace(0, total_frames - 1, count).astype(np.int64)
    if target_fps <= 0 or fps <= 0:
        raise ValueError("fps sampling needs a positive target_fps and a known video fps")
    step = fps / target_fps  # frames between samples
    grid = np.unique(np.floor(np.arange(0, total_frames, step)).astype(np.int64))
    grid = grid[grid < total_frames]
    if len(grid) > num_frames:
        grid = grid[np.linspace(0, len(grid) - 1, num_frames).astype(np.int64)]
    return grid


def read_video(
    path: str | os.PathLike,
    num_frames: int = 32,
    target_fps: float | None = None,
    backend: str = "auto",
    sampling: str = "lmms-eval",
) -> VideoClip:
    """Decode `num_frames` frames (uniform with `sampling`, or at `target_fps` capped at `num_frames`).

    backend "auto" uses decord when it imports and retries with PyAV if decord fails on the file;
    the error then carries both reasons.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file")
    if backend == "decord" and not HAVE_DECORD:
        raise ImportError("backend='decord' requested but decord does not import; use backend='pyav'")
    if backend == "pyav" or (backend == "auto" and not HAVE_DECORD):
        return _read_pyav(path, num_frames, target_fps, sampling)
    try:
        return _read_decord(path, num_frames, target_fps, sampling)
    except VideoDecodeError as err:
        if backend == "decord":
            raise
        try:
            return _read_pyav(path, num_frames, target_fps, sampling)
        except VideoDecodeError as err2:
            raise VideoDecodeError(path, f"decord: {err.reason}; pyav: {err2.reason}") from err2


def _read_decord(path: str, num_frames: int, target_fps: float | None, sampling: str) -> VideoClip:
    vr = None
    try:
        try:
            vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises a bare RuntimeError/DECORDError
            raise VideoDecodeError(path, f"open failed ({type(e).__name__}: {_first_line(e)})") from e
        total = len(vr)
        if total <= 0:
            raise VideoDecodeError(path, "video stream has no frames")
        fps = float(vr.get_avg_fps())
        idx = _indices(path, total, num_frames, fps, target_fps, sampling)
        try:
            batch = vr.get_batch(idx.tolist())
            frames = batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy()  # torch bridge set elsewhere
        except Exception as e:
            raise VideoDecodeError(path, f"frame read failed ({type(e).__name__}: {_first_line(e)})") from e
        return VideoClip(np.ascontiguousarray(frames, dtype=np.uint8), _seconds(idx, fps), idx, fps, total, "decord")
    finally:
        del vr  # release the reader (decord leaks file handles and memory otherwise)


def _read_pyav(path: str, num_frames: int, target_fps: float | None, sampling: str) -> VideoClip:
    import av

    try:
        container = av.open(path)
    except Exception as e:
        raise VideoDecodeError(path, f"open failed ({type(e).__name__}: {_first_line(e)})") from e
    try:
        if not container.streams.video:
            raise VideoDecodeError(path, "no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        total = int(stream.frames or 0)
        if total <= 0:  # some containers do not store a frame count: count packets instead
            total = sum(1 for p in container.demux(stream) if p.size > 0)
            container.seek(0)
        if total <= 0:
            raise VideoDecodeError(path, "video stream has no frames")
        idx = _indices(path, total, num_frames, fps, target_fps, sampling)
        frames, seen = _decode_indices(container, stream, idx)
        if len(frames) < len(idx):  # the stored frame count was wrong: resample over the frames really there
            if seen <= 0:
                raise VideoDecodeError(path, "no frame could be decoded")
            total = seen
            idx = _indices(path, total, num_frames, fps, target_fps, sampling)
            container.seek(0)
            frames, _ = _decode_indices(container, stream, idx)
        return VideoClip(np.stack(frames), _seconds(idx, fps), idx, fps, total, "pyav")
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(path, f"decode failed ({type(e).__name__}: {_first_line(e)})") from e
    finally:
        container.close()


def _indices(path: str, total: int, num_frames: int, fps: float, target_fps: float | None,
             sampling: str) -> np.ndarray:
    if target_fps is not None and fps <= 0:
        raise VideoDecodeError(path, "frame rate unknown, cannot sample at a target fps")
    return sample_indices(total, num_frames, fps, target_fps, sampling)


def _decode_indices(container, stream, idx: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Decode sequentially, keeping the frames whose running index is in `idx` (sorted; a repeated index gives
    the same frame again). Returns fewer frames than `idx` when the stream ends early."""
    wanted = set(idx.tolist())
    last = int(idx[-1])
    decoded: dict[int, np.ndarray] = {}
    seen = 0
    for i, frame in enumerate(container.decode(stream)):
        seen = i + 1
        if i in wanted:
            decoded[i] = frame.to_ndarray(format="rgb24")
        if i >= last:
            break
    return [decoded[i] for i in idx.tolist() if i in decoded], seen


def _seconds(idx: np.ndarray, fps: float) -> np.ndarray:
    """index / fps, as LongVideoBench's loader computes frame times (container timestamps are unreliable,
    e.g. decord returns garbage for AVI); NaN when the frame rate is unknown."""
    return idx / fps if fps > 0 else np.full(len(idx), np.nan)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "no message"


def benchmark(path: str, num_frames: int = 32, repeats: int = 3) -> dict[str, float]:
    """Seconds per `read_video` call for each available backend (best of `repeats`)."""
    out = {}
    for backend in (["decord"] if HAVE_DECORD else []) + ["pyav"]:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            read_video(path, num_frames, backend=backend)
            best = min(best, time.perf_counter() - t0)
        out[backend] = best
    return out


if __name__ == "__main__":  # python -m video.decoding VIDEO [NUM_FRAMES]
    import sys

    n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    for name, sec in benchmark(sys.argv[1], n).items():
        print(f"{name:7s} {sec * 1000:8.1f} ms for {n} frames")
