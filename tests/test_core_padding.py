"""Left-padded batches of prompts of different lengths: every row gets what its prompt alone gets, with its own
positions and eviction steps; padding is never a token seen, scored or kept."""
import pytest
import torch

from namm_transfer import FullCache, H2O, MemoryCache, NAMMPolicy, SnapKV, enable_memory_attention
from namm_transfer.adapters.causal_lm import generate
from namm_transfer.policies import LayerView, MemoryPolicy

from helpers_core import tiny_model
from helpers_families import VOCAB, family_model

LENGTHS = [300, 233, 170]  # row 2 has 130 padding columns: its steps fall at other columns than row 0's
NEW = 10


def padded_batch(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - n for n in lengths])[:, None]).long()
    return prompts, ids, mask


def policies():
    return [FullCache(), H2O(0.5, delay=64),
            NAMMPolicy(torch.randn(4172, generator=torch.Generator().manual_seed(1)) * 0.5, delay=64)]


def assert_rows_equal_alone(model, prompts, tokens, step_logits, policy):
    for r, p in enumerate(prompts):
        alone = generate(model, p[None], policy, max_new_tokens=NEW, chunk_size=40, keep_logits=True)
        assert tokens[r] == alone.tokens[0], (policy.name, r)
        for a, b in zip(alone.step_logits, step_logits):
            assert torch.allclose(a[0], b[r].float(), atol=1e-4), (policy.name, r, (a[0] - b[r]).abs().max())


@pytest.mark.parametrize("name", ["llama", "gemma2", "deepseek_v3-mla", "olmo_hybrid-linear", "falcon_h1-hybrid"])
def test_padded_batch_equals_each_prompt_alone(name):
    """gemma2: sliding windows + soft-cap, so each row's window must be measured on its own columns;
    deepseek_v3-mla: the rows' latents evict independently, their expansion follows each row's slots;
    olmo_hybrid-linear, falcon_h1-hybrid: linear-attention / Mamba states held whole beside the evicting rows."""
    model = tiny_model(name) if name == "llama" else family_model(name)
    prompts, ids, mask = padded_batch()
    for policy in policies() if name == "llama" else policies()[2:]:
        res = generate(model, ids, policy, max_new_tokens=NEW, chunk_size=40, attention_mask=mask, keep_logits=True)
        assert_rows_equal_alone(model, prompts, res.tokens, res.step_logits, policy)
        if policy.evicts:
            assert res.realised_fraction < 0.8


def test_transformers_generate_with_a_memory_cache_on_a_padded_batch():
    """`model.generate(..., cache=MemoryCache(policy))` (or `past_key_values=`): one-shot prefill of the padded batch (the cache
    cuts it at every row's eviction steps), then transformers' own decoding loop."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    enable_memory_attention(model)
    prompts, ids, mask = padded_batch()
    for policy in policies():
        cache = MemoryCache(policy)
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[:, ids.shape[1]:].tolist()
        assert_rows_equal_alone(model, prompts, tokens, out.logits, policy)
        assert cache.row_tokens_seen() == [n + NEW - 1 for n in LENGTHS]


class Spy(MemoryPolicy):
    """Evicts the oldest valid slot of every head at each step and records what it was shown."""

    name = "spy"
    needs_attention = True

    def __init__(self, delay):
        super().__init__(delay)
        self.views: list[LayerView] = []

    def step(self, view):
        self.views.append(view)
        first = view.valid.float().argmax(-1, keepdim=True)
        return view.valid & (torch.arange(view.valid.shape[-1]) != first), {}


def test_padding_is_never_seen_scored_or_kept():
    model = tiny_model("llama")
    prompts, ids, mask = padded_batch()
    spy = Spy(delay=32)
    enable_memory_attention(model)
    cache = MemoryCache(spy)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True,
              position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert cache.row_tokens_seen() == LENGTHS and cache.tokens_seen == max(LENGTHS)
    steps = {}
    for view in spy.views:
        for i, row in enumerate(view.rows.tolist()):
            steps.setdefault((view.layer_idx, row), []).append(view.tokens_seen)
            # the view holds the row's own tokens only: positions 0.. of its prompt (one evicted per earlier step)
            pos = view.positions[i, 0][view.valid[i, 0]]
            assert pos.tolist() == list(range(len(steps[(view.layer_idx, row)]) - 1, view.tokens_seen))
            # the attention rows are the row's own last `delay` queries: each a distribution over its own tokens
            assert view.attention.shape[2] == 32
            assert torch.allclose(view.attention[i].sum(-1), torch.ones(()), atol=1e-2)
            assert view.attention[i][..., ~view.valid[i, 0]].abs().sum() == 0
    for (layer, row), seen in steps.items():
        assert seen == list(range(32, LENGTHS[row] + 1, 32)), (layer, row)
    for layer in cache.layers:  # no padding column is stored as a valid slot
        for r, n in enumerate(LENGTHS):
            cols = layer.columns[r][layer.valid[r]]
            assert int(cols.min()) >= max(LENGTHS) - n


def test_snapkv_below_its_window_keeps_the_newest():
    """A budget below the observation window keeps the newest tokens, so the choice does not depend on how the
    batch lays the slots out."""
    n, w = 40, 16
    valid = torch.ones(1, 2, n, dtype=torch.bool)
    view = LayerView(0, torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4), torch.arange(n).expand(1, 2, n), valid,
                     torch.rand(1, 2, w, n), w, n, 0, {})
    keep, _ = SnapKV(budget=5, window=w).step(view)
    assert keep[0, 0].nonzero().flatten().tolist() == list(range(n - 5, n))


def test_per_row_budgets_equal_one_policy_per_row():
    """A baseline with a budget per batch row keeps, in each row, what it keeps with that budget alone."""
    g = torch.Generator().manual_seed(0)
    n = 50
    att = torch.rand(3, 2, 16, n, generator=g)
    keys = torch.randn(3, 2, n, 4, generator=g)
    valid = torch.ones(3, 2, n, dtype=torch.bool)
    valid[2, :, :7] = False  # a left-padded row

    def view(rows):
        r = torch.tensor(rows)
        return LayerView(0, keys[r], keys[r], torch.arange(n).expand(len(rows), 2, n), valid[r], att[r], 16, 60, 0,
                         {}, rows=r)
    budgets = [0.3, 0.55, 12]
    for cls in (H2O, SnapKV):
        together, _ = cls(budgets, delay=16).step(view([0, 1, 2]))
        for r, b in enumerate(budgets):
            alone, _ = cls(b, delay=16).step(view([r]))
            assert torch.equal(together[r], alone[0]), (cls.name, r)


def test_rows_with_their_own_eviction_limits():
    """Rows of one length (no padding) that stop evicting at different token counts (evict_until per row, as the
    context-only protocol gives) equal each row alone with its limit."""
    from namm_transfer.adapters.causal_lm import prefill
    model = tiny_model("llama")
    enable_memory_attention(model)
    prompts, _, _ = padded_batch([260, 260, 260])
    ids = torch.stack(prompts)
    limits = [100, 260, 200]
    for policy in policies()[1:]:
        cache = MemoryCache(policy, evict_until=limits)
        together, _, _ = prefill(model, ids, cache, chunk_size=40, keep_logits=True)
        for r, limit in enumerate(limits):
            alone_cache = MemoryCache(policy, evict_until=limit)
            alone, _, _ = prefill(model, ids[r:r + 1], alone_cache, chunk_size=40, keep_logits=True)
            assert torch.allclose(together[r], alone[0], atol=1e-4), (policy.name, r)
            assert max(rec.tokens_seen for rec in alone_cache.log) <= limit
        assert cache.row_fractions() != [cache.row_fractions()[0]] * 3
