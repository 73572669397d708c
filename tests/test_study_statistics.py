"""Seed statistics: t intervals against scipy.stats' tests and printed t tables, the
symmetric verdict rule, and the trajectory summaries against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from opdgeo.study.statistics import (
    Interval,
    combine,
    log_band,
    log_slope,
    mean_sd,
    t_interval,
    trajectory_distance,
    verdict,
    welch_interval,
)


def test_t_interval_by_hand():
    # x = 1, 2, 3: mean 2, s = 1, t_{0.975, 2} = 4.302653 (printed tables): half-width 4.302653 / sqrt(3)
    iv = t_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert iv.estimate == 2.0 and iv.n == 3
    assert iv.low == pytest.approx(2 - half, abs=1e-6) and iv.high == pytest.approx(2 + half, abs=1e-6)
    assert "t interval" in iv.method


@pytest.mark.parametrize("x", [[0.3, 0.1, 0.7, 0.25], [5.0, 5.5, 4.0], list(np.linspace(-1, 2, 7) ** 2)])
def test_t_interval_matches_scipy_ttest(x):
    ref = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    iv = t_interval(x)
    assert iv.low == pytest.approx(ref.low, rel=1e-12) and iv.high == pytest.approx(ref.high, rel=1e-12)


@pytest.mark.parametrize("a,b", [([0.5, 0.54, 0.51], [0.8, 0.78, 0.83]), ([1.0, 2.0, 4.0, 3.0], [0.0, 0.1, 0.3])])
def test_welch_interval_matches_scipy_ttest_ind(a, b):
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    iv = welch_interval(a, b)
    assert iv.estimate == pytest.approx(np.mean(a) - np.mean(b), rel=1e-12)
    assert iv.low == pytest.approx(ref.low, rel=1e-10) and iv.high == pytest.approx(ref.high, rel=1e-10)
    assert iv.n == min(len(a), len(b))


def test_welch_by_hand_equal_spread():
    # a = 1,2,3 and b = 4,5,6: difference -3, se = sqrt(1/3 + 1/3), df = (2/3)^2 / (2 (1/3)^2 / 2) = 4,
    # t_{0.975, 4} = 2.776445 (printed tables)
    iv = welch_interval([1, 2, 3], [4, 5, 6])
    half = 2.776445 * math.sqrt(2 / 3)
    assert iv.estimate == -3.0
    assert iv.low == pytest.approx(-3 - half, abs=1e-5) and iv.high == pytest.approx(-3 + half, abs=1e-5)


def test_too_few_seeds_and_zero_spread():
    assert t_interval([1.0]).ci is None and verdict(t_interval([1.0])) is None
    assert welch_interval([1.0, 2.0], [3.0]).ci is None
    iv = welch_interval([2.0, 2.0], [1.0, 1.0])
    assert iv.ci == [1.0, 1.0] and verdict(iv) is True
    assert mean_sd([None, 1.0, float("nan"), 3.0]) == (2.0, math.sqrt(2.0), 2)


def test_verdict_is_symmetric_in_direction():
    above, below, across = Interval(1, 0.5, 1.5, 3, "t"), Interval(-1, -1.5, -0.5, 3, "t"), Interval(0, -1, 1, 3, "t")
    assert verdict(above, 0, 1) is True and verdict(above, 0, -1) is False
    assert verdict(below, 0, 1) is False and verdict(below, 0, -1) is True
    assert verdict(across, 0, 1) is None and verdict(across, 0, -1) is None
    # a non-zero null: the interval is compared with it, not with 0
    assert verdict(above, 0.8, 1) is None and verdict(above, 0.4, 1) is True and verdict(above, 1.6, 1) is False
    with pytest.raises(ValueError):
        verdict(above, 0, 0)


def test_combine():
    assert combine([True, True]) is True
    assert combine([True, None]) is None
    assert combine([None, False, True]) is False
    assert combine([]) is None


def test_trajectory_summaries_by_hand():
    assert log_band([20, 25, 30]) == pytest.approx(math.log(1.5))
    assert log_band([]) is None and log_band([0, 1]) is None
    # s = exp(2 p): slope exactly 2
    p = [0.2, 0.4, 0.6, 0.8, 1.0]
    assert log_slope(p, [math.exp(2 * x) for x in p]) == pytest.approx(2.0, rel=1e-12)
    assert log_slope([0.5], [3.0]) is None
    # a at 10 % above b everywhere: distance ln 1.1
    assert trajectory_distance(p, [11, 22, 33, 44, 55], p, [10, 20, 30, 40, 50]) == pytest.approx(math.log(1.1))
    # b sampled at other progress points: interpolated in ln s, clamped at its ends
    d = trajectory_distance([0.5], [math.e], [0.0, 1.0], [1.0, math.e ** 2])
    assert d == pytest.approx(0.0, abs=1e-12)
    assert trajectory_distance([2.0], [1.0], [0.0, 1.0], [1.0, math.e]) == pytest.approx(1.0)
