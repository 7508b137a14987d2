"""Small-sample statistics for evaluation numbers: Wilson intervals, differences and sums of rates, mean
and spread, interval overlap.

Evaluation sets here are small (tens to hundreds of items), so a rate such as 0.85 means little without
its uncertainty. The Wilson score interval stays inside [0, 1] and keeps a sensible width at 0 or n
successes, where the normal ("Wald") interval collapses to a point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from statistics import NormalDist


def _z(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, Real) or not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be a number strictly between 0 and 1 (e.g. 0.95), got {confidence!r}.")
    return NormalDist().inv_cdf(1 - (1 - float(confidence)) / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for a success rate ``successes / n``.

    ``center = (p + z²/2n) / (1 + z²/n)`` and ``half = z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²)``,
    with ``z`` the two-sided normal quantile of ``confidence`` (1.95996 for 0.95). Bounds lie in [0, 1];
    the low bound is exactly 0 at 0 successes and the high bound exactly 1 at n successes.

    Raises:
        ValueError: ``n == 0`` (no observations, so no interval), counts that are not integers, or
            ``successes`` outside ``0..n``.

    Example:
        >>> wilson_interval(8, 10)  # (0.4902, 0.9433)
    """
    for name, value in (("successes", successes), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"`{name}` must be an integer count, got {value!r}.")
    if n < 1:
        raise ValueError(f"`n` must be at least 1 (no observations give no interval), got {n}.")
    if not 0 <= successes <= n:
        raise ValueError(f"`successes` must be between 0 and n={n}, got {successes}.")
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact ends (the formula gives them up to rounding)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1`` in the denominator) of ``values``.

    A single value has no spread estimate: its std is ``nan`` (not 0, which would claim certainty).

    Example:
        >>> mean_std([0.8, 0.9, 1.0])  # (0.9, 0.1)
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"`values` must be a non-empty list of numbers, got {values!r:.80}.")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise ValueError(f"`values[{i}]` must be a finite number, got {v!r}.")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _check_interval(interval: Sequence[float], name: str) -> tuple[float, float]:
    if isinstance(interval, (str, bytes)) or not isinstance(interval, Sequence) or len(interval) != 2:
        raise ValueError(f"`{name}` must be a (low, high) pair, got {interval!r}.")
    low, high = interval
    if any(isinstance(v, bool) or not isinstance(v, Real) or math.isnan(v) for v in (low, high)):
        raise ValueError(f"`{name}` bounds must be numbers, got {interval!r}.")
    if low > high:
        raise ValueError(f"`{name}` has low {low} above high {high}; pass (low, high).")
    return float(low), float(high)


def intervals_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether closed intervals ``a = (low, high)`` and ``b`` share at least one point.

    Non-overlapping 95% intervals are a conservative sign of a real difference; overlapping ones do
    not prove there is none.
    """
    a_low, a_high = _check_interval(a, "a")
    b_low, b_high = _check_interval(b, "b")
    return a_low <= b_high and b_low <= a_high


def newcombe_difference(
    successes_a: int, n_a: int, successes_b: int, n_b: int, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Difference of two rates ``a - b`` with Newcombe's hybrid score interval: ``(difference, low, high)``.

    Built from each rate's Wilson interval (Newcombe 1998, method 10), so it stays sensible near 0 and 1
    where the Wald difference interval fails. It treats the samples as independent; for two variants
    judged on the same prompts (positively correlated outcomes) it is conservative. It is
    :func:`combination_interval` with weights ``+1`` and ``-1``.

    Example:
        >>> newcombe_difference(56, 70, 48, 80)  # (0.2, 0.0524, 0.3339)
    """
    return combination_interval([(successes_a, n_a, 1.0), (successes_b, n_b, -1.0)], confidence)


def combination_interval(
    terms: Sequence[tuple[int, int, float]], confidence: float = 0.95
) -> tuple[float, float, float]:
    """A weighted sum of independent rates ``sum(w * successes / n)`` with its MOVER interval: ``(value, low, high)``.

    Each term is ``(successes, n, weight)``. The interval recovers each rate's variance from its Wilson
    bounds (the method of variance estimates recovery, Zou & Donner 2008): with ``p`` the rate and
    ``(l, u)`` its Wilson interval, the low bound subtracts ``sqrt(sum (w (p - l))^2)`` over positive
    weights and ``(w (u - p))^2`` over negative ones, and the high bound mirrors it. One term gives the
    Wilson interval scaled by its weight, two with weights ``+1, -1`` give Newcombe's difference, and
    ``(target_a - side_a) - (target_b - side_b)`` (weights ``+1, -1, -1, +1``) compares two variants on
    target minus side. Samples are treated as independent, which is conservative for variants judged on
    the same prompts.

    Raises:
        ValueError: no terms, a term that is not a ``(successes, n, weight)`` triple, a weight that is not
            a finite number, or counts :func:`wilson_interval` rejects.

    Example:
        >>> combination_interval([(90, 100, 1), (10, 100, -1)])  # (0.8, 0.6948, 0.8633)
    """
    if isinstance(terms, (str, bytes)) or not isinstance(terms, Sequence) or len(terms) == 0:
        raise ValueError(f"`terms` must be a non-empty list of (successes, n, weight) triples, got {terms!r:.80}.")
    value, low_sq, high_sq = 0.0, 0.0, 0.0
    for i, term in enumerate(terms):
        if isinstance(term, (str, bytes)) or not isinstance(term, Sequence) or len(term) != 3:
            raise ValueError(f"`terms[{i}]` must be a (successes, n, weight) triple, got {term!r}.")
        successes, n, weight = term
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight):
            raise ValueError(f"`terms[{i}]` weight must be a finite number, got {weight!r}.")
        low, high = wilson_interval(successes, n, confidence)
        p = successes / n
        below, above = (p - low, high - p) if weight >= 0 else (high - p, p - low)
        value += weight * p
        low_sq += (weight * below) ** 2
        high_sq += (weight * above) ** 2
    return value, value - math.sqrt(low_sq), value + math.sqrt(high_sq)
