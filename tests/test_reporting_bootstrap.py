"""Bootstrap intervals: coverage of a known mean, pairing, stratification, ratio."""
import numpy as np
import pytest

from namm_transfer.reporting.bootstrap import mean_ci, paired_difference_ci, ratio_ci, resample_indices


def test_mean_ci_matches_the_normal_interval_for_a_large_sample():
    x = np.random.default_rng(1).normal(2.0, 1.0, size=400)
    m, lo, hi = mean_ci(x)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert m == pytest.approx(x.mean())
    assert lo == pytest.approx(m - half, abs=0.02) and hi == pytest.approx(m + half, abs=0.02)


def test_pairing_removes_the_shared_sample_spread():
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0, 5, size=100)  # shared by both methods
    a, b = difficulty + 0.3 + rng.normal(0, 0.1, 100), difficulty
    d, lo, hi = paired_difference_ci(a, b)
    assert 0.25 < lo < d < hi < 0.35  # paired: clearly above zero
    _, ua_lo, ua_hi = mean_ci(a)
    _, ub_lo, ub_hi = mean_ci(b)
    assert ua_lo < ub_hi  # unpaired intervals overlap: the pairing is what separates them
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference_ci(a, b[:-1])


def test_stratified_resamples_keep_each_group_count():
    groups = ["a"] * 3 + ["b"] * 5
    idx = resample_indices(8, 200, seed=0, groups=groups)
    assert ((idx[:, :3] < 3).all() and (idx[:, 3:] >= 3).all())


def test_ratio_ci_resamples_pairs_together():
    ref = np.array([1.0, 2.0, 3.0, 4.0] * 10)
    r, lo, hi = ratio_ci(0.9 * ref, ref)
    assert r == pytest.approx(0.9) and lo == pytest.approx(0.9) and hi == pytest.approx(0.9)


def test_median_ci_brackets_the_median_and_ignores_one_outlier():
    from namm_transfer.reporting.bootstrap import median_ci
    values = [0.80, 0.81, 0.82, 0.83, 0.84, 0.85, 0.86, 0.87, 0.88, 5.0]
    med, lo, hi = median_ci(values)
    assert med == pytest.approx(0.845)
    assert 0.80 <= lo <= med <= hi <= 0.88  # one slow round moves the median's interval, not to the outlier
    assert median_ci([0.9] * 5) == (0.9, 0.9, 0.9)
