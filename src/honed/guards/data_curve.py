"""Data sufficiency: a learning curve err(n) = a·n^(−b) + c over nested training fractions.

It answers "would more data help?" (metric expected at 2× and 5× the data, the n for a
target) and "did I need all of it?" (the smallest fraction within ε of the full-data score).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from honed.errors import RecipeError
from honed.guards.status import guard_result

B_MAX = 3.0
# A fit that misses the held-out largest fraction by more than this (metric units) is not
# trusted for extrapolation: 0.05 is 5 accuracy points, larger than any gain it would predict.
BACKTEST_TOLERANCE = 0.05
_B_GRID = np.linspace(0.0, B_MAX, 301)


def _wsse(x: np.ndarray, err: np.ndarray, w: np.ndarray, a: float, b: float, c: float) -> float:
    return float(np.sum(w * (a * x ** (-b) + c - err) ** 2))


def _box_ls(u: np.ndarray, err: np.ndarray, w: np.ndarray, c_max: float) -> tuple[float, float]:
    """Weighted least squares of err ≈ a·u + c with a ≥ 0, 0 ≤ c ≤ c_max, solved exactly.

    A convex quadratic in two variables over a box has its minimum either at the unconstrained
    solution or on an edge, where the 1-D problem is solved by clipping; try them all.
    """
    sw = np.sqrt(w)
    design = np.column_stack([u, np.ones_like(u)]) * sw[:, None]
    candidates = []
    sol, *_ = np.linalg.lstsq(design, err * sw, rcond=None)
    candidates.append((sol[0], sol[1]))
    wsum = w.sum()
    candidates.append((0.0, np.sum(w * err) / wsum))  # edge a = 0
    uu = np.sum(w * u * u)
    for c in (0.0, c_max):  # edges c = 0 and c = c_max
        if math.isfinite(c) and uu > 0:
            candidates.append((np.sum(w * u * (err - c)) / uu, c))
    best, best_loss = (0.0, 0.0), math.inf
    for a, c in candidates:
        a = max(float(a), 0.0)
        c = min(max(float(c), 0.0), c_max)
        loss = float(np.sum(w * (a * u + c - err) ** 2))
        if loss < best_loss:
            best, best_loss = (a, c), loss
    return best


def _grid_fit(x: np.ndarray, err: np.ndarray, w: np.ndarray, c_max: float) -> tuple[float, float, float]:
    best, best_loss = (0.0, 0.0, 0.0), math.inf
    for b in _B_GRID:
        a, c = _box_ls(x ** (-b), err, w, c_max)
        loss = _wsse(x, err, w, a, b, c)
        if loss < best_loss:
            best, best_loss = (a, float(b), c), loss
    return best


def fit_power_law(n: Sequence[float], err: Sequence[float], weights: Sequence[float] | None = None) -> dict:
    """Fit err(n) = a·n^(−b) + c by weighted least squares; return ``{"a", "b", "c"}``.

    Bounds: a ≥ 0, 0 ≤ b ≤ 3, 0 ≤ c ≤ 1 — or c unbounded above when some err > 1 (a
    regression error rather than an error rate). Default weights are ∝ √n: the large-n points
    are the ones we extrapolate from, and runs on small fractions are noisier and often sit
    before the power-law regime; √n leans on them without letting the largest point decide
    alone. Needs ≥ 3 distinct n. A bounded curve_fit is started from an exact grid search over
    b (linear least squares for a, c at each b); the better of the two is kept, so a failing
    curve_fit falls back to the grid.
    """
    n_arr = np.asarray(n, dtype=np.float64).ravel()
    e_arr = np.asarray(err, dtype=np.float64).ravel()
    if n_arr.shape != e_arr.shape:
        raise ValueError(f"fit_power_law needs one error per n: got {n_arr.size} n and {e_arr.size} errors.")
    if np.unique(n_arr).size < 3:
        raise ValueError(
            f"fit_power_law needs at least 3 distinct training sizes for 3 parameters. Got {np.unique(n_arr).size}."
        )
    if not (np.all(np.isfinite(n_arr)) and np.all(n_arr > 0)):
        raise ValueError(f"Training sizes must be positive and finite. Got {n_arr.tolist()}.")
    if not np.all(np.isfinite(e_arr)) or np.any(e_arr < 0):
        raise ValueError(f"Errors must be finite and non-negative. Got {e_arr.tolist()}.")
    if weights is None:
        w = np.sqrt(n_arr)
    else:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.shape != n_arr.shape or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError("Weights must be positive, finite, and one per point.")
    w = w / w.sum()

    c_max = math.inf if np.any(e_arr > 1.0) else 1.0
    # Fit on x = n / n_max so a stays O(err) whatever the dataset size; rescale a at the end.
    n_max = float(n_arr.max())
    x = n_arr / n_max

    a0, b0, c0 = _grid_fit(x, e_arr, w, c_max)
    best, best_loss = (a0, b0, c0), _wsse(x, e_arr, w, a0, b0, c0)
    try:
        from scipy.optimize import curve_fit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OptimizeWarning on flat curves; the grid covers us.
            popt, _ = curve_fit(
                lambda xx, a, b, c: a * xx ** (-b) + c,
                x,
                e_arr,
                p0=[a0, b0, c0],
                sigma=1.0 / np.sqrt(w),
                bounds=([0.0, 0.0, 0.0], [np.inf, B_MAX, c_max]),
                maxfev=20000,
            )
        loss = _wsse(x, e_arr, w, *popt)
        if np.all(np.isfinite(popt)) and loss < best_loss:
            best = tuple(float(p) for p in popt)
    except (RuntimeError, ValueError, ImportError):
        pass
    a, b, c = best
    return {"a": float(a * n_max**b), "b": float(b), "c": float(c)}


def predict_error(fit: dict, n: float) -> float:
    """The fitted error a·n^(−b) + c at training size n (> 0)."""
    if not n > 0:
        raise ValueError(f"predict_error needs a positive training size. Got {n!r} instead.")
    return float(fit["a"] * float(n) ** (-fit["b"]) + fit["c"])


def n_for_target(fit: dict, target_err: float) -> float | None:
    """Training size n* = (a / (target − c))^(1/b) at which the fit reaches target_err.

    None ("unreachable") when target_err ≤ c (the floor the curve tends to), or when a == 0 or
    b == 0 (a flat curve: more data never changes the error).
    """
    a, b, c = fit["a"], fit["b"], fit["c"]
    if target_err <= c or a == 0 or b == 0:
        return None
    return float((a / (target_err - c)) ** (1.0 / b))


def _check_fractions(fractions: Sequence[float], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(fractions, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if f.shape != s.shape:
        raise ValueError(f"One score per fraction is needed: got {f.size} fractions and {s.size} scores.")
    if not (np.all(np.isfinite(f)) and np.all((f > 0) & (f <= 1))):
        raise RecipeError(
            f"The 'fractions' of the learning curve must each be in (0, 1]. Got {f.tolist()} instead."
        )
    if np.unique(f).size < 3:
        raise RecipeError(
            "The 'fractions' of the learning curve must hold at least 3 distinct values to fit a curve "
            f"(e.g. [0.1, 0.2, 0.4, 0.7, 1.0]). Got {f.tolist()} instead."
        )
    if not np.all(np.isfinite(s)):
        raise ValueError(f"Learning-curve scores must be finite. Got {s.tolist()}.")
    return f, s


def data_sufficiency(
    fractions: Sequence[float],
    n_train: int,
    scores: Sequence[float],
    *,
    higher_is_better: bool = True,
    target: float | None = None,
    epsilon: float = 0.01,
    max_extrapolation: float = 10.0,
    metric: str = "score",
) -> dict:
    """Learning-curve figures for the data guard's ``details`` (design.md §3 keys and more).

    scores[i] is the validation metric of a model trained on fractions[i] of n_train rows
    (repeated fractions, e.g. several seeds, are averaged). Errors are 1 − score when
    higher_is_better (the score must then be ≤ 1: accuracy, F1, R²), else the score itself.
    target and epsilon are in metric units. Figures:
      expected_at_2x/5x  fitted metric at 2×/5× the largest n; None beyond max_extrapolation.
      gain_at_2x         fitted improvement from 1× to 2× (positive = better), same units.
      n_for_target       int, "unreachable", or None without a target; beyond_extrapolation_limit
                         is True when it exceeds max_extrapolation × the largest n.
      sufficient_fraction the smallest fraction from which every larger fraction is within
                         ε of the full-data score (robust to one lucky small run).
      backtest_error     |metric predicted at the largest fraction by a fit without it −
                         observed|; None with fewer than 4 distinct fractions.
      verdict            "uncertain" when the backtest misses by > 0.05 or no gain can be
                         computed without extrapolating; "more data helps" when gain_at_2x > ε;
                         otherwise "saturated".
      status             suggestion: "warn" when uncertain or gain_at_2x > 2ε, else "ok".
    """
    f, s = _check_fractions(fractions, scores)
    if not (isinstance(n_train, (int, np.integer)) and n_train >= 1):
        raise ValueError(f"n_train must be a positive integer. Got {n_train!r} instead.")
    if epsilon < 0 or not max_extrapolation >= 1:
        raise ValueError("epsilon must be ≥ 0 and max_extrapolation ≥ 1.")
    if higher_is_better and np.any(s > 1):
        raise ValueError(
            f"A higher-is-better score must be ≤ 1 to be read as 1 − error. Got max {s.max()!r}; "
            "pass higher_is_better=False with an error-like metric instead."
        )

    def to_err(score: np.ndarray | float) -> np.ndarray | float:
        return 1.0 - score if higher_is_better else score

    def to_metric(err: float) -> float:
        return float(1.0 - err if higher_is_better else err)

    def gain(new: float, old: float) -> float:  # positive = better, whatever the direction
        return float(new - old if higher_is_better else old - new)

    n_rows = np.maximum(np.round(f * n_train), 1.0)
    err = to_err(s)
    if np.any(err < 0):
        raise ValueError(f"An error-like (lower-is-better) score must be ≥ 0. Got {s.tolist()}.")
    fit = fit_power_law(n_rows, err)

    uniq = np.unique(f)
    mean_score = np.array([s[f == u].mean() for u in uniq])
    full_score = float(mean_score[-1])
    n_full = float(max(np.round(uniq[-1] * n_train), 1.0))

    def expected_at(mult: float) -> float | None:
        return to_metric(predict_error(fit, mult * n_full)) if mult <= max_extrapolation else None

    expected_2x, expected_5x = expected_at(2.0), expected_at(5.0)
    gain_2x = None if expected_2x is None else gain(expected_2x, to_metric(predict_error(fit, n_full)))

    improvement = mean_score - full_score if higher_is_better else full_score - mean_score
    within = improvement >= -epsilon - 1e-12
    # Walk down from the largest fraction while every fraction stays within ε.
    k = len(uniq) - 1
    while k > 0 and within[k - 1]:
        k -= 1
    sufficient_fraction = float(uniq[k])

    backtest_error = None
    if len(uniq) >= 4:
        keep = f < uniq[-1]
        back_fit = fit_power_law(n_rows[keep], err[keep])
        backtest_error = abs(to_metric(predict_error(back_fit, n_full)) - full_score)

    n_target: int | str | None = None
    beyond = False
    if target is not None:
        needed = n_for_target(fit, float(to_err(float(target))))
        if needed is None:
            n_target = "unreachable"
        else:
            n_target = int(math.ceil(needed))
            beyond = needed > max_extrapolation * n_full

    if backtest_error is not None and backtest_error > BACKTEST_TOLERANCE:
        verdict = "uncertain"
    elif gain_2x is None:
        verdict = "saturated" if sufficient_fraction < uniq[-1] else "uncertain"
    elif gain_2x > epsilon:
        verdict = "more data helps"
    else:
        verdict = "saturated"
    steep = gain_2x is not None and gain_2x > 2 * epsilon

    return {
        "fractions": f.tolist(),
        "scores": s.tolist(),
        "n": [int(v) for v in n_rows],
        "n_train": int(n_train),
        "metric": metric,
        "higher_is_better": higher_is_better,
        "fit": fit,
        "full_score": full_score,
        "expected_at_2x": expected_2x,
        "expected_at_5x": expected_5x,
        "gain_at_2x": gain_2x,
        "target": target,
        "n_for_target": n_target,
        "beyond_extrapolation_limit": beyond,
        "sufficient_fraction": sufficient_fraction,
        "epsilon": epsilon,
        "backtest_error": backtest_error,
        "max_extrapolation": max_extrapolation,
        "verdict": verdict,
        "status": "warn" if verdict == "uncertain" or steep else "ok",
    }


def _amount(value: float, details: dict) -> str:
    """Metric differences as accuracy-style points when the metric is a [0, 1] score."""
    if details.get("higher_is_better", True):
        pts = f"{value * 100:.1f}".rstrip("0").rstrip(".")
        return f"{pts} point" + ("" if pts == "1" else "s")
    return f"{value:.3g}"


def data_guard(details: dict, class_counts: dict[str, int] | None = None, min_per_class: int = 20) -> dict:
    """The data guard's result from data_sufficiency's details and per-class example counts.

    warn: a class has fewer than min_per_class examples; the curve is still rising steeply
    (gain_at_2x > 2ε: more data would pay); or the backtest misses by more than 0.05 (the
    curve cannot be trusted). ok: otherwise (in particular, a saturated curve with every class
    above the floor). details may be {} when no curve was run; only the classes are judged then.
    """
    details = dict(details)
    problems: list[str] = []
    sentences: list[str] = []
    has_curve = "fit" in details

    if has_curve:
        metric = details.get("metric", "score")
        eps = details.get("epsilon", 0.01)
        sf = details["sufficient_fraction"]
        g2 = details.get("gain_at_2x")
        if sf < max(details["fractions"]):
            first = f"{sf:.0%} of the data already reaches within {_amount(eps, details)} of the full-data {metric}"
        else:
            first = f"Only the full data reaches its {metric} of {details['full_score']:.3g}; smaller fractions fall short by more than {_amount(eps, details)}"
        if g2 is not None:
            # a ≥ 0 and b ≥ 0 make the fitted error non-increasing, so g2 ≥ 0 up to rounding.
            first += f"; doubling the data is expected to add {_amount(max(g2, 0.0), details)}"
        sentences.append(first + ".")
        if g2 is not None and g2 > 2 * eps:
            problems.append("more data would pay")
        bt = details.get("backtest_error")
        if bt is not None and bt > BACKTEST_TOLERANCE:
            problems.append("the curve is unreliable")
            sentences.append(
                f"The fitted curve missed the largest run by {bt:.3g} when fitted without it, "
                "so its predictions are uncertain."
            )
        nt = details.get("n_for_target")
        if nt == "unreachable":
            sentences.append(f"The target {metric} of {details.get('target')} looks unreachable with more of this data.")
        elif nt is not None:
            extra = " (far beyond what the curve can reliably predict)" if details.get("beyond_extrapolation_limit") else ""
            sentences.append(f"Reaching the target {metric} of {details.get('target')} needs about {nt:,} training rows{extra}.")

    small: dict[str, int] = {}
    if class_counts is not None:
        small = {str(k): int(v) for k, v in class_counts.items() if v < min_per_class}
        details["class_counts"] = {str(k): int(v) for k, v in class_counts.items()}
        details["min_per_class"] = min_per_class
        details["small_classes"] = small
        if small:
            listed = ", ".join(f"'{k}' ({v})" for k, v in sorted(small.items(), key=lambda kv: kv[1]))
            problems.append("some classes are rare")
            sentences.append(f"{len(small)} class(es) have fewer than {min_per_class} examples: {listed}.")

    if not has_curve and class_counts is not None and not small:
        sentences.append(f"Every class has at least {min_per_class} examples.")
    if not sentences:
        return guard_result("skipped", "No learning curve was run and no class counts were given.", details)
    status = "warn" if problems else "ok"
    details["status"] = status
    return guard_result(status, " ".join(sentences), details)
