"""Features and scorer against independent loop / NumPy references."""
import math

import numpy as np
import pytest
import torch

from namm_transfer import features as feat
from namm_transfer.namm import NAMMConfig, bam_scores, select_tokens, token_features, unflatten

CFG = NAMMConfig()


def np_stft_mag(x: np.ndarray, n_fft=32, hop=16) -> np.ndarray:
    """(L,) -> (frames, bins) by explicit DFT of each periodic-Hann-windowed frame."""
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = (len(x) - n_fft) // hop + 1
    out = np.zeros((frames, n_fft // 2 + 1))
    for f in range(frames):
        seg = x[f * hop: f * hop + n_fft] * win
        for b in range(n_fft // 2 + 1):
            out[f, b] = abs(sum(seg[t] * np.exp(-2j * np.pi * b * t / n_fft) for t in range(n_fft)))
    return out


def test_gqa_mean():
    a = torch.rand(2, 6, 3, 5)
    out = feat.gqa_mean(a, 2)
    assert torch.allclose(out[:, 1], a[:, 3:6].mean(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [2, 3, 4, 7, 8])
def test_gqa_mean_in_half_precision_has_the_bits_of_torch_mean(dtype, group):
    """gqa_mean's element-wise path for bf16/fp16 on CPU gives exactly what .mean over the group gives."""
    g = torch.Generator().manual_seed(group)
    for scale in (1.0, 8.0):
        a = torch.softmax(torch.randn(2, 2 * group, 48, 300, generator=g) * scale, -1).to(dtype)
        want = a.view(2, 2, group, 48, 300).mean(dim=2)
        assert torch.equal(feat.gqa_mean(a, 2), want)


def test_streaming_spectrogram_matches_numpy():
    torch.manual_seed(0)
    series = torch.rand(3, 64)
    overlap = torch.rand(3, 16)
    got = feat.streaming_spectrogram(series, overlap)
    for i in range(3):
        ref = np_stft_mag(np.concatenate([overlap[i].numpy(), series[i].numpy()]).astype(np.float64))
        assert np.allclose(got[i].numpy(), ref, atol=1e-5)


def test_recency_embedding_matches_formula():
    r = torch.tensor([0, 1, 7, 1000, 30000])
    got = feat.recency_embedding(r)
    w = [50000 ** (-k / 4) for k in range(4)]
    ref = np.array([[math.sin(x * wk) for wk in w] + [math.cos(x * wk) for wk in w] for x in r.tolist()])
    assert np.allclose(got.numpy(), ref, atol=1e-4)
    assert torch.equal(got[0], torch.tensor([0.0] * 4 + [1.0] * 4))



def test_recency_float64_table_is_evo_memorys_bit_for_bit():
    """evo-memory's PositionalEmbedding: a numpy float64 table sin/cos(position / max_freq^(k / half)), cast to
    float32 and indexed by age; table="float64" gives its values exactly for every age the table holds."""
    ages = np.arange(50001)
    freq = 1 / (50000.0 ** (np.arange(4, dtype=np.float64) / 4))
    angles = ages[:, None] * freq
    official = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype("float32")
    got = feat.recency_embedding(torch.from_numpy(ages), 8, 50000.0, table="float64")
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), official)
    # the project's float32 table differs (its trained NAMMs use it): this is why the choice is a config field
    assert not np.array_equal(feat.recency_embedding(torch.from_numpy(ages)).numpy(), official)
    with pytest.raises(ValueError, match="recency table"):
        feat.recency_embedding(torch.from_numpy(ages), table="float16")


def test_ema_closed_form_and_streaming_equals_offline():
    """Stream 3 steps of 64 queries over tokens that are never evicted; compare with the offline STFT of the
    whole series and the closed-form EMA sum_g (1-a) a^(G-1-g) S_g."""
    torch.manual_seed(1)
    cfg, step, steps = CFG, 64, 3
    total = step * steps
    attn = torch.rand(1, total, total).tril()  # query x key, causal
    ema = torch.zeros(1, 0, 17)
    ovl = torch.zeros(1, 0, 16)
    valid_all = torch.ones(1, total, dtype=torch.bool)
    for s in range(steps):
        n = step * (s + 1)
        a = attn[:, s * step:n, :n]
        pos = torch.arange(n)[None]
        _, ema, ovl = token_features(a, pos, valid_all[:, :n], ema, ovl, step, None, cfg)
    coeff = cfg.ema_coeff ** cfg.hop
    for j in [0, 5, 70, 150, total - 1]:
        series = attn[0, :, j].double().numpy()
        spec = np_stft_mag(np.concatenate([np.zeros(16), series]))  # offline, whole history
        g = spec.shape[0]
        closed = sum((1 - coeff) * coeff ** (g - 1 - f) * spec[f] for f in range(g))
        assert np.allclose(ema[0, j].numpy(), closed, atol=1e-5), j


def np_bam(x, params, cfg):
    """Loop reference of the scorer for one row: x (N, d)."""
    w = {k: v[0].double().numpy() for k, v in unflatten(torch.as_tensor(params)[None], cfg).items()}
    n, h, d = x.shape[0], cfg.hidden, cfg.d_in
    qkv = x @ w["w_qkv"] + w["b_qkv"]
    q, k, v = qkv[:, :h], qkv[:, h:2 * h], qkv[:, 2 * h:]
    att = np.zeros((n, h))
    for i in range(n):
        logits = np.array([q[i] @ k[j] / math.sqrt(h) for j in range(i, n)])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        att[i] = sum(p[t] * v[j] for t, j in enumerate(range(i, n)))
    o = att @ w["w_out"] + w["b_out"]
    hid = x * (1 + o[:, d:]) + o[:, :d]
    return hid @ w["w_score"] + w["b_score"][0]


def test_bam_scores_match_loop_reference():
    torch.manual_seed(2)
    params = torch.randn(CFG.num_params) * 0.3
    x = torch.randn(2, 20, CFG.d_in)
    got = bam_scores(x, torch.ones(2, 20, dtype=torch.bool), params.expand(2, -1), CFG)
    for r in range(2):
        assert np.allclose(got[r].double().numpy(), np_bam(x[r].double().numpy(), params, CFG), atol=1e-4)


def test_bam_padding_slots_are_ignored():
    torch.manual_seed(3)
    params = torch.randn(CFG.num_params) * 0.3
    x = torch.randn(1, 12, CFG.d_in)
    padded = torch.cat([torch.randn(1, 4, CFG.d_in) * 100, x], dim=1)
    valid = torch.tensor([[False] * 4 + [True] * 12])
    got = bam_scores(padded, valid, params[None], CFG)[:, 4:]
    ref = bam_scores(x, torch.ones(1, 12, dtype=torch.bool), params[None], CFG)
    assert torch.allclose(got, ref, atol=1e-5)


def test_population_batching_equals_separate_calls():
    torch.manual_seed(4)
    pop = torch.randn(5, CFG.num_params) * 0.2
    x = torch.randn(5, 30, CFG.d_in)
    valid = torch.ones(5, 30, dtype=torch.bool)
    together = bam_scores(x, valid, pop, CFG)
    for p in range(5):
        alone = bam_scores(x[p:p + 1], valid[p:p + 1], pop[p:p + 1], CFG)
        assert torch.equal(together[p], alone[0])


def test_parameter_layout_is_input_major_official_order():
    cfg = NAMMConfig()
    assert cfg.num_params == 4172
    flat = torch.arange(cfg.num_params, dtype=torch.float32)
    w = unflatten(flat, cfg)
    assert w["w_qkv"][0, 0, 1].item() == 1  # row = input feature, col = output
    assert w["w_qkv"][0, 1, 0].item() == 96
    assert w["b_qkv"][0, 0].item() == 2400
    assert w["w_out"][0, 0, 0].item() == 2496 and w["w_out"][0, 1, 0].item() == 2546
    assert w["b_out"][0, 0].item() == 4096
    assert w["w_score"][0, 0].item() == 4146 and w["b_score"][0, 0].item() == 4171


def test_zero_params_keep_everything_and_select_rule():
    x = torch.randn(2, 10, CFG.d_in)
    s = bam_scores(x, torch.ones(2, 10, dtype=torch.bool), torch.zeros(2, CFG.num_params), CFG)
    assert torch.equal(s, torch.zeros_like(s))
    assert select_tokens(s.view(1, 2, 10), torch.ones(1, 2, 10, dtype=torch.bool)).all()
    # rectangular rule: k = max over heads of #(score >= 0); each head keeps its own top-k; newest always kept
    scores = torch.tensor([[[-1.0, 2.0, -3.0, 0.5, -9.0], [-1.0, -2.0, -3.0, -4.0, -9.0]]])
    keep = select_tokens(scores, torch.ones(1, 2, 5, dtype=torch.bool))
    assert keep[0, 0].tolist() == [False, True, False, True, True]  # 2.0, 0.5, newest(+inf): k = 3
    assert keep[0, 1].tolist() == [True, True, False, False, True]  # top-3 of head 1: newest, -1, -2


def test_running_stats_merge_equals_pooled():
    torch.manual_seed(5)
    a, b = torch.randn(50, 17) * 3 + 1, torch.randn(70, 17)
    st = feat.RunningStats(17)
    st.update(a)
    st.update(b)
    pooled = torch.cat([a, b]).double()
    assert torch.allclose(st.mean, pooled.mean(0)) and torch.allclose(st.var, pooled.var(0, unbiased=False))


def test_bam_left_padding_fast_path_equals_masked_path():
    torch.manual_seed(6)
    params = torch.randn(2, CFG.num_params) * 0.3
    x = torch.randn(2, 16, CFG.d_in)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[0, :5] = False  # left padding -> fused reversed-causal path
    fast = bam_scores(x, valid, params, CFG)
    scattered = valid.clone()
    scattered[1, 7] = False  # not left-padded -> explicit mask path; row 0 is unaffected by it
    slow = bam_scores(x, scattered, params, CFG)
    assert torch.allclose(fast[0, 5:], slow[0, 5:], atol=1e-5)


def test_bam_fused_path_gives_the_kernel_a_head_axis(monkeypatch):
    """CUDA's fused attention kernels (flash, memory-efficient) take 4-D inputs only: 3-D ones fall back to the math
    kernel, which holds rows x N x N scores (6.3 GB on a 7B model's 4,700-slot cache, measured on an H200; CPU
    picks a fused kernel for either). Both paths hand SDPA (R, 1, N, h), with the same scores."""
    import namm_transfer.namm as namm_mod
    shapes, sdpa = [], namm_mod.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        shapes.append(q.dim())
        return sdpa(q, k, v, **kw)

    torch.manual_seed(7)
    params = torch.randn(2, CFG.num_params) * 0.3
    x, valid = torch.randn(2, 16, CFG.d_in), torch.ones(2, 16, dtype=torch.bool)
    scattered = valid.clone()
    scattered[1, 7] = False  # not left-padded: the explicit-mask path
    before = [bam_scores(x, v, params, CFG) for v in (valid, scattered)]
    monkeypatch.setattr(namm_mod.F, "scaled_dot_product_attention", spy)
    assert all(torch.equal(bam_scores(x, v, params, CFG), b) for v, b in zip((valid, scattered), before))
    assert shapes == [4, 4]


def _split(total, seed, step=64):
    """Random pieces of 1..39 queries, cut at every multiple of `step` (where the cache cuts a forward)."""
    g = torch.Generator().manual_seed(seed)
    cuts, a = [], 0
    while a < total:
        e = min(total, a + int(torch.randint(1, 40, (1,), generator=g)), (a // step + 1) * step)
        cuts.append((a, e))
        a = e
    return cuts


def test_streamed_spectrogram_ema_equals_batch_features_at_every_step():
    """SpectrogramEMA folds frames as the queries arrive, in pieces of any size; at each step it holds what
    token_features computes from all the step's queries at once (kept tokens' EMA decayed, new tokens from 0)."""
    from namm_transfer.streams import SpectrogramEMA
    torch.manual_seed(2)
    step, steps, h = 64, 3, 2
    total = step * steps
    attn = torch.softmax(torch.randn(1, h, total, total).masked_fill(
        ~torch.ones(total, total, dtype=torch.bool).tril(), float("-inf")), -1)
    stream = SpectrogramEMA()
    ema = torch.zeros(h, 0, 17)
    ovl = torch.zeros(h, 0, 16)
    for a, e in _split(total, 0):
        stream.add(attn[:, :, a:e, :e], None)
        if e % step == 0:
            n = e
            _, ema, ovl = token_features(attn[0, :, e - step:e, :n], torch.arange(n).expand(h, n),
                                         torch.ones(h, n, dtype=torch.bool), ema, ovl, step, None, CFG)
            got = stream.take(torch.tensor([0]), n, step, True)["ema"][0]
            assert torch.allclose(got, ema, rtol=1e-5, atol=1e-7), (e, (got - ema).abs().max())
    with pytest.raises(ValueError, match="multiple of hop"):
        stream.add(attn[:, :, :5, :5], None)
        stream.take(torch.tensor([0]), 5, 5, True)


def test_streamed_spectrogram_rows_out_of_phase():
    """A left-padded row folds its frames at its own token counts: in a batch it holds what it holds alone."""
    from namm_transfer.streams import SpectrogramEMA
    torch.manual_seed(3)
    n, lead = 100, 5
    own = torch.softmax(torch.randn(1, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(),
                                                            float("-inf")), -1)
    alone = SpectrogramEMA()
    alone.add(own[:, :, :70, :70], None)
    alone.add(own[:, :, 70:, :], None)
    other = torch.softmax(torch.randn(1, 1, n + lead, n + lead), -1)
    batch = torch.zeros(2, 1, n + lead, n + lead)
    batch[0] = other[0]
    batch[1, :, lead:, lead:] = own[0]
    batch[1, :, :lead] = torch.rand(1, lead, n + lead)  # whatever padding queries hold is ignored
    real = torch.ones(2, n + lead, dtype=torch.bool)
    real[1, :lead] = False
    both = SpectrogramEMA()
    both.add(batch[:, :, :75, :75], real[:, :75])
    both.add(batch[:, :, 75:], None)
    assert both.fill == [(n + lead) % 16, n % 16]
    got = both.ema[1, :, :, lead:]  # (H, bins, N)
    assert torch.allclose(got, alone.ema[0], rtol=1e-5, atol=1e-7), (got - alone.ema[0]).abs().max()


def test_attention_sum_stream_is_the_total_over_real_queries():
    """H2O's streamed score: the attention each slot received from every real query, padding queries excluded,
    slots that arrived later counted from zero, following the kept slots through a compaction."""
    from namm_transfer.streams import AttentionSum
    torch.manual_seed(4)
    att = torch.rand(2, 3, 40, 40)
    att[:, :, :25, 25:] = 0  # the first piece's queries saw 25 slots
    real = torch.ones(2, 40, dtype=torch.bool)
    real[1, :6] = False
    s = AttentionSum()
    s.add(att[:, :, :25, :25], real[:, :25])
    s.add(att[:, :, 25:, :], None)
    ref = (att * real[:, None, :, None]).sum(2)
    assert torch.allclose(s.take(torch.tensor([0, 1]), 40, 40, True)["acc"], ref, atol=1e-5)
    idx = torch.tensor([3, 7, 39]).expand(2, 3, 3)
    s.gather(idx, 40)
    assert torch.allclose(s.acc, ref.gather(2, idx), atol=1e-5)
    assert torch.allclose(s.take(torch.tensor([1]), 3, 0, False)["acc"], ref[1:].gather(2, idx[1:]), atol=1e-5)


def test_fold_frames_is_the_frame_by_frame_ema():
    torch.manual_seed(5)
    ema, mags, a = torch.rand(2, 3, 17, 10), torch.rand(2, 3, 6, 17, 10), 0.99 ** 16
    s = ema.clone()
    for f in range(6):
        s = a * s + (1 - a) * mags[:, :, f]
    assert torch.allclose(feat.fold_frames(ema, mags, a), s, rtol=1e-6)


def test_streamed_features_after_evictions_equal_brute_force_history():
    """A NAMM that evicts about half the cache at every step, run streamed over a tiny model: at each step, every
    valid slot's spectrogram EMA equals the one computed from scratch from the full history of attention its key
    received (the rows the pruned model produced, since the key entered), as the batch functions define it: the
    STFT of that column with zero overlap before the sequence, then the EMA over all its frames. A kept slot
    misaligned after a compaction, or an EMA not decayed (or restarted) across an eviction, fails it."""
    from namm_transfer import MemoryCache, NAMMPolicy, enable_memory_attention
    from namm_transfer.cache import MemoryLayer
    from namm_transfer.language.models import tiny_random_lm

    delay, total, chunk = 32, 160, 40  # 5 steps per layer; forwards cut at the steps
    model = tiny_random_lm("llama", seed=0)
    enable_memory_attention(model)
    params = torch.randn(CFG.num_params, generator=torch.Generator().manual_seed(0)) * 0.5
    params[-1] = 1.0  # score bias: keeps about half of the slots at each step
    policy = NAMMPolicy(params, delay=delay)
    cfg = policy.config
    assert policy.attention_stream() is not None  # the streamed path (n_fft == 2 * hop)

    rows = {}  # layer -> [(attention (B, H_kv, q, N) as the policy reads it, sequence column of each slot)]
    record = MemoryLayer.record

    def recording(layer, probs, a, e):
        att = feat.gqa_mean(probs.to(policy.attention_dtype), layer.keys.shape[1]).float()
        rows.setdefault(layer.layer_idx, []).append((att.clone(), layer.columns[..., :att.shape[-1]].clone()))
        return record(layer, probs, a, e)

    steps = []  # (layer, tokens seen, positions, valid, streamed EMA (B, H, N, bins), keep)
    policy_step = policy.step

    def capturing(view):
        keep, state = policy_step(view)
        steps.append((view.layer_idx, view.tokens_seen, view.positions.clone(), view.valid.clone(),
                      view.summary["ema"].clone(), keep.clone()))
        return keep, state

    policy.step = capturing
    ids = torch.randint(0, 128, (1, total), generator=torch.Generator().manual_seed(1))
    cache = MemoryCache(policy)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(MemoryLayer, "record", recording)
        for s in range(0, total, chunk):
            model(input_ids=ids[:, s:s + chunk], cache=cache, use_cache=True,
                  position_ids=torch.arange(s, s + chunk)[None])

    # brute-force history: hist[layer][b, h, query, key position] = attention the key received from the query
    hist = {}
    for layer, pieces in rows.items():
        b, h = pieces[0][0].shape[:2]
        hist[layer] = torch.zeros(b, h, total, total)
        q0 = 0
        for att, cols in pieces:
            q = att.shape[2]
            hist[layer][:, :, q0:q0 + q].scatter_(3, cols[:, :, None, :].expand(-1, -1, q, -1), att)
            q0 += q
        assert q0 == total  # every query's attention row was read

    a = cfg.ema_coeff ** cfg.hop
    survivors = veterans = 0  # slots compared that outlived one / two or more evictions
    assert len(steps) == 2 * (total // delay)
    for layer, seen, pos, valid, ema, keep in steps:
        assert seen % delay == 0
        if seen <= 2 * delay:  # the first steps really evict, in every head
            assert bool(((valid & ~keep).sum(-1) > 0).all()), (layer, seen)
        for hd in range(pos.shape[1]):
            p = pos[0, hd][valid[0, hd]]
            survivors += int((p < seen - delay).sum())
            veterans += int((p < seen - 2 * delay).sum())
            column = hist[layer][0, hd, :seen, p].T  # (K, seen): each kept key's attention since the start
            mags = feat.streaming_spectrogram(column, column.new_zeros(len(p), cfg.n_fft - cfg.hop), cfg.n_fft,
                                              cfg.hop)  # (K, frames, bins)
            want = feat.fold_frames(column.new_zeros(cfg.num_bins, len(p)), mags.permute(1, 2, 0), a).T
            got = ema[0, hd][valid[0, hd]]
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (
                layer, seen, hd, (got - want).abs().max(), p[(got - want).abs().amax(-1).argmax()])
    assert survivors > 100 and veterans > 50  # here 384 and 96
    assert sum(r.after < r.before for r in cache.log) >= len(cache.log) - 1
