"""The data guard: examples per class, and the learning curve over nested fractions of the
training set (design.md §4 "Data sufficiency")."""

from __future__ import annotations

from ..guards import data_curve
from .budget import curve_fractions, memory_refusal, min_curve_points
from ..recipe import main_seed
from ..train.progress import quiet
from ..train.progress import say


def learning_curve(session, tuner, show_progress: bool = False, full_score: float | None = None,
                   fractions: list[float] | None = None, on_steps=None) -> dict:
    """Fine-tune on nested fractions of the training set (the recipe's, unless given); each scored on
    the same validation split. on_steps(n) hears each fraction's optimizer steps (the guards' budget)."""
    recipe, task = session.recipe, session.task
    fractions = sorted(recipe.guards.curve_fractions if fractions is None else fractions)
    subsets = task.curve_subsets(session.encoded["train"], fractions, main_seed(recipe))
    scores = []
    for fraction, idx in zip(fractions, subsets):
        if fraction == 1.0 and full_score is not None:
            scores.append(full_score)
            continue
        say(show_progress, f"learning curve: {fraction:.0%} of the training data ({len(idx)} rows)")
        model, outcomes, _ = tuner.fine_tune(main_seed(recipe), train_idx=idx, progress=quiet())
        if on_steps is not None:
            on_steps(sum(o.steps for o in outcomes))
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
    budget = tuner.budget
    fractions, note = list(recipe.guards.curve_fractions), None
    if budget is not None:
        allowed = budget.allot("data", others_to_come=recipe.guards.baseline is not False)
        fractions, note = curve_fractions(fractions, len(session.encoded["train"]), allowed, budget.fine_tune_steps)
    points = len(set(fractions))
    if note is not None and points < min_curve_points(recipe.guards.curve_fractions):
        note["points"] = points
        needed = min_curve_points(recipe.guards.curve_fractions)
        note["note"] = (f"the learning curve was not run: guards.budget allows {note['steps_allowed']} training steps, enough for "
                        f"{points} of the {needed} points a curve needs (with fewer its three parameters fit any data exactly); "
                        "raise guards.budget or set it to null")
        budget.notes["data"] = note
        return curve_not_run(counts, recipe.guards.min_per_class, note["note"])
    refusal = memory_refusal(session, recipe.method, "the learning curve")
    if refusal is not None:  # before any fraction's model is built
        if budget is not None:
            budget.notes["data"] = {"note": refusal}
        return curve_not_run(counts, recipe.guards.min_per_class, refusal)
    if note is not None:
        budget.notes["data"] = note
    details = learning_curve(session, tuner, show_progress, full_score=best, fractions=fractions,
                             on_steps=budget.spend if budget is not None else None)
    return data_curve.data_guard(details, counts, recipe.guards.min_per_class)


def curve_not_run(counts, min_per_class: int, reason: str) -> dict:
    """The data guard when the learning curve was asked for and not run: the classes are still judged
    (a warning stands), and otherwise the guard is "skipped", not "ok": nothing measured the data's sufficiency."""
    guard = data_curve.data_guard({}, counts, min_per_class)
    guard["summary"] += f" ({reason})"
    if guard["status"] == "ok":
        guard["status"] = "skipped"
    guard["details"]["curve_skipped"] = reason
    return guard
