"""Prompt strings, subtitle interleaving, answer parsing, accuracy tables and submission files against
hand-written expectations taken from the official evaluators:
LongVideoBench: lmms-eval tasks/longvideobench/utils.py + longvideobench_{val_v,val_i}.yaml, and the official
loader's insert_subtitles_into_frames; MLVU: JUNJIE99/MLVU choice_bench.py (qa_template, check_ans, llava_v1
conversation) and evaluation_test/test_bench.py (submission "option")."""

import json
import random

import pytest

from video.datasets import VideoQASample
from video.prompts import (
    MLVU_SYSTEM,
    VideoPrompt,
    build_prompt,
    chat_text,
    conversation,
    interleave_subtitles,
    lvb_interleaved_prompt,
    lvb_prompt,
    mlvu_prompt,
    mlvu_test_option,
    parse_answer,
    parse_lvb_answer,
    parse_mlvu_answer,
    video_prompt,
)
from video.scoring import accuracy_table, lvb_submission, make_record, mlvu_test_submission

LVB = VideoQASample("v_0", "v.mp4", "What is the man holding?", ["a cup", "a book", "a phone", "a key"], 2,
                    "longvideobench", duration=8.0, duration_group=60, category="S2O", subtitle_offset=1.0)
MLVU = VideoQASample("m_0", "m.mp4", "What color is the car?", ["Yellow", "Red", "Green", "Blue"], 0, "mlvu",
                     category="plotQA")


def test_lvb_prompt_snapshot():
    assert lvb_prompt(LVB) == (
        "What is the man holding?\n"
        "A. a cup\nB. a book\nC. a phone\nD. a key\n"
        "Answer with the option's letter from the given choices directly.\n"
    )
    assert video_prompt(LVB) == VideoPrompt(lvb_prompt(LVB)) and build_prompt(LVB) == lvb_prompt(LVB)


def test_mlvu_prompt_snapshot():
    p = mlvu_prompt(MLVU)
    assert p.text == ("Question: What color is the car?\nOptions:\n(A) Yellow\n(B) Red\n(C) Green\n(D) Blue"
                      "\nOnly give the best option.")
    assert p.system == ("Carefully watch this video and pay attention to every detail. Based on your observations, "
                        "select the best option that accurately addresses the question.")
    assert p.answer_prefix == "Best Option: (" and not p.frames_inline
    assert video_prompt(MLVU) == p and build_prompt(MLVU) == p.text


class TemplateProcessor:
    """The llava-hf/LLaVA-NeXT-Video-7B-hf chat template's rendering (system text bare, roles in capitals,
    placeholders first, text items + ' ', 'ASSISTANT:'), written out by hand."""

    def apply_chat_template(self, messages, add_generation_prompt=False):
        out = ""
        for m in messages:
            out += "" if m["role"] == "system" else m["role"].upper() + ": "
            out += "".join("<video>\n" for c in m["content"] if c["type"] == "video")
            out += "".join(c["text"] + " " for c in m["content"] if c["type"] == "text")
        return out + ("ASSISTANT:" if add_generation_prompt else "")


def test_mlvu_chat_equals_llava_v1_get_prompt2():
    # choice_bench.py: conv.system + " " + "USER: " + inp + " " + "ASSISTANT: " + "Best Option: (", with
    # inp = <video tokens> + "\n" + question + "\nOnly give the best option."
    expected = (MLVU_SYSTEM + " USER: <video>\nQuestion: What color is the car?\nOptions:\n(A) Yellow\n(B) Red\n"
                "(C) Green\n(D) Blue\nOnly give the best option. ASSISTANT: Best Option: (")
    assert chat_text(TemplateProcessor(), mlvu_prompt(MLVU)) == expected
    assert chat_text(TemplateProcessor(), video_prompt(LVB)) == "USER: <video>\n" + lvb_prompt(LVB) + " ASSISTANT:"


SUBTITLES = [
    {"timestamp": [1.5, 4.0], "text": "hello"},       # span 0.5..3.0 after the 1 s offset, midpoint 1.75
    {"timestamp": [2, 3], "text": "int end"},         # an integer end means the video's end: 1.0..7.0
    {"start": "00:00:05.00", "end": "00:00:05.50", "line": "short"},  # 4.0..4.5, widened to 3.75..4.75
    {"timestamp": [8.0, None], "text": "gone"},       # 7.0..7.0 -> 6.5..7.5 holds no frame: left out
]
FRAME_TIMES = [0.0, 2.0, 4.0, 6.0]


def test_interleave_subtitles_official_rule():
    assert interleave_subtitles(FRAME_TIMES, SUBTITLES, offset=1.0, duration=8.0) == [
        0, "hello", 1, 2, "int end", "short", 3]
    assert interleave_subtitles(FRAME_TIMES, [], 0.0, 8.0) == [0, 1, 2, 3]
    # a subtitle whose span holds no frame (strictly inside) is left out; frames after it still follow
    assert interleave_subtitles([0.0, 2.0], [{"timestamp": [0.5, 2.0], "text": "x"}], 0.0, 4.0) == [0, 1]


def test_lvb_interleaved_prompt_snapshot():
    text = lvb_interleaved_prompt(LVB, FRAME_TIMES, SUBTITLES)
    assert text == ("<video>\nhello\n<video>\n<video>\nint end\nshort\n<video>\n" + "What is the man holding?\n"
                    "A. a cup\nB. a book\nC. a phone\nD. a key\n"
                    "Answer with the option's letter from the given choices directly.\n")
    p = video_prompt(LVB, FRAME_TIMES, SUBTITLES)
    assert p == VideoPrompt(text, frames_inline=True)
    # the frames travel inside the text: the user turn has no separate video item
    assert chat_text(TemplateProcessor(), p) == "USER: " + text + " ASSISTANT:"
    with pytest.raises(ValueError):
        video_prompt(LVB, None, SUBTITLES)
    with pytest.raises(ValueError):
        video_prompt(MLVU, FRAME_TIMES, SUBTITLES)


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
    ("Based on the video, C) Green", "B"),  # lmms-eval's LVB rule: the first capital A-E ("B" of "Based")
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


@pytest.mark.parametrize("reply, letter", [
    ("A) Yellow", "A"),
    ("B", "B"),
    (" B \n", "B"),  # the reply is stripped first
    ("Based on the video, C) Green", "C"),  # check_ans: the character before the first ")"
    ("(B) Red", "B"),
    ("Best option: (C)", "C"),
    ("D)", "D"),
    ("B. Red", None),  # no ")": the whole reply must be the letter
    ("The answer is B", None),
    ("E) Cyan", None),  # MLVU dev has four options
    (") A", None),  # nothing before the ")"
    ("Green)", None),  # "n" is no option letter
    ("", None),
])
def test_mlvu_parse_check_ans(reply, letter):
    p = parse_mlvu_answer(reply)
    assert (p.letter, p.guess, p.prediction) == (letter, None, letter)
    assert (p.reason == "") == (letter is not None)


def test_mlvu_test_six_options_and_option_string():
    assert parse_mlvu_answer("F) a dog", num_options=6).letter == "F"
    # test_bench.py: the stripped reply up to the first ")", stripped again
    assert mlvu_test_option("A) Yellow") == "A"
    assert mlvu_test_option("Based on the video, C) Green") == "Based on the video, C"
    assert mlvu_test_option("  F ) x") == "F"
    assert mlvu_test_option(" D \n") == "D"


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


def test_mlvu_m_avg_is_the_mean_of_task_accuracies():
    a = [VideoQASample(f"a{i}", "v", "q", ["x", "y"], 0, "mlvu", category="count") for i in range(4)]
    b = [VideoQASample("b0", "v", "q", ["x", "y"], 1, "mlvu", category="ego")]
    recs = [make_record(s, r, parse_answer(s, r)) for s, r in zip(a + b, ["A)", "A)", "A)", "B)", "B)"])]
    table = accuracy_table(recs)
    assert table["by_category"] == {"count": 0.75, "ego": 1.0}
    assert table["category_mean"] == pytest.approx(0.875) and table["overall"] == pytest.approx(0.8)


def _test_split_records():
    test = [VideoQASample(f"t{i}", "v", "q", ["x", "y", "z"], None, "longvideobench", duration_group=15,
                          category="E2O") for i in range(3)]
    replies = ["B", "I cannot tell", ""]
    recs = [make_record(s, r, parse_answer(s, r, seed=0, index=i)) for i, (s, r) in enumerate(zip(test, replies))]
    recs[2] = make_record(test[2], "", parse_answer(test[2], ""), error="VideoDecodeError: broken")
    recs[2].prediction = None
    return recs


def test_withheld_answers_give_no_accuracy_but_a_submission():
    recs = _test_split_records()
    table = accuracy_table(recs)
    assert table["overall"] is None and table["category_mean"] is None and table["n"] == 3
    assert table["by_category"] == {} and table["n_errors"] == 1
    sub = lvb_submission([{"id": r.id, "prediction": r.prediction} for r in recs])
    guess = random.Random(0 + 1).choice("ABC")
    assert sub == {"t0": "B", "t1": guess, "t2": None}
    assert json.loads(json.dumps(sub)) == sub


def test_mlvu_test_submission_format():
    recs = [{"id": "AR_0", "category": "anomaly_reco", "response": "B) a fight"},
            {"id": "SQA_3", "category": "sportsQA", "response": "Based on the video, C) Green"},
            {"id": "TQA_1", "category": "tutorialQA", "response": None, "error": "VideoDecodeError: x"}]
    assert mlvu_test_submission(recs) == [
        {"question_id": "AR_0", "question_type": "anomaly_reco", "option": "B"},
        {"question_id": "SQA_3", "question_type": "sportsQA", "option": "Based on the video, C"},
        {"question_id": "TQA_1", "question_type": "tutorialQA", "option": ""},
    ]


def test_tiny_processor_renders_like_the_7b_template():
    from video.tiny_model import build_processor

    processor = build_processor()
    for prompt in (mlvu_prompt(MLVU), video_prompt(LVB), video_prompt(LVB, FRAME_TIMES, SUBTITLES)):
        assert chat_text(processor, prompt) == chat_text(TemplateProcessor(), prompt)
