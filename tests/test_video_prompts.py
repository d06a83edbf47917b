"""Prompt snapshots (exact strings) and answer-parsing cases."""

import random

import pytest

from video.datasets import VideoQASample
from video.prompts import (
    build_prompt,
    conversation,
    lvb_prompt,
    mlvu_prompt,
    parse_answer,
    parse_lvb_answer,
    parse_mlvu_answer,
)
from video.scoring import accuracy_table, make_record

LVB = VideoQASample("v_0", "v.mp4", "What is the man holding?", ["a cup", "a book", "a phone", "a key"], 2,
                    "longvideobench", duration_group=60, category="S2O")
MLVU = VideoQASample("m_0", "m.mp4", "What color is the car?", ["Yellow", "Red", "Green", "Blue"], 0, "mlvu",
                     category="plotQA")


def test_lvb_prompt_snapshot():
    assert lvb_prompt(LVB) == (
        "What is the man holding?\n"
        "A. a cup\nB. a book\nC. a phone\nD. a key\n"
        "Answer with the option's letter from the given choices directly.\n"
    )


def test_mlvu_prompt_snapshots():
    assert mlvu_prompt(MLVU) == (
        "What color is the car?\n(A) Yellow\n(B) Red\n(C) Green\n(D) Blue\nOnly give the best option.\nBest option: ("
    )
    assert mlvu_prompt(MLVU, legacy=True) == (
        "\nWhat color is the car?\n(A) Yellow\n(B) Red\n(C) Green\n(D) Blue\nOnly give the best option.\n\nBest option: ("
    )
    assert build_prompt(MLVU) == mlvu_prompt(MLVU) and build_prompt(LVB) == lvb_prompt(LVB)


def test_conversation_shape():
    assert conversation("hi") == [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}]


@pytest.mark.parametrize("reply, letter", [
    ("C", "C"),
    ("C. a phone", "C"),
    ("(B)", "B"),
    ("The best answer is D.", "D"),
    ("The correct answer is A", "A"),
    ("Best option: (E)", "E"),
    ("D. A book", "D"),  # first letter wins, not the article inside the option
    ("  b  c E", "E"),  # only capital letters count
])
def test_lvb_parse(reply, letter):
    p = parse_lvb_answer(reply)
    assert p.letter == letter and p.reason == "" and p.guess is None and p.prediction == letter


@pytest.mark.parametrize("reply, reason", [
    ("", "empty response"),
    ("   ", "empty response"),
    ("i am not sure", "no option letter"),
    ("the video shows a man walking a dog in the park on a sunny day", "more than 10 words and no option letter"),
])
def test_lvb_unparsable_gets_seeded_guess(reply, reason):
    p = parse_lvb_answer(reply, num_options=4, seed=3, index=7)
    assert p.letter is None and p.reason == reason
    assert p.guess == random.Random(10).choice("ABCD") and p.prediction == p.guess
    assert parse_lvb_answer(reply, num_options=4, seed=3, index=7) == p  # deterministic
    guesses = {parse_lvb_answer(reply, 5, seed=0, index=i).guess for i in range(50)}
    assert guesses <= set("ABCDE") and len(guesses) > 1  # varies with the sample index


@pytest.mark.parametrize("reply, letter, reason", [
    ("A) Yellow", "A", ""),
    ("B", "B", ""),
    ("Best option: (C)", "C", ""),
    ("E", None, "no option letter"),  # MLVU dev has four options
    ("yellow", None, "no option letter"),
])
def test_mlvu_parse(reply, letter, reason):
    p = parse_mlvu_answer(reply)
    assert (p.letter, p.reason, p.guess, p.prediction) == (letter, reason, None, letter)


def test_parse_dispatch_and_scoring():
    recs = [
        make_record(LVB, "C", parse_answer(LVB, "C")),
        make_record(LVB, "??", parse_answer(LVB, "??", seed=0, index=1)),
        make_record(MLVU, "A)", parse_answer(MLVU, "A)")),
        make_record(MLVU, "", parse_answer(MLVU, ""), error="VideoDecodeError: missing"),
    ]
    assert [r.correct for r in recs[::2]] == [True, True] and recs[3].correct is False
    table = accuracy_table(recs)
    assert table["n"] == 4 and table["n_unparsed"] == 2 and table["n_errors"] == 1
    assert table["by_category"]["plotQA"] == 0.5 and table["by_duration_group"] == {60: table["by_category"]["S2O"]}
