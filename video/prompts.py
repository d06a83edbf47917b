"""Prompts and answer parsing for video multiple-choice QA, following lmms-eval's tasks.

LongVideoBench (lmms-eval `longvideobench_val_v`, pre_prompt ""):
    "{question}\nA. {opt0}\nB. {opt1}\n...\nAnswer with the option's letter from the given choices directly.\n"
MLVU dev (lmms-eval `mlvu_dev`, pre_prompt "", post_prompt "\nOnly give the best option.\nBest option: ("),
with the options written into the question in MLVU's own "(A) ..." style:
    "{question}\n(A) {c0}\n(B) {c1}\n...\nOnly give the best option.\nBest option: ("
`legacy=True` gives the older lmms-eval MLVU text: "\n{question...}\nOnly give the best option.\n\nBest option: (".

Parsing (deterministic): strip stock answer phrases, then take the first capital option letter (A-E for
LongVideoBench, A-D for MLVU); a reply of more than 10 words without such a letter, or with none at all, is
unparsable. LongVideoBench's protocol then guesses a random letter (the LVB authors' rule); here the guess is
seeded with random.Random(seed + sample_index) and kept apart from the parsed letter. MLVU scores it wrong.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from video.datasets import LETTERS, VideoQASample

LVB_POST_PROMPT = "Answer with the option's letter from the given choices directly.\n"
MLVU_POST_PROMPT = "\nOnly give the best option.\nBest option: ("
ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
)


def lvb_prompt(sample: VideoQASample) -> str:
    """LongVideoBench text prompt (no subtitles), exactly as lmms-eval builds it."""
    lines = [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(sample.options)]
    return sample.question + "\n" + "\n".join(lines) + "\n" + LVB_POST_PROMPT


def mlvu_question(sample: VideoQASample) -> str:
    """Question with the candidates appended as "(A) ..." lines."""
    return sample.question + "\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(sample.options))


def mlvu_prompt(sample: VideoQASample, legacy: bool = False) -> str:
    """MLVU dev text prompt; ends with "Best option: (" so the model continues with a letter."""
    if legacy:
        return "\n" + mlvu_question(sample) + "\nOnly give the best option.\n" + "\n" + "Best option: ("
    return mlvu_question(sample) + MLVU_POST_PROMPT


def build_prompt(sample: VideoQASample) -> str:
    """The prompt for the sample's dataset (the synthetic set uses LongVideoBench's)."""
    return mlvu_prompt(sample) if sample.dataset == "mlvu" else lvb_prompt(sample)


def conversation(text: str) -> list[dict]:
    """A one-turn chat for `processor.apply_chat_template`: the video first, then the text."""
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]


@dataclass(frozen=True)
class ParsedAnswer:
    letter: str | None  # letter read from the reply; None when unparsable
    reason: str  # "" when parsed, else why not
    guess: str | None = None  # seeded fallback letter (LongVideoBench protocol only)

    @property
    def prediction(self) -> str | None:
        """The letter that is scored: the parsed one, else the fallback guess (may be None)."""
        return self.letter if self.letter is not None else self.guess


def extract_letter(response: str, letters: str) -> tuple[str | None, str]:
    """First capital letter from `letters` after stripping stock phrases; (None, reason) if there is none."""
    s = response.strip()
    if not s:
        return None, "empty response"
    for prefix in ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    match = re.search(f"[{letters}]", s)
    if len(s.split()) > 10 and match is None:
        return None, "more than 10 words and no option letter"
    if match is None:
        return None, "no option letter"
    return match.group(0), ""


def parse_lvb_answer(response: str, num_options: int = 5, seed: int = 0, index: int = 0) -> ParsedAnswer:
    """LongVideoBench parsing; an unparsable reply gets a guess from random.Random(seed + index)."""
    letter, reason = extract_letter(response, "ABCDE")
    if letter is not None:
        return ParsedAnswer(letter, "")
    return ParsedAnswer(None, reason, random.Random(seed + index).choice(LETTERS[:num_options]))


def parse_mlvu_answer(response: str) -> ParsedAnswer:
    """MLVU parsing; an unparsable reply stays None (scored wrong, no guess)."""
    letter, reason = extract_letter(response, "ABCD")
    return ParsedAnswer(letter, reason)


def parse_answer(sample: VideoQASample, response: str, seed: int = 0, index: int = 0) -> ParsedAnswer:
    """Parse with the rule of the sample's dataset."""
    if sample.dataset == "mlvu":
        return parse_mlvu_answer(response)
    return parse_lvb_answer(response, len(sample.options), seed, index)
