"""Seed statistics of the study: intervals over seeds, one symmetric verdict rule, and the
per-seed summaries of a stable-rank trajectory. Pure functions of plain numbers.

The rule (every claim of the report): a claim is a comparison ``statistic ≷ null`` in a
claimed direction. Its verdict is

- ``True`` when the 95 % confidence interval of the statistic over seeds lies entirely on
  the claimed side of the null,
- ``False`` when it lies entirely on the opposite side,
- ``None`` (inconclusive) otherwise, and when there are too few seeds for an interval.

Intervals are Student t intervals (``method`` says which):

- ``t_interval(x)``: one-sample, mean(x) ± t_{0.975, n-1} · s / √n;
- ``welch_interval(a, b)``: mean(a) − mean(b) ± t_{0.975, ν} · √(s_a²/n_a + s_b²/n_b), ν the
  Welch–Satterthwaite degrees of freedom. Seeds of two runs are independent samples.

With zero spread (every seed equal) the interval is the point itself. Fewer than two
values on a side give no interval.

Trajectory summaries (per seed, from the mean stable rank s(p) at checkpoint progress p):

- ``log_band(s) = ln(max s / min s)`` — the width of the stable-rank band (the log of the
  max/min ratio);
- ``log_slope(p, s)`` — the least-squares slope of ln s against p ∈ [0, 1]: > 0 expands,
  < 0 contracts;
- ``trajectory_distance(p_a, s_a, p_b, s_b)`` — the root mean square of ln s_a − ln s_b over
  the checkpoints of ``a``, with ln s_b linearly interpolated at ``a``'s progress (clamped
  at its ends): 0.1 means the two trajectories differ by about 10 % on average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "LEVEL",
    "Interval",
    "mean_sd",
    "t_interval",
    "welch_interval",
    "verdict",
    "combine",
    "log_band",
    "log_slope",
    "trajectory_distance",
]

LEVEL = 0.95
"""Confidence level of every interval of the study."""


@dataclass(frozen=True)
class Interval:
    """A confidence interval over seeds.

    Attributes:
        estimate: the statistic (a mean, or a difference of means); None without data.
        low, high: the interval; None when there are too few values for one.
        n: values per side (the smaller side for a difference).
        method: how the interval was computed, in words.
    """

    estimate: float | None
    low: float | None
    high: float | None
    n: int
    method: str

    @property
    def ci(self) -> list[float] | None:
        return None if self.low is None else [self.low, self.high]


def _clean(x: Sequence[float | None]) -> list[float]:
    return [float(v) for v in x if v is not None and math.isfinite(float(v))]


def mean_sd(x: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sample standard deviation, n)`` of the finite values (sd None for n < 2)."""
    v = _clean(x)
    n = len(v)
    if not n:
        return None, None, 0
    m = math.fsum(v) / n
    if n < 2:
        return m, None, n
    return m, math.sqrt(math.fsum((a - m) ** 2 for a in v) / (n - 1)), n


def _t_quantile(df: float, level: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def t_interval(x: Sequence[float | None], level: float = LEVEL) -> Interval:
    """One-sample t interval of the mean of ``x``."""
    m, sd, n = mean_sd(x)
    method = f"t interval of the mean over seeds ({100 * level:g} %, n-1 df)"
    if n < 2:
        return Interval(m, None, None, n, method + f"; n = {n} < 2: no interval")
    half = _t_quantile(n - 1, level) * sd / math.sqrt(n)
    return Interval(m, m - half, m + half, n, method)


def welch_interval(a: Sequence[float | None], b: Sequence[float | None], level: float = LEVEL) -> Interval:
    """Welch t interval of mean(a) − mean(b) (independent seeds, unequal variances)."""
    ma, sa, na = mean_sd(a)
    mb, sb, nb = mean_sd(b)
    method = f"Welch t interval of the difference of seed means ({100 * level:g} %)"
    est = None if ma is None or mb is None else ma - mb
    n = min(na, nb)
    if n < 2:
        return Interval(est, None, None, n, method + f"; n = {na} and {nb}: fewer than 2 seeds on a side, no interval")
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Interval(est, est, est, n, method + "; zero spread over seeds")
    df = (va + vb) ** 2 / ((va * va / (na - 1) if va else 0.0) + (vb * vb / (nb - 1) if vb else 0.0))
    half = _t_quantile(df, level) * se
    return Interval(est, est - half, est + half, n, method)


def verdict(iv: Interval, null: float = 0.0, direction: int = 1) -> bool | None:
    """The symmetric rule: True when the interval excludes ``null`` on the claimed side
    (``direction`` +1: statistic > null; -1: statistic < null), False when it excludes it on
    the other side, None otherwise (and without an interval)."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1; got {direction!r}")
    if iv.low is None or iv.high is None:
        return None
    lo, hi = (iv.low - null, iv.high - null) if direction == 1 else (null - iv.high, null - iv.low)
    if lo > 0:
        return True
    if hi < 0:
        return False
    return None


def combine(verdicts: Sequence[bool | None]) -> bool | None:
    """A claim made of several comparisons: True when every one is True, False when any is
    False, None otherwise (and for no comparison at all)."""
    v = list(verdicts)
    if not v:
        return None
    if any(x is False for x in v):
        return False
    if all(x is True for x in v):
        return True
    return None


def log_band(series: Sequence[float]) -> float | None:
    """ln(max/min) of a positive series (None when empty or not positive)."""
    s = _clean(series)
    if not s or min(s) <= 0:
        return None
    return math.log(max(s) / min(s))


def log_slope(progress: Sequence[float], series: Sequence[float]) -> float | None:
    """Least-squares slope of ln(series) against progress (None for < 2 distinct points)."""
    pts = [(float(p), float(s)) for p, s in zip(progress, series) if p is not None and s is not None and s > 0]
    if len(pts) < 2:
        return None
    xs = [p for p, _ in pts]
    ys = [math.log(s) for _, s in pts]
    mx, my = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


def trajectory_distance(progress_a: Sequence[float], series_a: Sequence[float],
                        progress_b: Sequence[float], series_b: Sequence[float]) -> float | None:
    """RMS of ln s_a − ln s_b over ``a``'s checkpoints (``b`` interpolated in progress)."""
    a = sorted((float(p), math.log(s)) for p, s in zip(progress_a, series_a) if p is not None and s is not None and s > 0)
    b = sorted((float(p), math.log(s)) for p, s in zip(progress_b, series_b) if p is not None and s is not None and s > 0)
    if not a or not b:
        return None
    bx, by = [p for p, _ in b], [v for _, v in b]
    sq = [(v - _interp(p, bx, by)) ** 2 for p, v in a]
    return math.sqrt(math.fsum(sq) / len(sq))
