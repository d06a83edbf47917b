"""Video QA samples and loaders for LongVideoBench, MLVU (dev) and the synthetic set, from a local data root.

    samples = load_dataset("longvideobench", "/data")   # finds /data, /data/LongVideoBench, hub snapshots, ...
    samples = load_dataset("mlvu", "/data")             # finds /data/MLVU/json + /data/MLVU/video/<task>/
    samples = load_dataset("synthetic", "runs/synth", split="test")

Loaders only read annotations and build paths; videos are decoded later (video.decoding), so a missing or
broken video becomes a per-sample error there, not a failed load. A malformed annotation entry (a missing or
ill-typed field, an answer out of range, a path leaving the dataset folder) is kept as a sample whose `problem`
says what is wrong: the harness records it as that sample's error. Paths in annotations are resolved under the
dataset folder; `allow_outside=True` (run_video.py --allow-outside-paths) lets them point anywhere. Duplicate
sample ids refuse the whole file (DatasetError): results are keyed by id.
"""

from __future__ import annotations

import glob
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

LETTERS = "ABCDEF"


@dataclass
class VideoQASample:
    id: str
    video_path: str
    question: str
    options: list[str]
    answer: int | None  # index into options; None where the benchmark withholds it (LVB test)
    dataset: str
    duration: float | None = None  # seconds, as annotated
    duration_group: int | None = None
    category: str | None = None  # LVB question_category, MLVU question_type, synthetic question kind
    subtitle_path: str | None = None  # only set when the subtitle file exists
    subtitle_offset: float = 0.0  # LVB starting_timestamp_for_subtitles
    extra: dict = field(default_factory=dict)
    problem: str | None = None  # why this entry cannot be run (malformed annotation); None = fine

    @property
    def answer_letter(self) -> str | None:
        return None if self.answer is None else LETTERS[self.answer]


class DatasetNotFoundError(FileNotFoundError):
    """The benchmark files are not under the given root; the message says how to get them."""


class DatasetError(ValueError):
    """An annotation file that cannot be used at all (not a list of entries, duplicate ids); names the file."""


class SampleError(ValueError):
    """One sample that cannot be run (a malformed annotation entry): recorded as that sample's error."""


def under(base: Path, rel, field_name: str, allow_outside: bool = False) -> Path:
    """`base / rel`, which must stay inside `base` (no absolute path, no `..` out of it) unless `allow_outside`.
    The check is lexical: symlinks inside the dataset folder may point anywhere."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{field_name} {rel!r} is not a file name")
    path = base / rel
    if not allow_outside and not os.path.normpath(path).startswith(os.path.normpath(base) + os.sep):
        raise ValueError(f"{field_name} {rel!r} points outside {base}; pass --allow-outside-paths to allow it")
    return path


def duration_of(value) -> float | None:
    """An annotated `duration`: None, or a finite number of seconds >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"duration {value!r:.80} is not a number of seconds >= 0")
    return float(value)


def bad_sample(dataset: str, sample_id: str, where: str, err: Exception) -> VideoQASample:
    """A placeholder for a malformed entry: run_video.py records `problem` as its error."""
    return VideoQASample(sample_id, "", "", [], None, dataset, problem=f"malformed entry {where}: {err}")


def check_unique_ids(samples: list[VideoQASample], path: Path) -> list[VideoQASample]:
    ids = [s.id for s in samples]
    dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if dup:
        raise DatasetError(f"{path}: sample ids {dup[:5]}{' ...' if len(dup) > 5 else ''} occur more than once; "
                           "ids must be unique (results are recorded per id)")
    return samples


# ----------------------------------------------------------------------------------------------- locating


def _candidate_dirs(root: Path, names: tuple[str, ...], hub_ids: tuple[str, ...]) -> list[Path]:
    """root itself, root/<name> (one and two levels), and Hugging Face hub-cache snapshots."""
    dirs = [root] + [root / n for n in names] + [root / a / b for a in names for b in names]
    for hub_id in hub_ids:
        pattern = "datasets--" + hub_id.replace("/", "--")
        for base in (root, root / "hub"):
            dirs += sorted(Path(p) for p in glob.glob(str(base / pattern / "snapshots" / "*")))
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _find_dir(root: Path, names: tuple[str, ...], hub_ids: tuple[str, ...], has) -> tuple[Path | None, list[Path]]:
    tried = _candidate_dirs(root, names, hub_ids)
    for d in tried:
        if d.is_dir() and has(d):
            return d, tried
    return None, tried


def _not_found(name: str, root: Path, tried: list[Path], how: str) -> DatasetNotFoundError:
    shown = ", ".join(str(t) for t in tried[:6]) + (" ..." if len(tried) > 6 else "")
    return DatasetNotFoundError(
        f"{name} not found under {root} (looked in: {shown}).\n{how}\n"
        "To try the pipeline offline without it, use `--dataset synthetic`."
    )


# ------------------------------------------------------------------------------------------ LongVideoBench

LVB_NAMES = ("LongVideoBench", "longvideobench")
LVB_HUB = ("longvideobench/LongVideoBench",)
LVB_JSON = {"val": "lvb_val.json", "validation": "lvb_val.json", "test": "lvb_test_wo_gt.json"}
LVB_PARQUET = {"val": "validation-00000-of-00001.parquet", "validation": "validation-00000-of-00001.parquet",
               "test": "test-00000-of-00001.parquet"}
LVB_HOW = (
    "Get LongVideoBench (gated on the Hub; accept its terms first):\n"
    "  huggingface-cli download longvideobench/LongVideoBench --repo-type dataset --local-dir <root>/LongVideoBench\n"
    "  cd <root>/LongVideoBench && cat videos.tar.part.* > videos.tar && tar -xf videos.tar && tar -xf subtitles.tar\n"
    "It needs lvb_val.json (or validation-00000-of-00001.parquet) next to a videos/ folder."
)


def choices(value, field_name: str = "candidates") -> list[str]:
    """Answer options as text: a JSON list of strings or numbers, at most one per letter A-F."""
    if not isinstance(value, list) or not all(isinstance(c, (str, int, float)) and not isinstance(c, bool)
                                              for c in value):
        raise ValueError(f"{field_name} {value!r:.80} is not a list of answer texts")
    if len(value) > len(LETTERS):
        raise ValueError(f"{len(value)} {field_name}; at most {len(LETTERS)} (A-{LETTERS[-1]}) are supported")
    return [str(c) for c in value]


def _lvb_options(rec: dict) -> list[str]:
    if rec.get("candidates") is not None:
        return choices(rec["candidates"])
    opts = []
    for i in range(5):  # the parquet has option0..option4, "N/A" for missing ones
        o = rec.get(f"option{i}")
        if o is None or o == "N/A":
            continue
        opts.append(str(o))
    return opts


def _lvb_sample(rec: dict, base: Path, videos_dir: Path, dataset: str, index: int,
                allow_outside: bool = False) -> VideoQASample:
    """One entry; a malformed one becomes a sample with `problem` set (see `bad_sample`)."""
    sample_id = str(rec["id"]) if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) else \
        f"{dataset}_entry{index:05d}"
    try:
        if not isinstance(rec, dict):
            raise ValueError(f"a {type(rec).__name__}, not an object")
        missing = [k for k in ("id", "video_path", "question") if rec.get(k) is None]
        if missing:
            raise ValueError(f"missing {missing}")
        options = _lvb_options(rec)
        if len(options) < 2:
            raise ValueError(f"{len(options)} answer options")
        answer = rec.get("correct_choice")
        if isinstance(answer, bool) or (isinstance(answer, float) and not answer.is_integer()):
            raise ValueError(f"correct_choice {answer!r} is not an option index")
        answer = None if answer is None or int(answer) < 0 else int(answer)
        if answer is not None and answer >= len(options):
            raise ValueError(f"correct_choice {answer} but {len(options)} options")
        sub = rec.get("subtitle_path")
        sub_path = under(base / "subtitles", sub, "subtitle_path", allow_outside) if sub else None
        group = rec.get("duration_group")
        known = {"id", "video_path", "question", "candidates", "correct_choice", "duration", "duration_group",
                 "question_category", "subtitle_path", "starting_timestamp_for_subtitles"} | {
                    f"option{i}" for i in range(5)}
        return VideoQASample(
            id=sample_id,
            video_path=str(under(videos_dir, rec["video_path"], "video_path", allow_outside)),
            question=str(rec["question"]),
            options=options,
            answer=answer,
            dataset=dataset,
            duration=duration_of(rec.get("duration")),
            duration_group=None if group is None else int(group),
            category=rec.get("question_category"),
            subtitle_path=str(sub_path) if sub_path is not None and sub_path.is_file() else None,
            subtitle_offset=float(rec.get("starting_timestamp_for_subtitles") or 0.0),
            extra={k: v for k, v in rec.items() if k not in known},
        )
    except (ValueError, TypeError) as err:
        return bad_sample(dataset, sample_id, f"#{index} ({sample_id})", err)


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); or use the lvb_*.json files") from e
    return pq.read_table(path).to_pylist()


def load_longvideobench(
    root: str | os.PathLike,
    split: str = "val",
    annotation: str | None = None,
    source: str = "auto",
    videos_dir: str | os.PathLike | None = None,
    dataset: str = "longvideobench",
    allow_outside: bool = False,
) -> list[VideoQASample]:
    """LongVideoBench samples from `lvb_val.json` / `lvb_test_wo_gt.json` or the parquet files.

    source: "json", "parquet" or "auto" (json if present, else parquet). `annotation` names a file directly
    (the synthetic set uses this). Videos are `<dataset dir>/videos/<video_path>` unless `videos_dir` is given.
    """
    if source not in ("auto", "json", "parquet"):
        raise ValueError("source must be 'auto', 'json' or 'parquet'")
    if annotation is None and split not in LVB_JSON:
        raise ValueError(f"split must be one of {sorted(LVB_JSON)}")
    root = Path(root)
    names = [annotation] if annotation else (
        ([LVB_JSON[split]] if source in ("auto", "json") else [])
        + ([LVB_PARQUET[split], f"data/{LVB_PARQUET[split]}"] if source in ("auto", "parquet") else []))
    base, tried = _find_dir(root, LVB_NAMES, LVB_HUB, lambda d: any((d / n).is_file() for n in names))
    if base is None:
        raise _not_found(dataset if annotation else "LongVideoBench", root, tried,
                         f"Expected {' or '.join(names)}." if annotation else LVB_HOW)
    path = next(base / n for n in names if (base / n).is_file())
    if path.suffix == ".parquet":
        records = _read_parquet(path)
    else:
        records = _read_json_list(path)
    vdir = Path(videos_dir) if videos_dir is not None else base / "videos"
    return check_unique_ids([_lvb_sample(r, base, vdir, dataset, i, allow_outside) for i, r in enumerate(records)],
                            path)


def _read_json_list(path: Path) -> list:
    try:
        with open(path) as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise DatasetError(f"{path} holds a JSON {type(records).__name__}, expected a list of entries")
    return records


def load_subtitles(sample: VideoQASample) -> list[tuple[float, float, str]]:
    """LongVideoBench subtitles as (start_s, end_s, text), shifted by the sample's subtitle offset.

    Two formats occur: {"timestamp": [start, end], "text"} and {"start": "HH:MM:SS.ff", "end", "line"};
    a missing end (null) means "until the end of the video".
    """
    if sample.subtitle_path is None:
        return []
    with open(sample.subtitle_path) as f:
        items = json.load(f)
    end_default = sample.duration if sample.duration is not None else float("inf")
    out = []
    for i, it in enumerate(items):
        try:
            if "timestamp" in it:
                start, end = it["timestamp"]
                text = it["text"]
            else:
                start, end, text = _hms(it["start"]), _hms(it["end"]), it["line"]
            end = end_default if end is None else float(end)
            out.append((float(start) - sample.subtitle_offset, end - sample.subtitle_offset, str(text)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{sample.subtitle_path}, item {i}: not a subtitle ({type(err).__name__}: {err})") \
                from None
    return out


def _hms(t: str) -> float:
    h, m, s = t.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


# -------------------------------------------------------------------------------------------------- MLVU

# dev multiple-choice annotation files -> question_type inside them (8_sub_scene, 9_summary are open-ended)
MLVU_TASKS = {
    "1_plotQA": "plotQA",
    "2_needle": "findNeedle",
    "3_ego": "ego",
    "4_count": "count",
    "5_order": "order",
    "6_anomaly_reco": "anomaly_reco",
    "7_topic_reasoning": "topic_reasoning",
}
MLVU_NAMES = ("MLVU", "mlvu")
MLVU_HUB = ("MLVU/MVLU", "MLVU/MLVU")
MLVU_HOW = (
    "Get MLVU dev (gated on the Hub; the repository is spelled MVLU):\n"
    "  huggingface-cli download MLVU/MVLU --repo-type dataset --local-dir <root>\n"
    "It needs MLVU/json/<n>_<task>.json and the videos in MLVU/video/<n>_<task>/."
)


def _mlvu_json_dir(root: Path) -> tuple[Path | None, list[Path]]:
    def has(d: Path) -> bool:
        return any((d / sub / f"{t}.json").is_file() for sub in ("json", "data") for t in MLVU_TASKS)

    base, tried = _find_dir(root, MLVU_NAMES, MLVU_HUB, has)
    if base is None:
        return None, tried
    for sub in ("json", "data"):
        if any((base / sub / f"{t}.json").is_file() for t in MLVU_TASKS):
            return base / sub, tried
    return None, tried  # pragma: no cover


def _mlvu_video_path(video_root: Path, stem: str, qtype: str, name: str | Path) -> Path:
    """First existing of video/<n_task>/, video/<question_type>/, video/<task>/, video/; else the official one."""
    folders = [stem, qtype, stem.split("_", 1)[1], ""]
    for folder in folders:
        p = video_root / folder / name
        if p.is_file():
            return p
    return video_root / stem / name


def _mlvu_answer(item: dict, options: list[str], where: str) -> int | None:
    """Index of the gold answer (a candidate's text, or a letter). A text that names no candidate gives None: the
    official scorer (JUNJIE99/MLVU choice_bench.py qa_template) then makes the gold "(@)", which no reply matches,
    so the question stays in its task and is always wrong (2_needle.json entries 34 and 338 of the dev set)."""
    ans = item.get("answer")
    if ans in options:
        return options.index(ans)
    if isinstance(ans, str) and len(ans) == 1 and ans in LETTERS[: len(options)]:
        return LETTERS.index(ans)
    if isinstance(ans, str) and ans:
        return None
    raise ValueError(f"{where}: answer {ans!r} is neither one of the candidates nor a letter")


def _mlvu_sample(item, i: int, stem: str, qtype: str, json_name: str, video_root: Path,
                 allow_outside: bool) -> VideoQASample | None:
    """One dev entry (None for open-ended ones without candidates); a malformed one gets `problem` set."""
    sample_id = f"mlvu_{stem}_{i:04d}"
    try:
        if not isinstance(item, dict):
            raise ValueError(f"a {type(item).__name__}, not an object")
        if not item.get("candidates"):
            return None
        options = choices(item["candidates"])
        missing = [k for k in ("video", "question") if item.get(k) is None]
        if missing:
            raise ValueError(f"missing {missing}")
        qt = str(item.get("question_type", qtype))
        for key, value in (("video", item["video"]), ("question_type", qt)):  # question_type names a folder too
            under(video_root, value, key, allow_outside)
        video = _mlvu_video_path(video_root, stem, qt, item["video"])
        extra = {k: v for k, v in item.items() if k not in ("video", "question", "candidates", "answer",
                                                             "question_type", "duration")}
        return VideoQASample(
            id=sample_id, video_path=str(video), question=str(item["question"]), options=options,
            answer=_mlvu_answer(item, options, f"{json_name}[{i}]"), dataset="mlvu",
            duration=duration_of(item.get("duration")), category=qt,
            extra={**extra, "task": stem})
    except (ValueError, TypeError) as err:
        return bad_sample("mlvu", sample_id, f"{json_name}[{i}]", err)


def load_mlvu(
    root: str | os.PathLike,
    tasks: list[str] | None = None,
    videos_dir: str | os.PathLike | None = None,
    allow_outside: bool = False,
) -> list[VideoQASample]:
    """MLVU dev multiple-choice samples (7 tasks, 2,175 questions in the official release).

    tasks: annotation stems ("1_plotQA") or question types ("plotQA"); default all seven.
    """
    root = Path(root)
    json_dir, tried = _mlvu_json_dir(root)
    if json_dir is None:
        raise _not_found("MLVU", root, tried, MLVU_HOW)
    video_root = Path(videos_dir) if videos_dir is not None else json_dir.parent / "video"
    wanted = set(tasks) if tasks else None
    samples = []
    for stem, qtype in MLVU_TASKS.items():
        if wanted is not None and stem not in wanted and qtype not in wanted:
            continue
        path = json_dir / f"{stem}.json"
        if path.is_file():
            found = (_mlvu_sample(item, i, stem, qtype, path.name, video_root, allow_outside)
                     for i, item in enumerate(_read_json_list(path)))
            samples += [s for s in found if s is not None]
    if wanted is not None and not samples:
        raise ValueError(f"no MLVU samples for tasks {sorted(wanted)}; known: {list(MLVU_TASKS.items())}")
    return samples


# ------------------------------------------------------------------------------------------- synthetic


def load_synthetic(root: str | os.PathLike, split: str = "test", allow_outside: bool = False) -> list[VideoQASample]:
    """The synthetic set written by `video.synthetic.generate_split` (LongVideoBench layout)."""
    try:
        return load_longvideobench(root, annotation=f"lvb_{split}.json", dataset="synthetic",
                                   allow_outside=allow_outside)
    except DatasetNotFoundError as e:
        raise DatasetNotFoundError(
            f"{e}\nGenerate it with video.synthetic.generate_split(root, split={split!r}, ...)."
        ) from None


def load_dataset(name: str, root: str | os.PathLike, split: str | None = None, **kwargs) -> list[VideoQASample]:
    """Dispatch by name: "longvideobench" (split val/test), "mlvu" (dev/test), "synthetic" (train/val/test)."""
    if name == "longvideobench":
        return load_longvideobench(root, split or "val", **kwargs)
    if name == "mlvu" and split == "test":
        from video.mlvu_test import load_mlvu_test

        return load_mlvu_test(root, **kwargs)
    if name == "mlvu":
        if split not in (None, "dev"):
            raise ValueError(f"MLVU split must be dev or test, got {split!r}")
        return load_mlvu(root, **kwargs)
    if name == "synthetic":
        return load_synthetic(root, split or "test", **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose longvideobench, mlvu or synthetic")
