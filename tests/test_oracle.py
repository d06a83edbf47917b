"""The oracle reference (`eval_language.py --policies ...,oracle`): its scores equal the unmodified model's attention
from the question and answer, it keeps the top-scoring slots, and at budget 1 it is the full cache exactly."""
import json
import sys
from pathlib import Path

import pytest
import torch

from namm_transfer import FullCache, make_policy
from namm_transfer.language.benchmark import evaluate_batch, evaluate_sample, future_attention_scores
from namm_transfer.language.models import tiny_random_lm, tiny_tokenizer
from namm_transfer.language.tasks import TaskSample, eviction_limit
from namm_transfer.policies import FutureAttention, LayerView

ROOT = Path(__file__).resolve().parents[1]


def samples():
    filler = "The grass is green. The sky is blue. "
    return [TaskSample("passkey", "test", i, filler * (6 + 5 * i) + f"The pass key is {k}. " + filler * 2,
                       "What is the pass key?", "The pass key is", str(k)) for i, k in enumerate([31415, 27182, 16180])]


def test_scores_equal_the_eager_attention_of_the_question_and_answer():
    """Brute force: one eager forward of prompt + answer[:-1]; attention rows of the queries from `first_query` on,
    summed, averaged over the query heads of each KV head; every layer."""
    model, tok = tiny_random_lm("llama"), tiny_tokenizer()
    sample = samples()[1]
    first = eviction_limit(sample, tok, "context-only")
    got = future_attention_scores(model, tok, sample, first, chunk=16)
    prompt = tok(sample.prompt(tok)).input_ids
    answer = tok(sample.continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + answer[:-1]])
    ref_model = tiny_random_lm("llama")
    ref_model.set_attn_implementation("eager")
    with torch.no_grad():
        att = ref_model(ids, output_attentions=True).attentions
    kv = ref_model.config.num_key_value_heads
    assert len(got) == len(att) == ref_model.config.num_hidden_layers
    for layer, (mine, a) in enumerate(zip(got, att)):
        h, n = a.shape[1], a.shape[-1]
        ref = a[0, :, first:, :].sum(1).reshape(kv, h // kv, n).mean(1)
        assert mine.shape == (kv, n)
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5, msg=f"layer {layer}")
    assert first < ids.shape[1] - len(answer)  # the question's queries are counted, not only the answer's


def test_oracle_keeps_the_top_scoring_slots_by_position():
    """Rows of a view may be a subset of the cache's rows and slots out of position order: the oracle scores a slot
    by its own row's table at the slot's position."""
    g = torch.Generator().manual_seed(0)
    tables = [[torch.rand(2, 12, generator=g)] for _ in range(3)]
    pos = torch.stack([torch.randperm(10, generator=g) for _ in range(4)]).reshape(2, 2, 10)
    view = LayerView(0, torch.zeros(2, 2, 10, 4), torch.zeros(2, 2, 10, 4), pos, torch.ones(2, 2, 10, dtype=torch.bool),
                     None, 10, 10, 0, {}, rows=torch.tensor([2, 0]))
    keep, state = FutureAttention(4, scores=tables).step(view)
    assert state == {} and keep.sum(-1).eq(4).all()
    for b, row in enumerate([2, 0]):
        for h in range(2):
            s = tables[row][0][h][pos[b, h]]
            assert set(torch.nonzero(keep[b, h]).flatten().tolist()) == set(s.topk(4).indices.tolist())


def test_oracle_refuses_missing_or_mismatched_scores():
    with pytest.raises(ValueError, match="needs its scores"):
        make_policy("oracle", budget=0.5)
    view = LayerView(0, torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), torch.arange(5).expand(1, 2, 5),
                     torch.ones(1, 2, 5, dtype=torch.bool), None, 5, 5, 0, {})
    with pytest.raises(ValueError, match="3 KV heads at layer 0, the cache 2"):
        FutureAttention(2, scores=[[torch.rand(3, 5)]]).step(view)


def test_oracle_at_budget_one_is_the_full_cache_and_batches_like_single_samples():
    model, tok = tiny_random_lm("llama"), tiny_tokenizer()
    batch = samples()
    until = [eviction_limit(s, tok, "context-only") for s in batch]
    scores = [future_attention_scores(model, tok, s, u) for s, u in zip(batch, until)]
    full = evaluate_batch(model, tok, batch, FullCache(), "full", list("abc"), max_new_tokens=6, evict_until=until)
    # steps on the chunk boundaries (every 128 tokens), so both read the same forwards: equal to the last bit
    same = evaluate_batch(model, tok, batch, FutureAttention([1.0] * 3, scores, delay=128), "oracle", list("abc"),
                          max_new_tokens=6, budgets=[1.0] * 3, evict_until=until)
    for f, o in zip(full, same):
        assert (o.answer_prob, o.prediction, o.realised_fraction) == (f.answer_prob, f.prediction, 1.0)
    budgets = [0.4, 0.6, 0.5]
    together = evaluate_batch(model, tok, batch, FutureAttention(budgets, scores, delay=32), "oracle", list("abc"),
                              max_new_tokens=6, budgets=budgets, evict_until=until)
    for r, s in enumerate(batch):
        alone = evaluate_sample(model, tok, s, FutureAttention(budgets[r], [scores[r]], delay=32), "oracle", "abc"[r],
                                max_new_tokens=6, budget=budgets[r], evict_until=until[r])
        assert together[r].prediction == alone.prediction
        for field in ("answer_prob", "realised_fraction", "kept_fraction"):
            assert getattr(together[r], field) == pytest.approx(getattr(alone, field), abs=1e-5), (r, field)
        assert together[r].kept_fraction < 0.9


def test_eval_language_runs_the_oracle_at_namms_cache(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_inputs import script
    from namm_transfer import save_namm
    from namm_transfer.namm import NAMMConfig
    save_namm(tmp_path / "namm", torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5, None,
              NAMMConfig(delay=128))
    out = tmp_path / "eval"
    assert script("eval_language").main(["--model", "tiny-llama", "--namm", str(tmp_path / "namm"), "--tasks", "passkey",
                                         "--tokens", "300", "--n", "2", "--policies", "full,namm,oracle", "--out",
                                         str(out), "--no-progress"]) == 0
    rows = {(r["policy"], r["key"]): r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    oracle = [r for (p, _), r in rows.items() if p == "oracle"]
    assert len(oracle) == 2
    for r in oracle:
        assert r["budget"] == rows[("namm", r["key"])]["kept_fraction"]
    assert "| all | oracle |" in (out / "summary.md").read_text()
    assert "knows the question and the gold answer" in (out / "summary.md").read_text()
    assert {p["baseline"] for p in json.loads((out / "paired.json").read_text())} == {"oracle"}


def test_retained_mass_is_the_share_of_oracle_mass_each_row_still_holds():
    """retained_mass on a hand-made cache: per layer and KV head, the kept slots' oracle mass over the mass of every
    position before `first_query` (slots at or after it, invalid slots and duplicate-free gathers by position)."""
    from types import SimpleNamespace
    from namm_transfer.evolution.fitness import retained_mass
    oracle = [torch.tensor([[1., 2., 3., 4., 10.], [4., 0., 0., 4., 10.]])]  # (H=2, L=5); position 4 is a query
    pos = torch.tensor([[[3, 0, 4, 1], [1, 2, 4, 0]],  # row 0: head 0 keeps 3, 0, (4 is the question's), 1
                        [[2, 1, 0, 3], [3, 0, 1, 2]]])  # row 1: everything, but head 1's slot 1 (position 0) is invalid
    valid = torch.tensor([[[1, 1, 1, 1], [1, 1, 1, 0]], [[1, 1, 1, 1], [1, 0, 1, 1]]], dtype=torch.bool)
    cache = SimpleNamespace(kv_layers=[SimpleNamespace(positions=pos, valid=valid)])  # the layers holding keys
    got = retained_mass(cache, oracle, first_query=4)
    row0 = ((4 + 1 + 2) / 10 + (0 + 0) / 8) / 2
    row1 = (10 / 10 + 4 / 8) / 2
    torch.testing.assert_close(got, torch.tensor([row0, row1]))
    with pytest.raises(ValueError, match="layers"):
        retained_mass(cache, oracle * 2, 4)


def test_retained_mass_of_a_full_cache_is_one_and_of_the_oracle_the_most_at_its_budget():
    """On a model: keep-all holds all the oracle's mass; the oracle at a budget holds at least as much as recency at
    the same budget (it keeps the top-mass slots of each head by construction)."""
    from namm_transfer.evolution.fitness import encode_sample, score_rows
    from namm_transfer.language.benchmark import future_attention_from_ids
    model, tok = tiny_random_lm("llama"), tiny_tokenizer()
    sample = encode_sample(samples()[2], tok, protocol="context-only")
    first = sample.evict_until
    oracle = future_attention_from_ids(model, sample.stream, first, 16)
    got = {}
    for name, policy in [("full", FullCache()), ("recency", make_policy("recency", budget=0.5, delay=32)),
                         ("oracle", FutureAttention(0.5, delay=32, scores=[oracle]))]:
        got[name] = score_rows(model, sample, policy, 1, 16, share_prefix=False, oracle=oracle).retained_mass
    assert float(got["full"][0]) == pytest.approx(1.0, abs=1e-6)
    assert 0 < float(got["recency"][0]) <= float(got["oracle"][0]) < 1
