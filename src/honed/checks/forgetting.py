"""Forgetting measured on the head's input features: the original task's metric before and after,
representation drift (1 − linear CKA), and the WiSE-FT sweep (design.md §4 "Forgetting")."""

from __future__ import annotations

import copy

from ..guards.forgetting import choose_interpolation_alpha, forgetting_guard, interpolate_state, linear_cka

DEFAULT_ALPHAS = [round(0.1 * i, 1) for i in range(11)]


def interpolation_alphas(recipe) -> list[float]:
    return DEFAULT_ALPHAS if recipe.interpolate is True else sorted(recipe.interpolate)


def wise_ft_sweep(model, theta0: dict, alphas: list[float], score, floor: float):
    """WiSE-FT (Wortsman et al. 2022): θ_α = (1−α)θ⁰ + αθ_ft for every α; `score(model)` returns the
    sweep row ({metric, retention, ...}); the model is left at the chosen α.

    theta0 holds the weights to interpolate (a task may leave out its new head: that one is
    always θ_ft). Returns (rows, chosen α, model).
    """
    theta_ft = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sweep = []
    for alpha in alphas:
        model.load_state_dict(interpolate_state(theta0, theta_ft, alpha))
        sweep.append({"alpha": alpha, **score(model)})
    chosen = choose_interpolation_alpha(sweep, floor)
    model.load_state_dict(interpolate_state(theta0, theta_ft, chosen))
    return sweep, chosen, model


def feature_forgetting(session, tuner, model, before, original_metric, lower_is_better: bool = False):
    """The forgetting guard for tasks with a head: retention of the original task and representation
    drift on the reference inputs; with `interpolate`, the WiSE-FT sweep and the exported weights at the chosen α.

    original_metric(session, model, features) -> the original task's score (None when it cannot be scored).
    """
    recipe, ref = session.recipe, session.reference

    def ratio(b, a):
        if b is None or a is None:
            return None
        if lower_is_better:
            return b / a if a > 0 else None
        return a / b if b else None

    pristine = None  # the pre-trained model, rebuilt only for a reference set (the validation features are cached)
    if not ref.on_validation:
        pristine = copy.deepcopy(model)
        pristine.load_state_dict({k: v for k, v in tuner.pristine_state().items() if k in pristine.state_dict()}, strict=False)
    features_before = session.features["validation"] if ref.on_validation else session.head_features(pristine, ref.encoded)
    features_after = session.head_features(model, ref.encoded)
    metric_before = original_metric(session, pristine, features_before)
    del pristine
    metric_after = original_metric(session, model, features_after)
    kept = ratio(metric_before, metric_after)
    floor, cka_floor = recipe.guards.forgetting.floor, recipe.guards.forgetting.cka_floor
    sweep, chosen = None, None
    if recipe.interpolate:
        head_prefix = session.bundle.head_name + "."
        theta0 = {k: v for k, v in tuner.pristine_state().items() if not k.startswith(head_prefix)}

        def score(m):
            val = session.evaluate(m, "validation")[session.task.primary]
            after = original_metric(session, m, session.head_features(m, ref.encoded))
            return {"metric": val, "retention": ratio(metric_before, after)}

        sweep, chosen, model = wise_ft_sweep(model, theta0, interpolation_alphas(recipe), score, floor)
        features_after = session.head_features(model, ref.encoded)
        metric_after = original_metric(session, model, features_after)
        kept = ratio(metric_before, metric_after)
    try:
        cka = linear_cka(features_before, features_after)
    except ValueError:  # e.g. a single validation window (one series): CKA needs two inputs
        cka = None
    guard = forgetting_guard(reference=ref.name, retention=kept, cka=cka, interpolation=sweep, chosen_alpha=chosen,
                             retention_floor=floor, cka_floor=cka_floor, measured_on_validation=ref.on_validation)
    guard["details"].update({"original_metric_before": metric_before, "original_metric_after": metric_after})
    return guard, model
