"""scripts/run_longbench.py on a stand-in LongBench folder (official layout, tiny samples): pred.py-format files,
resume, scores equal to longbench.py's on the pred files, LongBench-E length buckets, clear errors on bad input, and
full-cache decoding equal to transformers' own greedy `generate` (pred.py's call) on the same truncated prompt."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from namm_transfer.cli import load_script
from namm_transfer.language import longbench as lb
from namm_transfer.language.models import tiny_config, tiny_tokenizer
from namm_transfer.policies import FullCache

rl = load_script("run_longbench")
TOK = tiny_tokenizer()  # character level: one token per character, so --max-length 200 truncates every prompt
NEWLINE = TOK.encode("\n", add_special_tokens=False)[-1]
TASKS = ("hotpotqa", "trec", "samsum")
CFG = rl.DecodeConfig(max_length=200)


def lively_lm():
    """A tiny random Llama whose greedy output varies (tiny_random_lm's repeats one character): wider initial
    weights, and the EOS and "\\n" rows of the tied embedding doubled so that predictions stop early."""
    cfg = tiny_config("llama")
    cfg.initializer_range = 0.3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[[TOK.eos_token_id, NEWLINE]] *= 2.0
    return model


def rows(task: str, n: int = 3, lengths=None) -> list[dict]:
    """Tiny samples of `task` in LongBench's fields (contexts long enough to be middle-truncated)."""
    classes = ["City", "Individual", "Country"] if task == "trec" else None
    return [{"input": f"Question {i}: where did Alice meet Bob?", "answers": [f"Paris {i}", "Paris"],
             "context": f"Sample {i}. Alice met Bob in Paris, by the river. " * (6 + i), "dataset": task,
             "length": (lengths or [300 + i] * n)[i], "language": "en", "all_classes": classes, "_id": f"{task}{i}"}
            for i in range(n)]


def write(path, items) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")


def stand_in(root) -> dict[str, list[dict]]:
    """Write the three tasks; hotpotqa sample 0's gold answer is what the full cache predicts (answers are not part
    of the prompt), so one score is not 0."""
    data = {t: rows(t) for t in TASKS}
    sample = lb.load_longbench("hotpotqa", _written(root, data))[0]
    data["hotpotqa"][0]["answers"] = [rl.predict(lively_lm(), TOK, rl.prompt_ids(sample, TOK, CFG), "hotpotqa",
                                                 FullCache()).text]
    _written(root, data)
    return data


def _written(root, data):
    for task, items in data.items():
        write(root / f"{task}.jsonl", items)
    return root


@pytest.fixture
def lively(monkeypatch):
    monkeypatch.setattr(rl, "load_model", lambda name, device, dtype: (lively_lm(), TOK, "generated (test)"))


def argv(data, out, *extra) -> list[str]:
    """The command line (a flag repeated in `extra` overrides: argparse keeps the last)."""
    return ["--data", str(data), "--tasks", ",".join(TASKS), "--model", "tiny-random", "--max-length", "200",
            "--policies", "full,h2o", "--budget", "0.5", "--delay", "64", "--out", str(out), "--no-progress", *extra]


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_pred_files_summary_and_resume(tmp_path, lively, capsys):
    data, out = tmp_path / "LongBench", tmp_path / "out"
    gold = stand_in(data)
    assert rl.main(argv(data, out)) == 0
    texts = {}
    for policy in ("full", "h2o"):
        expected = {}
        for task in TASKS:
            path = out / "pred" / policy / f"{task}.jsonl"
            lines = read_lines(path)
            assert [list(r) for r in lines] == [["pred", "answers", "all_classes", "length"]] * 3  # pred.py's
            assert [(r["answers"], r["all_classes"], r["length"]) for r in lines] == \
                [(g["answers"], g["all_classes"], g["length"]) for g in gold[task]]
            if task == "samsum":  # stops at "\n", which stays in the prediction (pred.py does not strip)
                assert all("\n" not in r["pred"][:-1] for r in lines)
            expected[task] = lb.task_score(task, [r["pred"] for r in lines], [r["answers"] for r in lines],
                                           lines[-1]["all_classes"])
            texts[path] = path.read_text(encoding="utf-8")
        summary = json.loads((out / "summary.json").read_text())["policies"][policy]
        want = lb.summarize(expected)
        assert {k: summary[k] for k in want} == want and summary["n"] == {t: 3 for t in TASKS}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policies"]["full"]["tasks"]["hotpotqa"] >= 33.33  # sample 0's gold is its prediction
    (pair,) = [r for r in summary["paired"] if r["task"] == "task mean"]  # full - h2o: the mean task-score gap
    assert (pair["method"], pair["baseline"]) == ("full", "h2o") and pair["low"] <= pair["diff"] <= pair["high"]
    gaps = [rl.sample_scores(t, read_lines(out / "pred" / "full" / f"{t}.jsonl")) for t in TASKS]
    base = [rl.sample_scores(t, read_lines(out / "pred" / "h2o" / f"{t}.jsonl")) for t in TASKS]
    assert pair["diff"] == pytest.approx(sum(sum(g) / 3 - sum(b) / 3 for g, b in zip(gaps, base)) / len(TASKS))
    assert "full - h2o" in (out / "summary.md").read_text()
    assert len({p.read_text() for p in texts}) == 6  # the predictions differ: resuming them is a real check
    records = read_lines(out / "records.jsonl")
    assert len(records) == 18
    assert all(r["kept_fraction"] == 0.5 and r["realised_fraction"] < 1 for r in records if r["policy"] == "h2o")
    assert "| hotpotqa |" in (out / "summary.md").read_text() and "| h2o | --budget" in capsys.readouterr().out

    # resume: one file loses its last line, another a torn half line; only those two samples run again
    h2o_samsum, full_trec = out / "pred/h2o/samsum.jsonl", out / "pred/full/trec.jsonl"
    h2o_samsum.write_text("".join(texts[h2o_samsum].splitlines(keepends=True)[:-1]), encoding="utf-8")
    full_trec.write_bytes(texts[full_trec].encode()[:-20])
    assert rl.main(argv(data, out)) == 0
    assert "2 to run" in capsys.readouterr().err
    assert {p: p.read_text(encoding="utf-8") for p in texts} == texts
    assert len(read_lines(out / "records.jsonl")) == 20

    # the data changed under the pred files: refused, not mixed
    gold["trec"][0]["answers"] = ["Country"]
    write(data / "trec.jsonl", gold["trec"])
    assert rl.main(argv(data, out)) == 2
    assert "does not belong to sample 1" in capsys.readouterr().err


def test_longbench_e_length_buckets(tmp_path, lively):
    data, out = tmp_path / "data", tmp_path / "out"
    write(data / "hotpotqa_e.jsonl", rows("hotpotqa", 3, lengths=[100, 5000, 9000]))
    assert rl.main(argv(data, out, "--e", "--tasks", "hotpotqa", "--policies", "full")) == 0
    lines = read_lines(out / "pred_e" / "full" / "hotpotqa.jsonl")
    assert [r["length"] for r in lines] == [100, 5000, 9000]
    summary = json.loads((out / "summary.json").read_text())["policies"]["full"]
    assert summary["length_buckets"]["hotpotqa"] == lb.task_score_e(
        "hotpotqa", [r["pred"] for r in lines], [r["answers"] for r in lines], [r["length"] for r in lines])
    assert set(summary["length_buckets"]["hotpotqa"]) == {"0-4k", "4-8k", "8k+"}
    assert "LongBench-E by length" in (out / "summary.md").read_text()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("longbench")
    for task in TASKS:
        write(root / f"{task}.jsonl", rows(task, 2))
    return root


@pytest.mark.parametrize("task", TASKS)
def test_full_cache_equals_transformers_greedy_generate(task, small_data):
    """pred.py's model.generate (greedy; samsum: stop at EOS or "\\n", min_length = prompt + 1) on the same prompt
    ids, with an unmodified copy of the model. The other tasks stop at the generation config's EOS, here set to
    include "\\n" so that both stop early."""
    model, reference = lively_lm(), lively_lm()
    for m in (model, reference):
        m.generation_config.eos_token_id = [TOK.eos_token_id, NEWLINE]
    lengths = []
    for sample in lb.load_longbench(task, small_data):
        ids = rl.prompt_ids(sample, TOK, CFG)
        assert len(ids) <= CFG.max_length < len(TOK(sample.prompt()).input_ids)  # truncated in the middle
        ours = rl.predict(model, TOK, ids, task, FullCache())
        extra = {"eos_token_id": [TOK.eos_token_id, NEWLINE], "min_length": len(ids) + 1} if task == "samsum" else {}
        hf = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=lb.MAX_NEW_TOKENS[task], num_beams=1, do_sample=False,
                                pad_token_id=TOK.pad_token_id, **extra)[0, len(ids):]
        assert ours.text == TOK.decode(hf, skip_special_tokens=True) and ours.new_tokens == len(hf)
        lengths.append(ours.new_tokens)
    assert min(lengths) < lb.MAX_NEW_TOKENS[task]  # a stop token ended one, not the length limit


def test_samsum_no_stop_token_first(small_data):
    """pred.py's min_length: a stop token as the first greedy choice is skipped (here the stop set is made to hold
    the model's first choice), exactly as transformers does it."""
    model, reference = lively_lm(), lively_lm()
    sample = lb.load_longbench("samsum", small_data)[0]
    ids = rl.prompt_ids(sample, TOK, CFG)
    with torch.no_grad():
        first = int(reference(torch.tensor([ids])).logits[0, -1].argmax())
    tok = tiny_tokenizer()
    tok.eos_token = tok.convert_ids_to_tokens(first)  # samsum stops at [eos, "\n"]: the first choice is a stop token
    assert rl.stop_ids(model, tok, "samsum") == {first, NEWLINE}
    ours = rl.predict(model, tok, ids, "samsum", FullCache())
    hf = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=128, do_sample=False, eos_token_id=[first, NEWLINE],
                            min_length=len(ids) + 1, pad_token_id=NEWLINE)[0, len(ids):]
    assert int(hf[0]) != first and ours.new_tokens == len(hf) and ours.text == tok.decode(hf, skip_special_tokens=True)


def test_chat_template_only_where_pred_py_formats_chat(small_data):
    model, tok, note = rl.load_model("tiny-random", "cpu", torch.float32)
    assert note == "generated (seed 0)" and tok.chat_template
    chat = rl.DecodeConfig(max_length=200, chat_template=True)
    qa, trec = lb.load_longbench("hotpotqa", small_data)[0], lb.load_longbench("trec", small_data)[0]
    assert tok.decode(rl.prompt_ids(qa, tok, chat)).startswith("<s>user\nAnswer the question")
    assert tok.decode(rl.prompt_ids(qa, tok, chat)).endswith("Answer:</s>\n<s>assistant\n")
    assert rl.prompt_ids(trec, tok, chat) == rl.prompt_ids(trec, tok, CFG)  # few-shot tasks: never templated


def test_pred_lines_end_at_newline_only(tmp_path):
    """A prediction holding U+2028 / U+0085 (raw in an ensure_ascii=False line) stays one line, as eval.py reads it;
    a torn last line is cut off; a malformed line is an error naming it."""
    path = tmp_path / "p.jsonl"
    odd = {"pred": "a\u2028b\x85c", "answers": ["x"], "all_classes": None, "length": 1}
    path.write_text(json.dumps(odd, ensure_ascii=False) + "\n" + '{"pred": "to', encoding="utf-8")
    assert rl.read_preds(path) == [odd] and path.read_text(encoding="utf-8").count("\n") == 1
    path.write_text('{"pred": 1, "answers": []}\n', encoding="utf-8")
    with pytest.raises(rl.UsageError, match="line 1: not a LongBench prediction"):
        rl.read_preds(path)


def test_bad_inputs_say_what_to_do(tmp_path, monkeypatch, capsys):
    def no_model(*_):
        raise AssertionError("the model must not load before the inputs are checked")

    monkeypatch.setattr(rl, "load_model", no_model)
    out = tmp_path / "out"
    assert rl.main(argv(tmp_path / "missing", out)) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "data.zip" in err and "THUDM/LongBench" in err

    data = tmp_path / "data"
    write(data / "hotpotqa.jsonl", rows("hotpotqa", 2))
    assert rl.main(argv(data, out, "--tasks", "hotpotqa,trec")) == 2
    err = capsys.readouterr().err
    assert "'trec' not found" in err and str(data / "trec.jsonl") in err and "data.zip" in err

    with pytest.raises(SystemExit) as exit_info:
        rl.main(argv(data, out, "--tasks", "hotpotqa,nosuch"))
    assert exit_info.value.code == 2 and "unknown ['nosuch']" in capsys.readouterr().err

    assert rl.main(argv(data, out, "--e", "--tasks", "hotpotqa")) == 2  # LongBench-E file missing
    assert "hotpotqa_e.jsonl" in capsys.readouterr().err
    assert rl.main(argv(data, out, "--e", "--tasks", "narrativeqa")) == 2
    assert "LongBench-E has no ['narrativeqa']" in capsys.readouterr().err

    (data / "hotpotqa.jsonl").write_text(json.dumps(rows("hotpotqa", 1)[0]) + "\n{not json\n", encoding="utf-8")
    assert rl.main(argv(data, out, "--tasks", "hotpotqa")) == 2
    err = capsys.readouterr().err
    assert f"{data / 'hotpotqa.jsonl'}, line 2: not valid JSON" in err
    (data / "hotpotqa.jsonl").write_text('{"input": "q", "answers": "Paris"}\n', encoding="utf-8")
    assert rl.main(argv(data, out, "--tasks", "hotpotqa")) == 2
    assert "line 1: not a LongBench sample" in capsys.readouterr().err
    assert not out.exists()  # nothing written for a command that could not start


def test_eviction_steps_stop_with_the_prompt_unless_asked(small_data):
    """--evict-during prompt (default): no step after the prompt's last token, the answer is decoded into the
    pruned cache; --evict-during answer: steps go on at every multiple of the delay while decoding."""
    from namm_transfer.language.models import tiny_random_lm
    from namm_transfer.policies import make_policy

    model = tiny_random_lm("llama")  # repeats one character: decodes all 32 new tokens of hotpotqa
    sample = lb.load_longbench("hotpotqa", small_data)[0]
    ids = rl.prompt_ids(sample, TOK, CFG)
    runs = {mode: rl.predict(model, TOK, ids, "hotpotqa", make_policy("h2o", budget=0.5, delay=16), evict_during=mode)
            for mode in rl.EVICT_DURING}
    n, total = len(ids), len(ids) + runs["answer"].new_tokens
    assert runs["prompt"].new_tokens == runs["answer"].new_tokens == lb.MAX_NEW_TOKENS["hotpotqa"]
    assert runs["prompt"].step_tokens == list(range(16, n + 1, 16))
    assert runs["answer"].step_tokens == list(range(16, total, 16))  # the last token's step never runs: it is not read
    assert runs["answer"].step_tokens[-1] > n
    with pytest.raises(ValueError, match="evict_during"):
        rl.predict(model, TOK, ids, "hotpotqa", FullCache(), evict_during="question")


def test_paired_differences_weight_each_task_as_its_score_does():
    """The 'task mean' difference is the mean of the per-task score differences (tasks of 2 and 4 samples weigh the
    same), its interval comes from resamples that keep each task's count, and per-task rows are plain paired means."""
    scores = {"namm": {"a": [100.0, 0.0], "b": [50.0, 50.0, 50.0, 50.0]},
              "h2o": {"a": [0.0, 0.0], "b": [50.0, 50.0, 50.0, 10.0]}}
    rows = {r["task"]: r for r in rl.paired_differences(scores, "namm")}
    assert rows["a"]["diff"] == pytest.approx(50.0) and rows["b"]["diff"] == pytest.approx(10.0)
    assert rows["task mean"]["diff"] == pytest.approx((50.0 + 10.0) / 2) and rows["task mean"]["n"] == 6
    assert rows["task mean"]["low"] <= 30.0 <= rows["task mean"]["high"]
    # the extreme resamples: task a's two samples both 0 or both 100 (diff 0 / 100), b's 0 or 40 -> [0, 70] at most
    assert 0.0 <= rows["task mean"]["low"] and rows["task mean"]["high"] <= 70.0
    same = rl.paired_differences({"x": scores["namm"], "y": scores["namm"]}, "x")
    assert all(r["diff"] == r["low"] == r["high"] == 0.0 for r in same)
