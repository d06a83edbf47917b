"""Long-memory language tasks built offline from the stdlib's Python reference prose (see corpus.py).

Three tasks, each a long context with the information needed at its end:
  passkey            a 5-digit pass key hidden once in filler prose;
  kv_retrieval       a few "secret code" key -> value sentences spread through the filler, one is asked for;
  passage_retrieval  labelled passages of reference prose; one passage's last sentence is repeated at the end
                     and the answer is its label.

Every prompt ends with an answer prefix in the needle's own wording ("... The pass key is"), so the answer
is a short continuation (" 12345"). All answers are digit strings. Samples are deterministic functions of (task, seed, target_tokens, tokenizer);
splits use disjoint seed ranges. Scoring: normalised exact match and per-character accuracy of the greedy
generation, and the teacher-forced answer log-likelihood (less noisy for a 135M model).
"""
from __future__ import annotations

import math
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .corpus import corpus_fingerprint, paragraphs, split_sentences

TASKS = ("passkey", "kv_retrieval", "passage_retrieval")
SPLITS = {"train": 0, "validation": 1_000_000, "test": 2_000_000}  # split -> first seed; ranges never overlap
SPLIT_SIZE = 1_000_000
STYLES = ("raw", "chat")
DEFAULT_STYLE = "raw"
LENGTH_TOLERANCE = 0.05  # prompts are built to within 5% of target_tokens (measured with the given tokenizer)

TokenCounter = Callable[[str], int]


def token_counter(tokenizer=None) -> TokenCounter:
    """Count tokens of a text with `tokenizer` (no special tokens); without one, estimate 4 characters a token."""
    if tokenizer is None:
        return lambda text: math.ceil(len(text) / 4)
    if callable(tokenizer) and not hasattr(tokenizer, "encode"):
        return tokenizer
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


# --------------------------------------------------------------------------------------------------- samples
@dataclass
class TaskSample:
    task: str
    split: str
    seed: int
    context: str  # instruction + long document (filler, needles or passages)
    question: str
    answer_prefix: str  # the prompt ends with this; the model should continue with answer_sep + answer
    answer: str
    metadata: dict = field(default_factory=dict)
    answer_sep: str = " "  # text between the answer prefix and the answer

    @property
    def continuation(self) -> str:
        """The gold continuation of the prompt (e.g. " 12345", leading space included)."""
        return self.answer_sep + self.answer

    def raw_prompt(self) -> str:
        return f"{self.context}\n\n{self.question}\n{self.answer_prefix}"

    def chat_messages(self) -> list[dict]:
        return [{"role": "user", "content": f"{self.context}\n\n{self.question}"}]

    def prompt(self, tokenizer=None, style: str = DEFAULT_STYLE) -> str:
        """The prompt text: "raw" (plain text) or "chat" (the tokenizer's chat template, then the answer prefix
        opening the assistant turn)."""
        if style == "raw":
            return self.raw_prompt()
        if style == "chat":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError("style='chat' needs a tokenizer with a chat template")
            head = tokenizer.apply_chat_template(self.chat_messages(), tokenize=False, add_generation_prompt=True)
            return head + self.answer_prefix
        raise ValueError(f"unknown style {style!r}; use one of {STYLES}")


PROTOCOLS = ("context-only", "query-aware")


def context_token_count(sample: TaskSample, tokenizer, style: str = DEFAULT_STYLE) -> int:
    """Number of prompt tokens up to the end of the context (instruction + document), i.e. where the question
    starts, counted in the tokenisation of the whole prompt (character offsets, so merges at the boundary are
    assigned to the token that holds them)."""
    text = sample.prompt(tokenizer, style)
    end = text.index(sample.context) + len(sample.context)
    enc = tokenizer(text, return_offsets_mapping=True)
    return sum(1 for a, _ in enc["offset_mapping"] if a < end)


def eviction_limit(sample: TaskSample, tokenizer, protocol: str, style: str = DEFAULT_STYLE) -> int:
    """Last token count at which an eviction step may run. "context-only": steps only while the context is read
    (the question and the answer are read into the pruned cache); "query-aware": the question is compressed too.
    Never inside the answer."""
    if protocol == "context-only":
        return context_token_count(sample, tokenizer, style)
    if protocol == "query-aware":
        return len(tokenizer(sample.prompt(tokenizer, style)).input_ids)
    raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")


def _fill(rng_start: int, budget: int, count: TokenCounter, sep_tokens: int = 1) -> list[str]:
    """Consecutive prose paragraphs from index `rng_start` (wrapping) until `budget` tokens; the last one is cut
    at a word boundary so the total lands on the budget."""
    paras, out, used, i = paragraphs(), [], 0, rng_start
    while used < budget:
        p = paras[i % len(paras)]
        i += 1
        n = count(p.text) + sep_tokens
        if used + n <= budget:
            out.append(p.text)
            used += n
            continue
        words = p.text.split()
        lo, hi = 0, len(words)  # largest word prefix that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(" ".join(words[:mid])) + sep_tokens <= budget - used:
                lo = mid
            else:
                hi = mid - 1
        if lo >= 4:
            out.append(" ".join(words[:lo]))
        break
    return out


def _insert(filler: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Insert needle paragraphs between filler paragraphs at fractional depths (0 = start, 1 = end)."""
    out = list(filler)
    for needle, depth in sorted(zip(needles, depths), key=lambda x: -x[1]):  # from the back keeps indices valid
        out.insert(round(depth * len(filler)), needle)
    return out


def _sized(build: Callable[[int], TaskSample], target_tokens: int, count: TokenCounter) -> TaskSample:
    """Call build(filler_budget) and correct the budget until the raw prompt is within tolerance of the target."""
    budget = target_tokens
    for _ in range(4):
        sample = build(max(budget, 0))
        n = count(sample.raw_prompt())
        if abs(n - target_tokens) <= max(4, 0.005 * target_tokens):
            break
        budget += target_tokens - n
    if abs(n - target_tokens) > LENGTH_TOLERANCE * target_tokens:
        warnings.warn(f"{sample.task} seed {sample.seed}: {n} prompt tokens for a target of {target_tokens}")
    sample.metadata.update(prompt_tokens=n, target_tokens=target_tokens, corpus=corpus_fingerprint())
    return sample


def _locate(sample: TaskSample, needle: str, count: TokenCounter) -> dict:
    """Character and token offsets (in the raw prompt) of a needle, plus its relative depth."""
    text = sample.raw_prompt()
    char = text.index(needle)
    tok = count(text[:char])
    return {"char": char, "token": tok, "depth": round(tok / max(count(text), 1), 4)}


# ---------------------------------------------------------------------------------------------- the tasks
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.")


def passkey_sample(seed: int, target_tokens: int = 1024, tokenizer=None, split: str = "train") -> TaskSample:
    """A 5-digit pass key stated once at a uniformly random depth of the filler."""
    rng = random.Random(f"passkey/{seed}")
    key, depth, start = str(rng.randint(10000, 99999)), rng.random(), rng.randrange(len(paragraphs()))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    count = token_counter(tokenizer)
    overhead = count(PASSKEY_INTRO) + count(needle) + 20

    def build(budget: int) -> TaskSample:
        body = _insert(_fill(start, budget - overhead, count), [needle], [depth])
        return TaskSample("passkey", split, seed, "\n\n".join([PASSKEY_INTRO, *body]),
                          "What is the pass key?", "The pass key is", key, {"requested_depth": depth})

    sample = _sized(build, target_tokens, count)
    sample.metadata["needles"] = [_locate(sample, needle, count)]
    return sample


KV_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white", "brown",
              "pink", "grey", "violet", "crimson", "amber")
KV_ANIMALS = ("falcon", "tiger", "otter", "badger", "heron", "walrus", "lizard", "panda", "rabbit", "beaver",
              "camel", "dolphin", "ferret", "gecko", "moose", "parrot", "salmon", "turtle", "zebra", "wolf")
KV_INTRO = ("The text below is a technical document. Hidden inside it are a few sentences that give the secret "
            "code of an animal. Memorize every secret code. I will ask you for one of them at the end.")


def kv_retrieval_sample(seed: int, target_tokens: int = 1024, tokenizer=None, split: str = "train",
                        num_pairs: int = 4, value_digits: int = 4) -> TaskSample:
    """`num_pairs` "The secret code of the <colour> <animal> is <digits>." sentences at random depths; one asked.
    Keys share no colour and no animal, values share no digit string."""
    rng = random.Random(f"kv_retrieval/{seed}")
    colours, animals = rng.sample(KV_COLOURS, num_pairs), rng.sample(KV_ANIMALS, num_pairs)
    keys = [f"{c} {a}" for c, a in zip(colours, animals)]
    values = [str(v) for v in rng.sample(range(10 ** (value_digits - 1), 10 ** value_digits), num_pairs)]
    depths = sorted(rng.random() for _ in keys)
    asked, start = rng.randrange(num_pairs), rng.randrange(len(paragraphs()))
    needles = [f"The secret code of the {k} is {v}." for k, v in zip(keys, values)]
    count = token_counter(tokenizer)
    overhead = count(KV_INTRO) + sum(count(n) for n in needles) + 30

    def build(budget: int) -> TaskSample:
        body = _insert(_fill(start, budget - overhead, count), needles, depths)
        return TaskSample("kv_retrieval", split, seed, "\n\n".join([KV_INTRO, *body]),
                          f"What is the secret code of the {keys[asked]}?",
                          f"The secret code of the {keys[asked]} is", values[asked],
                          {"keys": keys, "values": values, "asked": asked, "requested_depths": depths})

    sample = _sized(build, target_tokens, count)
    sample.metadata["needles"] = [_locate(sample, n, count) for n in needles]
    return sample


PR_INTRO = ("Below are {n} paragraphs from the Python language reference. Each paragraph ends with its label, a "
            "number in square brackets. After them, the last sentence of one paragraph is repeated.")
PR_QUESTION = ("Which paragraph ends with the sentence below? Repeat the sentence and complete it with the label of "
               "its paragraph.")
LB_INTRO = ("Here are {n} paragraphs from the Python language reference, along with a sentence quoted from one of them. "
            "Please determine which paragraph the sentence is from.")
LB_QUESTION = ('The following is the quoted sentence.\n\n"{quote}"\n\nPlease enter the number of the paragraph that '
               'the sentence is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.')


def _passage(topic_paras: list[int], rng: random.Random, limit: int, count: TokenCounter) -> tuple[str, int]:
    """Whole sentences from a random paragraph of one topic onwards, at most `limit` tokens: (text, tokens)."""
    paras = paragraphs()
    first = rng.randrange(len(topic_paras))
    text, n = "", 0
    for s in (s for j in topic_paras[first:] for s in split_sentences(paras[j].text)):
        cand = (text + " " + s).strip()
        c = count(cand)
        if c > limit:
            break
        text, n = cand, c
    return text, n


def _topics() -> dict[str, list[int]]:
    by_topic: dict[str, list[int]] = {}
    for i, p in enumerate(paragraphs()):
        by_topic.setdefault(p.topic, []).append(i)
    return by_topic


def passage_retrieval_sample(seed: int, target_tokens: int = 1024, tokenizer=None, split: str = "train",
                             passage_tokens: int = 96, layout: str = "label") -> TaskSample:
    """Passages of reference prose (each from a different topic); one passage's last sentence is repeated at the
    end and the answer is that passage's label.
    layout="label" (default): each passage ends, without its final full stop, with a distinct random label
    "... as follows [47]"; the prompt ends with "<quote> [" and the answer is "47". A 135M model can solve this;
    it cannot when numbers are sequential (it answers "last + 1") or when generic words separate the quote from
    the label (measured; see namm_transfer/language/README.md).
    layout="start": LongBench style, "Paragraph k: <text>", the first sentence quoted, "The answer is: Paragraph"
    and the answer "k" (a 135M model is at chance here).
    The quoted sentence has at least 6 words and occurs once in the context."""
    if layout not in ("label", "start"):
        raise ValueError(f"layout must be 'label' or 'start', not {layout!r}")
    rng = random.Random(f"passage_retrieval/{seed}")
    count = token_counter(tokenizer)
    by_topic = _topics()
    topics = sorted(by_topic)
    rng.shuffle(topics)
    for t, topic in enumerate(topics):  # the gold passage: the first topic giving a long enough quote
        gold, _ = _passage(by_topic[topic], rng, passage_tokens, count)
        sents = split_sentences(gold)
        quote = (sents[-1].rstrip(".:;!?") if layout == "label" else sents[0]) if sents else ""
        if len(quote.split()) >= 6:
            break
    else:
        raise ValueError(f"passage_retrieval seed {seed}: no passage fits passage_tokens={passage_tokens}")
    others, where, state = topics[t + 1:], rng.random(), rng.getstate()
    if layout == "label":
        intro, question, prefix = PR_INTRO, PR_QUESTION, f"{quote} ["
    else:
        intro, question, prefix = LB_INTRO, LB_QUESTION.format(quote=quote), "The answer is: Paragraph"
    fixed = count(intro) + count(question) + count(prefix) + count(gold) + 24

    def build(budget: int) -> TaskSample:
        rng.setstate(state)  # identical choices for every budget: only the number of passages changes
        filler, used = [], fixed
        for topic in others:
            limit = min(passage_tokens, budget - used - 8)
            if limit < 12:
                break
            text, n = _passage(by_topic[topic], rng, limit, count)
            if n >= 12 and quote not in text:
                filler.append(text)
                used += n + 8  # label and separator
        k = min(int(where * (len(filler) + 1)), len(filler))
        passages = filler[:k] + [gold] + filler[k:]
        if layout == "label":
            pool = [x for x in (range(10, 100) if len(passages) <= 60 else range(100, 1000))
                    if not any(f"[{x}]" in p for p in passages)]
            labels = [str(x) for x in rng.sample(pool, len(passages))]
            body = [f"{p.rstrip('.:;!?')} [{lab}]" for p, lab in zip(passages, labels)]
            answer, sep, extra = labels[k], "", {"labels": labels}
        else:
            body = [f"Paragraph {i + 1}: {p}" for i, p in enumerate(passages)]
            answer, sep, extra = str(k + 1), " ", {}
        context = "\n\n".join([intro.format(n=len(passages)), *body])
        return TaskSample("passage_retrieval", split, seed, context, question, prefix, answer,
                          {"num_passages": len(passages), "gold_index": k, "quote": quote, "layout": layout,
                           **extra}, answer_sep=sep)

    sample = _sized(build, target_tokens, count)
    needle = f"{sample.metadata['quote']} [{sample.answer}]" if layout == "label" else f"Paragraph {sample.answer}: "
    sample.metadata["needles"] = [_locate(sample, needle, count)]
    return sample


BUILDERS = {"passkey": passkey_sample, "kv_retrieval": kv_retrieval_sample,
            "passage_retrieval": passage_retrieval_sample}


def split_seeds(split: str, n: int, start: int = 0) -> range:
    """Seeds of a split: train [0, 1e6), validation [1e6, 2e6), test [2e6, 3e6)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLITS)}")
    if start < 0 or start + n > SPLIT_SIZE:
        raise ValueError(f"split {split!r} holds seeds 0..{SPLIT_SIZE - 1} relative to its start")
    return range(SPLITS[split] + start, SPLITS[split] + start + n)


def make_sample(task: str, seed: int, target_tokens: int = 1024, tokenizer=None, **options) -> TaskSample:
    """One sample of `task` for an absolute `seed` (its split is found from the seed range)."""
    if task not in BUILDERS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    split = next((s for s, base in SPLITS.items() if base <= seed < base + SPLIT_SIZE), None)
    if split is None:
        raise ValueError(f"seed {seed} is outside every split's range")
    return BUILDERS[task](seed, target_tokens, tokenizer, split=split, **options)


def make_split(task: str, split: str, n: int, target_tokens: int = 1024, tokenizer=None, start: int = 0,
               **options) -> list[TaskSample]:
    """`n` samples of `task` from `split` (seeds `split_seeds(split, n, start)`)."""
    return [make_sample(task, s, target_tokens, tokenizer, **options) for s in split_seeds(split, n, start)]


# ---------------------------------------------------------------------------------------------- scoring
def normalize_answer(text: str) -> list[str]:
    """Lower-cased alphanumeric words (punctuation and extra whitespace dropped)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the generation starts with the answer's words ("12345." and " 12345 is the key" both match,
    " 123456" and " 17" for "7" do not)."""
    gold = normalize_answer(answer)
    return float(bool(gold) and normalize_answer(prediction)[:len(gold)] == gold)


def char_accuracy(prediction: str, answer: str) -> float:
    """Fraction of answer characters matched position by position at the start of the generation."""
    pred = prediction.lstrip()
    return sum(a == b for a, b in zip(pred, answer)) / max(len(answer), 1)


def score_generation(prediction: str, answer: str) -> dict[str, float]:
    return {"em": exact_match(prediction, answer), "char_acc": char_accuracy(prediction, answer)}


@dataclass
class AnswerLogProb:
    logprob: float  # sum of log p(answer tokens | prompt, earlier answer tokens)
    num_tokens: int
    token_accuracy: float  # fraction of answer tokens that are the teacher-forced argmax
    greedy_match: bool  # every answer token is the argmax (teacher-forced exact match)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(self.num_tokens, 1)


def answer_logprob_from_logits(logits: torch.Tensor, answer_ids: torch.Tensor) -> AnswerLogProb:
    """`logits` (n, V): the predictions for the n answer tokens (the last prompt position first)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = answer_ids.reshape(-1).to(logits.device)
    hits = logits.argmax(-1) == ids
    return AnswerLogProb(float(logp.gather(-1, ids[:, None]).sum()), len(ids), float(hits.float().mean()),
                         bool(hits.all()))


def encode_prompt_answer(tokenizer, prompt: str, continuation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids (with the tokenizer's default special tokens) and continuation ids (none), each 1-D."""
    p = tokenizer(prompt, return_tensors="pt").input_ids[0]
    a = tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return p, a


@torch.no_grad()
def answer_loglik(model, tokenizer, prompt: str, continuation: str) -> AnswerLogProb:
    """Teacher-forced log-likelihood of `continuation` after `prompt` with one full-cache forward pass."""
    p, a = encode_prompt_answer(tokenizer, prompt, continuation)
    device = next(model.parameters()).device
    ids = torch.cat([p, a])[None].to(device)
    logits = model(input_ids=ids).logits[0, len(p) - 1:-1]
    return answer_logprob_from_logits(logits, a)
