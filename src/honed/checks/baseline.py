"""The baseline guard's reference points: the same architecture from random initialisation with
the same budget, and (for tasks with a head) the linear probe and the trivial model."""

from __future__ import annotations

from ..guards.status import guard_result
from ..train.progress import say

BASELINE_AUTO_SECONDS = 300  # `baseline: auto` trains the scratch model when fine-tuning took less than this
PROBE_MARGIN = 0.01  # the baseline guard warns when fine-tuning scores this far below the linear probe


def scratch_model(session, tuner, train_seconds: float, show_progress: bool):
    """The scratch-trained model when guards.baseline asks for it (auto: when fine-tuning was quick), else None."""
    wanted = session.recipe.guards.baseline
    if not (wanted is True or (wanted == "auto" and train_seconds < BASELINE_AUTO_SECONDS)):
        return None
    say(show_progress, "baseline: training the same architecture from random initialisation")
    return tuner.from_scratch()


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
