"""Running trials: the objective (one honed run directory per trial, pruned from its
evaluations) and the per-trial progress line and failure count."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .. import runner
from ..errors import HonedError, TrainingInterrupted
from ..recipe import Recipe
from .space import Param, to_overrides


# Guards that cost extra training are off inside trials; the final run of the best recipe keeps the recipe's own.
TRIAL_ONLY = ["guards.data_curve=false", "guards.baseline=false", "train.seeds=null"]
MAX_CONSECUTIVE_FAILURES = 3


class StopSearch(Exception):
    """Raised out of a trial to end the whole search (Ctrl-C, or a problem no trial can get past)."""

    def __init__(self, message: str, interrupted: bool = False):
        super().__init__(message)
        self.interrupted = interrupted


def _trial_dir(out: Path, number: int) -> Path:
    return out / f"trial-{number:04d}"


@dataclass
class _State:
    show_progress: bool
    failures: int = 0

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.FAIL:
            self.failures += 1
        elif trial.state == optuna.trial.TrialState.COMPLETE:
            self.failures = 0
        if self.show_progress:
            say(_trial_line(trial))
        if self.failures >= MAX_CONSECUTIVE_FAILURES and not complete_trials(study):
            error = trial.user_attrs.get("error", "see the trial directories")
            raise StopSearch(f"tune: the first {self.failures} trials failed and none completed; last error: {error}")


def make_objective(base: Recipe, space: dict[str, Param], out: Path, metric: str, timeout: float | None, show_progress: bool):
    """The objective (one honed run per trial, pruned from its evaluations) and the per-trial progress callback."""
    deadline = time.time() + timeout if timeout is not None else None
    state = _State(show_progress)
    # pre-trained features (and the linear probe on them) do not depend on the searched values:
    # computed by the first trial of this worker, reused by the others
    cache: dict[str, Any] = {}

    def objective(trial: optuna.Trial) -> float:
        params = {name: param.suggest(trial) for name, param in space.items()}
        sets = to_overrides(params, base)
        run_dir = _trial_dir(out, trial.number)
        trial.set_user_attr("overrides", sets)
        trial.set_user_attr("run_dir", str(run_dir))
        evaluations = {"n": 0}

        def on_evaluation(record: dict) -> None:
            value = record.get(f"val_{metric}")
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return
            trial.report(float(value), evaluations["n"])  # step = evaluation index (every half epoch with eval_every: auto)
            evaluations["n"] += 1
            if deadline is not None and time.time() > deadline:
                trial.set_user_attr("stopped", "the --timeout budget ran out during this trial")
                raise optuna.TrialPruned(f"stopped at evaluation {evaluations['n']}: the time budget ran out")
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at evaluation {evaluations['n']} (validation {metric} {value:.4f})")

        try:
            result = runner.run(base, sets + TRIAL_ONLY, out=run_dir, show_progress=False, on_evaluation=on_evaluation, cache=cache)
        except TrainingInterrupted as exc:
            raise StopSearch("tune: interrupted", interrupted=True) from exc
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            raise
        finally:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a trial is never resumed; its model/ stays
        validation = result.metrics.get("validation") or {}
        trial.set_user_attr("validation", validation)
        trial.set_user_attr("evaluations", evaluations["n"])
        if validation.get(metric) is None:
            raise HonedError(f"tune: {run_dir / 'metrics.json'} has no validation {metric} to optimise")
        return float(validation[metric])

    return objective, state


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(text, markup=False, highlight=False)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _trial_line(trial: optuna.trial.FrozenTrial) -> str:
    state = "stopped (time budget)" if trial.user_attrs.get("stopped") else trial.state.name.lower()
    value = f" validation {trial.value:.4f}" if trial.value is not None else ""
    if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
        last = trial.intermediate_values[max(trial.intermediate_values)]
        value = f" at validation {last:.4f}"
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    seconds = f" {trial.duration.total_seconds():.0f} s" if trial.duration is not None else ""
    error = f" ({trial.user_attrs['error']})" if trial.state == optuna.trial.TrialState.FAIL and "error" in trial.user_attrs else ""
    return f"trial {trial.number}: {state}{value}{seconds}  [{params}]{error}"
