"""Statistics over seeds, checked against SciPy and hand computations."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy import stats as scipy_stats

from lightning_ensembles.stats import (
    format_difference,
    paired_difference,
    seeds_needed,
    spread,
    t_quantile,
    verdict,
)

# Per-seed top-1 of two arms on 8 shared seeds (300-image test split: steps of 1/300).
ENSEMBLE = [0.9933, 0.9867, 0.9900, 0.9967, 0.9900, 0.9833, 0.9933, 0.9900]
SINGLE = [0.9867, 0.9867, 0.9833, 0.9900, 0.9867, 0.9800, 0.9900, 0.9933]


def test_spread_is_the_sample_standard_deviation() -> None:
    s = spread(ENSEMBLE)
    assert s.n == 8
    assert s.mean == pytest.approx(statistics.fmean(ENSEMBLE), abs=1e-15)
    assert s.std == pytest.approx(statistics.stdev(ENSEMBLE), rel=1e-12)
    assert spread([0.5]).std == 0.0
    with pytest.raises(ValueError, match="at least one value"):
        spread([])


def test_paired_difference_matches_scipy_ttest_rel() -> None:
    d = paired_difference(ENSEMBLE, SINGLE, "top1")
    reference = scipy_stats.ttest_rel(ENSEMBLE, SINGLE)
    assert d.t == pytest.approx(reference.statistic, rel=1e-9)
    assert d.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    low, high = reference.confidence_interval(0.95)
    assert (d.ci_low, d.ci_high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    # By hand: mean difference +- t(0.975, 7) * sd / sqrt(8).
    diffs = [a - b for a, b in zip(ENSEMBLE, SINGLE)]
    half = 2.364624251592785 * statistics.stdev(diffs) / math.sqrt(8)
    assert d.mean == pytest.approx(statistics.fmean(diffs), abs=1e-15)
    assert d.ci_high - d.mean == pytest.approx(half, rel=1e-9)
    assert d.df == 7 and d.n == 8
    assert (d.wins, d.ties, d.losses) == (6, 1, 1)
    assert d.significant == (low > 0)


def test_wins_follow_the_metric_direction() -> None:
    nll_a, nll_b = [0.03, 0.04, 0.05], [0.04, 0.04, 0.04]
    d = paired_difference(nll_a, nll_b, "nll")
    assert (d.wins, d.ties, d.losses) == (1, 1, 1)  # lower NLL wins
    d = paired_difference([0.03, 0.03], [0.05, 0.06], "ece")
    assert (d.wins, d.losses) == (2, 0) and d.mean < 0


def test_degenerate_samples() -> None:
    one = paired_difference([0.99], [0.98])
    assert math.isinf(one.ci_low) and math.isinf(one.ci_high) and not one.significant
    assert math.isnan(one.t)
    constant = paired_difference([0.99, 0.98, 0.97], [0.98, 0.97, 0.96])
    assert constant.ci_low == pytest.approx(0.01) == constant.ci_high and constant.significant
    assert constant.seeds_needed == 2
    zero = paired_difference([0.99, 0.98], [0.99, 0.98])
    assert zero.mean == 0 and not zero.significant and zero.seeds_needed is None


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(ValueError, match="one value per shared seed, but got 2 and 3"):
        paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"`confidence` to be in \(0, 1\), but got 1.5"):
        paired_difference([0.1, 0.2], [0.1, 0.3], confidence=1.5)


def test_t_quantile_and_seeds_needed_by_hand() -> None:
    assert t_quantile(0.95, 7) == pytest.approx(scipy_stats.t.ppf(0.975, 7))
    # The 20-seed measurement: +0.47 +- 0.58 points. n = 9 is the first n with t*s/sqrt(n) < 0.47.
    n = seeds_needed(0.47, 0.58)
    assert n == 9
    assert (
        t_quantile(0.95, n - 1) * 0.58 / math.sqrt(n)
        < 0.47
        <= t_quantile(0.95, n - 2) * 0.58 / math.sqrt(n - 1)
    )
    assert seeds_needed(-0.47, 0.58) == 9  # the sign does not matter
    assert seeds_needed(1e-9, 1.0, limit=50) is None


def test_verdicts_in_plain_words() -> None:
    covering = paired_difference([0.99, 0.98, 0.99], [0.98, 0.99, 0.985])
    sentence = verdict(covering, "4 x WRN-16-2", "WRN-16-4", scale=100, unit=" points")
    assert sentence.startswith("No significant difference between 4 x WRN-16-2 and WRN-16-4 on top1")
    assert "seeds would resolve" in sentence or covering.seeds_needed is None

    worse = paired_difference([0.95, 0.96, 0.955, 0.95], [0.98, 0.985, 0.98, 0.99])
    sentence = verdict(worse, "4 x WRN-16-1", "WRN-16-2", scale=100, unit=" points")
    assert sentence.startswith("WRN-16-2 is better than 4 x WRN-16-1 on top1")
    assert "4 x WRN-16-1 minus WRN-16-2 = -3.00 points" in sentence

    lower_nll = paired_difference([0.03, 0.031, 0.029, 0.03], [0.05, 0.052, 0.049, 0.051], "nll")
    assert verdict(lower_nll, "ensemble", "single", digits=4).startswith(
        "ensemble is better than single on nll"
    )
    assert format_difference(worse, 100) == (
        f"{100 * worse.mean:+.2f} [{100 * worse.ci_low:+.2f}, {100 * worse.ci_high:+.2f}]"
    )


def test_detectable_difference_has_the_power_it_claims() -> None:
    """Simulated paired experiments at the returned difference reject 0 in 80% of cases (5 and 12 seeds)."""
    import numpy as np

    from lightning_ensembles.stats import detectable_difference

    rng = np.random.default_rng(0)
    for n in (5, 12):
        delta = detectable_difference(0.5, n)
        draws = rng.normal(delta, 0.5, size=(40_000, n))
        t = draws.mean(axis=1) / (draws.std(axis=1, ddof=1) / np.sqrt(n))
        rejected = np.abs(t) > t_quantile(0.95, n - 1)
        assert rejected.mean() == pytest.approx(0.8, abs=0.01)
        smaller = rng.normal(0.6 * delta, 0.5, size=(40_000, n))
        t_small = smaller.mean(axis=1) / (smaller.std(axis=1, ddof=1) / np.sqrt(n))
        assert (np.abs(t_small) > t_quantile(0.95, n - 1)).mean() < 0.6  # less power below it
    assert detectable_difference(0.5, 5) > detectable_difference(0.5, 12)  # more seeds, finer resolution
    assert math.isnan(detectable_difference(0.5, 1)) and detectable_difference(0.0, 4) == 0.0
    d = paired_difference([0.99, 0.98, 0.99, 0.99], [0.98, 0.97, 0.98, 0.985])
    assert d.detectable == pytest.approx(detectable_difference(d.std, 4))
