"""LongBench (THUDM/LongBench v1) for users who have the data locally: loading, prompts, truncation, metrics.

Files: `<root>/data/<task>.jsonl` (the layout of the released data.zip) or `<root>/<task>.jsonl`; one JSON object
a line with fields input, context, answers, length, dataset, language, all_classes, _id.

Everything here follows THUDM/LongBench at commit c5ea10bc (2024-12-18; files LongBench/pred.py, eval.py,
metrics.py, config/dataset2prompt.json, config/dataset2maxlen.json), reimplemented: the prompts are the official
strings (typos included: narrativeqa says "asconcisely" twice), all 21 tasks have their official metric, a task's
score is 100 x the mean over samples of the best metric value over the gold answers, rounded to 2 decimals as
eval.py writes it (`task_score_e`: per length bucket, eval.py's scorer_e for LongBench-E), and `summarize` gives
the six LongBench categories and the averages. scripts/run_longbench.py generates the predictions.

Truncation: truncation="longbench" is pred.py's (the prompt tokenized *with* the tokenizer's special tokens, so a BOS
counts; longer than max_length -> the first and last int(max_length / 2) tokens, decoded without special tokens and
concatenated). truncation="namm" is the official NAMM code's (SakanaAI/evo-memory memory_evaluator.py: budget
max_length - the task's max new tokens, counted without special tokens). Neither applies a chat template here.
"""
from __future__ import annotations

import difflib
import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# LongBench config/dataset2prompt.json ({context} and {input} are filled in), verbatim: narrativeqa's
# "asconcisely" (twice) is the official string; correcting it would change every narrativeqa prompt.
PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                   "question asconcisely as you can, using a single phrase if possible. Do not provide any "
                   "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as "
                   "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}"
                   "\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using "
              "a single phrase or sentence if possible. If the question cannot be answered based on the information "
              "in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", "
              "or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question "
              "based on the above article as concisely as you can, using a single phrase or sentence if possible. If "
              "the question cannot be answered based on the information in the article, write \"unanswerable\". If "
              "the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
              "explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                       "question based on the above text, only give me the answer and do not output any other words."
                       "\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
                       "\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other "
                "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
                "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                  "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query "
             "in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
             "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
                  "Now, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
            "{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
                "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
              "{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
                     "carefully read these paragraphs and determine how many unique paragraphs there are after "
                     "removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
                     "{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The "
                     "output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer "
                     "is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                            "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}"
                            "\n\nPlease enter the number of the paragraph that the abstract is from. The answer "
                            "format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
                            "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
PROMPTS["2wikimqa"] = PROMPTS["musique"] = PROMPTS["hotpotqa"]

# LongBench config/dataset2maxlen.json (maximum new tokens).
MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}
# Few-shot tasks that LongBench runs without a chat template and scores on the first generated line only.
NO_CHAT_TEMPLATE = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")
NAMM_TASKS = ("passage_retrieval_en", "dureader", "narrativeqa")  # the official NAMM curriculum, in order
# pred.py's task lists, in its order: LongBench (21 tasks) and LongBench-E (13, files <task>_e.jsonl).
TASKS = ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique", "dureader",
         "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht", "passage_count",
         "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p")
TASKS_E = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
           "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
DOWNLOAD_HINT = ("Get the official data: download data.zip from the Hugging Face dataset THUDM/LongBench "
                 "(https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip) and unzip it, then pass the "
                 "unzipped data folder (the one holding narrativeqa.jsonl) or its parent.")


@dataclass
class LongBenchSample:
    task: str
    input: str
    context: str
    answers: list[str]
    length: int
    language: str
    all_classes: list[str] | None
    id: str
    extra: dict = field(default_factory=dict)

    def prompt(self) -> str:
        """The official LongBench prompt (before truncation)."""
        return PROMPTS[self.task].format(context=self.context, input=self.input)


def longbench_path(task: str, root: str | Path) -> Path:
    """The jsonl of `task` under `root`: `<root>/data/<task>.jsonl`, else `<root>/<task>.jsonl`."""
    root = Path(root).expanduser()
    candidates = [root / "data" / f"{task}.jsonl", root / f"{task}.jsonl"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"LongBench task {task!r} not found: expected {candidates[0]} or {candidates[1]}. "
                            f"{DOWNLOAD_HINT}")


def load_longbench(task: str, root: str | Path, limit: int | None = None) -> list[LongBenchSample]:
    """Read the samples of `task` (e.g. "passage_retrieval_en", or "hotpotqa_e" for LongBench-E)."""
    base = task[:-2] if task.endswith("_e") else task
    if base not in PROMPTS:
        raise ValueError(f"unknown LongBench task {task!r}; known: {sorted(PROMPTS)}")
    out = []
    path = longbench_path(task, root)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            out.append(_parse_sample(base, line, len(out), f"{path}, line {number}"))
            if limit is not None and len(out) >= limit:
                break
    return out


_KNOWN_FIELDS = {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}


def _parse_sample(task: str, line: str, index: int, where: str) -> LongBenchSample:
    """One jsonl line as a sample; a malformed line is a ValueError naming `where` (file and line)."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err}); the file looks damaged: {DOWNLOAD_HINT}") from None
    if not isinstance(d, dict) or "context" not in d or not isinstance(d.get("answers"), list):
        raise ValueError(f"{where}: not a LongBench sample (a JSON object with at least 'context' and a list "
                         f"'answers'); {DOWNLOAD_HINT}")
    return LongBenchSample(task, d.get("input", ""), d["context"], list(d["answers"]), int(d.get("length", 0)),
                           d.get("language", ""), d.get("all_classes"), str(d.get("_id", index)),
                           {k: v for k, v in d.items() if k not in _KNOWN_FIELDS})


TRUNCATION = ("longbench", "namm")


def truncate_middle(prompt: str, tokenizer, max_tokens: int, add_special_tokens: bool = True) -> str:
    """LongBench pred.py: a prompt of more than `max_tokens` tokens (counted with the special tokens the tokenizer
    adds, e.g. BOS, unless add_special_tokens=False) becomes its first and last int(max_tokens / 2) tokens, each half
    decoded without special tokens, concatenated."""
    ids = tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
    if len(ids) <= max_tokens:
        return prompt
    half = int(max_tokens / 2)
    return (tokenizer.decode(ids[:half], skip_special_tokens=True) +
            tokenizer.decode(ids[-half:], skip_special_tokens=True))


def build_prompt(sample: LongBenchSample, tokenizer, max_length: int | None = None,
                 truncation: str = "longbench") -> str:
    """Official prompt, middle-truncated to `max_length` (no truncation if None). No chat template.

    truncation "longbench": pred.py's (max_length = config/model2maxlen.json's value, special tokens counted);
    "namm": evo-memory's (budget max_length - the task's max new tokens, special tokens not counted)."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    prompt = sample.prompt()
    if max_length is None:
        return prompt
    if truncation == "namm":
        return truncate_middle(prompt, tokenizer, max_length - MAX_NEW_TOKENS[sample.task], add_special_tokens=False)
    return truncate_middle(prompt, tokenizer, max_length)


# --------------------------------------------------------------------------------------------------- metrics
def normalize_en(text: str) -> str:
    """SQuAD-style: lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: list[str], reference: list[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    p, r = same / len(prediction), same / len(reference)
    return 2 * p * r / (p + r)


def qa_f1_score(prediction: str, reference: str, **_) -> float:
    """narrativeqa, qasper, hotpotqa, ...: token F1 after `normalize_en`."""
    return token_f1(normalize_en(prediction).split(), normalize_en(reference).split())


def _id_share(prediction: str, gold_id: str) -> float:
    """The fraction of the numbers in the prediction that equal `gold_id`; 0 if the prediction has no number."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == gold_id for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, reference: str, **_) -> float:
    """passage_retrieval_en: `_id_share` of the gold paragraph id, taken from "Paragraph <id>" in the reference."""
    return _id_share(prediction, re.findall(r"Paragraph (\d+)", reference)[0])


def retrieval_zh_score(prediction: str, reference: str, **_) -> float:
    """passage_retrieval_zh: as `retrieval_score`, the gold id taken from "段落<id>"."""
    return _id_share(prediction, re.findall(r"段落(\d+)", reference)[0])


def count_score(prediction: str, reference: str, **_) -> float:
    """passage_count: `_id_share` of the gold count."""
    return _id_share(prediction, str(reference))


def classification_score(prediction: str, reference: str, all_classes=None, **_) -> float:
    """trec, lsht: the classes named in the prediction; a named class that is a strict substring of the gold class is
    dropped, in LongBench's loop that removes from the list it walks (so the class right after a dropped one is not
    examined); score 1 / (classes left) if the gold class is among them, else 0."""
    if all_classes is None:
        raise ValueError("classification_score needs all_classes (the sample's all_classes field)")
    named = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(named):
        if named[i] in reference and named[i] != reference:
            named.remove(named[i])
        i += 1
    return 1.0 / len(named) if reference in named else 0.0


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18 `fuzz.ratio` on the pure-Python path LongBench's requirements install (no python-Levenshtein):
    100 if equal, 0 if either is empty, else round(100 x difflib.SequenceMatcher(None, a, b).ratio())."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, reference: str, **_) -> float:
    """lcc, repobench-p: the first line of the prediction (after leading newlines) that holds none of '`', '#', '//'
    ("" if none), compared to the gold line by `fuzz_ratio` / 100."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((ln for ln in lines if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz_ratio(line, reference) / 100


def _lcs_words(x: list[str], y: list[str]) -> tuple[list[str], int]:
    """One longest common subsequence of x and y, backtracked from the end: on a match take it, else step
    towards the larger neighbour, preferring to drop y's word on ties (this choice fixes which words count); and the
    number of calls the `rouge` package's recursive backtrack makes for it (steps + 1)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    out, i, j, calls = [], len(x), len(y), 1
    while i and j:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
        calls += 1
    return out[::-1], calls


def _segments(text: str) -> list[list[str]]:
    """Split at '.', keep non-empty pieces, collapse whitespace and split words at single spaces."""
    return [" ".join(s.split()).split(" ") for s in text.split(".") if len(s) > 0]


# The deepest recursive LCS backtrack (in calls) that LongBench's eval.py survives under Python's default recursion
# limit of 1000 when it scores a task with rouge_score (measured: 990 on Python 3.8-3.10, 991 on 3.11+); deeper,
# the `rouge` package raises RecursionError and metrics.py's bare except scores the pair 0. rouge_zh_score calls
# rouge_score, one frame deeper, so its limit is one less.
ROUGE_MAX_CALLS = 990


def rouge_l_score(prediction: str, reference: str, max_calls: int | None = ROUGE_MAX_CALLS, **_) -> float:
    """ROUGE-L F as LongBench gets it from the `rouge` 1.0.1 package: summary-level union LCS over '.'-separated
    segments, with the LCS words and both lengths counted as sets of distinct words; 0.0 for an empty side, and 0.0
    when a (reference, prediction) segment pair needs more than `max_calls` backtrack calls (the package's
    RecursionError, which LongBench scores 0; max_calls=None: the real value instead)."""
    hyp, ref = _segments(prediction), _segments(reference)
    if not hyp or not ref:
        return 0.0
    pairs = [_lcs_words(r, h) for r in ref for h in hyp]
    if max_calls is not None and any(calls > max_calls for _, calls in pairs):
        return 0.0
    union = {w for words, _ in pairs for w in words}
    m, n = len({w for r in ref for w in r}), len({w for h in hyp for w in h})
    recall, precision = len(union) / m, len(union) / n
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def _jieba():
    try:
        import jieba
    except ImportError as e:
        raise ImportError("Chinese LongBench metrics need jieba: pip install jieba==0.42.1") from e
    jieba.setLogLevel(60)
    return jieba


def rouge_zh_score(prediction: str, reference: str, max_calls: int | None = ROUGE_MAX_CALLS - 1, **_) -> float:
    """dureader, vcsum: jieba word segmentation (accurate mode) of both texts, then `rouge_l_score`."""
    jieba = _jieba()
    cut = lambda s: " ".join(jieba.cut(s, cut_all=False))  # noqa: E731
    return rouge_l_score(cut(prediction), cut(reference), max_calls=max_calls)


# metrics.py normalize_zh_answer's extra punctuation (besides string.punctuation).
CN_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_ZH_DROP = set(string.punctuation + CN_PUNCTUATION)


def normalize_zh(text: str) -> str:
    """Lower case, drop ASCII and Chinese punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_DROP).split())


def qa_f1_zh_score(prediction: str, reference: str, **_) -> float:
    """multifieldqa_zh: token F1 over jieba words (accurate mode), each normalised by `normalize_zh`, empty ones
    dropped."""
    jieba = _jieba()
    words = lambda s: [w for w in (normalize_zh(t) for t in jieba.cut(s, cut_all=False)) if w]  # noqa: E731
    return token_f1(words(prediction), words(reference))


METRICS: dict[str, Callable[..., float]] = {  # eval.py dataset2metric
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "dureader": rouge_zh_score, "gov_report": rouge_l_score, "qmsum": rouge_l_score, "multi_news": rouge_l_score,
    "vcsum": rouge_zh_score, "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_l_score,
    "lsht": classification_score, "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}
# The six categories of the LongBench README (its "Avg" column is the mean of these six category means).
CATEGORIES = {
    "Single-Document QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "Multi-Document QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "Summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "Few-shot Learning": ("trec", "triviaqa", "samsum", "lsht"),
    "Synthetic Tasks": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "Code Completion": ("lcc", "repobench-p"),
}


def score_prediction(task: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """Best metric value over the gold answers (first line only for trec, triviaqa, samsum, lsht), as eval.py."""
    if task not in METRICS:
        raise ValueError(f"unknown LongBench task {task!r}; known: {sorted(METRICS)}")
    if task in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max((METRICS[task](prediction, a, all_classes=all_classes) for a in answers), default=0.0)


def _classes_per_sample(all_classes, n: int) -> list:
    """all_classes as one entry per sample: a list of lists as given, else the task's one list (or None) n times."""
    return all_classes if all_classes and isinstance(all_classes[0], list) else [all_classes] * n


def task_score(task: str, predictions: list[str], answers: list[list[str]], all_classes=None,
               ndigits: int | None = 2) -> float:
    """LongBench task score: 100 x mean over samples of `score_prediction`, rounded to `ndigits` as eval.py writes
    result.json (None: unrounded). all_classes: one list for the task (eval.py passes the last sample's) or one per
    sample."""
    if not predictions:
        raise ValueError(f"task_score({task!r}): no predictions to score (eval.py would divide by zero); score a task "
                         "only once it has at least one prediction")
    per_sample = _classes_per_sample(all_classes, len(answers))
    scores = [score_prediction(task, p, a, c) for p, a, c in zip(predictions, answers, per_sample, strict=True)]
    value = 100.0 * sum(scores) / len(scores)
    return value if ndigits is None else round(value, ndigits)


# eval.py scorer_e's length buckets (LongBench-E), by the sample's "length" field (words; characters for Chinese).
LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")


def length_bucket(length: int) -> str:
    """eval.py scorer_e: "0-4k" below 4000, "4-8k" below 8000, else "8k+"."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def task_score_e(task: str, predictions: list[str], answers: list[list[str]], lengths: list[int], all_classes=None,
                 ndigits: int | None = 2) -> dict[str, float | None]:
    """LongBench-E score of one task per length bucket (eval.py scorer_e): 100 x the mean of `score_prediction` over
    the samples in the bucket, rounded to `ndigits`; None for an empty bucket (eval.py writes NaN there).
    all_classes: as in `task_score`."""
    if not (len(predictions) == len(answers) == len(lengths)):
        raise ValueError(f"task_score_e({task!r}): {len(predictions)} predictions, {len(answers)} answer lists and "
                         f"{len(lengths)} lengths; give one of each per sample")
    per_sample = _classes_per_sample(all_classes, len(answers))
    buckets: dict[str, list[float]] = {b: [] for b in LENGTH_BUCKETS}
    for p, a, n, c in zip(predictions, answers, lengths, per_sample, strict=True):
        buckets[length_bucket(n)].append(score_prediction(task, p, a, c))
    out = {}
    for name, scores in buckets.items():
        value = 100.0 * sum(scores) / len(scores) if scores else None
        out[name] = value if value is None or ndigits is None else round(value, ndigits)
    return out


def summarize(task_scores: dict[str, float]) -> dict:
    """Category means and the two averages from per-task scores (LongBench-E suffixes "_e" are dropped).

    Returns {"tasks", "categories": {name: mean of its tasks, None if one is missing}, "task_mean": mean over all 21
    tasks (the average of the official NAMM code, evo-memory's aggregate over tasks), "category_mean": mean of the six
    category means (the LongBench README's "Avg")}; an average is None until every task it needs is scored."""
    scores = {(t[:-2] if t.endswith("_e") else t): v for t, v in task_scores.items()}
    unknown = sorted(set(scores) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown LongBench tasks {unknown}")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    cats = {name: (mean([scores[t] for t in tasks]) if all(t in scores for t in tasks) else None)
            for name, tasks in CATEGORIES.items()}
    return {
        "tasks": scores,
        "categories": cats,
        "task_mean": mean([scores[t] for t in METRICS]) if set(METRICS) <= set(scores) else None,
        "category_mean": mean(list(cats.values())) if None not in cats.values() else None,
    }
