"""Forgetting guard: did fine-tuning cost the model what it knew before?

Three measures (design.md §4): original-task retention, perplexity before/after for language
models, and representation drift (1 − linear CKA). WiSE-FT weight interpolation is the
mitigation whose α is chosen here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from honed.guards.status import guard_result

# Retention inside the floor but below this still earns a "warn": losing more than 2% of the
# original skill is worth a user's attention even when their floor allows it.
WARN_RETENTION = 0.98
# With no retention measured, CKA is the only signal. Above this drift the representations
# share less than half their linear structure, which is worth a look but not a gate (CKA can
# move without behaviour moving; Kornblith et al. 2019).
WARN_DRIFT = 0.5


def _as_float64_matrix(a: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        # .float() first: numpy has no bfloat16, so a bf16 activation cannot go to numpy directly.
        a = a.detach().to("cpu").float().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(
            f"The '{name}' features for CKA must be a 2-D (examples × features) array. "
            f"Got shape {a.shape} instead; pool token or spatial dimensions first."
        )
    if not np.all(np.isfinite(a)):
        raise ValueError(f"The '{name}' features for CKA contain NaN or infinite values.")
    return a


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Linear CKA between features x (n×p) and y (n×q) of the same n inputs, in [0, 1].

    CKA = ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on column-centred X, Y (Kornblith et al. 2019),
    computed in float64. 1.0 when y is x rotated or isotropically scaled; near 0 for
    unrelated features when n ≫ p, q. Raises ValueError for n < 2, mismatched n, non-finite
    values, or a feature matrix with zero variance (CKA is undefined there).
    """
    xm = _as_float64_matrix(x, "x")
    ym = _as_float64_matrix(y, "y")
    if xm.shape[0] != ym.shape[0]:
        raise ValueError(
            f"CKA needs the same inputs on both sides: x has {xm.shape[0]} rows, y has {ym.shape[0]}."
        )
    n = xm.shape[0]
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples. Got {n} instead.")

    xc = xm - xm.mean(axis=0, keepdims=True)
    yc = ym - ym.mean(axis=0, keepdims=True)
    for name, raw, centred in (("x", xm, xc), ("y", ym, yc)):
        norm = np.linalg.norm(centred)
        # Relative test: a constant column of 1e6 leaves ~1e-10 of rounding after centring.
        if norm == 0.0 or norm <= 1e-12 * max(np.linalg.norm(raw), 1e-300):
            raise ValueError(
                f"CKA is undefined: the '{name}' features have zero variance across the {n} examples "
                "(every example maps to the same vector)."
            )
        # CKA is scale-invariant; normalising first keeps the 4th-power terms from overflowing.
        centred /= norm

    cross = np.linalg.norm(yc.T @ xc) ** 2
    # ‖XᵀX‖_F = ‖XXᵀ‖_F: take the smaller Gram matrix so wide features (p ≫ n) stay cheap.
    self_x = np.linalg.norm(xc.T @ xc if xc.shape[1] <= n else xc @ xc.T)
    self_y = np.linalg.norm(yc.T @ yc if yc.shape[1] <= n else yc @ yc.T)
    return float(np.clip(cross / (self_x * self_y), 0.0, 1.0))


def _finite_or_none(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _check_floor(value: float | None, name: str) -> None:
    if value is not None and not (0.0 < value <= 1.0):
        raise ValueError(f"The '{name}' of the forgetting guard must be in (0, 1]. Got {value!r} instead.")


def forgetting_guard(
    *,
    reference: str,
    retention: float | None,
    cka: float | None,
    perplexity_before: float | None = None,
    perplexity_after: float | None = None,
    interpolation: list[dict] | None = None,
    chosen_alpha: float | None = None,
    retention_floor: float | None = 0.95,
    cka_floor: float | None = None,
    measured_on_validation: bool = False,
) -> dict:
    """Build the forgetting guard's result from figures the engine measured.

    Retention is after ÷ before on the original task; when it is None and both perplexities
    are given it is perplexity_before / perplexity_after (lower perplexity is better).
    Status rule:
      fail    retention < retention_floor, or cka < cka_floor (only when cka_floor is set),
              or a retention that could not be computed (NaN: the model likely diverged);
      warn    retention within the floor but below 0.98, or — with no retention at all —
              drift (1 − CKA) above 0.5 (CKA alone is a signal, never a gate);
      skipped nothing was measured;
      ok      otherwise.
    """
    _check_floor(retention_floor, "retention_floor")
    _check_floor(cka_floor, "cka_floor")
    for name, ppl in (("perplexity_before", perplexity_before), ("perplexity_after", perplexity_after)):
        if ppl is not None and not (ppl > 0):  # `not >` also rejects NaN
            raise ValueError(f"The '{name}' must be a positive number. Got {ppl!r} instead.")

    retention_source = None
    retention_nan = False
    if retention is not None:
        retention_source = "task"
        retention_nan = not math.isfinite(float(retention))
        retention = _finite_or_none(retention)
    elif perplexity_before is not None and perplexity_after is not None:
        retention_source = "perplexity"
        # perplexity_after may be inf for a diverged model: the ratio is then 0, a clear fail.
        retention = float(perplexity_before) / float(perplexity_after)
    cka = _finite_or_none(cka)
    drift = None if cka is None else 1.0 - cka

    details = {
        "reference": reference,
        "retention": retention,
        "cka": cka,
        "drift": drift,
        "perplexity_before": _finite_or_none(perplexity_before),
        "perplexity_after": _finite_or_none(perplexity_after),
        "interpolation": interpolation,
        "chosen_alpha": chosen_alpha,
        "retention_floor": retention_floor,
        "cka_floor": cka_floor,
        "retention_source": retention_source,
        "measured_on_validation": measured_on_validation,
    }

    parts: list[str] = []
    if retention_nan:
        parts.append(f"Could not measure how much of its original skill it kept on {reference} (the result was NaN)")
    elif retention_source == "task":
        parts.append(f"Kept {retention:.1%} of its original performance on {reference}")
    elif retention_source == "perplexity":
        parts.append(
            f"Perplexity on {reference} went from {perplexity_before:.2f} to {perplexity_after:.2f}, "
            f"so it kept {retention:.1%} of its language-modelling ability"
        )
    if drift is not None:
        parts.append(f"its internal representations drifted by {drift:.2f} (1 − CKA; 0 means unchanged, 1 unrelated)")

    if not parts:
        return guard_result(
            "skipped",
            "Forgetting was not measured: no retention, perplexity or representation figures were available.",
            details,
        )

    problems: list[str] = []
    if retention_nan:
        problems.append("a model whose reference score is NaN cannot be trusted")
    if retention is not None and retention_floor is not None and retention < retention_floor:
        problems.append(f"that is below the floor of {retention_floor:.1%}")
    if cka is not None and cka_floor is not None and cka < cka_floor:
        problems.append(f"CKA {cka:.2f} is below the floor of {cka_floor:.2f}")

    if problems:
        status = "fail"
    elif retention is not None and retention < WARN_RETENTION:
        status = "warn"
        problems.append(f"within the floor, but more than {1 - WARN_RETENTION:.0%} of the original skill was lost")
    elif retention is None and drift is not None and drift > WARN_DRIFT:
        status = "warn"
        problems.append("a large drift; measure a reference set to see whether behaviour changed too")
    else:
        status = "ok"

    summary = parts[0] if len(parts) == 1 else parts[0] + "; " + parts[1]
    if problems:
        summary += " — " + "; ".join(problems)
    summary += "."
    if chosen_alpha is not None and chosen_alpha < 1.0:
        summary += (
            f" The weights were blended back towards the pre-trained model (α = {chosen_alpha:.2f}) "
            "to keep more of what it knew."
        )
    if measured_on_validation:
        summary += " Drift was measured on the validation inputs because no reference set was given."
    return guard_result(status, summary, details)


def choose_interpolation_alpha(
    sweep: list[dict], retention_floor: float | None, *, higher_is_better: bool = True
) -> float:
    """Pick the WiSE-FT α from a sweep of ``{"alpha", "metric", "retention"}`` items.

    Among items with measured retention ≥ floor, the best task metric wins; ties go to the
    smaller α (closer to the pre-trained weights: same task score, less forgetting risk).
    If none reaches the floor, the α with the highest retention (ties → smaller α). When the
    floor is None, or no item has retention measured, the best metric wins. Items with a
    NaN metric are ignored. ``higher_is_better=False`` for loss-like metrics (e.g. RMSE).
    """
    if not sweep:
        raise ValueError("The interpolation sweep is empty; it needs at least one {alpha, metric, retention} item.")
    items = []
    for i, item in enumerate(sweep):
        missing = [k for k in ("alpha", "metric") if k not in item]
        if missing:
            raise ValueError(f"Interpolation sweep item {i} lacks {missing}; got keys {sorted(item)}.")
        metric = float(item["metric"])
        if math.isnan(metric):
            continue
        retention = item.get("retention")
        retention = None if retention is None or math.isnan(float(retention)) else float(retention)
        items.append((float(item["alpha"]), metric if higher_is_better else -metric, retention))
    if not items:
        raise ValueError("Every item of the interpolation sweep has a NaN metric; no α can be chosen.")

    def best_by(candidates: list[tuple[float, float, float | None]], idx: int) -> float:
        # max over (value, -alpha): the higher value wins, then the smaller α.
        return max(candidates, key=lambda t: (t[idx], -t[0]))[0]

    measured = [t for t in items if t[2] is not None]
    if retention_floor is None or not measured:
        return best_by(items, 1)
    qualifying = [t for t in measured if t[2] >= retention_floor]
    if qualifying:
        return best_by(qualifying, 1)
    return best_by(measured, 2)


def interpolate_state(
    theta0: dict[str, torch.Tensor], theta_ft: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT weights (1−α)·θ⁰ + α·θ_ft, keyed like θ_ft.

    Interpolated: floating tensors present in both with equal shapes (computed in at least
    float32, returned in θ_ft's dtype and device). Taken from θ_ft unchanged (shared, not
    copied): keys only in θ_ft (a new head), shape-mismatched keys (a resized head), and
    non-float tensors (step counters, position ids). Keys only in θ⁰ are dropped. Merge LoRA
    adapters into the base weights first: unmerged adapter keys would survive α = 0.
    """
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"The 'alpha' of WiSE-FT interpolation must be in [0, 1]. Got {alpha!r} instead.")
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, ft in theta_ft.items():
            base = theta0.get(key)
            if base is None or not ft.is_floating_point() or not base.is_floating_point() or base.shape != ft.shape:
                out[key] = ft
                continue
            # Half-precision lerp loses ~3 significant digits; do the arithmetic in float32.
            work = torch.promote_types(ft.dtype, torch.float32)
            a = base.to(device=ft.device, dtype=work)
            b = ft.to(dtype=work)
            # torch.lerp returns its endpoints exactly at α = 0 and α = 1.
            out[key] = torch.lerp(a, b, alpha).to(ft.dtype)
    return out
