"""Bias guard math: group representation, per-group metrics via fairlearn, and the verdict."""

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

from honed.errors import DataError
from honed.guards.bias import bias_guard, group_metrics, group_representation


def _frame(n=600, seed=0):
    rng = np.random.default_rng(seed)
    region = rng.choice(["north", "south"], size=n)
    label = rng.integers(0, 2, size=n)
    return pd.DataFrame({"region": region, "label": label, "age": rng.choice(["young", "old"], size=n)})


def test_representation_counts_shares_and_label_rates():
    df = pd.DataFrame({
        "region": ["n"] * 40 + ["s"] * 10 + [None] * 5,
        "label": ["a"] * 30 + ["b"] * 10 + ["a"] * 10 + ["b"] * 5,
    })
    rep = group_representation(df, ["region"], "label", min_group_size=30)
    col = rep["columns"]["region"]
    assert list(col) == ["n", "s", "(missing)"]
    assert col["n"] == {"count": 40, "share": pytest.approx(40 / 55), "label_rate": {"a": 0.75, "b": 0.25}}
    assert col["(missing)"]["label_rate"] == {"b": 1.0}
    assert rep["small_groups"] == [("region", "s", 10), ("region", "(missing)", 5)]


def test_missing_group_column_raises_data_error_listing_columns():
    with pytest.raises(DataError, match=r"'county'.*\['region', 'label', 'age'\]"):
        group_representation(_frame(), ["county"], "label")


def test_predictions_tied_to_a_group_warn():
    df = _frame()
    y_true = df["label"].to_numpy()
    # The model predicts positive for the north almost always and for the south almost never.
    y_pred = np.where(df["region"] == "north", 1, 0)
    after = group_metrics(y_true, y_pred, df[["region"]])
    assert after["demographic_parity_difference"] == pytest.approx(1.0)
    g = bias_guard(after, None, group_representation(df, ["region"], "label"))
    assert g["status"] == "warn"
    assert "1.00" in g["summary"]


def test_independent_predictions_are_ok():
    df = _frame(n=4000)
    y_true = df["label"].to_numpy()
    flip = np.random.default_rng(1).random(len(df)) < 0.1
    y_pred = np.where(flip, 1 - y_true, y_true)
    after = group_metrics(y_true, y_pred, df[["region", "age"]])
    assert after["demographic_parity_difference"] < 0.1
    assert set(after["groups"]) == {"region", "age"}
    g = bias_guard(after, after, group_representation(df, ["region", "age"], "label"))
    assert g["status"] == "ok"
    assert g["details"]["widened"] is False
    north = g["details"]["groups"]["region"]["north"]
    assert {"count", "accuracy", "f1_macro", "selection_rate", "share", "label_rate"} <= set(north)


def test_binary_gaps_match_fairlearn():
    rng = np.random.default_rng(2)
    g = rng.choice(["a", "b", "c"], size=300)
    y_true = rng.integers(0, 2, size=300)
    y_pred = np.where(rng.random(300) < 0.3, 1 - y_true, y_true)
    res = group_metrics(y_true, y_pred, pd.Series(g, name="g"))
    assert res["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(y_true, y_pred, sensitive_features=g))
    assert res["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(y_true, y_pred, sensitive_features=g))


def test_multiclass_uses_one_vs_rest_max():
    group = pd.Series(["x"] * 6 + ["y"] * 6, name="site")
    y_true = np.array(["cat", "dog", "owl"] * 4)
    y_pred = np.array(["cat", "dog", "owl"] * 2 + ["owl"] * 6)  # site y: always "owl"
    res = group_metrics(y_true, y_pred, group)
    x, y = res["groups"]["site"]["x"], res["groups"]["site"]["y"]
    assert x["accuracy"] == 1.0 and y["accuracy"] == pytest.approx(1 / 3)
    assert y["selection_rate"] == {"cat": 0.0, "dog": 0.0, "owl": 1.0}
    # "owl" is predicted for 1/3 of x and all of y.
    assert res["demographic_parity_difference"] == pytest.approx(2 / 3)
    assert res["equalized_odds_difference"] == pytest.approx(1.0)  # TPR of cat: 1 vs 0
    assert res["largest_accuracy_gap"] == pytest.approx(2 / 3)
    assert 0 < y["f1_macro"] < x["f1_macro"] == 1.0


def test_undefined_rates_do_not_create_an_equalized_odds_gap():
    # Group b has no true positives: its TPR is undefined, not 0.
    y_true = np.array([1, 1, 0, 0, 0, 0])
    y_pred = np.array([1, 1, 0, 0, 0, 0])
    res = group_metrics(y_true, y_pred, pd.Series(list("aaabbb"), name="g"))
    assert res["equalized_odds_difference"] == pytest.approx(0.0)


def test_widened_accuracy_gap_warns():
    before = {"demographic_parity_difference": 0.02, "equalized_odds_difference": 0.03,
              "largest_accuracy_gap": 0.02, "groups": {}}
    after = {"demographic_parity_difference": 0.04, "equalized_odds_difference": 0.05,
             "largest_accuracy_gap": 0.10, "groups": {}}
    g = bias_guard(after, before, None)
    assert g["status"] == "warn" and g["details"]["widened"] is True
    assert "widened" in g["summary"] and "0.02" in g["summary"] and "0.10" in g["summary"]
    assert bias_guard(after, None, None)["status"] == "ok"


def test_small_groups_warn():
    df = pd.DataFrame({"region": ["n"] * 50 + ["s"] * 5, "label": [0, 1] * 25 + [1] * 5})
    rep = group_representation(df, ["region"], "label")
    after = group_metrics(df["label"], df["label"], df[["region"]])
    g = bias_guard(after, None, rep)
    assert g["status"] == "warn" and "region=s (5)" in g["summary"]
    # Group s holds only label 1 and is predicted perfectly: its macro-F1 is 1, not 0.5.
    assert g["details"]["groups"]["region"]["s"]["f1_macro"] == 1.0
