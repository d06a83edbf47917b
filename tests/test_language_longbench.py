"""LongBench loader (both file layouts), prompts, middle truncation and metrics on hand-computed examples."""
import json

import pytest

from namm_transfer.language.longbench import (MAX_NEW_TOKENS, LongBenchSample, NAMM_TASKS, PROMPTS, build_prompt, load_longbench,
                                              longbench_path, qa_f1_score, retrieval_score, rouge_l_score,
                                              score_prediction, task_score, truncate_middle)
from namm_transfer.language.models import tiny_tokenizer

ROWS = [
    {"input": "What is the name of the dog?", "context": "The dog is called Rex. " * 5, "answers": ["Rex"],
     "length": 25, "dataset": "narrativeqa", "language": "en", "all_classes": None, "_id": "a1"},
    {"input": "Who wrote it?", "context": "It was written by Ann Lee.", "answers": ["Ann Lee", "Lee"],
     "length": 6, "dataset": "narrativeqa", "language": "en", "all_classes": None, "_id": "a2", "extra": 1},
]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("layout", ["data", "flat"])
def test_load_both_layouts(tmp_path, layout):
    path = tmp_path / "data" / "narrativeqa.jsonl" if layout == "data" else tmp_path / "narrativeqa.jsonl"
    _write(path, ROWS)
    assert longbench_path("narrativeqa", tmp_path) == path
    samples = load_longbench("narrativeqa", tmp_path)
    assert [s.id for s in samples] == ["a1", "a2"] and samples[1].answers == ["Ann Lee", "Lee"]
    assert samples[1].extra == {"extra": 1} and samples[0].length == 25
    assert load_longbench("narrativeqa", tmp_path, limit=1)[0].id == "a1"
    prompt = samples[0].prompt()
    assert prompt.startswith("You are given a story") and prompt.endswith(
        "Question: What is the name of the dog?\n\nAnswer:") and "Story: The dog is called Rex." in prompt


def test_missing_file_names_expected_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_longbench("passage_retrieval_en", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "data" / "passage_retrieval_en.jsonl") in msg
    assert str(tmp_path / "passage_retrieval_en.jsonl") in msg
    with pytest.raises(ValueError, match="unknown LongBench task"):
        load_longbench("not_a_task", tmp_path)


def test_longbench_e_suffix(tmp_path):
    _write(tmp_path / "data" / "hotpotqa_e.jsonl", [dict(ROWS[0], dataset="hotpotqa_e")])
    s = load_longbench("hotpotqa_e", tmp_path)[0]
    assert s.task == "hotpotqa" and s.prompt().startswith("Answer the question based on the given passages.")


def test_config_facts():
    assert set(NAMM_TASKS) <= set(PROMPTS) and len(PROMPTS) == 21
    assert (MAX_NEW_TOKENS["passage_retrieval_en"], MAX_NEW_TOKENS["dureader"], MAX_NEW_TOKENS["narrativeqa"]) == (
        32, 128, 128)
    assert PROMPTS["passage_retrieval_en"].endswith("The answer is: ")
    assert PROMPTS["dureader"].endswith("问题：{input}\n回答：")


def test_truncate_middle():
    tok = tiny_tokenizer()
    text = "abcdefghij" * 3
    assert truncate_middle(text, tok, 100) == text
    assert truncate_middle(text, tok, 10) == "abcde" + "fghij"
    assert truncate_middle(text, tok, 11) == "abcde" + "fghij"  # half = 5 on each side


def test_build_prompt_budget():
    tok = tiny_tokenizer()
    sample = LongBenchSample("narrativeqa", "Q?", "x" * 1000, ["a"], 1000, "en", None, "0")
    full = sample.prompt()
    out = build_prompt(sample, tok, max_length=400)  # 400 - 128 new tokens -> 272 prompt tokens
    assert len(tok(out, add_special_tokens=False).input_ids) == 272
    assert out.startswith(full[:136]) and out.endswith(full[-136:])
    assert build_prompt(sample, tok) == full


def test_retrieval_score():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5
    assert retrieval_score("Paragraph 13", "Paragraph 3") == 0.0
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0


def test_qa_f1_score():
    assert qa_f1_score("The Rex!", "rex") == 1.0  # punctuation, case and articles are dropped
    # pred tokens: [rex, is, dog], gold: [rex]: p = 1/3, r = 1 -> f1 = 0.5
    assert qa_f1_score("Rex is a dog.", "Rex") == pytest.approx(0.5)
    # pred [ann, smith], gold [ann, lee]: overlap 1 -> p = r = 0.5
    assert qa_f1_score("Ann Smith", "Ann Lee") == pytest.approx(0.5)
    assert qa_f1_score("", "Rex") == 0.0


def test_rouge_l_score_hand_computed():
    # one segment each: LCS(a b c d, a c d e) = a c d; p = 3/4, r = 3/4
    assert rouge_l_score("a b c d", "a c d e") == pytest.approx(0.75, abs=1e-6)
    # distinct-word denominators: hyp {a, b} (2 distinct of 3 words), ref {a, b, c}; LCS words {a, b}
    assert rouge_l_score("a b a", "a b c") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3), abs=1e-6)
    # summary level over '.'-segments: the union of LCS words of each (ref, hyp) segment pair
    assert rouge_l_score("x y. z w", "x y z w") == pytest.approx(1.0, abs=1e-6)
    assert rouge_l_score("", "a b") == 0.0 and rouge_l_score("...", "a b") == 0.0


def test_rouge_l_matches_rouge_package():
    rouge = pytest.importorskip("rouge")
    import random
    scorer, rng = rouge.Rouge(), random.Random(0)
    words = list("abcdefg") + [".", ". ", " "]
    for _ in range(300):
        p = " ".join(rng.choice(words) for _ in range(rng.randint(0, 20)))
        g = " ".join(rng.choice(words) for _ in range(rng.randint(0, 20)))
        try:
            ref = scorer.get_scores([p], [g], avg=True)["rouge-l"]["f"]
        except Exception:  # LongBench scores the package's errors (empty text) as 0
            ref = 0.0
        assert rouge_l_score(p, g) == pytest.approx(ref, abs=1e-9), (p, g)


def test_rouge_zh_score():
    pytest.importorskip("jieba")
    assert score_prediction("dureader", "今天天气很好", ["今天天气很好"]) == pytest.approx(1.0, abs=1e-6)
    assert score_prediction("dureader", "完全无关", ["今天天气很好"]) == 0.0
    s = score_prediction("dureader", "我们今天去北京的天安门广场看升旗仪式。", ["今天我们去天安门广场看升旗。"])
    assert 0.3 < s < 0.9


def test_task_score_max_over_answers_and_mean():
    preds = ["Lee", "Paris", "no idea"]
    golds = [["Ann Lee", "Lee"], ["Paris"], ["Rome"]]
    assert task_score("narrativeqa", preds, golds) == pytest.approx(100 * 2 / 3)
    assert task_score("passage_retrieval_en", ["Paragraph 2", "Paragraph 1"], [["Paragraph 2"], ["Paragraph 4"]]) \
        == pytest.approx(50.0)
    assert score_prediction("triviaqa", "\nParis\nRome", ["Rome"]) == 0.0  # first line only
    with pytest.raises(NotImplementedError):
        score_prediction("lcc", "x", ["x"])
