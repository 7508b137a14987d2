import math

import pytest

from mi_peft.stats import combination_interval, intervals_overlap, mean_std, newcombe_difference, wilson_interval

# Published Wilson score intervals (95%). Newcombe (1998), "Two-sided confidence intervals for the single
# proportion: comparison of seven methods", Stat. Med. 17:857-872, Table I, method 3 (score, no continuity
# correction): 81/263, 15/148, 0/20, 1/29. The other rows were worked by hand with z = 1.959964 (z^2 = 3.841459):
#   8/10:  p = 0.8, d = 1 + z^2/10 = 1.384146, center = (0.8 + 0.192073) / d = 0.716738,
#          half = z / d * sqrt(0.016 + z^2/400) = 1.416012 * 0.160011 = 0.226578  -> (0.4902, 0.9433)
#   0/50:  d = 1.076829, center = half = 0.038415 / d = 0.035674                  -> (0, 0.0713)
#          (0.07135: the bound rounds to 0.0713 with z = 1.96 too, not 0.0714)
#   45/50: p = 0.9, center = 0.938415 / 1.076829 = 0.871459,
#          half = 1.820128 * sqrt(0.0018 + 0.000384) = 0.085063                    -> (0.7864, 0.9565)
PUBLISHED = [
    (8, 10, 0.4902, 0.9433),
    (0, 50, 0.0, 0.0713),
    (45, 50, 0.7864, 0.9565),
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
]


@pytest.mark.parametrize(("successes", "n", "low", "high"), PUBLISHED)
def test_wilson_matches_published_values(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got[0] == pytest.approx(low, abs=6e-5)
    assert got[1] == pytest.approx(high, abs=6e-5)


def _quadratic_roots(successes: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson bounds as the roots in p of (p_hat - p)^2 = z^2 p (1 - p) / n (the score test's definition)."""
    p_hat = successes / n
    a = 1 + z * z / n
    b = -(2 * p_hat + z * z / n)
    c = p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95, 0.99])
def test_wilson_solves_the_score_test_equation(confidence):
    z = {0.8: 1.2815516, 0.9: 1.6448536, 0.95: 1.9599640, 0.99: 2.5758293}[confidence]  # normal quantiles
    for n in (1, 7, 64, 500):
        for successes in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            low, high = wilson_interval(successes, n, confidence)
            ref_low, ref_high = _quadratic_roots(successes, n, z)
            assert low == pytest.approx(max(ref_low, 0.0), abs=1e-6)
            assert high == pytest.approx(min(ref_high, 1.0), abs=1e-6)
            assert 0.0 <= low <= successes / n <= high <= 1.0


def test_wilson_narrows_with_n_and_widens_with_confidence():
    widths = [wilson_interval(n * 4 // 5, n) for n in (10, 100, 1000)]
    assert widths[0][1] - widths[0][0] > widths[1][1] - widths[1][0] > widths[2][1] - widths[2][0]
    low90, high90 = wilson_interval(8, 10, 0.90)
    low99, high99 = wilson_interval(8, 10, 0.99)
    assert low99 < low90 and high99 > high90


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 0), "at least 1"),
        ((3, 2), "between 0 and n=2"),
        ((-1, 5), "between 0 and n=5"),
        ((1.0, 5), "integer count"),
        ((True, 5), "integer count"),
        ((1, 5, 1.0), "strictly between 0 and 1"),
        ((1, 5, 95), "strictly between 0 and 1"),
    ],
)
def test_wilson_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        wilson_interval(*args)


def test_mean_std_uses_sample_std():
    mean, std = mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert mean == pytest.approx(5.0)
    assert std == pytest.approx(math.sqrt(32 / 7))  # squared deviations sum to 32; n - 1 = 7 (population std: 2)
    assert mean_std([0.8, 0.9, 1.0]) == pytest.approx((0.9, 0.1))


def test_mean_std_single_value_has_nan_std_and_bad_input_raises():
    mean, std = mean_std([0.7])
    assert mean == 0.7 and math.isnan(std)
    for bad, message in (
        ([], "non-empty"),
        ("0.5", "non-empty"),
        ([1.0, float("nan")], r"values\[1\]"),
        ([1, "2"], r"values\[1\]"),
    ):
        with pytest.raises(ValueError, match=message):
            mean_std(bad)


def test_intervals_overlap():
    assert intervals_overlap((0.1, 0.3), (0.25, 0.5))
    assert intervals_overlap((0.1, 0.3), (0.3, 0.5))  # closed intervals: a shared end point overlaps
    assert intervals_overlap((0.0, 1.0), (0.4, 0.6))  # containment
    assert not intervals_overlap((0.1, 0.3), (0.31, 0.5))
    assert not intervals_overlap((0.6, 0.9), (0.1, 0.5))
    assert intervals_overlap(wilson_interval(8, 10), wilson_interval(6, 10))
    assert not intervals_overlap(wilson_interval(5, 100), wilson_interval(95, 100))
    with pytest.raises(ValueError, match="low 0.5 above high 0.2"):
        intervals_overlap((0.5, 0.2), (0.0, 1.0))
    with pytest.raises(ValueError, match=r"\(low, high\) pair"):
        intervals_overlap((0.5,), (0.0, 1.0))


# Newcombe (1998), "Interval estimation for the difference between independent proportions", Table II,
# method 10 (hybrid score): three of its worked examples.
@pytest.mark.parametrize(
    "a, n_a, b, n_b, low, high",
    [
        (56, 70, 48, 80, 0.0524, 0.3339),
        (9, 10, 3, 10, 0.1705, 0.8090),
        (5, 56, 0, 29, -0.0381, 0.1926),
    ],
)
def test_newcombe_difference_matches_published_values(a, n_a, b, n_b, low, high):
    difference, got_low, got_high = newcombe_difference(a, n_a, b, n_b)
    assert difference == pytest.approx(a / n_a - b / n_b)
    assert (got_low, got_high) == pytest.approx((low, high), abs=6e-5)


def test_newcombe_difference_is_antisymmetric_and_checks_counts():
    d, low, high = newcombe_difference(30, 100, 60, 100)
    mirrored = newcombe_difference(60, 100, 30, 100)
    assert (d, low, high) == pytest.approx((-mirrored[0], -mirrored[2], -mirrored[1]))
    with pytest.raises(ValueError, match="between 0 and n"):
        newcombe_difference(11, 10, 3, 10)


def test_combination_of_one_or_two_rates_is_wilson_or_newcombe():
    assert combination_interval([(8, 10, 1.0)]) == pytest.approx((0.8, *wilson_interval(8, 10)))
    low, high = wilson_interval(8, 10)
    assert combination_interval([(8, 10, -2.0)]) == pytest.approx((-1.6, -2 * high, -2 * low))
    for a, n_a, b, n_b in [(56, 70, 48, 80), (9, 10, 3, 10), (5, 56, 0, 29)]:
        assert combination_interval([(a, n_a, 1), (b, n_b, -1)]) == pytest.approx(newcombe_difference(a, n_a, b, n_b))


# Worked by hand with z = 1.959964. Wilson(90/100) = (0.825643, 0.944779), Wilson(10/100) = (0.055229, 0.174365):
#   90/100 - 10/100: low  = 0.8 - sqrt((0.9 - 0.825643)^2 + (0.174365 - 0.1)^2) = 0.8 - 0.105163 = 0.694837
#                    high = 0.8 + sqrt((0.944779 - 0.9)^2 + (0.1 - 0.055229)^2) = 0.8 + 0.063318 = 0.863318
# Wilson(80/100) = (0.711171, 0.866633), Wilson(20/100) = (0.133367, 0.288829); the net difference
#   (90/100 - 10/100) - (80/100 - 20/100) = 0.2 with weights +1, -1, -1, +1:
#   low  = 0.2 - sqrt(0.074357^2 + 0.074365^2 + 0.066633^2 + 0.066633^2) = 0.2 - 0.141206 = 0.058794
#   high = 0.2 + sqrt(0.044779^2 + 0.044771^2 + 0.088829^2 + 0.088829^2) = 0.2 + 0.140680 = 0.340680
def test_combination_interval_matches_hand_computed_values():
    assert combination_interval([(90, 100, 1), (10, 100, -1)]) == pytest.approx((0.8, 0.694837, 0.863318), abs=1e-5)
    net = combination_interval([(90, 100, 1), (10, 100, -1), (80, 100, -1), (20, 100, 1)])
    assert net == pytest.approx((0.2, 0.058794, 0.340680), abs=1e-5)


@pytest.mark.parametrize(
    ("terms", "message"),
    [
        ([], "non-empty list"),
        ("abc", "non-empty list"),
        ([(1, 10)], r"terms\[0\]` must be a \(successes, n, weight\) triple"),
        ([(1, 10, 1.0), (1, 10, float("nan"))], r"terms\[1\]` weight must be a finite number"),
        ([(1, 10, True)], "weight must be a finite number"),
        ([(11, 10, 1.0)], "between 0 and n"),
    ],
)
def test_combination_interval_bad_input(terms, message):
    with pytest.raises(ValueError, match=message):
        combination_interval(terms)
