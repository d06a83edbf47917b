"""Synthetic long-video QA in LongVideoBench's file layout (offline stand-in for LVB / MLVU).

Each video shows, on a dark background:
  - a counter in the top-left corner that counts segments 1, 2, 3, ...;
  - a large shape on the left whose colour (and often shape) changes at every segment;
  - small shapes that flash one at a time on the right, with gaps between flashes.
Each sample asks one question that needs specific moments of the video:
  colour_at_count  "What colour is the large shape ... when the counter shows k?"
  first_event      "Which of these small shapes appeared first on the right?"
  count_event      "How many times did a <colour> <shape> flash on the right?"
  change           "How did the large shape change between counter a and counter b?"
Every piece of evidence lasts `unit` frames, long enough to be seen by uniform sampling of
`min_sampled_frames` frames; longer videos hold the same story with more redundant frames.

    generate_split("runs/synth", "test", num_samples=32, seed=0)   # writes videos/ + lvb_test.json
    load_synthetic("runs/synth", "test")                           # video.datasets

Determinism: everything derives from numpy's default_rng([seed, split code, index]) and x264 runs
single-threaded. Splits are disjoint by construction: a scene is kept for split s only if the hash of
its description falls in s's residue class, so no video can occur in two splits, whatever the seeds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (60, 90, 235),
    "yellow": (235, 215, 40),
    "magenta": (210, 60, 210),
    "cyan": (40, 210, 210),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
KINDS = ("colour_at_count", "first_event", "count_event", "change")
SPLITS = {"train": 0, "val": 1, "test": 2}
BACKGROUND = (25, 25, 25)
NUM_OPTIONS = 5
FONT = {  # 3x5 bitmap digits, rows top to bottom
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}


@dataclass
class SyntheticConfig:
    frame_counts: tuple[int, ...] = (64, 128, 256)
    size: int = 64  # frame height = width (even; 64 or 112 are sensible)
    fps: int = 8
    min_sampled_frames: int = 16  # evidence stays visible under uniform sampling of this many frames
    crf: int = 12  # x264 quality (lower = closer to the rendered colours)


@dataclass
class Scene:
    num_frames: int
    unit: int  # frames per piece of evidence
    segments: list[tuple[str, str]]  # (colour, shape) of the large shape, one per counter value 1..n
    flashes: list[tuple[int, str, str]]  # (start frame, colour, shape); each lasts `unit` frames

    @property
    def segment_len(self) -> int:
        return 2 * self.unit

    def counter_at(self, t: int) -> int:
        """The counter value (1-based) that frame t shows."""
        return min(int(t) // self.segment_len + 1, len(self.segments))

    def flash_at(self, t: int) -> tuple[int, str, str] | None:
        """The flash (start frame, colour, shape) that frame t shows, or None (flashes never overlap)."""
        return next((f for f in self.flashes if f[0] <= t < f[0] + self.unit), None)

    def segment_range(self, k: int) -> tuple[int, int]:
        """Frames [start, end) during which the counter shows k (1-based); the last segment runs to the end."""
        start = (k - 1) * self.segment_len
        end = self.num_frames if k == len(self.segments) else k * self.segment_len
        return start, end


# ------------------------------------------------------------------------------------------- scene + QA


def _name(obj: tuple[str, str]) -> str:
    return f"{obj[0]} {obj[1]}"


def make_scene(rng: np.random.Generator, num_frames: int, min_sampled_frames: int) -> Scene:
    unit = max(2, math.ceil((num_frames - 1) / (min_sampled_frames - 1)))
    n_seg = num_frames // (2 * unit)
    colours = list(COLOURS)
    segments: list[tuple[str, str]] = []
    for _ in range(n_seg):  # neighbouring segments always differ in colour
        choices = [c for c in colours if not segments or c != segments[-1][0]]
        segments.append((str(rng.choice(choices)), str(rng.choice(SHAPES))))
    n_slots = num_frames // unit
    n_flash = int(rng.integers(4, min(7, (n_slots + 1) // 2) + 1))
    # choose n_flash slots with at least one empty slot between flashes
    free = n_slots - (2 * n_flash - 1)
    gaps = rng.multinomial(free, np.ones(n_flash + 1) / (n_flash + 1))
    starts, slot = [], int(gaps[0])
    for j in range(n_flash):
        starts.append(slot * unit)
        slot += 2 + int(gaps[j + 1])
    objects = [(str(rng.choice(colours)), str(rng.choice(SHAPES))) for _ in range(n_flash)]
    return Scene(num_frames, unit, segments, [(s, c, sh) for s, (c, sh) in zip(starts, objects)])


def _options(rng: np.random.Generator, answer: str, preferred: list[str], pool: list[str]) -> tuple[list[str], int]:
    """5 distinct options: the answer, distractors from `preferred` first, then from `pool`; shuffled."""
    distract: list[str] = []
    for group in (preferred, pool):
        for x in rng.permutation(np.array(group, dtype=object)).tolist() if group else []:
            if x != answer and x not in distract and len(distract) < NUM_OPTIONS - 1:
                distract.append(x)
    opts = [answer] + distract
    order = rng.permutation(len(opts))
    opts = [opts[i] for i in order]
    return opts, opts.index(answer)


def make_question(rng: np.random.Generator, scene: Scene, kind: str, target: tuple[str, str] | None = None) -> dict | None:
    """Question, options, answer index and evidence frame ranges; None if the scene cannot support `kind`.

    `target` is the (colour, shape) to count for count_event (default: a random flashed object)."""
    seg, fl, u = scene.segments, scene.flashes, scene.unit
    all_objects = [_name((c, s)) for c in COLOURS for s in SHAPES]
    if kind == "colour_at_count":
        k = int(rng.integers(1, len(seg) + 1))
        opts, ans = _options(rng, seg[k - 1][0], [c for c, _ in seg], list(COLOURS))
        q = f"What colour is the large shape on the left when the counter in the top-left corner shows {k}?"
        return dict(question=q, candidates=opts, correct_choice=ans, evidence=[scene.segment_range(k)])
    if kind == "first_event":
        names = [_name((c, s)) for _, c, s in fl]
        first = names[0]
        opts, ans = _options(rng, first, names[1:], all_objects)
        q = "Small shapes flash one at a time on the right side of the video. Which of these appeared first?"
        firsts = {n: i for i, n in reversed(list(enumerate(names)))}
        ev = sorted({(fl[firsts[o]][0], fl[firsts[o]][0] + u) for o in opts if o in firsts})
        return dict(question=q, candidates=opts, correct_choice=ans, evidence=ev)
    if kind == "count_event":
        target = target or fl[int(rng.integers(len(fl)))][1:]
        hits = [(s, s + u) for s, c, sh in fl if (c, sh) == target]
        if len(hits) > NUM_OPTIONS:
            return None
        opts = [str(i) for i in range(1, NUM_OPTIONS + 1)]
        q = f"How many times did a {_name(target)} flash on the right side of the video?"
        return dict(question=q, candidates=opts, correct_choice=len(hits) - 1, evidence=hits)
    if kind == "change":
        pairs = [(a, b) for a in range(1, len(seg) + 1) for b in range(a + 1, len(seg) + 1) if seg[a - 1] != seg[b - 1]]
        a, b = pairs[int(rng.integers(len(pairs)))]
        phrase = lambda x, y: f"from a {_name(x)} to a {_name(y)}"  # noqa: E731
        answer = phrase(seg[a - 1], seg[b - 1])
        preferred = [phrase(seg[b - 1], seg[a - 1])]  # reversed direction
        preferred += [phrase(x, y) for x in seg for y in seg if x != y]
        pool = [phrase(seg[a - 1], (c, s)) for c in COLOURS for s in SHAPES if (c, s) != seg[a - 1]]
        opts, ans = _options(rng, answer, preferred, pool)
        q = (f"How did the large shape on the left change between the moment the counter showed {a} "
             f"and the moment it showed {b}?")
        return dict(question=q, candidates=opts, correct_choice=ans,
                    evidence=[scene.segment_range(a), scene.segment_range(b)])
    raise ValueError(f"unknown question kind {kind!r}")


def _adjust_count(rng: np.random.Generator, scene: Scene) -> tuple[Scene, tuple[str, str]]:
    """For count questions: make one object repeat 1..5 times so the answers spread over the options."""
    fl = scene.flashes
    target = fl[int(rng.integers(len(fl)))][1:]
    want = int(rng.integers(1, min(NUM_OPTIONS, len(fl)) + 1))
    others = [(c, s) for c in COLOURS for s in SHAPES if (c, s) != target]
    idx = rng.permutation(len(fl))
    new = list(fl)
    for n, i in enumerate(idx):
        obj = target if n < want else others[int(rng.integers(len(others)))]
        new[i] = (fl[i][0], obj[0], obj[1])
    return Scene(scene.num_frames, scene.unit, scene.segments, new), target


def _signature(scene: Scene) -> str:
    """Hash of what the video shows: equal signatures = identical videos (at equal size and fps)."""
    return hashlib.sha256(json.dumps(asdict(scene), sort_keys=True).encode()).hexdigest()


def make_sample(seed: int, split: str, index: int, config: SyntheticConfig) -> tuple[Scene, dict]:
    """Scene + QA for one sample, deterministic in (seed, split, index), owned by `split` alone."""
    code = SPLITS[split]
    kind = KINDS[index % len(KINDS)]
    rng = np.random.default_rng([seed, code, index])
    while True:
        num_frames = int(rng.choice(config.frame_counts))
        scene = make_scene(rng, num_frames, config.min_sampled_frames)
        target = None
        if kind == "count_event":
            scene, target = _adjust_count(rng, scene)
        qa = make_question(rng, scene, kind, target)
        if qa is None:
            continue
        sig = _signature(scene)
        if int(sig, 16) % len(SPLITS) == code:
            qa.update(kind=kind, signature=sig)
            return scene, qa


# ---------------------------------------------------------------------------------------------- drawing


@functools.lru_cache(maxsize=256)
def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return abs(dx) + abs(dy) <= r
    if shape == "triangle":
        return (dy >= -r) & (dy <= r) & (abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        return ((abs(dx) <= r / 3) & (abs(dy) <= r)) | ((abs(dy) <= r / 3) & (abs(dx) <= r))
    raise ValueError(shape)


def _digits_mask(text: str, size: int, scale: int, x0: int, y0: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    for n, ch in enumerate(text):
        glyph = np.array([[c == "1" for c in row] for row in FONT[ch]])
        big = np.kron(glyph, np.ones((scale, scale), bool))
        x = x0 + n * 4 * scale
        mask[y0:y0 + big.shape[0], x:x + big.shape[1]] |= big
    return mask


def _paint(frames: np.ndarray, rows: np.ndarray, mask: np.ndarray, colour) -> None:
    """frames[rows][:, mask] = colour, in place."""
    ys, xs = mask.nonzero()
    frames[rows.nonzero()[0][:, None], ys[None, :], xs[None, :]] = colour


def render(scene: Scene, size: int, indices: np.ndarray | None = None) -> np.ndarray:
    """Frames (T, size, size, 3) uint8 of the scene, drawn with numpy masks; only frames `indices` if given."""
    t = np.arange(scene.num_frames) if indices is None else np.asarray(indices)
    frames = np.empty((len(t), size, size, 3), np.uint8)
    frames[:] = BACKGROUND
    scale = max(1, size // 32)
    n_digits = len(str(len(scene.segments)))
    box = (2 * scale + 5 * scale + 2 * scale, 2 * scale + n_digits * 4 * scale)  # (height, width)
    for k, (colour, shape) in enumerate(scene.segments, start=1):
        a, b = scene.segment_range(k)
        rows = (t >= a) & (t < b)
        if not rows.any():
            continue
        frames[rows, : box[0], : box[1]] = 0
        _paint(frames, rows, _digits_mask(str(k).rjust(n_digits, "0"), size, scale, 2 * scale, 2 * scale), 255)
        _paint(frames, rows, _shape_mask(shape, size, 0.3 * size, 0.6 * size, 0.2 * size), COLOURS[colour])
    for start, colour, shape in scene.flashes:
        rows = (t >= start) & (t < min(start + scene.unit, scene.num_frames))
        if rows.any():
            _paint(frames, rows, _shape_mask(shape, size, 0.76 * size, 0.6 * size, 0.13 * size), COLOURS[colour])
    return frames


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, crf: int = 12) -> None:
    """H.264 (yuv420p) mp4 via PyAV, single-threaded so the bytes are reproducible."""
    import av

    h, w = frames.shape[1:3]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------- writing


def generate_split(
    root: str | os.PathLike,
    split: str = "test",
    num_samples: int = 32,
    seed: int = 0,
    config: SyntheticConfig | None = None,
) -> Path:
    """Write `num_samples` videos to <root>/videos/ and their QA to <root>/lvb_<split>.json; returns the json path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}")
    config = config or SyntheticConfig()
    if config.size % 2:
        raise ValueError("size must be even for yuv420p")
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_samples):
        scene, qa = make_sample(seed, split, i, config)
        name = f"{split}_{seed}_{i:05d}"
        write_mp4(root / "videos" / f"{name}.mp4", render(scene, config.size), config.fps, config.crf)
        duration = scene.num_frames / config.fps
        records.append({
            "video_id": name,
            "id": f"synthetic_{name}",
            "video_path": f"{name}.mp4",
            "subtitle_path": None,
            "question": qa["question"],
            "candidates": qa["candidates"],
            "correct_choice": qa["correct_choice"],
            "duration": duration,
            "duration_group": int(round(duration)),
            "question_category": qa["kind"],
            "topic_category": "synthetic",
            "starting_timestamp_for_subtitles": 0.0,
            "num_frames": scene.num_frames,
            "fps": config.fps,
            "evidence_frames": [list(map(int, e)) for e in qa["evidence"]],
            "signature": qa["signature"],
            "seed": seed,
        })
    path = root / f"lvb_{split}.json"
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path
