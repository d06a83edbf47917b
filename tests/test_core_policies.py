"""Each baseline keeps exactly the tokens its definition names (brute-force checks on synthetic views)."""
import math

import pytest
import torch

from namm_transfer.policies import (FullCache, H2O, L2Norm, LayerView, RandomEviction, Recency, SnapKV,
                                    make_policy, resolve_budget)


def view(n=40, n_new=16, heads=2, seed=0, tokens_seen=None, state=None):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, heads, n, 8, generator=g)
    attn = torch.rand(1, heads, n_new, n, generator=g)
    attn = attn / attn.sum(-1, keepdim=True)
    # positions with gaps (earlier evictions), ascending
    positions = torch.cumsum(torch.randint(1, 4, (n,), generator=g), 0).expand(1, heads, n).clone()
    return LayerView(0, keys, keys.clone(), positions, torch.ones(1, heads, n, dtype=torch.bool), attn, n_new,
                     tokens_seen or int(positions.max()) + 1, 0, state or {})


def kept_sets(mask):
    return [set(torch.nonzero(mask[0, h]).flatten().tolist()) for h in range(mask.shape[1])]


def test_resolve_budget():
    assert resolve_budget(0.25, 1000) == 250 and resolve_budget(0.001, 10) == 1 and resolve_budget(64, 5) == 64
    with pytest.raises(ValueError):
        resolve_budget(-1, 10)
    with pytest.raises(ValueError):
        resolve_budget(1.5, 10)


def test_full_cache_keeps_all():
    v = view()
    keep, _ = FullCache().step(v)
    assert keep.all()


def test_recency_sinks_plus_recent():
    v = view()
    v.positions[..., :3] = torch.tensor([0, 1, 2])  # three sinks still present (positions < 4)
    keep, _ = Recency(budget=10, sinks=4).step(v)
    for h in range(2):
        assert kept_sets(keep)[h] == {0, 1, 2} | set(range(40 - 7, 40))


def test_h2o_heavy_hitters_plus_recent_accumulates():
    v = view(state={"acc": torch.rand(1, 2, 24)})
    prev = v.state["acc"]
    keep, st = H2O(budget=12, recent_ratio=0.5).step(v)
    acc = torch.cat([prev, torch.zeros(1, 2, 16)], -1) + v.attention.sum(2)
    assert torch.allclose(st["acc"], acc)
    for h in range(2):
        recent = set(range(40 - 6, 40))
        rest = [i for i in range(40) if i not in recent]
        heavy = set(sorted(rest, key=lambda i: -acc[0, h, i].item())[:6])
        assert kept_sets(keep)[h] == recent | heavy


def test_l2_keeps_lowest_key_norms():
    v = view()
    keep, _ = L2Norm(budget=0.5).step(v)
    k = math.ceil(0.5 * v.tokens_seen)
    for h in range(2):
        norms = v.keys[0, h].norm(dim=-1)
        assert kept_sets(keep)[h] == set(norms.argsort()[:k].tolist())


def test_snapkv_window_plus_pooled_votes():
    v = view(n=40, n_new=16)
    keep, _ = SnapKV(budget=14, window=8, kernel=5).step(v)
    for h in range(2):
        votes = v.attention[0, h, -8:, :32].sum(0).tolist()
        pooled = [sum(votes[j] for j in range(i - 2, i + 3) if 0 <= j < 32) / 5 for i in range(32)]
        top = set(sorted(range(32), key=lambda i: -pooled[i])[:6])
        assert kept_sets(keep)[h] == top | set(range(32, 40))


def test_random_is_seeded_and_sized():
    v = view()
    a, _ = RandomEviction(budget=10, seed=3).step(v)
    b, _ = RandomEviction(budget=10, seed=3).step(v)
    c, _ = RandomEviction(budget=10, seed=4).step(v)
    assert torch.equal(a, b) and not torch.equal(a, c) and (a.sum(-1) == 10).all()


def test_padding_slots_never_kept():
    v = view()
    v.valid[..., :5] = False
    for p in [L2Norm(0.9), Recency(30), H2O(30), SnapKV(30, window=8), RandomEviction(30)]:
        keep, _ = p.step(v)
        assert not keep[..., :5].any(), p.name


def test_make_policy_unknown_name():
    with pytest.raises(ValueError, match="choose from"):
        make_policy("lru")
    assert make_policy("h2o", budget=0.3).budget == 0.3
