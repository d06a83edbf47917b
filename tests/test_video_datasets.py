"""Loaders read test-made annotation files in the official (and hub-nested) LongVideoBench / MLVU layouts."""

import json

import pytest

from video.datasets import DatasetNotFoundError, load_dataset, load_longvideobench, load_mlvu, load_subtitles

LVB_RECORDS = [
    {
        "video_id": "vidA", "id": "vidA_0", "video_path": "vidA.mp4", "subtitle_path": "vidA_en.json",
        "question": "What does the man hold when the bell rings?", "candidates": ["a cup", "a book", "a phone", "a key"],
        "correct_choice": 2, "duration": 42.5, "duration_group": 60, "question_category": "S2O",
        "topic_category": "NP-News-Programs", "starting_timestamp_for_subtitles": 10.0, "level": "L2-Relation",
    },
    {
        "video_id": "vidB", "id": "vidB_3", "video_path": "vidB.mp4", "subtitle_path": "vidB_en.json",
        "question": "Which scene comes first?", "candidates": ["one", "two", "three", "four", "five"],
        "correct_choice": 4, "duration": 900.0, "duration_group": 3600, "question_category": "T3E",
        "topic_category": "KH-Knowledge", "starting_timestamp_for_subtitles": 0.0,
    },
]


def write_lvb(base, records=LVB_RECORDS, name="lvb_val.json"):
    (base / "videos").mkdir(parents=True, exist_ok=True)
    (base / "subtitles").mkdir(exist_ok=True)
    (base / name).write_text(json.dumps(records))
    (base / "subtitles" / "vidA_en.json").write_text(json.dumps([
        {"timestamp": [11.0, 13.0], "text": "hello"},
        {"timestamp": [40.0, None], "text": "bye"},
    ]))
    return base


def test_lvb_json_nested_hub_layout(tmp_path):
    write_lvb(tmp_path / "LongVideoBench")  # what `huggingface-cli download --local-dir LongVideoBench` leaves
    for root in (tmp_path, tmp_path / "LongVideoBench"):
        samples = load_longvideobench(root)
        assert [s.id for s in samples] == ["vidA_0", "vidB_3"]
        a, b = samples
        assert a.video_path == str(tmp_path / "LongVideoBench" / "videos" / "vidA.mp4")
        assert a.options == ["a cup", "a book", "a phone", "a key"] and a.answer == 2 and a.answer_letter == "C"
        assert (a.duration, a.duration_group, a.category, a.dataset) == (42.5, 60, "S2O", "longvideobench")
        assert a.extra["level"] == "L2-Relation" and a.extra["topic_category"] == "NP-News-Programs"
        assert a.subtitle_path is not None and b.subtitle_path is None  # vidB's subtitle file is absent
        assert load_subtitles(a) == [(1.0, 3.0, "hello"), (30.0, 32.5, "bye")]
        assert load_subtitles(b) == []


def test_lvb_hub_cache_snapshot_and_test_split(tmp_path):
    snap = tmp_path / "datasets--longvideobench--LongVideoBench" / "snapshots" / "0123abc"
    test_records = [{k: v for k, v in r.items() if k != "correct_choice"} for r in LVB_RECORDS]
    write_lvb(snap, test_records, name="lvb_test_wo_gt.json")
    samples = load_dataset("longvideobench", tmp_path, split="test")
    assert len(samples) == 2 and all(s.answer is None and s.answer_letter is None for s in samples)
    assert samples[0].video_path.startswith(str(snap / "videos"))


def test_lvb_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = []
    for r in LVB_RECORDS:
        row = {k: v for k, v in r.items() if k not in ("candidates", "level")}
        opts = r["candidates"] + ["N/A"] * (5 - len(r["candidates"]))
        row.update({f"option{i}": o for i, o in enumerate(opts)})
        rows.append(row)
    base = tmp_path / "LongVideoBench"
    write_lvb(base)
    pq.write_table(pa.Table.from_pylist(rows), base / "validation-00000-of-00001.parquet")
    from_parquet = load_longvideobench(tmp_path, source="parquet")
    from_json = load_longvideobench(tmp_path, source="json")
    assert from_parquet[0].options == ["a cup", "a book", "a phone", "a key"]  # "N/A" dropped
    for p, j in zip(from_parquet, from_json):
        assert (p.id, p.video_path, p.question, p.options, p.answer, p.duration_group, p.category) == (
            j.id, j.video_path, j.question, j.options, j.answer, j.duration_group, j.category)
    (base / "lvb_val.json").unlink()
    assert len(load_longvideobench(tmp_path)) == 2  # auto falls back to the parquet


MLVU_PLOT = [
    {"video": "movie101_66.mp4", "duration": 246.0, "question": "What color is the main male character in the video?",
     "candidates": ["Yellow", "Red", "Green", "Blue"], "answer": "Yellow", "question_type": "plotQA"},
]
MLVU_NEEDLE = [
    {"video": "needle_32.mp4", "duration": 467.0, "question": "What does the hand coming out of the computer do?",
     "candidates": ["Delivers a product", "Shakes hands", "Waves", "Points"], "answer": "Waves",
     "question_type": "findNeedle"},
]
MLVU_SUMMARY = [{"video": "summary_1.mp4", "duration": 600.0, "question": "Please summarize.",
                 "answer": "A story.", "question_type": "summary"}]


def write_mlvu(base, video_folder=lambda stem, qtype: stem):
    (base / "json").mkdir(parents=True)
    for stem, items in (("1_plotQA", MLVU_PLOT), ("2_needle", MLVU_NEEDLE), ("9_summary", MLVU_SUMMARY)):
        (base / "json" / f"{stem}.json").write_text(json.dumps(items))
        folder = base / "video" / video_folder(stem, items[0]["question_type"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / items[0]["video"]).write_bytes(b"\x00")


def test_mlvu_dev_hub_layout(tmp_path):
    write_mlvu(tmp_path / "MLVU")  # `huggingface-cli download MLVU/MVLU --local-dir <root>` gives <root>/MLVU/...
    for root in (tmp_path, tmp_path / "MLVU"):
        samples = load_mlvu(root)
        assert [s.id for s in samples] == ["mlvu_1_plotQA_0000", "mlvu_2_needle_0000"]  # summary (open-ended) skipped
        plot, needle = samples
        assert plot.video_path == str(tmp_path / "MLVU" / "video" / "1_plotQA" / "movie101_66.mp4")
        assert plot.answer == 0 and plot.category == "plotQA" and plot.dataset == "mlvu" and plot.duration == 246.0
        assert needle.answer == 2 and needle.answer_letter == "C" and needle.category == "findNeedle"
    assert [s.category for s in load_mlvu(tmp_path, tasks=["findNeedle"])] == ["findNeedle"]
    assert [s.category for s in load_mlvu(tmp_path, tasks=["1_plotQA"])] == ["plotQA"]


def test_mlvu_other_video_folders(tmp_path):
    write_mlvu(tmp_path, video_folder=lambda stem, qtype: qtype)  # video/plotQA/, video/findNeedle/
    plot, needle = load_dataset("mlvu", tmp_path)
    assert plot.video_path == str(tmp_path / "video" / "plotQA" / "movie101_66.mp4")
    assert needle.video_path == str(tmp_path / "video" / "findNeedle" / "needle_32.mp4")


def test_missing_datasets_say_how_to_get_them(tmp_path):
    for name, hint in (("longvideobench", "longvideobench/LongVideoBench"), ("mlvu", "MLVU/MVLU"),
                       ("synthetic", "generate_split")):
        with pytest.raises(DatasetNotFoundError) as e:
            load_dataset(name, tmp_path)
        assert hint in str(e.value) and "--dataset synthetic" in str(e.value)
    with pytest.raises(ValueError):
        load_dataset("videomme", tmp_path)


def test_malformed_mlvu_entries_and_escaping_paths_are_sample_problems(tmp_path):
    write_mlvu(tmp_path)
    bad = [*MLVU_PLOT, {"video": "x.mp4", "candidates": ["a", "b"], "answer": "a"},  # no question
           {**MLVU_PLOT[0], "video": "/etc/passwd"}, {**MLVU_PLOT[0], "question_type": "../../elsewhere"},
           {**MLVU_PLOT[0], "answer": None}, "not an object"]
    (tmp_path / "json" / "1_plotQA.json").write_text(json.dumps(bad))
    samples = load_mlvu(tmp_path, tasks=["plotQA"])
    assert [s.problem is None for s in samples] == [True, False, False, False, False, False]
    problems = [s.problem for s in samples[1:]]
    assert "missing ['question']" in problems[0] and "'/etc/passwd' points outside" in problems[1]
    assert "question_type '../../elsewhere' points outside" in problems[2] and "None" in problems[3]
    assert "a str, not an object" in problems[4]
    allowed = load_mlvu(tmp_path, tasks=["plotQA"], allow_outside=True)
    assert allowed[2].problem is None and allowed[2].video_path.endswith("/etc/passwd")


def test_mlvu_gold_naming_no_candidate_is_a_question_always_wrong(tmp_path):
    # JUNJIE99/MLVU choice_bench.py: the gold becomes "(@)" (answer index -1), which no reply matches; the question
    # stays in its task (the dev set has two: 2_needle.json entries 34 and 338)
    from video.prompts import parse_answer
    from video.scoring import accuracy_table, make_record

    write_mlvu(tmp_path)
    (tmp_path / "json" / "1_plotQA.json").write_text(json.dumps([MLVU_PLOT[0], {**MLVU_PLOT[0], "answer": "Purple"}]))
    ok, odd = load_mlvu(tmp_path, tasks=["plotQA"])
    assert odd.problem is None and odd.answer is None and odd.category == "plotQA"
    recs = [make_record(s, f"{s.answer_letter or 'A'})", parse_answer(s, f"{s.answer_letter or 'A'})"))
            for s in (ok, odd)]
    assert [r.correct for r in recs] == [True, False]
    assert accuracy_table(recs)["by_category"] == {"plotQA": 0.5}


def test_unusable_annotation_files_are_dataset_errors(tmp_path):
    from video.datasets import DatasetError
    write_lvb(tmp_path, [LVB_RECORDS[0], LVB_RECORDS[0]])
    with pytest.raises(DatasetError, match=r"sample ids \['vidA_0'\] occur more than once"):
        load_longvideobench(tmp_path)
    (tmp_path / "lvb_val.json").write_text('{"id": 1}')
    with pytest.raises(DatasetError, match="holds a JSON dict, expected a list"):
        load_longvideobench(tmp_path)
    (tmp_path / "lvb_val.json").write_text("[{")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        load_longvideobench(tmp_path)
    write_lvb(tmp_path, [{**LVB_RECORDS[0], "subtitle_path": "../../../secret.json"}])
    assert "subtitle_path '../../../secret.json' points outside" in load_longvideobench(tmp_path)[0].problem
    write_lvb(tmp_path)
    (tmp_path / "subtitles" / "vidA_en.json").write_text(json.dumps([{"timestamp": [1.0]}]))
    with pytest.raises(ValueError, match="vidA_en.json, item 0: not a subtitle"):
        load_subtitles(load_longvideobench(tmp_path)[0])
