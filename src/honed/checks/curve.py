"""The data guard: examples per class, and the learning curve over nested fractions of the
training set (design.md §4 "Data sufficiency")."""

from __future__ import annotations

from ..guards import data_curve
from ..recipe import main_seed
from ..train.progress import quiet
from ..train.progress import say


def learning_curve(session, tuner, show_progress: bool = False, full_score: float | None = None) -> dict:
    """Fine-tune on nested fractions of the training set; each scored on the same validation split."""
    recipe, task = session.recipe, session.task
    fractions = sorted(recipe.guards.curve_fractions)
    subsets = task.curve_subsets(session.encoded["train"], fractions, main_seed(recipe))
    scores = []
    for fraction, idx in zip(fractions, subsets):
        if fraction == 1.0 and full_score is not None:
            scores.append(full_score)
            continue
        say(show_progress, f"learning curve: {fraction:.0%} of the training data ({len(idx)} rows)")
        model, _, _ = tuner.fine_tune(main_seed(recipe), train_idx=idx, progress=quiet())
        scores.append(session.evaluate(model, "validation")[task.primary])
    details = data_curve.data_sufficiency(fractions, len(session.encoded["train"]), scores, metric=task.primary,
                                          target=recipe.guards.target, epsilon=recipe.guards.epsilon)
    details["n"] = [len(idx) for idx in subsets]
    return details


def data_guard(session, tuner, history: list[dict], show_progress: bool) -> dict:
    """Examples per class and, with guards.data_curve, the learning curve (the full-data point is the run's own best)."""
    recipe = session.recipe
    counts = session.task.class_counts(session)
    if not recipe.guards.data_curve:
        guard = data_curve.data_guard({}, counts, recipe.guards.min_per_class)
        guard["summary"] += " (learning curve not run: set guards.data_curve: true)"
        return guard
    best = max((h[f"val_{session.task.primary}"] for h in history), default=None)
    details = learning_curve(session, tuner, show_progress, full_score=best)
    return data_curve.data_guard(details, counts, recipe.guards.min_per_class)
