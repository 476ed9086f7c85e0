"""Paired bootstrap against random and percentiles in random's spread, on hand-made numbers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from calibbench.report.significance import NEEDS_PAIRS, paired_bootstrap, paired_to_reference, percentile_within


def test_a_constant_difference_gives_a_zero_width_interval_at_that_value():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's BCa warns (DegenerateDataWarning) on such data
        d = paired_bootstrap([1.5, 1.5, 1.5, 1.5, 1.5])
    assert (d.mean, d.low, d.high, d.n, d.method) == (1.5, 1.5, 1.5, 5, "constant")
    assert d.excludes_zero and d.text() == "+1.50 [+1.50, +1.50] *"
    zero = paired_bootstrap([0.0, 0.0, 0.0])
    assert (zero.low, zero.high) == (0.0, 0.0) and not zero.excludes_zero


def test_symmetric_noise_gives_an_interval_containing_zero():
    d = paired_bootstrap([-2.0, -1.0, 0.0, 1.0, 2.0, -1.5, 1.5])
    assert d.low < 0 < d.high and not d.excludes_zero and d.mean == pytest.approx(0.0)
    assert d.method == "BCa" and "*" not in d.text()


def test_a_clear_shift_excludes_zero_and_the_interval_brackets_the_mean():
    d = paired_bootstrap([3.0, 3.5, 2.5, 4.0, 3.2])
    assert 2.5 <= d.low < d.mean < d.high <= 4.0 and d.excludes_zero and d.text().endswith(" *")


def test_seeded_and_ten_thousand_resamples_by_default():
    diffs = [0.3, -1.2, 2.2, 0.9, 1.7, -0.4, 0.8, 2.9, -0.6, 1.1]
    a, b = paired_bootstrap(diffs), paired_bootstrap(diffs)
    assert (a.low, a.high) == (b.low, b.high)
    c = paired_bootstrap(diffs, seed=1)
    assert (c.low, c.high) != (a.low, a.high)  # the seed is used
    coarse = paired_bootstrap(diffs, n_resamples=50)
    assert (coarse.low, coarse.high) != (a.low, a.high)  # so the default is not 50


def test_one_pair_says_the_interval_needs_two():
    d = paired_bootstrap([2.0])
    assert not d.has_interval and not d.excludes_zero and d.mean == 2.0
    assert d.text() == f"+2.00 (1 pair; {NEEDS_PAIRS})" and "≥ 2 paired seeds" in NEEDS_PAIRS
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1.0, float("nan")])
    with pytest.raises(ValueError, match="no paired seeds"):
        paired_bootstrap([])


def test_pairs_stay_together_so_a_shared_seed_effect_cancels():
    # The seed moves both sides by up to 20 points; the strategy is always exactly 1 point better.
    # Resampling the two sides independently would give a wide interval; pairs give a point.
    seed_effect = {s: 20.0 * np.sin(s) for s in range(6)}
    random_top1 = {s: 50.0 + e for s, e in seed_effect.items()}
    other = {s: 51.0 + e for s, e in seed_effect.items()}
    other[99] = 10.0  # a seed random lacks: not a pair, ignored
    d = paired_to_reference(other, random_top1)
    assert (d.n, d.low, d.high) == (6, pytest.approx(1.0), pytest.approx(1.0))
    assert paired_to_reference({7: 1.0}, random_top1) is None


def test_percentile_within_random():
    ref = list(range(1, 101))  # 1..100
    assert percentile_within(ref, 50.5) == 50.0
    assert percentile_within(ref, 50) == 49.5  # a tie counts half
    assert percentile_within(ref, 0) == 0.0 and percentile_within(ref, 1000) == 100.0
