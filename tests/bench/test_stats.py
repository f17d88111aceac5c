"""Unit tests of llmopt.bench.stats: paired ratio intervals, verdicts, reproduction checks (no model, no timing)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from llmopt.bench.stats import (
    Interval,
    bootstrap_ratio,
    equivalence,
    margin_from_noise,
    mean_interval,
    paired_ratio,
    percentiles,
    ratio_interval,
    verdict,
    verdict_text,
)
from llmopt.errors import InvalidParameterError

# ---- paired_ratio ---------------------------------------------------------------------------------------

def test_paired_ratio_is_the_geometric_mean_of_per_round_ratios():
    interval = paired_ratio([2.0, 8.0], [1.0, 1.0])
    assert interval.estimate == pytest.approx(4.0)  # sqrt(2 * 8), not the arithmetic mean 5
    assert interval.rounds == 2 and interval.method == "t on log ratios"


def test_paired_ratio_matches_a_hand_computed_t_interval():
    num = [4.0, 4.4, 4.2, 3.8, 4.6, 4.1]
    den = [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    logs = np.log(np.array(num) / np.array(den))
    half = st.t.ppf(0.975, 5) * logs.std(ddof=1) / math.sqrt(6)
    interval = paired_ratio(num, den)
    assert interval.estimate == pytest.approx(math.exp(logs.mean()))
    assert interval.low == pytest.approx(math.exp(logs.mean() - half))
    assert interval.high == pytest.approx(math.exp(logs.mean() + half))
    assert interval.low < interval.estimate < interval.high
    assert paired_ratio(num, den, confidence=0.99).high > interval.high


def test_paired_ratio_pairs_by_round_so_a_common_drift_cancels():
    drift = np.array([1.0, 1.5, 0.8, 2.0, 1.2])  # the machine slows and speeds up; both arms see it
    interval = paired_ratio(3.0 * drift, drift)
    assert interval.estimate == pytest.approx(3.0)
    assert interval.low == pytest.approx(3.0) and interval.high == pytest.approx(3.0)


def test_paired_ratio_95_percent_interval_covers_the_true_ratio_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true_ratio, experiments, rounds = 2.0, 2000, 6
    base = rng.lognormal(0.0, 0.2, size=(experiments, rounds))
    arm = true_ratio * base * rng.lognormal(0.0, 0.1, size=(experiments, rounds))
    covered = sum(paired_ratio(arm[i], base[i]).contains(true_ratio) for i in range(experiments))
    assert 0.93 <= covered / experiments <= 0.97


def test_paired_ratio_one_round_is_readable_not_a_crash():
    interval = paired_ratio([3.0], [1.5])
    assert (interval.estimate, interval.low, interval.high) == (2.0, 2.0, 2.0)
    assert interval.method == "single round" and interval.single
    assert interval.text() == "2.00x (1 round, no interval)"


@pytest.mark.parametrize("num, den, words", [
    ([], [], "at least one round"),
    ([1.0, 2.0], [1.0], "numerator has 2 rounds, denominator 1"),
    ([1.0, 0.0], [1.0, 1.0], "positive"),
    ([1.0, -2.0], [1.0, 1.0], "positive"),
    ([1.0, float("nan")], [1.0, 1.0], "finite"),
])
def test_paired_ratio_rejects_bad_input_with_one_clear_message(num, den, words):
    with pytest.raises(InvalidParameterError, match=words):
        paired_ratio(num, den)


def test_paired_ratio_rejects_a_confidence_outside_0_1():
    with pytest.raises(InvalidParameterError, match="confidence"):
        paired_ratio([1.0, 2.0], [1.0, 1.0], confidence=95)


def test_ratio_interval_is_the_core_of_paired_ratio():
    assert ratio_interval([2.0, 2.2, 1.9]) == paired_ratio([2.0, 2.2, 1.9], [1.0, 1.0, 1.0])


# ---- Interval -------------------------------------------------------------------------------------------

def test_interval_text_columns_and_relative_width():
    interval = Interval(2.36, 2.21, 2.52, 6)
    assert interval.text() == "2.36x (95% CI 2.21-2.52, 6 rounds)"
    assert interval.as_dict("speedup") == {"speedup": 2.36, "speedup_low": 2.21, "speedup_high": 2.52,
                                           "speedup_rounds": 6, "speedup_method": "t on log ratios"}
    assert interval.relative_width == pytest.approx(2.52 / 2.21 - 1)
    assert Interval(-1.0, -2.0, 0.5, 4, method="t").relative_width == math.inf


def test_negative_intervals_read_without_a_double_dash():
    interval = Interval(-3.2, -5.1, -1.3, 6, method="t")
    assert interval.text(unit="%") == "-3.20% (95% CI -5.10 to -1.30, 6 rounds)"


# ---- mean_interval, bootstrap, percentiles ----------------------------------------------------------------

def test_mean_interval_allows_negative_values_and_matches_scipy():
    values = [-3.0, -1.0, 2.0, -4.0, 0.5]
    interval = mean_interval(values)
    low, high = st.t.interval(0.95, 4, loc=np.mean(values), scale=st.sem(values))
    assert interval.estimate == pytest.approx(np.mean(values))
    assert (interval.low, interval.high) == (pytest.approx(low), pytest.approx(high))
    assert interval.method == "t"
    assert mean_interval([-2.0]).method == "single round"


def test_bootstrap_ratio_is_seeded_and_close_to_the_t_interval_on_well_behaved_data():
    rng = np.random.default_rng(1)
    den = rng.lognormal(0, 0.1, 12)
    num = 2.0 * den * rng.lognormal(0, 0.05, 12)
    a, b = bootstrap_ratio(num, den, n_resamples=999, seed=3), bootstrap_ratio(num, den, n_resamples=999, seed=3)
    t = paired_ratio(num, den)
    assert a == b and a.method == "bootstrap"
    assert a.estimate == pytest.approx(t.estimate)
    assert a.low == pytest.approx(t.low, rel=0.03) and a.high == pytest.approx(t.high, rel=0.03)
    assert bootstrap_ratio([2.0, 2.0], [1.0, 1.0]).low == pytest.approx(2.0)  # no spread: nothing to resample
    assert bootstrap_ratio([2.0], [1.0]).method == "single round"


def test_percentiles():
    values = list(range(1, 101))
    result = percentiles(values)
    assert list(result) == ["p50", "p95", "p99"]
    assert result["p50"] == pytest.approx(np.percentile(values, 50))
    assert result["p99"] == pytest.approx(np.percentile(values, 99))
    assert percentiles([0.2], qs=(50, 99.9)) == {"p50": 0.2, "p99.9": 0.2}
    with pytest.raises(InvalidParameterError):
        percentiles([])
    with pytest.raises(InvalidParameterError, match="percentile"):
        percentiles([1.0], qs=(150,))


# ---- verdict --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("low, high, expected", [
    (2.21, 2.52, "confirmed"),
    (1.80, 2.00, "confirmed"),           # touching the range counts as overlap
    (3.20, 3.80, "refuted (better)"),    # entirely above a speedup estimate
    (1.40, 1.60, "refuted (worse)"),     # entirely below it
    (1.20, 5.00, "inconclusive"),        # overlaps, but high/low > 1.5
])
def test_verdict_higher_is_better(low, high, expected):
    interval = Interval(math.sqrt(low * high), low, high, 6)
    assert verdict(interval, 2.0, 3.0, higher_is_better=True) == expected


@pytest.mark.parametrize("low, high, expected", [
    (0.95, 1.05, "confirmed"),
    (1.13, 1.29, "refuted (worse)"),     # latency entirely above its estimate: slower, i.e. worse
    (0.60, 0.80, "refuted (better)"),    # latency entirely below: faster
    (0.70, 1.60, "inconclusive"),
])
def test_verdict_lower_is_better(low, high, expected):
    interval = Interval(math.sqrt(low * high), low, high, 6)
    assert verdict(interval, 0.9, 1.1, higher_is_better=False) == expected


def test_issue_case_latency_above_its_estimate_is_refuted_worse_not_better():
    # the issue: latency 1.13x and 1.29x the sequential latency against an estimate of 0.9-1.1
    above = Interval(1.21, 1.13, 1.29, 6)
    assert verdict(above, 0.9, 1.1, higher_is_better=False) == "refuted (worse)"
    # the same two rounds alone give a 2-round interval far too wide to refute anything
    two_rounds = paired_ratio([1.13, 1.29], [1.0, 1.0])
    assert two_rounds.low < 1.1 and verdict(two_rounds, 0.9, 1.1, higher_is_better=False) == "inconclusive"


def test_verdict_on_a_point_estimate_range():
    assert verdict(Interval(1.0, 0.97, 1.03, 6), 1.0, 1.0) == "confirmed"
    assert verdict(Interval(1.1, 1.05, 1.15, 6), 1.0, 1.0) == "refuted (better)"
    assert verdict(Interval(1.1, 1.05, 1.15, 6), 1.0, 1.0, higher_is_better=False) == "refuted (worse)"


def test_verdict_on_a_single_round():
    single = paired_ratio([2.5], [1.0])
    assert verdict(single, 2.0, 3.0) == "inconclusive"  # one round never confirms
    assert verdict(paired_ratio([4.0], [1.0]), 2.0, 3.0) == "refuted (better)"


def test_verdict_on_difference_metrics_uses_an_absolute_width():
    reduction = mean_interval([-3.0, -2.0, -4.0, -3.0])  # percent change, negative = fewer bytes
    assert verdict(reduction, -5.0, 0.0, higher_is_better=False) == "inconclusive"  # no ratio scale
    assert verdict(reduction, -5.0, 0.0, higher_is_better=False, max_width=5.0) == "confirmed"
    assert verdict(reduction, -5.0, 0.0, higher_is_better=False, max_width=1.0) == "inconclusive"


def test_verdict_width_limit_is_a_parameter_and_the_range_is_checked():
    interval = Interval(2.5, 2.0, 3.2, 6)  # high/low = 1.6
    assert verdict(interval, 2.0, 3.0) == "inconclusive"
    assert verdict(interval, 2.0, 3.0, max_relative_width=1.0) == "confirmed"
    with pytest.raises(InvalidParameterError, match="estimate range"):
        verdict(interval, 3.0, 2.0)


def test_verdict_text():
    assert verdict_text(Interval(2.36, 2.21, 2.52, 6), 2, 3) == "confirmed: 2.36x (2.21-2.52) vs estimate 2-3x"
    assert (verdict_text(Interval(1.21, 1.13, 1.29, 6), 0.9, 1.1, higher_is_better=False)
            == "refuted (worse): 1.21x (1.13-1.29) vs estimate 0.9-1.1x")
    assert verdict_text(paired_ratio([2.5], [1.0]), 1, 1) == "refuted (better): 2.50x (1 round) vs estimate 1x"


# ---- equivalence ----------------------------------------------------------------------------------------

def test_equivalence_identical_distributions_with_small_noise_are_consistent():
    rng = np.random.default_rng(2)
    a, b = 2.0 * rng.lognormal(0, 0.02, 8), 2.0 * rng.lognormal(0, 0.02, 8)
    outcome, interval = equivalence(a, b)
    assert outcome == "consistent"
    assert interval.method == "welch t on log ratios" and interval.confidence == 0.90
    assert interval.contains(1.0)


def test_equivalence_a_40_percent_shift_is_inconsistent():
    rng = np.random.default_rng(3)
    a, b = 2.0 * rng.lognormal(0, 0.03, 6), 1.4 * rng.lognormal(0, 0.03, 6)
    outcome, interval = equivalence(a, b)
    assert outcome == "inconsistent" and interval.low > 1.15


def test_equivalence_few_noisy_rounds_are_inconclusive():
    outcome, interval = equivalence([2.0, 2.6, 1.6], [2.3, 1.7, 2.1])
    assert outcome == "inconclusive"
    assert interval.low < 1 / 1.15 or interval.high > 1.15


def test_equivalence_matches_scipy_welch_interval():
    a, b = [2.0, 2.1, 1.95, 2.05], [1.9, 2.0, 2.2, 1.85, 2.02]
    _, interval = equivalence(a, b)
    ci = st.ttest_ind(np.log(a), np.log(b), equal_var=False).confidence_interval(0.90)
    assert interval.low == pytest.approx(math.exp(ci.low))
    assert interval.high == pytest.approx(math.exp(ci.high))


def test_equivalence_with_one_round_is_inconclusive():
    outcome, interval = equivalence([2.0], [2.0, 2.1, 1.9])
    assert outcome == "inconclusive" and interval.method == "single round" and interval.rounds == 1


def test_equivalence_on_a_stable_machine_rarely_says_inconsistent():
    rng = np.random.default_rng(4)
    trials = 1000
    a = 1.8 * rng.lognormal(0, 0.05, size=(trials, 5))
    b = 1.8 * rng.lognormal(0, 0.05, size=(trials, 5))
    outcomes = [equivalence(a[i], b[i])[0] for i in range(trials)]
    assert outcomes.count("inconsistent") / trials <= 0.05
    assert outcomes.count("consistent") / trials >= 0.5  # 5% noise, 5 rounds: a 15% margin is usually reachable


def test_equivalence_rejects_bad_margins_and_inputs():
    with pytest.raises(InvalidParameterError, match="margin"):
        equivalence([1.0, 1.1], [1.0, 1.1], margin=0)
    with pytest.raises(InvalidParameterError, match="rounds_b"):
        equivalence([1.0, 1.1], [])


def test_margin_from_noise_is_the_tightest_margin_that_can_be_consistent():
    a, b = [2.0, 2.1, 1.95, 2.05], [2.0, 2.08, 1.9, 2.06]
    margin = margin_from_noise(a, b)
    assert margin > 0
    assert equivalence(a, b, margin=margin * 0.99)[0] != "consistent"
    same = margin_from_noise(a, a)  # identical means: consistent just above this margin, not below
    assert equivalence(a, a, margin=same * 1.01)[0] == "consistent"
    assert equivalence(a, a, margin=same * 0.99)[0] == "inconclusive"
    with pytest.raises(InvalidParameterError, match="at least 2 rounds"):
        margin_from_noise([2.0], b)
