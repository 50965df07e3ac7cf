"""Statistics over seeds: spread, paired differences with confidence intervals, and plain-words verdicts.

Kondratyuk et al. 2020 compare an ensemble of small networks with one larger network at the same
multiply-adds. One seed of each decides nothing when the difference is as small as one seed's noise (on a
300-image test split one image is 0.33 points of top-1). This module turns per-seed results into evidence:
the mean and sample standard deviation over seeds, and for two arms run on the same seeds (same data split
and order, a *paired* design) the mean per-seed difference with a Student-t confidence interval, the t
statistic, the two-sided p-value, wins/ties/losses, and the number of seeds that would resolve the observed
difference. Student-t quantiles come from SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

LOWER_IS_BETTER = frozenset(
    {"nll", "ece", "aece", "aurc", "risk80", "brier", "loss", "latency_ms", "gmacs"}
    | {f"ood/{criterion}/fpr95" for criterion in ("msp", "entropy", "mutual_information")}
)
"""Metrics for which a smaller value is better (wins are counted that way)."""


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of ``n`` values."""

    mean: float
    std: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON)."""
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """The per-seed difference ``a - b`` of two arms evaluated on the same seeds.

    ``ci_low``/``ci_high`` bound the mean difference at ``confidence``; ``t`` and ``p_value`` are the paired
    t-test's (NaN when all differences are equal, or for fewer than two seeds). ``wins`` counts seeds where
    ``a`` is better than ``b`` (larger, or smaller for a metric in :data:`LOWER_IS_BETTER`), ``ties`` equal
    values. ``seeds_needed`` is the smallest number of seeds whose interval would exclude 0 if the mean and
    standard deviation stayed as observed (``None`` when the mean difference is 0).
    """

    metric: str
    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float
    confidence: float
    t: float
    df: int
    p_value: float
    wins: int
    ties: int
    losses: int
    seeds_needed: int | None
    detectable: float = math.nan
    """The smallest true mean difference this many seeds detect with 80% power at ``confidence``, if the
    per-seed differences scatter as observed (:func:`detectable_difference`); NaN for fewer than 2 seeds."""

    @property
    def significant(self) -> bool:
        """Whether the confidence interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0

    def as_dict(self) -> dict[str, Any]:
        """The fields (and ``significant``) as a plain dict (for JSON)."""
        return {**asdict(self), "significant": self.significant}


def _check_values(values: Sequence[float], name: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"Expected `{name}` to hold at least one value, but got none.")
    return values


def spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation over seeds.

    Args:
        values: one value per seed.

    Returns:
        The spread; ``std`` is 0 for a single value.

    Raises:
        ValueError: if ``values`` is empty.

    Example:
        >>> s = spread([0.98, 0.99, 1.0])
        >>> round(s.mean, 6), round(s.std, 6), s.n
        (0.99, 0.01, 3)
    """
    values = _check_values(values, "values")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Spread(mean=mean, std=std, n=n)


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t critical value: ``P(|T| <= q) = confidence`` for ``df`` degrees of freedom.

    Args:
        confidence: in ``(0, 1)``.
        df: degrees of freedom, ``>= 1``.

    Returns:
        The quantile ``q``.

    Example:
        >>> round(t_quantile(0.95, 19), 3)
        2.093
    """
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.5 + confidence / 2, df))


def seeds_needed(mean: float, std: float, confidence: float = 0.95, limit: int = 10_000) -> int | None:
    """The fewest seeds whose ``confidence`` interval of a mean difference would exclude 0.

    Solves ``t_quantile(confidence, n - 1) * std / sqrt(n) < |mean|`` for the smallest ``n >= 2``, taking
    the observed mean and standard deviation as the truth.

    Args:
        mean: the observed mean difference.
        std: the observed standard deviation of the per-seed differences.
        confidence: the interval's coverage.
        limit: the most seeds considered.

    Returns:
        ``n``; 2 when every difference was equal and non-zero, ``None`` when ``mean == 0`` or more than
        ``limit`` seeds would be needed.

    Example:
        >>> seeds_needed(0.47, 0.58)
        9
    """
    if mean == 0:
        return None
    if std == 0:
        return 2
    for n in range(2, limit + 1):
        if t_quantile(confidence, n - 1) * std / math.sqrt(n) < abs(mean):
            return n
    return None


def detectable_difference(std: float, n: int, confidence: float = 0.95, power: float = 0.8) -> float:
    """The smallest true mean difference a paired t-test on ``n`` seeds detects with probability ``power``.

    The two-sided test at ``confidence`` rejects when ``|t| > t_quantile(confidence, n - 1)``; under a true
    difference ``delta`` the statistic follows a non-central t with ``n - 1`` degrees of freedom and
    non-centrality ``delta * sqrt(n) / std``. This solves for the ``delta`` that makes the rejection probability
    ``power``, taking the observed ``std`` as the truth. A design whose detectable difference is larger than
    the effect it looks for cannot be expected to give a verdict, whatever it prints.

    Args:
        std: the standard deviation of the per-seed differences.
        n: the number of seeds, at least 2.
        confidence: the test's coverage (1 - its two-sided level), in ``(0, 1)``.
        power: the probability of detecting the difference, in ``(0, 1)``.

    Returns:
        ``delta`` (in the units of ``std``); NaN for ``n < 2``, 0 for ``std == 0``.

    Example:
        >>> round(detectable_difference(1.0, 20), 2)  # near (1.96 + 0.84) / sqrt(20) = 0.63 for large n
        0.66
        >>> round(detectable_difference(1.0, 3), 2)  # three seeds: over 3 standard deviations
        3.26
    """
    if n < 2:
        return math.nan
    if std == 0:
        return 0.0
    if not (0 < confidence < 1 and 0 < power < 1):
        raise ValueError(
            f"Expected `confidence` and `power` to be in (0, 1), but got {confidence!r} and {power!r}."
        )
    from scipy.optimize import brentq
    from scipy.stats import nct

    df, critical = n - 1, t_quantile(confidence, n - 1)

    def shortfall(delta: float) -> float:
        shift = delta * math.sqrt(n) / std
        lower = float(nct.cdf(-critical, df, shift))  # NaN in SciPy once it underflows, far below 1e-20
        return float(nct.sf(critical, df, shift)) + (lower if math.isfinite(lower) else 0.0) - power

    high = std
    while shortfall(high) < 0:
        high *= 2
    return float(brentq(shortfall, 0.0, high, xtol=1e-10 * std))


def paired_difference(
    a: Sequence[float], b: Sequence[float], metric: str = "top1", confidence: float = 0.95
) -> PairedDifference:
    """Compare two arms seed by seed: the mean of ``a[i] - b[i]`` with its confidence interval.

    Args:
        a: one value per seed for the first arm (e.g. the ensemble).
        b: the second arm's values on the same seeds, in the same order.
        metric: the metric's name; decides which direction is a win (see :data:`LOWER_IS_BETTER`).
        confidence: coverage of the interval, in ``(0, 1)``.

    Returns:
        The paired difference. With one seed the interval is infinite.

    Raises:
        ValueError: if ``a`` and ``b`` differ in length or are empty, or ``confidence`` is outside ``(0, 1)``.

    Example:
        >>> d = paired_difference([0.99, 0.98, 0.99], [0.98, 0.98, 0.97])
        >>> round(d.mean, 4), (d.wins, d.ties, d.losses), d.significant
        (0.01, (2, 1, 0), False)
    """
    a, b = _check_values(a, "a"), _check_values(b, "b")
    if len(a) != len(b):
        raise ValueError(
            f"Expected the two arms of a paired difference to have one value per shared seed, but got "
            f"{len(a)} and {len(b)} values."
        )
    if not 0 < confidence < 1:
        raise ValueError(f"Expected `confidence` to be in (0, 1), but got {confidence!r}.")
    differences = [x - y for x, y in zip(a, b)]
    s = spread(differences)
    n, df = s.n, s.n - 1
    tolerance = 1e-12
    better = [-d if metric in LOWER_IS_BETTER else d for d in differences]
    wins = sum(d > tolerance for d in better)
    ties = sum(abs(d) <= tolerance for d in better)
    if n < 2:
        low, high, t, p = -math.inf, math.inf, math.nan, math.nan
    elif s.std == 0:
        low = high = s.mean
        t, p = math.nan, math.nan
    else:
        from scipy.stats import t as student_t

        sem = s.std / math.sqrt(n)
        half = t_quantile(confidence, df) * sem
        low, high = s.mean - half, s.mean + half
        t = s.mean / sem
        p = float(2 * student_t.sf(abs(t), df))
    return PairedDifference(
        metric=metric,
        mean=s.mean,
        std=s.std,
        n=n,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        t=t,
        df=df,
        p_value=p,
        wins=wins,
        ties=ties,
        losses=n - wins - ties,
        seeds_needed=seeds_needed(s.mean, s.std, confidence),
        detectable=detectable_difference(s.std, n, confidence),
    )


def format_difference(d: PairedDifference, scale: float = 1.0, digits: int = 2) -> str:
    """``"+0.47 [+0.20, +0.74]"``: the mean difference and its interval, multiplied by ``scale``.

    Args:
        d: the difference.
        scale: e.g. 100 for accuracies shown in points.
        digits: decimals.

    Returns:
        The text.
    """

    def signed(value: float) -> str:
        return f"{value * scale:+.{digits}f}" if math.isfinite(value) else ("-inf" if value < 0 else "+inf")

    return f"{signed(d.mean)} [{signed(d.ci_low)}, {signed(d.ci_high)}]"


def verdict(d: PairedDifference, a: str, b: str, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
    """One sentence in plain words: which arm is better on the metric, or "no significant difference".

    Args:
        d: the paired difference ``a - b``.
        a: the first arm's name.
        b: the second arm's name.
        scale: multiplies the numbers (100 for accuracy in points).
        unit: appended to the numbers (``" points"``).
        digits: decimals.

    Returns:
        The sentence.

    Example:
        >>> d = paired_difference([0.99, 0.98, 0.99, 0.99], [0.98, 0.97, 0.98, 0.985])
        >>> verdict(d, "4 x WRN-16-2", "WRN-16-4", scale=100, unit=" points")
        '4 x WRN-16-2 is better than WRN-16-4 on top1: 4 x WRN-16-2 minus WRN-16-4 = +0.88 points (95% CI +0.48 to +1.27; 4 seeds: 4 wins, 0 ties, 0 losses for 4 x WRN-16-2).'
    """
    level = f"{round(100 * d.confidence)}%"

    def number(value: float) -> str:
        return f"{value * scale:+.{digits}f}" if math.isfinite(value) else ("-inf" if value < 0 else "+inf")

    evidence = (
        f"{a} minus {b} = {number(d.mean)}{unit} ({level} CI {number(d.ci_low)} to {number(d.ci_high)}; "
        f"{d.n} seed{'s' if d.n != 1 else ''}: {d.wins} wins, {d.ties} ties, {d.losses} losses for {a})"
    )
    if not d.significant:
        needed = (
            f"; about {d.seeds_needed} seeds would resolve a difference this size"
            if d.seeds_needed is not None and d.seeds_needed > d.n
            else ""
        )
        return f"No significant difference between {a} and {b} on {d.metric}: {evidence}{needed}."
    a_better = (d.mean < 0) if d.metric in LOWER_IS_BETTER else (d.mean > 0)
    better, worse = (a, b) if a_better else (b, a)
    return f"{better} is better than {worse} on {d.metric}: {evidence}."


__all__ = [
    "LOWER_IS_BETTER",
    "PairedDifference",
    "Spread",
    "detectable_difference",
    "format_difference",
    "paired_difference",
    "seeds_needed",
    "spread",
    "t_quantile",
    "verdict",
]
