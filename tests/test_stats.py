"""mdiff.stats: the prompt-bootstrap CIs every RQ reports, checked against known distributions and by hand."""

import numpy as np
import pytest

from mdiff import stats
from mdiff.errors import MdiffError


def test_percentile_interval_covers_the_true_mean_at_its_nominal_rate():
    """95% intervals of the mean of 60 draws from a skewed distribution (exponential, true mean 2) cover the
    true mean in ≥ 90% of 400 repetitions, and are not trivially wide (≤ 99%). A narrower interval (e.g.
    the 50% one computed by the same code) covers far less often, so this test sees a narrowed interval."""
    rng = np.random.default_rng(0)
    true_mean, n, reps = 2.0, 60, 400
    cover95 = cover50 = 0
    for r in range(reps):
        x = rng.exponential(true_mean, size=n)
        _, lo, hi = stats.bootstrap_mean(x, n_boot=400, seed=r)
        cover95 += lo <= true_mean <= hi
        _, lo50, hi50 = stats.bootstrap_mean(x, n_boot=400, seed=r, ci=0.5)
        cover50 += lo50 <= true_mean <= hi50
    assert 0.90 <= cover95 / reps <= 0.99
    assert 0.40 <= cover50 / reps <= 0.60  # the ci argument means what it says


def test_paired_ratio_interval_covers_the_true_drop():
    """Paired (raw, mapped) per-prompt values with a known population drop: the ratio-of-means CI covers it
    at ≥ 90% for nominal 95%."""
    rng = np.random.default_rng(1)
    reps, n, hits = 300, 80, 0
    for r in range(reps):
        raw = rng.gamma(2.0, 0.5, size=n)  # mean 1
        mapped = raw * rng.uniform(0.2, 0.6, size=n)  # mean 0.4 · mean(raw): true drop 0.6
        d, lo, hi = stats.bootstrap_ratio_drop(raw, mapped, n_boot=400, seed=r)
        hits += lo <= 0.6 <= hi
        assert lo <= d <= hi
    assert hits / reps >= 0.90


def test_bootstrap_mean_by_hand():
    v = np.array([1.0, 2.0, 6.0])
    idx = np.array([[0, 0, 0], [0, 1, 2], [2, 2, 1], [1, 1, 1], [2, 2, 2]])  # means 1, 3, 14/3, 2, 6
    mean, lo, hi = stats.bootstrap_mean(v, idx=idx, ci=0.5)
    assert mean == 3.0
    # np.quantile (linear) of the sorted means [1, 2, 3, 14/3, 6] at 0.25 and 0.75: positions 1 and 3
    assert lo == pytest.approx(2.0) and hi == pytest.approx(14 / 3)


def test_paired_ratio_drop_by_hand():
    raw = np.array([1.0, 3.0, 2.0])
    mapped = np.array([0.5, 0.0, 2.0])
    idx = np.array([[0, 1, 2], [0, 0, 1], [2, 2, 2], [1, 1, 0]])
    # per resample: (Σraw − Σmapped)/Σraw over the same prompts (the pairing):
    # [0,1,2]: (6 − 2.5)/6;  [0,0,1]: (5 − 1)/5;  [2,2,2]: (6 − 6)/6;  [1,1,0]: (7 − 0.5)/7
    by_hand = np.sort([3.5 / 6, 4 / 5, 0.0, 6.5 / 7])
    d, lo, hi = stats.bootstrap_ratio_drop(raw, mapped, idx=idx, ci=0.5)
    assert d == pytest.approx((6 - 2.5) / 6)
    assert lo == pytest.approx(np.interp(0.75, [0, 1, 2, 3], by_hand))
    assert hi == pytest.approx(np.interp(2.25, [0, 1, 2, 3], by_hand))


def test_paired_bootstrap_keeps_pairs_together():
    """mapped = 0.3 · raw prompt by prompt: every paired resample has drop exactly 0.7, so the CI is a point.
    Resampling raw and mapped independently would give a wide interval."""
    raw = np.random.default_rng(2).exponential(1.0, size=50)
    d, lo, hi = stats.bootstrap_ratio_drop(raw, 0.3 * raw, n_boot=500, seed=0)
    assert d == pytest.approx(0.7) and lo == pytest.approx(0.7) and hi == pytest.approx(0.7)
    idx = stats.resample_indices(50, 500, 0)
    unpaired = 1 - (0.3 * raw)[stats.resample_indices(50, 500, 99)].mean(1) / raw[idx].mean(1)
    assert np.quantile(unpaired, 0.975) - np.quantile(unpaired, 0.025) > 0.1


def test_shared_indices_make_cis_paired_across_metrics():
    idx = stats.resample_indices(20, 100, 5)
    assert idx.shape == (100, 20) and idx.min() >= 0 and idx.max() < 20
    np.testing.assert_array_equal(idx, stats.resample_indices(20, 100, 5))  # seeded
    v = np.arange(20.0)
    assert stats.bootstrap_mean(v, idx=idx) == stats.bootstrap_mean(v, n_boot=100, seed=5)


def test_ratio_drop_undefined_when_raw_is_zero():
    assert all(np.isnan(stats.bootstrap_ratio_drop(np.zeros(5), np.zeros(5), n_boot=10)))


@pytest.mark.parametrize("a, b, expected", [
    ((0.5, 0.9), (0.1, 0.4), True),     # wholly above
    ((0.5, 0.9), (0.1, 0.5), False),    # touching: not beaten
    ((0.5, 0.9), (0.3, 0.6), False),    # overlapping
    ((0.1, 0.3), (0.5, 0.9), False),    # below
    ((float("nan"), 0.9), (0.1, 0.2), False),  # undefined drop
    ((0.5, 0.9), (0.1, float("nan")), False),
    ((0.5, 0.9), 0.45, True),           # a single number (e.g. the max of a null)
    ((0.5, 0.9), 0.5, False),
])
def test_beats_rule(a, b, expected):
    assert stats.beats(a, b) is expected


def test_bad_input():
    with pytest.raises(MdiffError, match="whole number ≥ 1"):
        stats.check_bootstrap(0)
    with pytest.raises(MdiffError, match="empty"):
        stats.resample_indices(0, 10, 0)
    with pytest.raises(MdiffError, match="non-empty 1-D"):
        stats.bootstrap_mean([])
    with pytest.raises(MdiffError, match="same length"):
        stats.bootstrap_ratio_drop([1.0, 2.0], [1.0])
