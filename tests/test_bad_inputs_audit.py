"""Bad inputs found by an adversarial pass over the harnesses and loaders: each is refused with a message naming the
input and what to do (exit code 2 for the scripts), never a traceback or a silently wrong result."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_inputs import refused, save_tiny_dt, script
from namm_transfer import save_namm
from namm_transfer.checkpoints import load_namm
from namm_transfer.cli import UsageError, check_model_path, load_namm_arg
from namm_transfer.runs import open_run
from test_reporting_tables import LANG, write_dt, write_language, write_video


# ------------------------------------------------------------------------------------------- NAMM checkpoints


@pytest.fixture
def namm_dir(tmp_path):
    params = torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5
    return save_namm(tmp_path / "namm", params, None)


@pytest.mark.parametrize("field,value", [("ema_coeff", 5.0), ("threshold", float("nan")),
                                         ("recency_max_freq", float("inf")), ("hop", 64)])
def test_namm_config_values_that_would_score_garbage_are_refused(namm_dir, field, value):
    """An EMA coefficient > 1 (diverging spectrogram), a NaN threshold (keeps nothing), an infinite recency frequency
    or a hop longer than the STFT window all loaded before and ran silently."""
    info = json.loads((namm_dir / "config.json").read_text())
    info["config"][field] = value
    (namm_dir / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=f"'{field}'"):
        load_namm(namm_dir)


@pytest.mark.parametrize("change", ["bool", "int", "2-D"])
def test_namm_params_of_another_dtype_or_shape_are_refused(namm_dir, change):
    path = namm_dir / "namm.safetensors"
    params = load_file(str(path))["params"]
    params = {"bool": params > 0, "int": (params * 100).long(), "2-D": params.reshape(4, -1)}[change]
    save_file({"params": params.contiguous()}, str(path))
    with pytest.raises(ValueError, match="expected a 1-D float tensor"):
        load_namm(namm_dir)


def test_namm_negative_norm_count_is_refused(namm_dir):
    """A negative normalisation count was clamped to 1 silently."""
    info = json.loads((namm_dir / "config.json").read_text())
    info["norm_count"] = -5
    (namm_dir / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="'norm_count' = -5"):
        load_namm(namm_dir)


def test_official_namm_negative_norm_count_is_refused(tmp_path):
    from namm_transfer.checkpoints import _BUFFER_PREFIX
    from namm_transfer.namm import NAMMConfig

    cfg = NAMMConfig()
    torch.save({"evolution_state": {"mean": torch.zeros(cfg.num_params), _BUFFER_PREFIX + "mean": torch.zeros(
        cfg.num_bins), _BUFFER_PREFIX + "var": torch.ones(cfg.num_bins), _BUFFER_PREFIX + "num": torch.tensor(-3)}},
               tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="num'\\] = -3 is negative"):
        load_namm(tmp_path / "ckpt.pt")


def test_namm_pt_that_does_not_exist_says_what_to_pass(tmp_path):
    with pytest.raises(UsageError, match="no such file; pass a folder written by save_namm or scripts/train_namm.py"
                                         ".*official evo-memory ckpt.pt"):
        load_namm_arg(str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------------------------------------- DT checkpoints


@pytest.fixture
def dt_dir(tmp_path):
    return save_tiny_dt(tmp_path / "ckpt")


def _dt_args(ckpt, out):
    return ["--checkpoint", str(ckpt), "--policies", "full", "--episodes", "1", "--max-steps", "3", "--out", str(out),
            "--no-progress"]


@pytest.mark.parametrize("key,value", [("context_length", 0), ("return_scale", 0), ("return_scale", -1000.0)])
def test_dt_config_with_unusable_context_or_scale_is_refused(dt_dir, tmp_path, capsys, key, value):
    """context_length 0 and return_scale 0 crashed mid-rollout; a negative scale flipped the return target."""
    cfg = json.loads((dt_dir / "config.json").read_text())
    cfg[key] = value
    (dt_dir / "config.json").write_text(json.dumps(cfg))
    refused(script("run_dt").main, _dt_args(dt_dir, tmp_path / "out"), capsys, str(dt_dir), key)
    assert not (tmp_path / "out" / "episodes.jsonl").exists()


def test_dt_weights_missing_tensors_are_refused(dt_dir, tmp_path, capsys):
    """transformers fills missing tensors with fresh values; the DT then acted on them (or the NaN check named a
    weight that was never in the file)."""
    tensors = load_file(str(dt_dir / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("predict_action")}, str(dt_dir / "model.safetensors"))
    refused(script("run_dt").main, _dt_args(dt_dir, tmp_path / "out"), capsys, "lack", "predict_action")


def test_a_refused_dt_checkpoint_prints_only_the_error(dt_dir):
    """transformers' load report (a table of missing keys) no longer prints above the refusal."""
    import logging

    from envs.rollout import load_dt
    tensors = load_file(str(dt_dir / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("predict_action")}, str(dt_dir / "model.safetensors"))
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        with pytest.raises(ValueError, match="lack 2 of the model's tensors"):
            load_dt(dt_dir)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not any("LOAD REPORT" in m for m in seen), seen


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_dt_pickle_with_code_is_refused_without_traceback(dt_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (dt_dir / "model.safetensors").unlink()
    (dt_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"embed_state.weight": _Evil()}))
    refused(script("run_dt").main, _dt_args(dt_dir, tmp_path / "out"), capsys, "pytorch_model.bin",
            "can run code")
    assert not (tmp_path / "pwned").exists()


def test_dt_checkpoint_path_that_does_not_exist_is_not_blamed_on_the_hub(tmp_path, capsys):
    refused(script("run_dt").main, _dt_args(tmp_path / "no" / "such" / "dt", tmp_path / "out"), capsys,
            "no such folder")


@pytest.mark.parametrize("record,field", [({"foo": 1}, "rollout"),
                                          ({"rollout": "kv-cache", "policy": "full", "seed": 0, "episode": 0,
                                            "ret": None, "length": 3}, "ret")])
def test_dt_resume_with_a_record_this_script_does_not_write_is_refused(dt_dir, tmp_path, capsys, record, field):
    out = tmp_path / "out"
    out.mkdir()
    (out / "episodes.jsonl").write_text(json.dumps(record) + "\n")
    refused(script("run_dt").main, [*_dt_args(dt_dir, out), "--rollout", "kv"], capsys, "episodes.jsonl", field,
            "remove that line")


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(UsageError, match="--out .*results.json: cannot create this folder"):
        with open_run(tmp_path / "results.json", {}, "scripts/x.py", []):
            pass


def test_out_whose_lock_is_a_folder_is_refused(tmp_path):
    (tmp_path / "out" / ".lock").mkdir(parents=True)
    with pytest.raises(UsageError, match="\\.lock is a folder.*remove it"):
        with open_run(tmp_path / "out", {}, "scripts/x.py", []):
            pass


@pytest.mark.parametrize("name", ["./no/such/model", "{tmp}/x/y", "no/such/model"])
def test_model_path_that_does_not_exist_is_not_blamed_on_the_hub(tmp_path, name):
    with pytest.raises(UsageError, match="no such folder; pass a folder holding the model .* Hub id owner/name"):
        check_model_path(name.format(tmp=tmp_path))


@pytest.mark.parametrize("name", ["owner/name", "gpt2", "smollm2-135m"])
def test_hub_ids_are_left_to_the_loader(name):
    check_model_path(name)


# ---------------------------------------------------------------------------------------------------------- video


def _lvb_entry(**change):
    return {"id": "s0", "video_path": "s0.mp4", "question": "Which?", "candidates": ["red", "green", "blue"],
            "correct_choice": 1, **change}


@pytest.mark.parametrize("change,problem", [({"candidates": "red"}, "not a list of answer texts"),
                                            ({"candidates": list("abcdefgh"), "correct_choice": 7}, "at most 6"),
                                            ({"candidates": [None, None]}, "not a list of answer texts"),
                                            ({"correct_choice": 1.7}, "not an option index")])
def test_malformed_options_are_per_sample_problems(tmp_path, change, problem):
    """A string of candidates became one option per character; 8 options crashed the prompt (letters A-F)."""
    from video.datasets import load_dataset

    (tmp_path / "lvb_test.json").write_text(json.dumps([_lvb_entry(**change)]))
    (sample,) = load_dataset("synthetic", tmp_path, "test")
    assert sample.problem and problem in sample.problem


@pytest.mark.parametrize("duration", [float("nan"), -3.0, "12", True, [1]])
def test_bad_duration_is_a_per_sample_problem(tmp_path, duration):
    """A NaN, negative or non-numeric duration was accepted (and bounds the subtitles read)."""
    from video.datasets import load_dataset

    (tmp_path / "lvb_test.json").write_text(json.dumps([_lvb_entry(duration=duration)]))
    (sample,) = load_dataset("synthetic", tmp_path, "test")
    assert sample.problem and "not a number of seconds >= 0" in sample.problem


def test_video_model_folder_that_does_not_exist_is_not_blamed_on_the_hub(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lvb_test.json").write_text(json.dumps([_lvb_entry()]))
    refused(script("run_video").main, ["--dataset", "synthetic", "--data-root", str(tmp_path / "data"), "--model",
                                       str(tmp_path / "no" / "such" / "model"), "--policies", "full", "--out",
                                       str(tmp_path / "out"), "--no-progress"], capsys, "no such folder",
            "Hub id owner/name")


def test_video_snapkv_with_delay_within_its_window_runs(tmp_path):
    """SnapKV reads the queries since the last step when --delay <= its window (32): the refusal was stale."""
    from video.synthetic import SyntheticConfig, generate_split

    data = tmp_path / "data"
    generate_split(data, "test", num_samples=1, seed=0, config=SyntheticConfig(frame_counts=(64,)))
    out = tmp_path / "out"
    assert script("run_video").main(["--dataset", "synthetic", "--data-root", str(data), "--policies", "snapkv",
                                     "--delay", "16", "--budget", "0.5", "--frames", "8", "--out", str(out),
                                     "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--model",
                                     "tiny-random"]) == 0
    (rec,) = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert rec["policy"] == "snapkv" and not rec["error"]


def test_video_annotations_without_entries_are_refused(tmp_path, capsys):
    (tmp_path / "lvb_test.json").write_text("[]")
    refused(script("run_video").main, ["--dataset", "synthetic", "--data-root", str(tmp_path), "--out",
                                       str(tmp_path / "out"), "--no-progress"], capsys, "no samples")


def test_video_model_of_another_kind_is_refused_before_building_a_default_model(tmp_path, capsys, monkeypatch,
                                                                               dt_dir):
    """A folder holding another model type made from_pretrained build a default (7B) Llava-Next-Video: a hang."""
    import transformers

    def never(*a, **k):
        raise AssertionError("from_pretrained reached with a decision_transformer folder")

    monkeypatch.setattr(transformers.LlavaNextVideoForConditionalGeneration, "from_pretrained", never)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lvb_test.json").write_text(json.dumps([_lvb_entry()]))
    refused(script("run_video").main, ["--dataset", "synthetic", "--data-root", str(tmp_path / "data"), "--model",
                                       str(dt_dir), "--policies", "full", "--out", str(tmp_path / "out"),
                                       "--no-progress"], capsys, "decision_transformer", "Llava-Next-Video")


def test_video_cache_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "cache").write_text("x")
    refused(script("run_video").main, ["--dataset", "synthetic", "--cache-dir", str(tmp_path / "cache"),
                                       "--synthetic-samples", "1", "--out", str(tmp_path / "out"), "--no-progress"],
            capsys, "--cache-dir")


# ------------------------------------------------------------------------------------------------------- language


def _lang_args(tmp_path, *extra):
    return ["--tasks", "passkey", "--tokens", "300", "--n", "1", "--policies", "full", "--out",
            str(tmp_path / "out"), "--no-progress", *extra]


@pytest.mark.parametrize("model,expected", [("tiny-lama", "unknown tiny arch"), ("random-smol", "random-smollm2"),
                                            ("{dt}", "Pass a Hub id or a folder")])
def test_language_model_names_and_folders_that_are_no_causal_lm(tmp_path, capsys, dt_dir, model, expected):
    refused(script("eval_language").main, ["--model", model.format(dt=dt_dir), *_lang_args(tmp_path)], capsys,
            expected)


def test_language_model_folder_that_does_not_exist_is_not_blamed_on_the_hub(tmp_path, capsys):
    refused(script("eval_language").main, ["--model", str(tmp_path / "no" / "such" / "model"), *_lang_args(tmp_path)],
            capsys, "no such folder", "Hub id owner/name")


def test_language_prompt_past_learned_positions_is_refused_before_work(tmp_path, capsys):
    """tiny-gpt2 (2048 learned positions) on 3000-token prompts: an IndexError deep in the embedding before."""
    refused(script("eval_language").main, ["--model", "tiny-gpt2", *_lang_args(tmp_path, "--tokens", "3000")],
            capsys, "--tokens 3000", "learned position embeddings for 2048")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- make_tables


def _tables(capsys, *args):
    capsys.readouterr()
    code = script("make_tables").main([str(a) for a in args])
    return code, capsys.readouterr()


@pytest.mark.parametrize("damage", ["binary episodes", "ret a string", "score a string", "run.json a list",
                                    "answer_prob null", "headline a string"])
def test_make_tables_reports_damaged_results_without_traceback(tmp_path, capsys, damage):
    if damage in ("answer_prob null",):
        folder = write_language(tmp_path / "r", LANG, summary=False)
    elif damage == "headline a string":
        folder = write_video(tmp_path / "r", {"full": ([True], 1.0)})
    else:
        folder = write_dt(tmp_path / "r", {"full": (3000.0, 1.0)})
    if damage in ("binary episodes", "ret a string"):
        (folder / "summary.json").unlink()
    if damage == "binary episodes":
        (folder / "episodes.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    elif damage == "ret a string":
        rec = json.loads((folder / "episodes.jsonl").read_text().splitlines()[0])
        (folder / "episodes.jsonl").write_text(json.dumps({**rec, "ret": "high"}) + "\n")
    elif damage == "score a string":
        s = json.loads((folder / "summary.json").read_text())
        s["rows"][0]["score_d4rl_mean"] = "x"
        (folder / "summary.json").write_text(json.dumps(s))
    elif damage == "run.json a list":
        (folder / "run.json").write_text("[1]")
    elif damage == "answer_prob null":
        recs = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
        recs[0]["answer_prob"] = None
        (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    else:
        s = json.loads((folder / "summary.json").read_text())
        s["policies"]["full"]["headline"] = "high"
        (folder / "summary.json").write_text(json.dumps(s))
    code, out = _tables(capsys, folder, "--out", tmp_path / "t")
    assert code == 1 and "Traceback" not in out.err
    assert "Unreadable inputs" in out.out and str(folder) in out.out


def test_make_tables_out_that_is_a_file_is_refused(tmp_path, capsys):
    folder = write_dt(tmp_path / "r", {"full": (3000.0, 1.0)})
    (tmp_path / "table.md").write_text("old")
    refused(script("make_tables").main, [str(folder), "--out", str(tmp_path / "table.md")], capsys, "is a file")
