"""Accuracy tables and submission files for video multiple-choice QA.

LongVideoBench reports accuracy overall, per duration_group and per question_category (lmms-eval fdb5bfad
`longvideobench_aggregate_results`; its "Overall" is the plain accuracy). MLVU's M-Avg is the unweighted mean of the
per-task accuracies (JUNJIE99/MLVU choice_bench.py "Avg"; lmms-eval's MLVU aggregators the same). Unparsed replies
and per-sample errors (e.g. an undecodable video) are counted, never dropped: a record without a prediction is
wrong. Where the benchmark withholds every answer (LongVideoBench test, MLVU test without its ground-truth file)
there is no accuracy: the run writes the file the benchmark's server scores instead.

    lvb_submission(records)        {id: letter}: the letter each reply was scored as (parsed, else the seeded
                                   guess; null for a sample that could not be run)
    mlvu_test_submission(records)  [{"question_id", "question_type", "option"}] as MLVU's test_bench.py writes
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from video.datasets import VideoQASample
from video.prompts import ParsedAnswer, mlvu_test_option


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
    "category_mean"} where category_mean is MLVU's M-Avg when categories are MLVU tasks. When no record has a
    gold answer (answers withheld) the accuracies are None and the breakdowns empty."""
    if records and all(r.answer is None for r in records):
        return {"overall": None, "n": len(records), "n_unparsed": sum(not r.parsed for r in records),
                "n_errors": sum(r.error is not None for r in records), "by_duration_group": {}, "by_category": {},
                "category_mean": None}
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


def lvb_submission(records: list[dict]) -> dict[str, str | None]:
    """LongVideoBench test submission {id: letter}, in record order."""
    return {r["id"]: r.get("prediction") for r in records}


def mlvu_test_submission(records: list[dict]) -> list[dict]:
    """MLVU test submission: test_bench.py's list of {question_id, question_type, option}, in record order."""
    return [{"question_id": r["id"], "question_type": r.get("category"),
             "option": mlvu_test_option(r.get("response") or "")} for r in records]
