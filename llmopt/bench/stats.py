"""Statistics for paired benchmark rounds: ratio intervals, percentiles, verdicts, reproduction checks.

Benchmarks on a shared machine interleave their arms in paired rounds; a round's ratio cancels the
machine's slow drift, and the rounds' spread gives a 95% interval. Ratios are averaged on the log scale
(geometric mean), so a 2x speedup and a 0.5x slowdown are symmetric. Distributions come from scipy.stats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import stats as st

from ..errors import InvalidParameterError

VERDICTS = ("confirmed", "refuted (better)", "refuted (worse)", "inconclusive")
EQUIVALENCE_OUTCOMES = ("consistent", "inconsistent", "inconclusive")
MAX_RELATIVE_WIDTH = 0.5  # a ratio interval with high/low above 1.5 is too wide to confirm an estimate


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval over `rounds` paired rounds."""
    estimate: float
    low: float
    high: float
    rounds: int
    confidence: float = 0.95
    method: str = "t on log ratios"  # or "bootstrap", "t", "welch t on log ratios", "single round"

    @property
    def single(self) -> bool:
        """True when no interval could be computed (one round): low == high == estimate."""
        return self.rounds < 2

    @property
    def relative_width(self) -> float:
        """high/low - 1 for a ratio interval; inf when the interval reaches zero or below (no ratio scale)."""
        if self.low <= 0:
            return math.inf
        return self.high / self.low - 1

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self, prefix: str) -> dict:
        """Flat columns for a results row: prefix, prefix_low, prefix_high, prefix_rounds, prefix_method."""
        return {prefix: self.estimate, f"{prefix}_low": self.low, f"{prefix}_high": self.high,
                f"{prefix}_rounds": self.rounds, f"{prefix}_method": self.method}

    def text(self, unit: str = "x", digits: int = 2) -> str:
        """E.g. '2.36x (95% CI 2.21-2.52, 6 rounds)'; one round reads '2.36x (1 round, no interval)'."""
        estimate = f"{self.estimate:.{digits}f}{unit}"
        if self.single:
            return f"{estimate} ({self.rounds} round, no interval)"
        return f"{estimate} ({self.confidence:.0%} CI {_range(self.low, self.high, digits)}, {self.rounds} rounds)"


def _range(low: float, high: float, digits: int) -> str:
    """'2.21-2.52', or '-5.10 to -1.30' where a dash would be ambiguous."""
    sep = " to " if min(low, high) < 0 else "-"
    return f"{low:.{digits}f}{sep}{high:.{digits}f}"


def _values(values: Iterable[float], name: str, positive: bool = False) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise InvalidParameterError(f"{name}: need at least one round, got {array.size}")
    if not np.all(np.isfinite(array)):
        raise InvalidParameterError(f"{name}: every value must be finite, got {array.tolist()}")
    if positive and np.any(array <= 0):
        raise InvalidParameterError(f"{name}: every value must be positive (times, rates), got {array.tolist()}")
    return array


def _confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise InvalidParameterError(f"confidence must be between 0 and 1, got {confidence}")
    return confidence


def _t_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """Mean and Student-t interval of the mean; a zero spread gives a zero-width interval."""
    mean = float(values.mean())
    se = float(values.std(ddof=1)) / math.sqrt(values.size)
    half = float(st.t.ppf((1 + confidence) / 2, values.size - 1)) * se
    return mean, mean - half, mean + half


def ratio_interval(ratios: Sequence[float], confidence: float = 0.95) -> Interval:
    """Geometric mean of per-round ratios with a t-interval on the mean log ratio, exponentiated.

    The shared core of paired_ratio: log ratios of paired rounds are close to normal on a noisy machine
    (noise is multiplicative), so the t-interval on their mean is the interval of the geometric mean.
    """
    logs = np.log(_values(ratios, "ratios", positive=True))
    confidence = _confidence(confidence)
    if logs.size == 1:
        estimate = math.exp(logs[0])
        return Interval(estimate, estimate, estimate, 1, confidence, "single round")
    mean, low, high = _t_interval(logs, confidence)
    return Interval(math.exp(mean), math.exp(low), math.exp(high), int(logs.size), confidence)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float], confidence: float = 0.95) -> Interval:
    """Ratio numerator/denominator of paired rounds (round i of both arms ran back to back).

    Estimate: geometric mean of the per-round ratios; interval: Student-t on the mean log ratio. One round
    gives low == high == estimate (method 'single round'); a verdict on it is never 'confirmed'.
    """
    num = _values(numerator, "numerator", positive=True)
    den = _values(denominator, "denominator", positive=True)
    if num.size != den.size:
        raise InvalidParameterError(f"paired rounds: numerator has {num.size} rounds, denominator {den.size}")
    return ratio_interval(num / den, confidence)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Arithmetic mean with a Student-t interval: for differences that can be zero or negative
    (a percent reduction, a score delta), where a ratio scale does not apply."""
    array = _values(values, "values")
    confidence = _confidence(confidence)
    if array.size == 1:
        return Interval(float(array[0]), float(array[0]), float(array[0]), 1, confidence, "single round")
    mean, low, high = _t_interval(array, confidence)
    return Interval(mean, low, high, int(array.size), confidence, "t")


def bootstrap_ratio(numerator: Sequence[float], denominator: Sequence[float], confidence: float = 0.95,
                    n_resamples: int = 9999, seed: int = 0) -> Interval:
    """Like paired_ratio, with a seeded BCa bootstrap of the mean log ratio instead of the t-interval:
    for skewed per-round ratios (an occasional stalled round) where normality of the logs is doubtful."""
    num = _values(numerator, "numerator", positive=True)
    den = _values(denominator, "denominator", positive=True)
    if num.size != den.size:
        raise InvalidParameterError(f"paired rounds: numerator has {num.size} rounds, denominator {den.size}")
    confidence = _confidence(confidence)
    logs = np.log(num / den)
    estimate = math.exp(float(logs.mean()))
    if logs.size == 1:
        return Interval(estimate, estimate, estimate, 1, confidence, "single round")
    if np.ptp(logs) == 0:  # every round identical: nothing to resample
        return Interval(estimate, estimate, estimate, int(logs.size), confidence, "bootstrap")
    result = st.bootstrap((logs,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                          method="BCa", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):  # BCa undefined on tiny samples: percentile instead
        result = st.bootstrap((logs,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                              method="percentile", rng=np.random.default_rng(seed))
        low, high = result.confidence_interval
    return Interval(estimate, math.exp(low), math.exp(high), int(logs.size), confidence, "bootstrap")


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """Latency percentiles as serving benchmarks report them: {'p50': ..., 'p95': ..., 'p99': ...}
    (linear interpolation between samples; with few samples p99 is close to the maximum)."""
    array = _values(values, "values")
    for q in qs:
        if not 0 <= q <= 100:
            raise InvalidParameterError(f"percentile must be between 0 and 100, got {q}")
    return {f"p{q:g}": float(np.percentile(array, q)) for q in qs}


def verdict(interval: Interval, estimate_low: float, estimate_high: float, higher_is_better: bool = True,
            max_relative_width: float = MAX_RELATIVE_WIDTH, max_width: float | None = None) -> str:
    """The measured interval against an estimated range [estimate_low, estimate_high]: one of VERDICTS.

    refuted: the WHOLE interval lies outside the range; 'better' or 'worse' follows the metric (with
    higher_is_better=False, as for latency and memory, an interval entirely above the range is worse).
    confirmed: the interval overlaps the range (touching counts; a point range low == high works) and is
    narrow enough. inconclusive: it overlaps the range but is too wide, or it is a single round.
    Too wide: high/low - 1 > max_relative_width (default 0.5, high/low > 1.5: as wide as a typical '2-3x'
    estimate, so a wider interval would confirm almost any estimate near it); for difference metrics that
    can be zero or negative pass max_width, an absolute limit on high - low, which replaces the ratio rule.
    """
    if not estimate_low <= estimate_high:
        raise InvalidParameterError(f"estimate range: low {estimate_low} is above high {estimate_high}")
    if interval.low > estimate_high:
        return "refuted (better)" if higher_is_better else "refuted (worse)"
    if interval.high < estimate_low:
        return "refuted (worse)" if higher_is_better else "refuted (better)"
    if interval.single:
        return "inconclusive"
    too_wide = (interval.high - interval.low > max_width if max_width is not None
                else interval.relative_width > max_relative_width)
    return "inconclusive" if too_wide else "confirmed"


def verdict_text(interval: Interval, estimate_low: float, estimate_high: float, higher_is_better: bool = True,
                 unit: str = "x", digits: int = 2, **limits: float) -> str:
    """E.g. 'confirmed: 2.36x (2.21-2.52) vs estimate 2-3x'; limits go to verdict (max_relative_width...)."""
    outcome = verdict(interval, estimate_low, estimate_high, higher_is_better, **limits)
    measured = f"{interval.estimate:.{digits}f}{unit}"
    measured += " (1 round)" if interval.single else f" ({_range(interval.low, interval.high, digits)})"
    estimate = (f"{estimate_low:g}{unit}" if estimate_low == estimate_high
                else f"{estimate_low:g}{' to ' if estimate_low < 0 else '-'}{estimate_high:g}{unit}")
    return f"{outcome}: {measured} vs estimate {estimate}"


def _welch(logs_a: np.ndarray, logs_b: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """Difference of means a - b with a Welch-t interval (unequal variances, Satterthwaite df)."""
    diff = float(logs_a.mean() - logs_b.mean())
    va, vb = logs_a.var(ddof=1) / logs_a.size, logs_b.var(ddof=1) / logs_b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (logs_a.size - 1) + vb ** 2 / (logs_b.size - 1))
    half = float(st.t.ppf((1 + confidence) / 2, df)) * se
    return diff, diff - half, diff + half


def equivalence(rounds_a: Sequence[float], rounds_b: Sequence[float], margin: float = 0.15,
                confidence: float = 0.90) -> tuple[str, Interval]:
    """Does re-measurement B reproduce A? Inputs are the per-round RATIOS (not logs) of the same comparison.

    Interval: Welch-t interval of mean log ratio A minus mean log ratio B, exponentiated (ratio of ratios).
    'consistent' when it lies within [1/(1+margin), 1+margin]; 'inconsistent' when it lies entirely outside
    that band; otherwise 'inconclusive'. A 90% two-sided interval inside the band is TOST: two one-sided 5%
    tests both reject a difference beyond the margin. Fewer than 2 rounds on either side: 'inconclusive'.
    """
    if margin <= 0:
        raise InvalidParameterError(f"margin must be positive (0.15 means ratios within 15%), got {margin}")
    logs_a = np.log(_values(rounds_a, "rounds_a", positive=True))
    logs_b = np.log(_values(rounds_b, "rounds_b", positive=True))
    confidence = _confidence(confidence)
    rounds = int(min(logs_a.size, logs_b.size))
    if rounds < 2:
        estimate = math.exp(float(logs_a.mean() - logs_b.mean()))
        return "inconclusive", Interval(estimate, estimate, estimate, rounds, confidence, "single round")
    diff, low, high = _welch(logs_a, logs_b, confidence)
    interval = Interval(math.exp(diff), math.exp(low), math.exp(high), rounds, confidence,
                        "welch t on log ratios")
    band_low, band_high = 1 / (1 + margin), 1 + margin
    if band_low <= interval.low and interval.high <= band_high:
        return "consistent", interval
    if interval.low > band_high or interval.high < band_low:
        return "inconsistent", interval
    return "inconclusive", interval


def margin_from_noise(rounds_a: Sequence[float], rounds_b: Sequence[float], confidence: float = 0.90) -> float:
    """The smallest equivalence margin these rounds could ever call 'consistent' at this noise.

    It is the half-width of equivalence()'s interval, exp(t * standard error) - 1: even two identical means
    would be 'inconclusive' with a smaller margin. A margin below it asks for more precision than was measured.
    """
    logs_a = np.log(_values(rounds_a, "rounds_a", positive=True))
    logs_b = np.log(_values(rounds_b, "rounds_b", positive=True))
    if min(logs_a.size, logs_b.size) < 2:
        raise InvalidParameterError("margin_from_noise: need at least 2 rounds on each side to estimate noise")
    diff, _, high = _welch(logs_a, logs_b, _confidence(confidence))
    return math.exp(high - diff) - 1


def interval_from_columns(row, prefix: str, point: float | None = None, confidence: float = 0.95) -> Interval:
    """The Interval a result row carries in `{prefix}_geomean`, `_low`, `_high`, `_rounds` (the measurement
    loops' interval columns). Where it carries none (columns missing or NaN, fewer than 2 rounds: an old results
    file, one repeat), the point value `point` (default row[prefix]) as a one-round Interval, on which
    `estimate_verdict` reads 'inconclusive'."""
    def get(key: str) -> float:
        try:
            value = row[key] if key in row else math.nan
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    estimate, low, high, rounds = (get(f"{prefix}_{k}") for k in ("geomean", "low", "high", "rounds"))
    if all(np.isfinite([estimate, low, high, rounds])) and rounds >= 2:
        return Interval(estimate, low, high, int(rounds), confidence)
    value = float(point) if point is not None else get(prefix)
    if not np.isfinite(value):
        value = estimate
    return Interval(value, value, value, 1, confidence, "single round")


def estimate_verdict(interval: Interval, estimate_low: float, estimate_high: float, higher_is_better: bool = True,
                     unit: str = "x", digits: int = 2, **limits: float) -> str:
    """The rule for a measurement against the design document's estimate, with its text.

    With an interval of 2 or more paired rounds: `verdict_text` (confirmed / refuted (better|worse) /
    inconclusive by the interval rule of `verdict`; higher_is_better=False for latency, time to first token and
    memory). With only a point estimate (fewer than 2 rounds): 'inconclusive', whatever side of the range the
    point lies, since one round says nothing about how far the next would move. E.g.
    'confirmed: 2.36x (2.21-2.52) vs estimate 2-3x', 'inconclusive: 1.13x (1 round) vs estimate 1x'.
    """
    text = verdict_text(interval, estimate_low, estimate_high, higher_is_better, unit, digits, **limits)
    if interval.single:
        return "inconclusive" + text[text.index(":"):]
    return text
