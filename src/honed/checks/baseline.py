"""The baseline guard's reference points: the same architecture from random initialisation with
the same budget, and (for tasks with a head) the linear probe and the trivial model."""

from __future__ import annotations

from ..guards.status import guard_result
from ..train.progress import say
from .budget import memory_refusal

BASELINE_AUTO_SECONDS = 300  # `baseline: auto` trains the scratch model when fine-tuning took less than this
PROBE_MARGIN = 0.01  # the baseline guard warns when fine-tuning scores this far below the linear probe


def scratch_model(session, tuner, train_seconds: float, show_progress: bool):
    """The scratch-trained model when guards.baseline asks for it (auto: when fine-tuning was quick), else None."""
    wanted = session.recipe.guards.baseline
    if not (wanted is True or (wanted == "auto" and train_seconds < BASELINE_AUTO_SECONDS)):
        return None
    budget = tuner.budget
    allowed = budget.remaining() if budget is not None else None
    if allowed is not None and allowed < 1:
        budget.notes["baseline"] = {"steps_allowed": 0, "note": "the from-scratch baseline was not run: guards.budget has no "
                                    "training steps left after the other guards; raise guards.budget or set it to null"}
        return None
    refusal = memory_refusal(session, "full", "the from-scratch baseline")  # before the scratch model is built
    if refusal is not None:
        if budget is not None:
            budget.notes["baseline"] = {"steps_allowed": allowed, "note": refusal}
        say(show_progress, f"baseline: {refusal}")
        return None
    say(show_progress, "baseline: training the same architecture from random initialisation"
        + (f" (at most {allowed} steps: guards.budget)" if allowed is not None else ""))
    trained, steps = tuner.from_scratch(max_steps=allowed)
    if budget is not None:
        budget.spend(steps)
        if allowed is not None and allowed < budget.fine_tune_steps:
            share = steps / max(1, budget.fine_tune_steps)
            budget.notes["baseline"] = {"steps_allowed": allowed, "steps": steps, "fine_tune_steps": budget.fine_tune_steps,
                                        "fraction": round(share, 4),
                                        "note": f"the from-scratch model trained for {steps} steps against the fine-tune's "
                                                f"{budget.fine_tune_steps} ({share:.0%}, guards.budget), so it is a lower bound of what random init reaches"}
    return trained


def probe_baseline(session, tuner, test_metrics: dict, before: dict, train_seconds: float, show_progress: bool,
                   majority: float, trivial: str) -> dict:
    """Fine-tuned against the trivial model (`trivial` names it), the linear probe and the scratch model."""
    primary = session.task.primary
    fine_tuned = test_metrics[primary]
    details = {"scratch": None, "linear_probe": before["test"][primary], "majority": majority, "fine_tuned": fine_tuned}
    trained = scratch_model(session, tuner, train_seconds, show_progress)
    if trained is not None:
        details["scratch"] = session.evaluate(trained, "test")[primary]
    problems = []
    if fine_tuned <= majority + 0.01:
        problems.append(f"the fine-tuned model ({fine_tuned:.3f}) is no better than {trivial} ({majority:.3f})")
    if details["scratch"] is not None and details["scratch"] >= fine_tuned - 0.005:
        problems.append(f"the same model trained from scratch scores {details['scratch']:.3f} against {fine_tuned:.3f}: pre-training bought nothing here")
    if fine_tuned < details["linear_probe"] - PROBE_MARGIN:
        problems.append(f"a linear probe on the frozen pre-trained features scores {details['linear_probe']:.3f} against {fine_tuned:.3f}: "
                        "fine-tuning lost what the features already gave; try lp-ft, more epochs, or (method: head) a higher train.head_lr")
    if problems:
        return guard_result("warn", "; ".join(problems).capitalize() + ".", details)
    parts = [f"Fine-tuned {primary} {fine_tuned:.3f}", f"majority class {majority:.3f}", f"linear probe {details['linear_probe']:.3f}"]
    if details["scratch"] is not None:
        parts.append(f"from scratch {details['scratch']:.3f}")
        return guard_result("ok", ", ".join(parts) + ": pre-training and fine-tuning both pay.", details)
    return guard_result("ok", ", ".join(parts) + " (from-scratch baseline not run: set guards.baseline: true).", details)
