"""Accuracy tables for video multiple-choice QA.

LongVideoBench reports accuracy overall, per duration_group and per question_category. MLVU's M-Avg is the
unweighted mean of per-task accuracies. Unparsed replies and per-sample errors (e.g. an undecodable video) are
counted, never dropped: a record without a prediction is wrong.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from video.datasets import VideoQASample
from video.prompts import ParsedAnswer


@dataclass
class QARecord:
    id: str
    dataset: str
    answer: str | None  # gold letter
    prediction: str | None  # scored letter (parsed, or the seeded guess), None if none
    parsed: bool  # the letter came from the reply, not from a guess
    category: str | None = None
    duration_group: int | None = None
    error: str | None = None  # e.g. "VideoDecodeError: ..."
    response: str = ""

    @property
    def correct(self) -> bool:
        return self.answer is not None and self.prediction == self.answer


def make_record(sample: VideoQASample, response: str, parsed: ParsedAnswer, error: str | None = None) -> QARecord:
    return QARecord(sample.id, sample.dataset, sample.answer_letter, parsed.prediction, parsed.letter is not None,
                    sample.category, sample.duration_group, error, response)


def _acc(rs: list[QARecord]) -> float:
    return sum(r.correct for r in rs) / len(rs) if rs else 0.0


def accuracy_table(records: list[QARecord]) -> dict:
    """{"overall", "n", "n_unparsed", "n_errors", "by_duration_group": {g: acc}, "by_category": {c: acc},
    "category_mean"} where category_mean is MLVU's M-Avg when categories are MLVU tasks."""
    by_group, by_cat = defaultdict(list), defaultdict(list)
    for r in records:
        if r.duration_group is not None:
            by_group[r.duration_group].append(r)
        if r.category is not None:
            by_cat[r.category].append(r)
    cat_acc = {c: _acc(rs) for c, rs in sorted(by_cat.items())}
    return {
        "overall": _acc(records),
        "n": len(records),
        "n_unparsed": sum(not r.parsed for r in records),
        "n_errors": sum(r.error is not None for r in records),
        "by_duration_group": {g: _acc(rs) for g, rs in sorted(by_group.items())},
        "by_category": cat_acc,
        "category_mean": sum(cat_acc.values()) / len(cat_acc) if cat_acc else 0.0,
    }
