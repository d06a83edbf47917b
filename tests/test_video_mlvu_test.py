"""MLVU test-set loader on a test-made copy of the Hub layout (MLVU/MLVU_Test), with and without the answers."""
import json

import pytest

from video.datasets import DatasetNotFoundError
from video.mlvu_test import load_mlvu_test
from video.prompts import mlvu_prompt, parse_answer
from video.scoring import accuracy_table, make_record

QUESTIONS = [
    {"question_id": "AR_0", "question_type": "anomaly_reco", "video": "test_surveil_1.mp4", "duration": 300.0,
     "question": "Does this surveillance footage contain any anomalies?",
     "candidates": ["fighting", "arrest", "shooting", "normal", "robbery", "explosion"]},
    {"question_id": "SQA_0", "question_type": "sportsQA", "video": "sports_2.mp4", "duration": 1200.0,
     "question": "Who scored first?", "candidates": ["red", "blue", "green", "white", "black", "nobody"]},
]
GOLD = [{"question_id": "AR_0", "answer": "normal"}, {"question_id": "SQA_0", "answer": "nobody"}]


def _layout(root, gold=True):
    base = root / "MLVU_Test"  # huggingface-cli download MLVU/MLVU_Test --local-dir <root>/MLVU_Test
    (base / "MLVU_Test" / "video").mkdir(parents=True)
    (base / "test_multi_choice_tasks.json").write_text(json.dumps(QUESTIONS))
    if gold:
        (base / "test-ground-truth").mkdir()
        (base / "test-ground-truth" / "test_mcq_gt.json").write_text(json.dumps(GOLD))
    return base


def test_without_answers(tmp_path):
    base = _layout(tmp_path, gold=False)
    samples = load_mlvu_test(tmp_path)
    assert [s.id for s in samples] == ["AR_0", "SQA_0"] and all(s.answer is None for s in samples)
    assert samples[0].video_path == str(base / "MLVU_Test" / "video" / "test_surveil_1.mp4")
    assert samples[0].category == "anomaly_reco" and samples[0].dataset == "mlvu" and len(samples[0].options) == 6
    assert mlvu_prompt(samples[0]).text.endswith("(E) robbery\n(F) explosion\nOnly give the best option.")
    recs = [make_record(s, "D) normal", parse_answer(s, "D) normal")) for s in samples]
    assert accuracy_table(recs)["overall"] is None


def test_with_ground_truth(tmp_path):
    _layout(tmp_path)
    samples = load_mlvu_test(tmp_path / "MLVU_Test")
    assert [s.answer_letter for s in samples] == ["D", "F"]
    recs = [make_record(s, r, parse_answer(s, r)) for s, r in zip(samples, ["D) normal", "E) black"])]
    table = accuracy_table(recs)
    assert table["by_category"] == {"anomaly_reco": 1.0, "sportsQA": 0.0} and table["category_mean"] == 0.5


def test_official_script_file_name_and_missing(tmp_path):
    (tmp_path / "MLVU_Test").mkdir()
    (tmp_path / "MLVU_Test" / "test_question.json").write_text(json.dumps(QUESTIONS[:1]))
    assert [s.id for s in load_mlvu_test(tmp_path)] == ["AR_0"]
    with pytest.raises(DatasetNotFoundError, match="MLVU test"):
        load_mlvu_test(tmp_path / "nothing")


def test_malformed_entry_is_one_samples_problem(tmp_path):
    base = _layout(tmp_path, gold=False)
    bad = dict(QUESTIONS[1], candidates=None)
    (base / "test_multi_choice_tasks.json").write_text(json.dumps([QUESTIONS[0], bad]))
    samples = load_mlvu_test(tmp_path)
    assert samples[0].problem is None and "missing ['candidates']" in samples[1].problem
