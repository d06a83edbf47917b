"""LongBench (THUDM/LongBench v1) for users who have the data locally: loading, prompts, truncation, metrics.

Files: `<root>/data/<task>.jsonl` (the layout of the released data.zip) or `<root>/<task>.jsonl`; one JSON object
a line with fields input, context, answers, length, dataset, language, all_classes, _id.

Metrics follow LongBench's definitions (reimplemented here): a prediction's score is the maximum over the gold
answers, a task's score is 100 x the mean over samples. The official NAMM fitness uses passage_retrieval_en,
dureader and narrativeqa with BOS added, no chat template and middle truncation to the model's length budget.
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# LongBench config/dataset2prompt.json ({context} and {input} are filled in).
PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                   "question as concisely as you can, using a single phrase if possible. Do not provide any "
                   "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as "
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
    raise FileNotFoundError(f"LongBench task {task!r} not found: expected {candidates[0]} or {candidates[1]} "
                            f"(the THUDM/LongBench data.zip unpacks to data/<task>.jsonl)")


def load_longbench(task: str, root: str | Path, limit: int | None = None) -> list[LongBenchSample]:
    """Read the samples of `task` (e.g. "passage_retrieval_en", or "hotpotqa_e" for LongBench-E)."""
    base = task[:-2] if task.endswith("_e") else task
    if base not in PROMPTS:
        raise ValueError(f"unknown LongBench task {task!r}; known: {sorted(PROMPTS)}")
    out = []
    with open(longbench_path(task, root), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            known = {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
            out.append(LongBenchSample(base, d.get("input", ""), d["context"], list(d["answers"]),
                                       int(d.get("length", 0)), d.get("language", ""), d.get("all_classes"),
                                       str(d.get("_id", len(out))), {k: v for k, v in d.items() if k not in known}))
            if limit is not None and len(out) >= limit:
                break
    return out


def truncate_middle(prompt: str, tokenizer, max_tokens: int) -> str:
    """Keep the first and last max_tokens // 2 tokens of a prompt that is longer than `max_tokens`
    (LongBench: decode both halves without special tokens and concatenate)."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return prompt
    half = max_tokens // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True) +
            tokenizer.decode(ids[-half:], skip_special_tokens=True))


def build_prompt(sample: LongBenchSample, tokenizer, max_prompt_tokens: int | None = None,
                 max_length: int | None = None) -> str:
    """Official prompt, middle-truncated to `max_prompt_tokens` (default: `max_length` - the task's max new
    tokens, as the NAMM code does with 32768). No chat template (the NAMM setting)."""
    if max_prompt_tokens is None and max_length is not None:
        max_prompt_tokens = max_length - MAX_NEW_TOKENS[sample.task]
    prompt = sample.prompt()
    return truncate_middle(prompt, tokenizer, max_prompt_tokens) if max_prompt_tokens else prompt


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


def retrieval_score(prediction: str, reference: str, **_) -> float:
    """passage_retrieval_en: the fraction of the numbers in the prediction that equal the gold paragraph id
    (taken from "Paragraph <id>" in the reference); 0 if the prediction has no number."""
    gold = re.findall(r"Paragraph (\d+)", reference)[0]
    numbers = re.findall(r"\d+", prediction)
    return sum(n == gold for n in numbers) / len(numbers) if numbers else 0.0


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """One longest common subsequence of x and y, backtracked from the end: on a match take it, else step
    towards the larger neighbour, preferring to drop y's word on ties (this choice fixes which words count)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    out, i, j = [], len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def _segments(text: str) -> list[list[str]]:
    """Split at '.', keep non-empty pieces, collapse whitespace and split words at single spaces."""
    return [" ".join(s.split()).split(" ") for s in text.split(".") if len(s) > 0]


def rouge_l_score(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F as LongBench gets it from the `rouge` 1.0.1 package: summary-level union LCS over '.'-separated
    segments, with the LCS words and both lengths counted as sets of distinct words; 0.0 for an empty side.
    (That package raises RecursionError, which LongBench scores as 0, when a pair exceeds about 1000 words;
    this iterative version returns the real value there.)"""
    hyp, ref = _segments(prediction), _segments(reference)
    if not hyp or not ref:
        return 0.0
    union = {w for r in ref for h in hyp for w in _lcs_words(r, h)}
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


def rouge_zh_score(prediction: str, reference: str, **_) -> float:
    """dureader, vcsum: jieba word segmentation (accurate mode) of both texts, then `rouge_l_score`."""
    jieba = _jieba()
    cut = lambda s: " ".join(jieba.cut(s, cut_all=False))  # noqa: E731
    return rouge_l_score(cut(prediction), cut(reference))


METRICS: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score, "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score, "musique": qa_f1_score, "triviaqa": qa_f1_score,
    "dureader": rouge_zh_score, "vcsum": rouge_zh_score,
    "gov_report": rouge_l_score, "qmsum": rouge_l_score, "multi_news": rouge_l_score, "samsum": rouge_l_score,
    "passage_retrieval_en": retrieval_score,
}


def score_prediction(task: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """Best metric value over the gold answers (first line only for the few-shot tasks)."""
    if task not in METRICS:
        raise NotImplementedError(f"no metric for LongBench task {task!r} here; implemented: {sorted(METRICS)}")
    if task in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max((METRICS[task](prediction, a, all_classes=all_classes) for a in answers), default=0.0)


def task_score(task: str, predictions: list[str], answers: list[list[str]], all_classes=None) -> float:
    """LongBench task score: 100 x mean over samples of `score_prediction`."""
    if not predictions:
        return 0.0
    scores = [score_prediction(task, p, a, all_classes) for p, a in zip(predictions, answers, strict=True)]
    return 100.0 * sum(scores) / len(scores)
