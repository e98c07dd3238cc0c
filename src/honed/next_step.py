"""When a guard says the run failed, the one change honed would try next, derived from the run's own
numbers: the training loss it recorded, the learning-rate range test's curve, the linear probe.

Failures read (by their details, not their wording): the model collapsed to one class (overfitting
guard), it is no better than the majority class or the seasonal-naive forecast, or it scores below
a linear probe on the frozen pre-trained features (baseline guard). The rules, in order, and why:
docs/auto.md "When a run fails". `honed run --retry-on-fail` (honed/retry.py) runs the change once.
"""

from __future__ import annotations

import math

from .checks.baseline import PROBE_MARGIN
from .lr_range import applies as range_test_applies

DIVERGED_RISE = 1.5  # the training loss ended this many times above its lowest, or never came below this many times
# the class prior's loss (a constant prediction of the class frequencies): the rate is too high
STUCK = 0.9  # the lowest training loss stayed above 90 % of the starting loss: the rate is too low
LOWER_FROM_MINIMUM = 10.0  # a lower rate: the range test's minimum-loss rate ÷ 10 (three times below auto's ÷ 3)
RAISE_FROM_MINIMUM = 3.0  # a higher rate: the minimum-loss rate ÷ 3 (auto's cap; when auto already took it, this run's rate × 3)
STEP = 3.0  # without a range test, a rate three times lower or higher
FITTED_MARGIN = 0.05  # a training score this far above the majority class: the model fitted its training data
TRIVIAL_MARGIN = 0.01  # as the baseline guard: within 0.01 of the majority class is no better than it


def failures(guards: dict) -> list[tuple[str, str, str]]:
    """(kind, guard, what the numbers say) for each failure a next step answers, the gravest first."""
    found = []
    over = guards.get("overfitting", {}).get("details", {})
    if over.get("collapsed"):
        found.append(("collapsed", "overfitting", "the model predicts one class for every test example"))
    base = guards.get("baseline", {}).get("details", {})
    tuned, majority, probe = base.get("fine_tuned"), base.get("majority"), base.get("linear_probe")
    naive = base.get("seasonal_naive")
    # forecasting: fine_tuned is the primary metric, neg_mase (higher is better), as the guard compares it
    if isinstance(naive, dict) and isinstance(tuned, (int, float)) and "neg_mase" in naive and not tuned > naive["neg_mase"]:
        found.append(("trivial", "baseline", f"its test MASE {-tuned:.3f} does not beat seasonal naive's {naive['mase']:.3f}"))
    elif isinstance(tuned, (int, float)) and isinstance(majority, (int, float)) and tuned <= majority + TRIVIAL_MARGIN:
        found.append(("trivial", "baseline", f"it scores {tuned:.3f}, the majority class {majority:.3f}"))
    if isinstance(tuned, (int, float)) and isinstance(probe, (int, float)) and tuned < probe - PROBE_MARGIN:
        found.append(("below_probe", "baseline", f"a linear probe on the frozen features scores {probe:.3f} against its {tuned:.3f}"))
    return found


def prior_loss(class_counts: dict | None) -> float | None:
    """The cross-entropy of always predicting the training split's class frequencies (None without classes)."""
    counts = [c for c in (class_counts or {}).values() if c > 0]
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts) if total and len(counts) > 1 else None


def loss_trend(history: list[dict], lr_range: dict | None, constant_loss: float | None = None) -> tuple[str, str]:
    """("diverged" | "stuck" | "fell", the figures): what the training loss did over the run.
    The starting loss is the range test's first (the model before any step) when it ran, else the first
    evaluation's; constant_loss (prior_loss) tells a loss that blew up from one that never moved."""
    losses = [h.get("train_loss") for h in history if h.get("train_loss") is not None]
    if not losses:
        return "fell", "no training loss was recorded"
    tested = lr_range and lr_range.get("losses") and lr_range["losses"][0] is not None
    start = lr_range["losses"][0] if tested else losses[0]
    lowest, last = min(losses), losses[-1]
    figures = (f"training loss {start:.3g} {'before training' if tested else 'at the first evaluation'}, "
               f"{lowest:.3g} at its lowest, {last:.3g} at the end")
    if constant_loss is not None:
        figures += f"; predicting the class frequencies scores {constant_loss:.3g}"
    if (not all(math.isfinite(x) for x in losses) or (tested and last >= start) or last > DIVERGED_RISE * lowest
            or (constant_loss is not None and lowest > DIVERGED_RISE * constant_loss)):
        return "diverged", figures
    if lowest > STUCK * (start if constant_loss is None else min(start, constant_loss)):
        return "stuck", figures
    return "fell", figures


def rate_step(recipe, lr_range: dict | None, direction: str) -> tuple[float, str]:
    """(rate, how it was found): lower or higher than this run's, from the range test's curve when it ran."""
    lr = float(recipe.train.lr)
    if lr_range and lr_range.get("smoothed"):
        curve = lr_range["smoothed"]
        minimum = lr_range["lrs"][curve.index(min(curve))]
        if direction == "lower" and minimum / LOWER_FROM_MINIMUM < lr:
            return float(f"{minimum / LOWER_FROM_MINIMUM:.2g}"), f"the range test's minimum-loss rate {minimum:.2g} ÷ {LOWER_FROM_MINIMUM:g}"
        if direction == "higher" and minimum / RAISE_FROM_MINIMUM > lr:
            return float(f"{minimum / RAISE_FROM_MINIMUM:.2g}"), f"the range test's minimum-loss rate {minimum:.2g} ÷ {RAISE_FROM_MINIMUM:g}"
    new = lr / STEP if direction == "lower" else lr * STEP
    return float(f"{new:.2g}"), f"this run's {lr:g} {'÷' if direction == 'lower' else '×'} {STEP:g}"


def for_session(session, history: list[dict], guards: dict) -> dict | None:
    """suggest() with what a run's session knows (runner.run_stages calls it once the guards are measured)."""
    counts = session.task.class_counts(session)
    return suggest(session.recipe, session.bundle.family, session.task.methods, history, guards, session.lr_range,
                   session.task.primary, prior_loss(counts))


def suggest(recipe, family: str, methods, history: list[dict], guards: dict, lr_range: dict | None,
            primary: str | None = None, constant_loss: float | None = None) -> dict | None:
    """The next step for a failed run: {"failure", "guard", "set" (recipe overrides), "sentence"}; None when nothing failed.

    recipe: the run's resolved recipe; family: the model bundle's family; methods: the task's methods;
    lr_range: the range test's record when `train.lr: auto` ran it; primary: the primary metric (its
    training score tells a model that fitted its training data); constant_loss: prior_loss()."""
    found = failures(guards)
    if not found:
        return None
    kind, guard, said = found[0]
    methods = tuple(methods)
    change, why = None, ""
    if kind == "below_probe":
        if recipe.method in ("full", "freeze", "lora") and "lp-ft" in methods:
            change, why = "method=lp-ft", f"{said}: fit that head first, then fine-tune from it (LP-FT)"
        elif "head" in methods and recipe.method != "head":
            change, why = "method=head", f"{said}: the probe itself, trained as the model's head"
    else:
        trend, figures = loss_trend(history, lr_range, constant_loss)
        explicit = lr_range is None and range_test_applies(recipe, family, True)
        probe = guards.get("baseline", {}).get("details", {}).get("linear_probe")
        majority = guards.get("baseline", {}).get("details", {}).get("majority")
        fits_probe = isinstance(probe, (int, float)) and isinstance(majority, (int, float)) and probe > majority + TRIVIAL_MARGIN
        trained = [h[f"train_{primary}"] for h in history if primary and h.get(f"train_{primary}") is not None]
        fitted = bool(trained) and isinstance(majority, (int, float)) and max(trained) > majority + FITTED_MARGIN
        if recipe.method == "head":
            change = None
        elif trend == "fell" and fitted and fits_probe and "head" in methods:
            change, why = "method=head", (f"{said}, though it reached a training {primary} of {max(trained):.3f}: it fitted "
                                          f"the training data without generalising, while the linear probe scores {probe:.3f}")
        elif explicit and trend in ("diverged", "stuck"):
            change, why = "train.lr=auto", f"{said}; at the explicit train.lr {float(recipe.train.lr):g} its {figures}: the range test measures a rate"
        else:
            direction = "higher" if trend == "stuck" else "lower"
            rate, how = rate_step(recipe, lr_range, direction)
            change, why = f"train.lr={rate:g}", f"{how}; {said}, and its {figures}"
    if change is None:
        return {"failure": kind, "guard": guard, "set": [], "sentence": f"No automatic next step: {said}; look at the data and the model."}
    key, value = change.split("=", 1)
    return {"failure": kind, "guard": guard, "set": [change], "sentence": f"Next step: try {key}: {value} ({why})."}


def attach(guards: dict, step: dict | None) -> None:
    """Append the next step's sentence to the summary of the guard that failed (the verdict line a user reads)."""
    if step is not None and step["guard"] in guards:
        guards[step["guard"]]["summary"] = guards[step["guard"]]["summary"].rstrip() + " " + step["sentence"]
