"""Forgetting guard math: linear CKA, the guard's status rule, WiSE-FT α choice and interpolation."""

import numpy as np
import pytest
import torch

from honed.guards.forgetting import (
    choose_interpolation_alpha,
    forgetting_guard,
    interpolate_state,
    linear_cka,
)
from honed.guards.status import guard_result, skipped


@pytest.fixture
def feats():
    return np.random.default_rng(0).normal(size=(400, 16))


def test_cka_is_one_for_identity_rotation_and_scale(feats):
    rot, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(16, 16)))
    assert linear_cka(feats, feats) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(feats, feats @ rot) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(feats, 7.5 * feats) == pytest.approx(1.0, abs=1e-12)
    # a shift is removed by centring
    assert linear_cka(feats, feats + 3.0) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_isotropic_scaling_of_either_side(feats):
    other = feats[:, :8] + np.random.default_rng(2).normal(size=(400, 8))
    base = linear_cka(feats, other)
    assert linear_cka(1e-3 * feats, other) == pytest.approx(base, rel=1e-10)
    assert linear_cka(feats, 1e6 * other) == pytest.approx(base, rel=1e-10)


def test_cka_near_zero_for_independent_noise():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5000, 10)), rng.normal(size=(5000, 12))
    assert linear_cka(x, y) < 0.02


def test_cka_partially_related_features_lie_between(feats):
    rng = np.random.default_rng(4)
    mild = linear_cka(feats, feats + 0.5 * rng.normal(size=feats.shape))
    strong = linear_cka(feats, feats + 3.0 * rng.normal(size=feats.shape))
    assert 0.05 < strong < mild < 0.95


def test_cka_accepts_torch_bf16_and_wide_features():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20, 300))  # p ≫ n takes the n×n Gram path
    rot, _ = np.linalg.qr(rng.normal(size=(300, 300)))
    assert linear_cka(torch.tensor(x), torch.tensor(x @ rot)) == pytest.approx(1.0, abs=1e-10)
    xb = torch.tensor(x[:, :8], dtype=torch.bfloat16)
    assert linear_cka(xb, xb) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.ones((1, 3)), np.ones((1, 3)), "at least 2"),
        (np.full((10, 3), 4.0), np.random.default_rng(0).normal(size=(10, 3)), "zero variance"),
        (np.zeros((10, 3)), np.zeros((10, 3)), "zero variance"),
        (np.ones((10, 3)), np.ones((9, 3)), "same inputs"),
        (np.ones((2, 3, 4)), np.ones((2, 3, 4)), "2-D"),
        (np.array([[np.nan, 1.0], [1.0, 2.0]]), np.ones((2, 2)), "NaN"),
    ],
)
def test_cka_rejects_bad_inputs(x, y, match):
    with pytest.raises(ValueError, match=match):
        linear_cka(x, y)


def test_guard_result_validates_status():
    assert skipped("no reference set") == {"status": "skipped", "summary": "No reference set", "details": {}}
    with pytest.raises(ValueError, match="status"):
        guard_result("passed", "x", {})


DETAIL_KEYS = {
    "reference", "retention", "cka", "drift", "perplexity_before", "perplexity_after",
    "interpolation", "chosen_alpha", "retention_floor", "cka_floor",
}


def test_retention_below_floor_fails():
    g = forgetting_guard(reference="the reference set", retention=0.90, cka=0.8)
    assert g["status"] == "fail"
    assert "90.0%" in g["summary"] and "95.0%" in g["summary"]
    assert DETAIL_KEYS <= set(g["details"])
    assert g["details"]["drift"] == pytest.approx(0.2)


def test_good_retention_is_ok_and_summary_has_numbers():
    g = forgetting_guard(reference="the reference set", retention=0.99, cka=0.88)
    assert g["status"] == "ok"
    assert "99.0%" in g["summary"] and "0.12" in g["summary"]


def test_retention_within_floor_but_below_098_warns():
    assert forgetting_guard(reference="r", retention=0.96, cka=None)["status"] == "warn"


def test_cka_alone_is_a_signal_unless_a_floor_is_set():
    assert forgetting_guard(reference="r", retention=None, cka=0.7)["status"] == "ok"
    assert forgetting_guard(reference="r", retention=None, cka=0.3)["status"] == "warn"
    assert forgetting_guard(reference="r", retention=0.99, cka=0.3)["status"] == "ok"
    assert forgetting_guard(reference="r", retention=0.99, cka=0.3, cka_floor=0.5)["status"] == "fail"


def test_perplexity_gives_retention_for_language_models():
    g = forgetting_guard(reference="general text", retention=None, cka=None,
                         perplexity_before=10.0, perplexity_after=12.5)
    assert g["details"]["retention"] == pytest.approx(0.8)
    assert g["details"]["retention_source"] == "perplexity"
    assert g["status"] == "fail"
    assert "10.00" in g["summary"] and "12.50" in g["summary"]
    diverged = forgetting_guard(reference="r", retention=None, cka=None,
                                perplexity_before=10.0, perplexity_after=float("inf"))
    assert diverged["status"] == "fail"


def test_nan_retention_fails_and_nothing_measured_is_skipped():
    assert forgetting_guard(reference="r", retention=float("nan"), cka=0.9)["status"] == "fail"
    g = forgetting_guard(reference="r", retention=None, cka=None)
    assert g["status"] == "skipped" and DETAIL_KEYS <= set(g["details"])


def test_validation_fallback_is_said_in_the_summary():
    g = forgetting_guard(reference="validation inputs", retention=None, cka=0.9, measured_on_validation=True)
    assert "validation inputs because no reference set was given" in g["summary"]


SWEEP = [
    {"alpha": 0.0, "metric": 0.60, "retention": 1.00},
    {"alpha": 0.25, "metric": 0.80, "retention": 0.99},
    {"alpha": 0.5, "metric": 0.85, "retention": 0.96},
    {"alpha": 0.75, "metric": 0.88, "retention": 0.93},
    {"alpha": 1.0, "metric": 0.90, "retention": 0.90},
]


def test_choose_alpha_best_metric_above_floor():
    assert choose_interpolation_alpha(SWEEP, 0.95) == 0.5
    assert choose_interpolation_alpha(SWEEP, 0.90) == 1.0
    assert choose_interpolation_alpha(SWEEP, None) == 1.0


def test_choose_alpha_falls_back_to_highest_retention():
    sweep = [{**s, "retention": s["retention"] - 0.2} for s in SWEEP]
    assert choose_interpolation_alpha(sweep, 0.95) == 0.0


def test_choose_alpha_ties_go_to_smaller_alpha_and_lower_is_better():
    sweep = [
        {"alpha": 0.3, "metric": 0.9, "retention": 0.97},
        {"alpha": 0.6, "metric": 0.9, "retention": 0.96},
        {"alpha": 0.9, "metric": 0.5, "retention": 0.99},
    ]
    assert choose_interpolation_alpha(sweep, 0.95) == 0.3
    assert choose_interpolation_alpha(sweep, 0.95, higher_is_better=False) == 0.9
    no_retention = [{"alpha": a, "metric": m, "retention": None} for a, m in [(0.5, 0.7), (1.0, 0.8)]]
    assert choose_interpolation_alpha(no_retention, 0.95) == 1.0


def _states():
    g = torch.Generator().manual_seed(0)
    theta0 = {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g),
        "steps": torch.tensor(5),
        "old_head": torch.randn(2, 3, generator=g),
        "resized": torch.randn(2, 3, generator=g),
    }
    theta_ft = {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g),
        "steps": torch.tensor(9),
        "new_head": torch.randn(5, 3, generator=g),
        "resized": torch.randn(7, 3, generator=g),
    }
    return theta0, theta_ft


def test_interpolate_state_endpoints_and_extra_keys():
    theta0, theta_ft = _states()
    at0 = interpolate_state(theta0, theta_ft, 0.0)
    at1 = interpolate_state(theta0, theta_ft, 1.0)
    assert set(at0) == set(theta_ft)  # keyed like the fine-tuned model; old_head dropped
    assert torch.equal(at0["w"], theta0["w"]) and torch.equal(at0["b"], theta0["b"])
    assert torch.equal(at1["w"], theta_ft["w"]) and torch.equal(at1["b"], theta_ft["b"])
    for out in (at0, at1):
        assert torch.equal(out["new_head"], theta_ft["new_head"])
        assert torch.equal(out["resized"], theta_ft["resized"])
        assert torch.equal(out["steps"], theta_ft["steps"])


def test_interpolate_state_midpoint_and_dtype():
    theta0, theta_ft = _states()
    mid = interpolate_state(theta0, theta_ft, 0.25)
    assert torch.allclose(mid["w"], 0.75 * theta0["w"] + 0.25 * theta_ft["w"])
    half = interpolate_state({"w": theta0["w"].bfloat16()}, {"w": theta_ft["w"].bfloat16()}, 0.5)
    assert half["w"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="alpha"):
        interpolate_state(theta0, theta_ft, 1.5)
