"""Batched language evaluation (`eval_language.py --batch-size B`): each sample's record equals its batch-1 record."""
import pytest
import torch

from namm_transfer import FullCache, H2O, NAMMPolicy
from namm_transfer.language.benchmark import evaluate_batch, evaluate_sample
from namm_transfer.language.models import tiny_random_lm, tiny_tokenizer
from namm_transfer.language.tasks import TaskSample, eviction_limit


def samples(tok):
    """Three passkey prompts of different lengths (a left-padded batch)."""
    filler = "The grass is green. The sky is blue. "
    return [TaskSample("passkey", "test", i, filler * (6 + 5 * i) + f"The pass key is {k}. " + filler * 2,
                       "What is the pass key?", "The pass key is", str(k)) for i, k in enumerate([31415, 27182, 16180])]


@pytest.mark.parametrize("protocol", [None, "context-only"])
def test_batch_records_equal_single_records(protocol):
    model, tok = tiny_random_lm("llama"), tiny_tokenizer()
    batch = samples(tok)
    until = [None if protocol is None else eviction_limit(s, tok, protocol) for s in batch]
    lengths = {len(tok(s.prompt(tok)).input_ids) for s in batch}
    assert len(lengths) == 3 and max(lengths) > 64
    budgets = [0.4, 0.6, 0.5]
    namm = NAMMPolicy(torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5, delay=32)
    for policy, per_row in ((FullCache(), [None] * 3), (namm, [None] * 3), (H2O(budgets, delay=32), budgets)):
        together = evaluate_batch(model, tok, batch, policy, policy.name, ["a", "b", "c"], max_new_tokens=6,
                                  budgets=per_row, evict_until=until)
        for r, s in enumerate(batch):
            single = policy if per_row[r] is None else H2O(per_row[r], delay=32)
            alone = evaluate_sample(model, tok, s, single, policy.name, "abc"[r], max_new_tokens=6,
                                    budget=per_row[r], evict_until=until[r])
            got = together[r]
            assert (got.prediction, got.em, got.budget, got.evict_until) == \
                (alone.prediction, alone.em, alone.budget, alone.evict_until)
            for field in ("answer_prob", "realised_fraction", "kept_fraction"):
                assert getattr(got, field) == pytest.approx(getattr(alone, field), abs=1e-5), (policy.name, r, field)
        if policy.evicts:
            assert min(r.kept_fraction for r in together) < 0.9
