"""Learning-curve math: the power-law fit, its predictions, and the data-sufficiency verdict."""

import math

import numpy as np
import pytest

from honed.errors import RecipeError
from honed.guards.data_curve import (
    data_guard,
    data_sufficiency,
    fit_power_law,
    n_for_target,
    predict_error,
)

FRACTIONS = [0.1, 0.2, 0.4, 0.7, 1.0]
N = np.array([100.0, 200, 400, 700, 1000])


def _law(n, a=2.0, b=0.5, c=0.1):
    return a * np.asarray(n, dtype=float) ** (-b) + c


@pytest.mark.parametrize("a, b, c, n", [
    (2.0, 0.5, 0.1, N),
    (50.0, 1.2, 0.05, N),
    (0.8, 0.3, 0.0, N * 1000),  # large n: checks the rescaling keeps a well-conditioned
    (30.0, 0.7, 2.5, N),  # regression-style error above 1: c may exceed 1
])
def test_fit_recovers_noiseless_parameters(a, b, c, n):
    fit = fit_power_law(n, _law(n, a, b, c))
    assert fit["b"] == pytest.approx(b, abs=1e-3)
    assert fit["c"] == pytest.approx(c, abs=1e-3)
    assert fit["a"] == pytest.approx(a, rel=1e-2)


def test_fit_on_noisy_data_is_roughly_right():
    rng = np.random.default_rng(0)
    n = np.repeat(N, 3)  # three seeds per fraction
    err = _law(n) + rng.normal(0, 0.002, n.size)
    fit = fit_power_law(n, err)
    assert 0.3 < fit["b"] < 0.8
    assert 0.05 < fit["c"] < 0.13
    # What matters downstream is the prediction, not each parameter.
    assert predict_error(fit, 2000) == pytest.approx(_law(2000), abs=0.01)


def test_fit_needs_three_distinct_sizes():
    with pytest.raises(ValueError, match="3 distinct"):
        fit_power_law([100, 200], [0.3, 0.2])
    with pytest.raises(ValueError, match="3 distinct"):
        fit_power_law([100, 100, 200, 200], [0.3, 0.31, 0.2, 0.2])


def test_fit_is_robust_on_flat_and_wiggly_curves():
    flat = fit_power_law(N, [0.2] * 5)
    assert predict_error(flat, 5000) == pytest.approx(0.2, abs=1e-6)
    wiggly = fit_power_law(N, [0.3, 0.1, 0.35, 0.05, 0.4])
    assert all(math.isfinite(v) for v in wiggly.values())
    assert wiggly["a"] >= 0 and 0 <= wiggly["b"] <= 3 and 0 <= wiggly["c"] <= 1


def test_n_for_target_inverts_the_fit_and_reports_unreachable():
    fit = {"a": 2.0, "b": 0.5, "c": 0.1}
    n_star = n_for_target(fit, 0.15)
    assert predict_error(fit, n_star) == pytest.approx(0.15)
    assert n_for_target(fit, 0.1) is None
    assert n_for_target(fit, 0.05) is None
    assert n_for_target({"a": 0.0, "b": 0.5, "c": 0.1}, 0.2) is None


def test_true_power_law_backtests_well_and_predicts_gains():
    d = data_sufficiency(FRACTIONS, 1000, 1 - _law(N), metric="accuracy")
    assert d["backtest_error"] < 1e-3
    assert d["n"] == [100, 200, 400, 700, 1000]
    assert d["expected_at_2x"] == pytest.approx(1 - _law(2000), abs=1e-4)
    assert d["expected_at_5x"] == pytest.approx(1 - _law(5000), abs=1e-4)
    assert d["fit"]["b"] == pytest.approx(0.5, abs=1e-3)


def test_target_unreachable_beyond_c_and_reachable_below():
    scores = 1 - _law(N)  # asymptote: accuracy 0.9
    assert data_sufficiency(FRACTIONS, 1000, scores, target=0.95)["n_for_target"] == "unreachable"
    d = data_sufficiency(FRACTIONS, 1000, scores, target=0.85)
    assert d["n_for_target"] == pytest.approx(1600, abs=2)
    assert d["beyond_extrapolation_limit"] is False
    far = data_sufficiency(FRACTIONS, 1000, scores, target=0.895)
    assert far["n_for_target"] > 10_000 and far["beyond_extrapolation_limit"] is True
    assert data_sufficiency(FRACTIONS, 1000, scores)["n_for_target"] is None


def test_saturating_curve_is_ok():
    d = data_sufficiency(FRACTIONS, 1000, [0.80, 0.88, 0.905, 0.91, 0.912], metric="accuracy")
    assert d["sufficient_fraction"] == 0.4
    assert d["verdict"] == "saturated"
    g = data_guard(d, class_counts={"spam": 400, "ham": 600})
    assert g["status"] == "ok"
    assert g["summary"].startswith("40% of the data already reaches within 1 point of the full-data accuracy")


def test_steadily_rising_curve_warns():
    d = data_sufficiency(FRACTIONS, 1000, 1 - _law(N, a=8.0, b=0.5, c=0.02), metric="accuracy")
    assert d["sufficient_fraction"] == 1.0
    assert d["verdict"] == "more data helps"
    g = data_guard(d)
    assert g["status"] == "warn"
    assert "doubling the data is expected to add" in g["summary"]


def test_rare_class_warns_even_when_saturated():
    d = data_sufficiency(FRACTIONS, 1000, [0.80, 0.88, 0.905, 0.91, 0.912])
    g = data_guard(d, class_counts={"a": 900, "b": 7})
    assert g["status"] == "warn" and "'b' (7)" in g["summary"]
    assert g["details"]["small_classes"] == {"b": 7}
    assert data_guard({}, class_counts={"a": 50, "b": 60})["status"] == "ok"
    assert data_guard({})["status"] == "skipped"


def test_bad_backtest_makes_the_curve_uncertain():
    # Flat, then a jump at full data: no power law predicts the last point from the others.
    d = data_sufficiency(FRACTIONS, 1000, [0.70, 0.70, 0.70, 0.70, 0.85])
    assert d["backtest_error"] > 0.05
    assert d["verdict"] == "uncertain"
    g = data_guard(d)
    assert g["status"] == "warn" and "uncertain" in g["summary"]


def test_lower_is_better_metric_and_extrapolation_limit():
    rmse = _law(N, a=40.0, b=0.5, c=3.0)
    d = data_sufficiency(FRACTIONS, 1000, rmse, higher_is_better=False, max_extrapolation=3.0)
    assert d["expected_at_2x"] == pytest.approx(_law(2000, a=40.0, b=0.5, c=3.0), rel=1e-3)
    assert d["expected_at_5x"] is None
    assert d["expected_at_2x"] < rmse[-1]


def test_too_few_fractions_and_bad_fractions_are_recipe_errors():
    with pytest.raises(RecipeError, match="fractions"):
        data_sufficiency([0.5, 1.0], 1000, [0.8, 0.9])
    with pytest.raises(RecipeError, match="fractions"):
        data_sufficiency([0.5, 1.0, 1.5], 1000, [0.8, 0.9, 0.9])
    with pytest.raises(ValueError, match="(?i)one score per fraction"):
        data_sufficiency([0.2, 0.5, 1.0], 1000, [0.8, 0.9])


def test_three_fractions_have_no_backtest():
    assert data_sufficiency([0.25, 0.5, 1.0], 800, [0.7, 0.8, 0.85])["backtest_error"] is None
