"""LongBench loader (both file layouts), prompts, middle truncation and metrics on hand-computed examples.

Expectations follow THUDM/LongBench at commit c5ea10bc (config/*.json, pred.py, eval.py, metrics.py); the two
hashes are those of the official dataset2prompt.json / dataset2maxlen.json objects (json.dumps, sort_keys=True,
ensure_ascii=False)."""
import hashlib
import json

import pytest

from namm_transfer.language.longbench import (CATEGORIES, MAX_NEW_TOKENS, METRICS, NAMM_TASKS, PROMPTS, TASKS,
                                              TASKS_E, LongBenchSample, build_prompt, classification_score,
                                              code_sim_score, count_score, fuzz_ratio, length_bucket, load_longbench,
                                              longbench_path, qa_f1_score, qa_f1_zh_score, retrieval_score,
                                              retrieval_zh_score, rouge_l_score, rouge_zh_score, score_prediction,
                                              summarize, task_score, task_score_e, truncate_middle)
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


def _sha(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def test_config_equals_official_files():
    assert _sha(PROMPTS) == "e7d865d712fe45e2455f5e864ac474001d7758d68d349e76ffbcdd382483358f"
    assert _sha(MAX_NEW_TOKENS) == "39a79d9491ead3dc8bcea6dbd8b963b29248eb4c344dde1e176b0a58b4e758a9"
    assert set(NAMM_TASKS) <= set(PROMPTS) and len(PROMPTS) == len(METRICS) == 21 == sum(map(len, CATEGORIES.values()))
    # the official typo, twice, kept: a reproduction must feed the model the official string
    assert PROMPTS["narrativeqa"] == (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:")
    assert PROMPTS["passage_retrieval_en"].endswith("The answer is: ")
    assert PROMPTS["lcc"] == "Please complete the code given below. \n{context}Next line of code:\n"


class BosTokenizer:
    """One token per character, BOS (id 1) added unless add_special_tokens=False; decode skips it if asked."""

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) + 10 for c in text]
        return type("Enc", (), {"input_ids": ([1] if add_special_tokens else []) + ids})()

    def decode(self, ids, skip_special_tokens=False):
        return ("<s>" if 1 in ids and not skip_special_tokens else "") + "".join(chr(i - 10) for i in ids if i != 1)


def test_truncate_middle_counts_bos_like_pred_py():
    tok = BosTokenizer()
    text = "abcdefghij" * 3  # 30 characters, 31 tokens with BOS
    assert truncate_middle(text, tok, 31) == text
    # pred.py: 31 > 30 -> first 15 tokens (BOS + 14 characters) and last 15, decoded without BOS
    assert truncate_middle(text, tok, 30) == text[:14] + text[-15:]
    assert truncate_middle(text, tok, 30, add_special_tokens=False) == text  # 30 characters fit without BOS
    assert truncate_middle(text, tok, 11) == text[:4] + text[-5:]  # half = int(11 / 2) = 5


def test_truncate_middle_tiny_tokenizer():
    tok = tiny_tokenizer()
    text = "abcdefghij" * 3
    assert truncate_middle(text, tok, 100) == text
    assert truncate_middle(text, tok, 10, add_special_tokens=False) == "abcde" + "fghij"


def test_build_prompt_truncations():
    tok = BosTokenizer()
    sample = LongBenchSample("narrativeqa", "Q?", "x" * 1000, ["a"], 1000, "en", None, "0")
    full = sample.prompt()
    assert build_prompt(sample, tok, max_length=400) == full[:199] + full[-200:]  # BOS takes one of the first 200
    namm = build_prompt(sample, tok, max_length=400, truncation="namm")  # 400 - 128 new tokens, BOS not counted
    assert namm == full[:136] + full[-136:]
    assert build_prompt(sample, tok) == full
    with pytest.raises(ValueError, match="truncation"):
        build_prompt(sample, tok, 400, truncation="left")


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


def _deep_pair(n: int) -> tuple[str, str]:
    """Prediction "z w1 .. wn" (one segment, n distinct filler words) and reference "z q": the `rouge` package's
    recursive backtrack walks j from n + 1 down to 1, then i to 1, then matches "z": n + 3 calls."""
    fillers = [f"x{a}{b}{c}" for a in "abcdefghij" for b in "abcdefghij" for c in "abcdefghij"][:n]
    return "z " + " ".join(fillers), "z q"


def test_rouge_zero_beyond_the_rouge_package_recursion_limit_as_metrics_rouge_score_except():
    """metrics.py rouge_score returns 0.0 from its bare except when rouge's recursive LCS backtrack raises
    RecursionError: under eval.py's call chain (Python <= 3.10) a pair may take 990 calls in rouge_score and 989 in
    rouge_zh_score, which calls rouge_score one frame deeper. Union LCS {z}: r = 1/2, p = 1/(n + 1)."""
    def f(n: int) -> float:
        p, r = 1 / (n + 1), 1 / 2
        return 2.0 * p * r / (p + r + 1e-8)
    assert rouge_l_score(*_deep_pair(987)) == pytest.approx(f(987), abs=1e-12)  # 990 calls
    assert rouge_l_score(*_deep_pair(988)) == 0.0  # 991 calls
    assert rouge_l_score(*_deep_pair(988), max_calls=None) == pytest.approx(f(988), abs=1e-12)
    pred, gold = _deep_pair(988)
    assert score_prediction("gov_report", pred, [gold]) == 0.0
    pytest.importorskip("jieba")
    assert rouge_zh_score(*_deep_pair(986)) == pytest.approx(f(986), abs=1e-12)  # 989 calls
    assert rouge_zh_score(*_deep_pair(987)) == 0.0  # 990 calls
    pred, gold = _deep_pair(987)
    assert score_prediction("vcsum", pred, [gold]) == 0.0


def test_rouge_zh_score():
    pytest.importorskip("jieba")
    assert score_prediction("dureader", "今天天气很好", ["今天天气很好"]) == pytest.approx(1.0, abs=1e-6)
    assert score_prediction("dureader", "完全无关", ["今天天气很好"]) == 0.0
    s = score_prediction("dureader", "我们今天去北京的天安门广场看升旗仪式。", ["今天我们去天安门广场看升旗。"])
    assert 0.3 < s < 0.9


def test_task_score_max_over_answers_and_mean():
    preds = ["Lee", "Paris", "no idea"]
    golds = [["Ann Lee", "Lee"], ["Paris"], ["Rome"]]
    assert task_score("narrativeqa", preds, golds) == 66.67  # eval.py: round(100 * mean, 2)
    assert task_score("narrativeqa", preds, golds, ndigits=None) == pytest.approx(100 * 2 / 3)
    assert task_score("passage_retrieval_en", ["Paragraph 2", "Paragraph 1"], [["Paragraph 2"], ["Paragraph 4"]]) \
        == pytest.approx(50.0)
    assert score_prediction("triviaqa", "\nParis\nRome", ["Rome"]) == 0.0  # first line only
    with pytest.raises(ValueError, match="unknown LongBench task"):
        score_prediction("lcc_x", "x", ["x"])


def test_task_score_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no predictions"):
        task_score("narrativeqa", [], [])


def test_length_buckets_scorer_e():
    """eval.py scorer_e: buckets by the sample's length field (< 4000, < 8000, else), 100 x mean, 2 decimals."""
    assert [length_bucket(n) for n in (0, 3999, 4000, 7999, 8000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+"]
    preds = ["Paragraph 1", "Paragraph 2", "none", "Paragraph 1 or 3", "Paragraph 1"]
    golds = [["Paragraph 1"]] * 5
    # 0-4k: 1, 0, 0 -> 33.33; 4-8k: one number of two is right -> 50.0; 8k+: 1 -> 100.0
    assert task_score_e("passage_retrieval_en", preds, golds, [0, 3999, 100, 4000, 8000]) == \
        {"0-4k": 33.33, "4-8k": 50.0, "8k+": 100.0}
    assert task_score_e("passage_retrieval_en", preds, golds, [0, 3999, 100, 4000, 8000], ndigits=None)["0-4k"] \
        == pytest.approx(100 / 3)
    # an empty bucket: None (eval.py writes NaN); trec with the task's one class list, first line only
    assert task_score_e("trec", ["City\nHuman", "Human"], [["City"], ["City"]], [10, 9000], ["City", "Human"]) == \
        {"0-4k": 100.0, "4-8k": None, "8k+": 0.0}
    with pytest.raises(ValueError, match="one of each per sample"):
        task_score_e("trec", ["City"], [["City"]], [1, 2], ["City"])
    assert len(TASKS) == 21 and set(TASKS) == set(METRICS) and set(TASKS_E) < set(TASKS) and len(TASKS_E) == 13


def test_malformed_lines_name_file_and_line(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"hotpotqa.jsonl, line 3: not valid JSON.*data.zip"):
        load_longbench("hotpotqa", tmp_path)
    path.write_text('["a list"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: not a LongBench sample"):
        load_longbench("hotpotqa", tmp_path)
    with pytest.raises(FileNotFoundError, match="THUDM/LongBench"):
        load_longbench("trec", tmp_path)


def test_retrieval_zh_and_count():
    assert retrieval_zh_score("段落3", "段落3") == 1.0
    assert retrieval_zh_score("段落3或段落13", "段落13") == 0.5
    assert retrieval_zh_score("不知道", "段落3") == 0.0
    assert count_score("There are 7 unique paragraphs", "7") == 1.0
    assert count_score("7 or 8", 7) == 0.5 and count_score("none", "7") == 0.0


def test_classification_score_official_quirks():
    classes = ["Location", "Description", "Entity", "Human being", "Human", "Abbreviation"]
    assert classification_score("Location", "Location", all_classes=classes) == 1.0
    assert classification_score("Location or Entity", "Entity", all_classes=classes) == 0.5
    assert classification_score("Numeric value", "Location", all_classes=classes) == 0.0
    # "Human" is inside the gold "Human being": dropped, so the gold is the only class left
    assert classification_score("Human being", "Human being", all_classes=classes) == 1.0
    # LongBench removes from the list it walks: after dropping "ab" the next class "abc" is skipped and kept
    assert classification_score("abcd", "abcd", all_classes=["ab", "abc", "abcd"]) == 0.5
    assert task_score("trec", ["abc\nab"], [["abc"]], ["ab", "abc"]) == 100.0  # one class list for the task
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("x", "x")


def test_code_sim_score():
    assert fuzz_ratio("abc", "abc") == 100 and fuzz_ratio("", "abc") == 0 and fuzz_ratio("", "") == 100
    assert fuzz_ratio("abcd", "abce") == 75  # SequenceMatcher ratio 2 * 3 / 8
    pred = "\n# comment\n```python\nreturn x + 1\nfoo()"  # the first line without '`', '#' or '//' is compared
    assert code_sim_score(pred, "return x + 1") == 1.0
    assert code_sim_score("// c\n# d", "x = 1") == 0.0  # no usable line: "" against the gold
    assert score_prediction("lcc", "abcd\nzzz", ["abce", "abcd"]) == 1.0


def test_qa_f1_zh_score():
    pytest.importorskip("jieba")
    assert qa_f1_zh_score("北京。", "北京") == 1.0  # punctuation and empty tokens dropped
    assert qa_f1_zh_score("上海", "北京") == 0.0
    assert 0.0 < qa_f1_zh_score("我们去北京", "北京") < 1.0


def test_every_task_has_a_metric():
    for task in METRICS:
        if task in ("dureader", "vcsum", "multifieldqa_zh"):
            pytest.importorskip("jieba")
        classes = ["Rex", "B"] if task in ("trec", "lsht") else None
        gold = {"passage_retrieval_en": "Paragraph 1", "passage_retrieval_zh": "段落1", "passage_count": "1"}.get(task, "Rex")
        assert score_prediction(task, gold, [gold], classes) == pytest.approx(1.0, abs=1e-6), task


def test_summarize_categories_and_averages():
    scores = {t: float(i) for i, t in enumerate(METRICS)}  # narrativeqa 0, qasper 1, ... in eval.py's order
    out = summarize(scores)
    assert out["categories"]["Single-Document QA"] == pytest.approx((0 + 1 + 3 + 2) / 4)
    assert out["categories"]["Code Completion"] == pytest.approx((19 + 20) / 2)
    assert out["task_mean"] == pytest.approx(sum(range(21)) / 21)
    assert out["category_mean"] == pytest.approx(sum(out["categories"].values()) / 6)
    partial = summarize({"lcc": 50.0, "repobench-p_e": 70.0})
    assert partial["categories"]["Code Completion"] == 60.0 and partial["task_mean"] is None
    assert partial["category_mean"] is None and partial["categories"]["Summarization"] is None
    with pytest.raises(ValueError, match="unknown"):
        summarize({"nope": 1.0})
