"""Retention maps (pure functions + recorder on a tiny model) and the namm-renorm calibration."""
import numpy as np
import pytest
import torch
from helpers_core import run_with_policy, tiny_model

from namm_transfer import MemoryCache, NAMMPolicy, Recency
from namm_transfer.namm import NAMMConfig
from namm_transfer.reporting import retention as ret
from namm_transfer.reporting.calibration import RENORM, renormalise, stats_collector, with_stats


def test_keep_matrix_counts_heads_and_ignores_invalid_slots():
    # batch 1, 2 KV heads, 3 slots; head 1's first slot is padding
    positions = torch.tensor([[[0, 2, 5], [7, 2, 3]]])
    valid = torch.tensor([[[True, True, True], [False, True, True]]])
    keep = ret.keep_matrix([(positions, valid), (positions, torch.ones_like(valid))], n_tokens=6)
    assert keep.tolist()[0] == [0.5, 0, 1.0, 0.5, 0, 0.5]
    assert keep.tolist()[1] == [0.5, 0, 1.0, 0.5, 0, 0.5]  # position 7 >= n_tokens: not counted


def test_dt_maps_follow_the_token_triples():
    keep = np.array([1.0, 0.0, 0.5, 0.0, 1.0])  # R0 s0 a0 R1 s1 (no a1 yet)
    m = ret.dt_type_map(keep)
    assert m.shape == (3, 2)
    assert m[:, 0].tolist() == [1.0, 0.0, 0.5] and m[:2, 1].tolist() == [0.0, 1.0] and np.isnan(m[2, 1])
    shares = ret.dt_type_shares(np.stack([keep, 1 - keep]))
    assert shares[0].tolist() == [0.5, 0.5, 0.5] and shares[1].tolist() == [0.5, 0.5, 0.5]


def test_frame_index_and_shares():
    is_video = np.array([0, 1, 1, 1, 1, 1, 1, 0], dtype=bool)  # 6 video tokens, 3 frames of 2
    frames = ret.frame_index(is_video, 3)
    assert frames.tolist() == [-1, 0, 0, 1, 1, 2, 2, -1]
    keep = np.array([[1, 1, 0, 1, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0, 1, 1]], dtype=float)
    assert ret.frame_shares(keep, frames, 3).tolist() == [[0.5, 1.0], [1.0, 0.0], [0.0, 0.5]]
    with pytest.raises(ValueError, match="6 video tokens do not split into 4"):
        ret.frame_index(is_video, 4)


def test_text_html_marks_evicted_tokens():
    page = ret.text_html(["<a>", " b"], np.array([1.0, 0.0]), "t")
    assert "&lt;a&gt;" in page and "line-through" in page.split("&lt;a&gt;")[1]
    assert "kept by 100% of heads" in page and "kept by 0% of heads" in page


def test_recorder_and_cache_maps_agree_on_a_tiny_model():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    log = ret.EvictionLog()
    policy = Recency(budget=40, sinks=4, delay=64)
    _, cache, _ = run_with_policy(model, ids, policy)
    # the same run with the recorder as the cache's callback
    from namm_transfer import enable_memory_attention
    from namm_transfer.adapters.causal_lm import prefill
    enable_memory_attention(model)
    c2 = MemoryCache(policy, on_evict=log)
    prefill(model, ids, c2, 64)
    a, b = ret.cache_keep_matrix(cache, 200), log.keep_matrix(200)
    assert np.array_equal(a, b)
    assert np.allclose(a.sum(1), cache.cache_lengths())
    # recency with 4 sinks after the last step at 192: sinks + the newest 36 of 192 + the 8 tokens since
    expected = np.zeros(200)
    expected[:4] = 1
    expected[192 - 36:] = 1
    assert np.array_equal(a[0], expected)
    assert [s[1] for s in log.steps if s[0] == 0] == [64, 128, 192]


def test_renorm_collects_target_stats_with_a_keep_all_pass():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 130), generator=torch.Generator().manual_seed(1))
    trained = NAMMPolicy(torch.randn(4172, generator=torch.Generator().manual_seed(2)), NAMMConfig(delay=64))
    trained.stats.set(torch.zeros(17), torch.ones(17))
    caches = []

    def keep_all_pass(collector):
        assert collector.collect_stats and not collector.params.any() and collector.config == trained.config
        caches.append(run_with_policy(model, ids, collector)[1])

    renorm = renormalise(trained, keep_all_pass)
    assert caches[0].cache_lengths() == [130.0, 130.0]  # zero parameters: nothing evicted
    assert renorm.name == RENORM and torch.equal(renorm.params, trained.params)
    assert renorm.stats.frozen and renorm.stats.count > 0 and not torch.equal(renorm.stats.mean, trained.stats.mean)
    # the statistics are exactly those a fresh keep-all collector measures on the same input
    again = stats_collector(trained)
    run_with_policy(model, ids, again)
    assert torch.equal(renorm.stats.mean, again.stats.mean) and torch.allclose(renorm.stats.var, again.stats.var)
    with pytest.raises(ValueError, match="no NAMM eviction step"):
        with_stats(trained, stats_collector(trained))


def test_retention_cli_language_tiny(tmp_path, capsys, monkeypatch):
    """scripts/retention_maps.py end to end on a tiny model with --renorm, and its message without a NAMM."""
    import json

    from test_reporting_tables import _script

    from namm_transfer import save_namm

    save_namm(tmp_path / "ck", torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5, None,
              NAMMConfig(delay=128))
    rm = _script("retention_maps")
    out = tmp_path / "maps"
    code = rm.main(["--domain", "language", "--model", "tiny-llama", "--tokens", "300", "--namm", str(tmp_path / "ck"),
                    "--renorm", "--save-renorm", str(tmp_path / "renorm"), "--calib-n", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["namm-renorm_layer1.html", "namm-renorm_layer1_text.png", "namm-renorm_layers.png",
                     "namm_layer1.html", "namm_layer1_text.png", "namm_layers.png", "retention.json"]
    report = json.loads((out / "retention.json").read_text())
    assert set(report["policies"]) == {"namm", RENORM} and len(report["policies"]["namm"]["kept_share_per_layer"]) == 2
    assert json.loads((tmp_path / "renorm" / "config.json").read_text())["meta"]["variant"] == RENORM

    import namm_transfer.checkpoints as ck
    monkeypatch.setattr(ck, "DEFAULT_NAMM", tmp_path / "absent")
    assert rm.main(["--domain", "dt"]) == 2
    err = capsys.readouterr().err
    assert f"no NAMM checkpoint at {tmp_path / 'absent'}" in err and "pass --namm PATH" in err


def test_retention_cli_video_tiny_calibrates_on_validation(tmp_path, capsys):
    """Video retention maps + namm-renorm on the random tiny Llava: frames heatmap, calibration on the val split."""
    import json

    from test_reporting_tables import _script

    from namm_transfer import save_namm
    from video.synthetic import SyntheticConfig, generate_split

    data = tmp_path / "data"
    for split in ("test", "val"):
        generate_split(data, split, num_samples=2, seed=0, config=SyntheticConfig(frame_counts=(64,)))
    save_namm(tmp_path / "ck", torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.5, None)
    rm = _script("retention_maps")
    out = tmp_path / "maps"
    code = rm.main(["--domain", "video", "--model", "tiny-random", "--data-root", str(data), "--frames", "16",
                    "--delay", "32", "--namm", str(tmp_path / "ck"), "--renorm", "--save-renorm",
                    str(tmp_path / "renorm"), "--calib-n", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert {"namm_frames.png", "namm-renorm_frames.png", "retention.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "retention.json").read_text())
    assert len(report["policies"]["namm"]["frame_shares_mean_over_layers"]) == 16
    meta = json.loads((tmp_path / "renorm" / "config.json").read_text())["meta"]
    assert meta["variant"] == RENORM and meta["calibration_inputs"] == 2
