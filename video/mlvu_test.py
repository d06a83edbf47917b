"""MLVU test set (multiple choice, six options), in the layout of the Hub dataset MLVU/MLVU_Test.

    samples = load_mlvu_test("/data")      # finds /data, /data/MLVU_Test, hub snapshots of MLVU/MLVU_Test

Questions: `test_multi_choice_tasks.json` (repository root) or `MLVU_Test/test_question.json` (the file the
authors' evaluation_test/test_bench.py reads), each entry {question_id, question_type, video, question, candidates,
duration}. Answers: `test-ground-truth/test_mcq_gt.json` when present (released 2025-03; the answer is the text of
one candidate, matched by question_id), else withheld (the run then writes the submission file instead of an
accuracy). Videos: `MLVU_Test/video/` or `video/` (unpack with `cat test_video.tar.gz.part-* | tar -xzf -` in
MLVU_Test/). Nine tasks: anomaly_reco, count, ego, needleQA, order, plotQA, sportsQA, topic_reasoning, tutorialQA.
"""

from __future__ import annotations

import os
from pathlib import Path

from video.datasets import (VideoQASample, _find_dir, _not_found, _read_json_list, bad_sample, check_unique_ids,
                            choices, duration_of, under)

MLVU_TEST_NAMES = ("MLVU_Test", "mlvu_test")
MLVU_TEST_HUB = ("MLVU/MLVU_Test",)
QUESTION_FILES = ("test_multi_choice_tasks.json", "MLVU_Test/test_question.json", "test_question.json",
                  "leaderboard/test_question.json")
GROUND_TRUTH = "test-ground-truth/test_mcq_gt.json"
VIDEO_DIRS = ("MLVU_Test/video", "video")
MLVU_TEST_HOW = (
    "Get the MLVU test set (gated on the Hub):\n"
    "  huggingface-cli download MLVU/MLVU_Test --repo-type dataset --local-dir <root>/MLVU_Test\n"
    "  cd <root>/MLVU_Test/MLVU_Test && cat test_video.tar.gz.part-* | tar -xzf -\n"
    f"It needs one of {', '.join(QUESTION_FILES)} and the videos in MLVU_Test/video/."
)


def _answers(base: Path) -> dict[str, str]:
    """question_id -> gold answer text from the ground-truth file; {} when it is not there."""
    path = base / GROUND_TRUTH
    if not path.is_file():
        return {}
    return {str(g["question_id"]): g["answer"] for g in _read_json_list(path)
            if isinstance(g, dict) and "question_id" in g and "answer" in g}


def _gold_index(answer: str | None, options: list[str]) -> int | None:
    """Index of the gold text among the options; None when withheld or when it names no option (then the sample
    is scored wrong, as test_bench's answer matching would never succeed)."""
    return options.index(answer) if answer in options else None


def _sample(item, i: int, name: str, gold: dict[str, str], videos_dir: Path, allow_outside: bool) -> VideoQASample:
    """One entry; a malformed one becomes a sample whose `problem` says why (recorded as that sample's error)."""
    qid = str(item["question_id"]) if isinstance(item, dict) and item.get("question_id") is not None else \
        f"mlvu_test_entry{i:05d}"
    try:
        if not isinstance(item, dict):
            raise ValueError(f"a {type(item).__name__}, not an object")
        missing = [k for k in ("question_id", "video", "question", "candidates") if item.get(k) is None]
        if missing:
            raise ValueError(f"missing {missing}")
        options = choices(item["candidates"])
        if not 2 <= len(options) <= 6:
            raise ValueError(f"{len(options)} candidates")
        return VideoQASample(
            id=qid, video_path=str(under(videos_dir, item["video"], "video", allow_outside)),
            question=str(item["question"]), options=options, answer=_gold_index(gold.get(qid), options),
            dataset="mlvu", duration=duration_of(item.get("duration")),
            category=item.get("question_type"),
            extra={"split": "test", **({"gold_text": gold[qid]} if qid in gold else {})})
    except (ValueError, TypeError) as err:
        return bad_sample("mlvu", qid, f"{name}[{i}]", err)


def load_mlvu_test(root: str | os.PathLike, videos_dir: str | os.PathLike | None = None,
                   allow_outside: bool = False) -> list[VideoQASample]:
    """The MLVU test multiple-choice samples; id = question_id, category = question_type."""
    root = Path(root)
    base, tried = _find_dir(root, MLVU_TEST_NAMES, MLVU_TEST_HUB,
                            lambda d: any((d / q).is_file() for q in QUESTION_FILES))
    if base is None:
        raise _not_found("MLVU test", root, tried, MLVU_TEST_HOW)
    questions = next(base / q for q in QUESTION_FILES if (base / q).is_file())
    gold = _answers(base)
    if videos_dir is None:
        videos_dir = next((base / v for v in VIDEO_DIRS if (base / v).is_dir()), base / VIDEO_DIRS[0])
    samples = [_sample(item, i, questions.name, gold, Path(videos_dir), allow_outside)
               for i, item in enumerate(_read_json_list(questions))]
    return check_unique_ids(samples, questions)
