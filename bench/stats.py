"""Confidence intervals for the ratios bench/run.py reports (pure functions, no I/O).

Each round of bench/run.py measures every scenario back to back, so a ratio
such as graft/pasta is formed per round, from two numbers taken seconds
apart: drift on the machine (other jobs, thermal, page cache) that hits both
cancels. The rounds' ratios are then summarised on the log scale:

  estimate  the geometric mean of the per-round ratios;
  interval  a Student t-interval (95%) on the mean of their logarithms,
            mapped back with exp().

Why t on logs, and not a bootstrap: with the 3 to 10 rounds this machine
affords, a percentile bootstrap is too narrow (with 3 rounds it has only
10 distinct resamples, and its interval never reaches beyond the observed
extremes), while the t-interval widens correctly for small n. Logs make the
interval for b/a the mirror of a/b's, and per-round log ratios of throughput
or latency are close to symmetric. The assumption is that the rounds are
independent; the rotated order of scenarios in each round keeps a fixed
position in the round from biasing one scenario.

>>> r = ratio_interval([1.00, 1.02, 0.98, 1.01, 0.99])
>>> round(r.estimate, 4), round(r.low, 4), round(r.high, 4), r.n
(0.9999, 0.9805, 1.0197, 5)
>>> rounds_needed([1.00, 1.02, 0.98, 1.01, 0.99], 0.02)
5
>>> ratio_interval([1.1]).low is None        # one round: no interval
True
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Student t, two-sided 95% (the 0.975 quantile), for 1..30 degrees of freedom.
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with df degrees of freedom.

    Beyond the table, the Cornish-Fisher expansion around the normal
    quantile (error < 0.001 for df > 30).

    >>> t975(4), round(t975(60), 3), round(t975(10_000), 2)
    (2.776, 2.0, 1.96)
    """
    if df < 1:
        raise ValueError("t975 needs at least 1 degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class RatioInterval:
    estimate: float | None  # geometric mean of the per-round ratios
    low: float | None  # 95% interval; None with fewer than two rounds
    high: float | None
    n: int
    log_sd: float | None  # sample standard deviation of the log ratios

    @property
    def half_width(self) -> float | None:
        """The interval's half width, relative (0.02 = ±2%), on the log scale."""
        return None if self.low is None else math.log(self.high / self.low) / 2

    def verdict(self, higher_better: bool) -> str:
        """'ahead' / 'behind' if the whole interval lies on one side of 1, else 'within noise'."""
        if self.low is None:
            return "n/a"
        if self.low > 1:
            return "ahead" if higher_better else "behind"
        if self.high < 1:
            return "behind" if higher_better else "ahead"
        return "within noise"


def ratio_interval(ratios: list[float]) -> RatioInterval:
    """Geometric mean and 95% t-interval of per-round ratios (all > 0)."""
    logs = [math.log(r) for r in ratios if r and r > 0]
    n = len(logs)
    if n == 0:
        return RatioInterval(None, None, None, 0, None)
    mean = statistics.fmean(logs)
    if n == 1:
        return RatioInterval(math.exp(mean), None, None, 1, None)
    sd = statistics.stdev(logs)
    half = t975(n - 1) * sd / math.sqrt(n)
    return RatioInterval(math.exp(mean), math.exp(mean - half), math.exp(mean + half), n, sd)


def rounds_needed(ratios: list[float], rel: float = 0.02) -> int | None:
    """Rounds for the 95% interval's half width to shrink to ±rel, at the spread these ratios show.

    None with fewer than two ratios. The spread is itself estimated from the
    rounds at hand, so with 3 rounds this is a rough guide.

    >>> rounds_needed([1.0, 1.5, 0.8]) > 500
    True
    """
    r = ratio_interval(ratios)
    if r.log_sd is None:
        return None
    target = math.log1p(rel)
    # t975 > 1.96 for every df, so the normal approximation's n is a lower bound
    n = max(2, math.ceil((1.959964 * r.log_sd / target) ** 2))
    while t975(n - 1) * r.log_sd / math.sqrt(n) > target:  # ends: t975 falls towards 1.96
        n += 1
    return n
