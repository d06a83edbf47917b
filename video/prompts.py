"""Prompts and answer parsing for video multiple-choice QA, as the official evaluators build and read them.

LongVideoBench follows lmms-eval (EvolvingLMMs-Lab/lmms-eval fdb5bfad, tasks/longvideobench/utils.py):
- `longvideobench_val_v` (default): "{question}\nA. {opt0}\nB. {opt1}\n...\nAnswer with the option's letter from
  the given choices directly.\n" after the video;
- `longvideobench_val_i` (`subtitles=True`): the frames and the subtitles interleaved in time order, one line
  each, before that text. The rule that places them is the official loader's (longvideobench/LongVideoBench
  fc3c5532, longvideobench_dataset.py `insert_subtitles_into_frames`; lmms-eval has the same). A frame is one
  `<video>` placeholder holding that single frame, since Llava-Next-Video reads videos, not images.
Parsing (lmms-eval `parse_multi_choice_response`): strip stock answer phrases, take the first capital A-E; a reply
of more than 10 words without one, or with none at all, gets a random letter (the LVB authors' rule); here the
guess is seeded with random.Random(seed + sample_index) and kept apart from the parsed letter.

MLVU follows its authors' evaluation (JUNJIE99/MLVU 228aa770, evaluation/models/videollava/choice_bench.py for the
dev set, evaluation_test/test_bench.py for the test set), rendered through the model's chat template:
    system "Carefully watch this video ... addresses the question."
    user   <video> "Question: {q}\nOptions:\n(A) {c0}\n(B) {c1}\n...\n(D) {c3}\nOnly give the best option."
    assistant turn opened with "Best Option: (" (the model continues it)
A reply is scored by check_ans: the character right before its first ")" (the whole stripped reply when there is
no ")") must equal the gold letter. The test-set submission keeps test_bench.py's "option": the stripped text
before the first ")". (The official run samples with temperature 0.1 and up to 1024 new tokens; the pipeline
decodes greedily, see video.pipeline.MAX_NEW_TOKENS.)
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from video.datasets import LETTERS, VideoQASample

LVB_POST_PROMPT = "Answer with the option's letter from the given choices directly.\n"
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
MLVU_SYSTEM = ("Carefully watch this video and pay attention to every detail. Based on your observations, select "
               "the best option that accurately addresses the question.")
MLVU_INSTRUCTION = "\nOnly give the best option."
MLVU_ANSWER_PREFIX = "Best Option: ("
FRAME_TOKEN = "<video>"  # LlavaNextVideoProcessor's video placeholder: here one frame each


@dataclass(frozen=True)
class VideoPrompt:
    """One chat turn about a video: the user text, an optional system text and the opening of the reply."""

    text: str  # after the video; with frames_inline it holds one FRAME_TOKEN per frame itself
    system: str | None = None
    answer_prefix: str = ""  # the assistant turn starts with this and the model continues it
    frames_inline: bool = False


# ------------------------------------------------------------------------------------------ LongVideoBench


def lvb_prompt(sample: VideoQASample) -> str:
    """LongVideoBench text prompt without subtitles, exactly as lmms-eval builds it."""
    lines = [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(sample.options)]
    return sample.question + "\n" + "\n".join(lines) + "\n" + LVB_POST_PROMPT


def _hms(t: str) -> float:
    h, m, s = t.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def subtitle_span(item: dict, offset: float, duration: float | None) -> tuple[float, float, str]:
    """(start, end, text) of one raw LongVideoBench subtitle, shifted by -offset, as the official loader reads it:
    {"timestamp": [start, end], "text"} (an end that is not a float, null or an integer, means the video's end)
    or {"start": "HH:MM:SS.ff", "end", "line"}."""
    if "timestamp" in item:
        start, end = item["timestamp"]
        if not isinstance(end, float):
            end = float("inf") if duration is None else duration
        text = item["text"]
    else:
        start, end, text = _hms(item["start"]), _hms(item["end"]), item["line"]
    return start - offset, end - offset, str(text)


def interleave_subtitles(frame_times: list[float], subtitles: list[dict], offset: float = 0.0,
                         duration: float | None = None) -> list[int | str]:
    """Frames (their positions 0..N-1) and subtitle texts in the official order.

    For each subtitle in file order: first every not yet placed frame whose time is <= the subtitle's midpoint;
    then the subtitle itself if some frame lies strictly inside its span (a span shorter than 1 s is widened to
    midpoint +- 0.5 s for that test). The frames left at the end follow."""
    out: list[int | str] = []
    placed = 0
    for item in subtitles:
        start, end, text = subtitle_span(item, offset, duration)
        mid = (start + end) / 2
        while placed < len(frame_times) and frame_times[placed] <= mid:
            out.append(placed)
            placed += 1
        if end - start < 1:
            start, end = mid - 0.5, mid + 0.5
        if any(start < t < end for t in frame_times):
            out.append(text)
    return out + list(range(placed, len(frame_times)))


def read_subtitles(sample: VideoQASample) -> list[dict]:
    """The sample's raw subtitle items (a JSON list); a sample without a subtitle file is an error."""
    if sample.subtitle_path is None:
        raise FileNotFoundError(f"sample {sample.id} has no subtitle file")
    with open(sample.subtitle_path, encoding="utf-8") as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ValueError(f"{sample.subtitle_path}: expected a JSON list of subtitles")
    return items


def lvb_interleaved_prompt(sample: VideoQASample, frame_times: list[float], subtitles: list[dict],
                           frame_token: str = FRAME_TOKEN) -> str:
    """lmms-eval `longvideobench_val_i` text: the interleaved frames and subtitles, one per line, then the
    question block of `lvb_prompt`; each frame is `frame_token`."""
    items = interleave_subtitles(frame_times, subtitles, sample.subtitle_offset, sample.duration)
    prefix = "\n".join(frame_token if isinstance(it, int) else it for it in items)
    return prefix + "\n" + lvb_prompt(sample)


# -------------------------------------------------------------------------------------------------- MLVU


def mlvu_question(sample: VideoQASample) -> str:
    """MLVU `qa_template`: "Question: {q}\nOptions:\n(A) {c0}\n..." without a trailing newline."""
    options = "".join(f"({LETTERS[i]}) {c}\n" for i, c in enumerate(sample.options))
    return (f"Question: {sample.question}\nOptions:\n" + options).rstrip()


def mlvu_prompt(sample: VideoQASample) -> VideoPrompt:
    """MLVU's multiple-choice chat (dev and test alike; the test set has six options)."""
    return VideoPrompt(mlvu_question(sample) + MLVU_INSTRUCTION, MLVU_SYSTEM, MLVU_ANSWER_PREFIX)


# ------------------------------------------------------------------------------------------------- chat


def video_prompt(sample: VideoQASample, frame_times: list[float] | None = None,
                 subtitles: list[dict] | None = None) -> VideoPrompt:
    """The prompt of the sample's dataset (the synthetic set uses LongVideoBench's); subtitles (raw items, with the
    times of the sampled frames) give LongVideoBench's interleaved variant."""
    if sample.dataset == "mlvu":
        if subtitles is not None:
            raise ValueError("MLVU has no subtitles")
        return mlvu_prompt(sample)
    if subtitles is None:
        return VideoPrompt(lvb_prompt(sample))
    if frame_times is None:
        raise ValueError("interleaving subtitles needs the times of the sampled frames")
    return VideoPrompt(lvb_interleaved_prompt(sample, frame_times, subtitles), frames_inline=True)


def build_prompt(sample: VideoQASample) -> str:
    """The user-turn text of `video_prompt(sample)` alone (no system text, answer prefix or subtitles)."""
    return video_prompt(sample).text


def conversation(text: str) -> list[dict]:
    """A one-turn chat for `processor.apply_chat_template`: the video first, then the text."""
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]


def chat_messages(prompt: VideoPrompt) -> list[dict]:
    """The chat of a prompt: an optional system turn, then the user turn (video first unless inline)."""
    user = [{"type": "text", "text": prompt.text}] if prompt.frames_inline else conversation(prompt.text)[0]["content"]
    system = [{"role": "system", "content": [{"type": "text", "text": prompt.system}]}] if prompt.system else []
    return system + [{"role": "user", "content": user}]


def chat_text(processor, prompt: VideoPrompt) -> str:
    """The model's input text: the chat template with a generation prompt, then " " + the answer prefix (as
    LLaVA's llava_v1 conversation writes "ASSISTANT: Best Option: (")."""
    text = processor.apply_chat_template(chat_messages(prompt), add_generation_prompt=True)
    return text + (" " + prompt.answer_prefix if prompt.answer_prefix else "")


# ---------------------------------------------------------------------------------------------- parsing


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


def mlvu_choice(response: str) -> str:
    """What MLVU's check_ans compares with the gold letter: the character before the first ")" of the stripped
    reply ("" when the reply starts with ")"), or the whole stripped reply when it has no ")"."""
    s = response.strip()
    cut = s.find(")")
    return s if cut < 0 else s[cut - 1:cut]


def mlvu_test_option(response: str) -> str:
    """test_bench.py's submitted "option": the stripped reply up to its first ")" (stripped again), or all of it."""
    s = response.strip()
    return s[:s.index(")")].strip() if ")" in s else s


def parse_mlvu_answer(response: str, num_options: int = 4) -> ParsedAnswer:
    """MLVU parsing (check_ans); anything but one of the option letters is wrong, with no guess."""
    choice = mlvu_choice(response)
    if len(choice) == 1 and choice in LETTERS[:num_options]:
        return ParsedAnswer(choice, "")
    if not response.strip():
        return ParsedAnswer(None, "empty response")
    return ParsedAnswer(None, f"{choice!r} is not an option letter")


def parse_answer(sample: VideoQASample, response: str, seed: int = 0, index: int = 0) -> ParsedAnswer:
    """Parse with the rule of the sample's dataset."""
    if sample.dataset == "mlvu":
        return parse_mlvu_answer(response, len(sample.options))
    return parse_lvb_answer(response, len(sample.options), seed, index)
