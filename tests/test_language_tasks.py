"""Offline long-memory tasks: determinism, splits, answers in the prompt, prompt lengths, scoring."""
import math
import os

import pytest
import torch

from namm_transfer.language.corpus import corpus_fingerprint, paragraphs, split_sentences
from namm_transfer.language.evaluate import evaluate_sample, summarize
from namm_transfer.language.models import cache_dir, tiny_random_lm, tiny_tokenizer
from namm_transfer.language.tasks import (SPLITS, TASKS, AnswerLogProb, answer_loglik, answer_logprob_from_logits,
                                          char_accuracy, exact_match, make_sample, make_split, split_seeds,
                                          token_counter)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_corpus_is_prose():
    paras = paragraphs()
    assert len(paras) > 1000 and len(corpus_fingerprint()) == 12
    assert not any("::=" in p.text or ">>>" in p.text for p in paras)
    assert split_sentences("One sentence here. Another one follows. And a third.") == [
        "One sentence here.", "Another one follows.", "And a third."]


@pytest.mark.parametrize("task", TASKS)
def test_deterministic(task, tok):
    a = make_sample(task, 1_000_003, 1024, tok)
    b = make_sample(task, 1_000_003, 1024, tok)
    c = make_sample(task, 1_000_004, 1024, tok)
    assert a == b
    assert a.raw_prompt() != c.raw_prompt()
    assert a.split == "validation" and a.task == task


def test_splits_disjoint():
    ranges = {s: set(split_seeds(s, 1000, start=0)) | set(split_seeds(s, 10, start=999_990)) for s in SPLITS}
    names = list(ranges)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert not ranges[x] & ranges[y]
    assert [make_sample("passkey", s, 256).split for s in (0, 1_000_000, 2_999_999)] == ["train", "validation", "test"]
    with pytest.raises(ValueError):
        split_seeds("dev", 3)
    with pytest.raises(ValueError):
        split_seeds("train", 2, start=999_999)
    with pytest.raises(ValueError):
        make_sample("passkey", 3_000_000, 256)


@pytest.mark.parametrize("task", TASKS)
def test_answer_is_in_prompt(task, tok):
    for s in make_split(task, "train", 4, 768, tok):
        prompt = s.raw_prompt()
        assert s.answer.isdigit() and prompt.endswith(s.answer_prefix)
        if task == "passkey":
            assert f"The pass key is {s.answer}." in s.context and len(s.answer) == 5
        elif task == "kv_retrieval":
            key = s.metadata["keys"][s.metadata["asked"]]
            assert f"The secret code of the {key} is {s.answer}." in s.context
            assert len(set(s.metadata["values"])) == len(s.metadata["values"])
            assert s.context.count(f"of the {key} is") == 1
        else:
            quote, labels = s.metadata["quote"], s.metadata["labels"]
            assert f"{quote} [{s.answer}]" in s.context and s.context.count(quote) == 1
            assert len(set(labels)) == len(labels) == s.metadata["num_passages"]
            assert labels[s.metadata["gold_index"]] == s.answer and s.continuation == s.answer
            assert prompt.endswith(f"{quote} [")
        needle = s.metadata["needles"][0]
        assert 0 <= needle["token"] < s.metadata["prompt_tokens"]


def test_passage_retrieval_longbench_layout(tok):
    s = make_sample("passage_retrieval", 5, 1024, tok, layout="start", passage_tokens=320)
    assert s.raw_prompt().endswith("The answer is: Paragraph") and s.continuation == " " + s.answer
    assert f"Paragraph {s.answer}: {s.metadata['quote']}" in s.context


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("target", [1024, 2048, 3072])
def test_prompt_length_near_target(task, target, tok):
    count = token_counter(tok)
    options = {"passage_tokens": 320} if task == "passage_retrieval" else {}  # the tiny tokenizer is per character
    for seed in (0, 1):
        s = make_sample(task, seed, target, tok, **options)
        n = count(s.raw_prompt())
        assert n == s.metadata["prompt_tokens"]
        assert abs(n - target) <= 0.05 * target, (task, target, n)


def test_prompt_length_without_tokenizer():
    s = make_sample("passkey", 2, 1000)
    assert abs(math.ceil(len(s.raw_prompt()) / 4) - 1000) <= 50


@pytest.mark.skipif(not (cache_dir() / "smollm2-135m-instruct" / "tokenizer.json").is_file(),
                    reason="SmolLM2 not converted yet (load_causal_lm() does it once)")
def test_prompt_length_smollm2_tokenizer():
    from transformers import AutoTokenizer
    smol = AutoTokenizer.from_pretrained(str(cache_dir() / "smollm2-135m-instruct"))
    for task in TASKS:
        s = make_sample(task, 11, 1024, smol)
        assert abs(len(smol(s.raw_prompt()).input_ids) - 1024) <= 0.05 * 1024


def test_chat_style(tok):
    s = make_sample("passkey", 0, 300, tok)
    chat = s.prompt(tok, "chat")
    assert chat.startswith("<s>user\n") and chat.endswith("<s>assistant\n" + s.answer_prefix)
    assert s.context in chat and s.prompt() == s.raw_prompt()
    with pytest.raises(ValueError):
        s.prompt(None, "chat")
    with pytest.raises(ValueError):
        s.prompt(tok, "xml")


def test_exact_match_and_char_accuracy():
    assert exact_match(" 12345. Remember it.", "12345") == 1.0
    assert exact_match("12345\n", "12345") == 1.0
    assert exact_match(" 123456", "12345") == 0.0
    assert exact_match(" 17", "7") == 0.0
    assert exact_match(" 7)", "7") == 1.0
    assert exact_match("The pass key is 12345", "12345") == 0.0
    assert char_accuracy(" 12354", "12345") == pytest.approx(0.6)
    assert char_accuracy("", "12345") == 0.0
    assert char_accuracy(" 12345 and more", "12345") == 1.0


def test_answer_logprob_from_logits():
    logits = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    res = answer_logprob_from_logits(logits, torch.tensor([1, 2]))
    expected = (1 - math.log(math.e + 2)) + (0 - math.log(math.e ** 2 + 2))
    assert res.logprob == pytest.approx(expected, abs=1e-6)
    assert res.num_tokens == 2 and res.token_accuracy == 0.5 and not res.greedy_match
    assert res.mean_logprob == pytest.approx(expected / 2, abs=1e-6)


def test_answer_loglik_matches_manual(tok):
    model = tiny_random_lm("llama", seed=0)
    prompt, cont = "The pass key is", " 42"
    res = answer_loglik(model, tok, prompt, cont)
    p = tok(prompt).input_ids
    a = tok(cont, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0], -1)
    manual = sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a))
    assert isinstance(res, AnswerLogProb) and res.num_tokens == 3
    assert res.logprob == pytest.approx(manual, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_evaluate_sample_tiny(arch, tok):
    model = tiny_random_lm(arch, seed=0)
    s = make_sample("kv_retrieval", 0, 600, tok)
    r = evaluate_sample(model, tok, s, max_new_tokens=4)
    full = answer_loglik(model, tok, s.raw_prompt(), s.continuation)
    assert r.logprob == pytest.approx(full.logprob, abs=1e-3)  # cached teacher forcing == one full forward
    assert r.prompt_tokens == len(tok(s.raw_prompt()).input_ids)
    # greedy decoding with the cache equals greedy decoding by full forwards
    ids = tok(s.raw_prompt(), return_tensors="pt").input_ids
    for _ in range(4):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    expected = tok.decode(ids[0, r.prompt_tokens:].tolist(), skip_special_tokens=True)
    assert expected.startswith(r.prediction)
    assert summarize([r])["n"] == 1
