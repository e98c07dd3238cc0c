"""After the search: tune.json (every trial, the best, importances), the best recipe run once more
into OUT/best, and OUT/best.yaml."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .. import runner
from ..errors import HonedError
from ..recipe import Recipe
from .space import Param, to_overrides
from .study import redact
from .trials import complete_trials, say


@dataclass
class TuneResult:
    out: Path
    study_name: str
    summary: dict  # the contents of tune.json
    best_metrics: dict | None = None  # metrics.json of OUT/best


@contextlib.contextmanager
def _exclusive(path: Path):
    """One worker at a time finalises an OUT folder (workers on one machine share it)."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: workers finalise one after another by chance
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _trial_record(t: optuna.trial.FrozenTrial) -> dict:
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "params": t.params,
        "duration_s": round(t.duration.total_seconds(), 2) if t.duration is not None else None,
        "evaluations": len(t.intermediate_values),
        "last_intermediate": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
        "run_dir": t.user_attrs.get("run_dir"),
        "overrides": t.user_attrs.get("overrides"),
        "defaults": bool(t.user_attrs.get("defaults", False)),
        "error": t.user_attrs.get("error"),
        "stopped": t.user_attrs.get("stopped"),
    }


def importances(study: optuna.Study, seed: int) -> tuple[dict | None, str | None]:
    """fANOVA importances over the complete trials (≥ 2 needed); (None, why) when they cannot be computed."""
    complete = complete_trials(study)
    if len(complete) < 2:
        return None, f"{len(complete)} complete trial(s); importances need at least 2"
    if len({t.value for t in complete}) == 1:
        return None, f"every complete trial scored {complete[0].value:.4f}: no parameter made a difference in this range"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
        return {k: round(float(v), 4) for k, v in found.items()}, None
    except Exception as exc:  # noqa: BLE001 - e.g. every complete trial has the same value of every parameter
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def finalise(study: optuna.Study, base: Recipe, space: dict[str, Param], out: Path, url: str, metric: str,
              direction: str, seed: int, show_progress: bool, final_run: bool) -> TuneResult:
    with _exclusive(out / ".tune.lock"):
        trials = study.get_trials(deepcopy=False)
        complete = complete_trials(study)
        found, why = importances(study, seed)
        defaults = next((t for t in trials if t.user_attrs.get("defaults")), None)
        summary: dict[str, Any] = {
            "study": study.study_name,
            "storage": redact(url),
            "direction": direction,
            "objective": f"validation {metric}",
            "space": {k: p.describe() for k, p in space.items()},
            "trials": [_trial_record(t) for t in trials],
            "counts": {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
            "best": None,
            "defaults": {"number": defaults.number, "value": defaults.value, "state": defaults.state.name} if defaults else None,
            "importances": found,
            "importances_note": why,
        }
        result = TuneResult(out, study.study_name, summary)
        if not complete:
            _write_json(out / "tune.json", summary)
            errors = [t.user_attrs["error"] for t in trials if "error" in t.user_attrs]
            raise HonedError(f"tune: no trial completed ({summary['counts']['PRUNED']} pruned, {summary['counts']['FAIL']} failed"
                             f"{'; first error: ' + errors[0] if errors else ''}); see {out / 'tune.json'}")
        best = study.best_trial
        sets = best.user_attrs.get("overrides") or to_overrides(best.params, base)
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params, "overrides": sets,
                           "trial_dir": best.user_attrs.get("run_dir"), "validation": best.user_attrs.get("validation"),
                           "recipe": str(out / "best.yaml"), "run_dir": str(out / "best")}
        if final_run:
            result.best_metrics = _run_best(base, sets, best.number, study.study_name, out, show_progress)
            metrics = result.best_metrics
            summary["best"].update({"final_validation": metrics.get("validation"), "test": metrics.get("test")})
            _write_best_yaml(out)
        _write_json(out / "tune.json", summary)
        return result


def _run_best(base: Recipe, sets: list[str], number: int, study_name: str, out: Path, show_progress: bool) -> dict:
    """Run the best recipe once more, with the recipe's own guards, into OUT/best: the only test score read."""
    best_dir = out / "best"
    previous = _read_json(out / "tune.json")
    same = (previous and previous.get("study") == study_name and (previous.get("best") or {}).get("number") == number
            and (best_dir / "metrics.json").exists())
    if same:  # another worker already ran this very trial's recipe
        return json.loads((best_dir / "metrics.json").read_text())
    if show_progress:
        say(f"best trial {number}: running its recipe once more into {best_dir} (the recipe's own guards on; test split read once)")
    overwrite = best_dir.exists() and (best_dir / "recipe.yaml").exists()
    return runner.run(base, sets, out=best_dir, overwrite=overwrite, show_progress=show_progress).metrics


def _write_best_yaml(out: Path) -> None:
    """best.yaml is the resolved recipe the best run used: every auto filled in, loadable by `honed run`."""
    text = (out / "best" / "recipe.yaml").read_text()
    tmp = out / "best.yaml.partial"
    tmp.write_text(text)
    os.replace(tmp, out / "best.yaml")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
