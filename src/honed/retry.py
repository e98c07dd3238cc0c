"""`honed run --retry-on-fail` and `honed.run(..., retry_on_fail=True)`: when a guard says the run
failed and names a next step (honed/next_step.py), run the recipe once more with that change, in a
run directory next to the first (RUN-retry1), and point the first run's metrics.json and report at
it. Both run directories are kept."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RecipeError
from .fileio import write_json_atomic
from .runner import RunResult, build_report
from .runner import run as run_once


def retry_dir(run_dir: Path) -> Path:
    """RUN-retry1 beside RUN."""
    return run_dir.with_name(f"{run_dir.name}-retry1")


def run(source, overrides: list[str] | None = None, out=None, retry_on_fail: bool = False, **kwargs) -> RunResult:
    """honed.runner.run, then with retry_on_fail the next step once when the run failed; the first
    run's RunResult, its `.retry` the second run's (None when it passed or had no next step).
    kwargs: as honed.runner.run (resume, overwrite, show_progress, ...)."""
    if retry_on_fail and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("--retry-on-fail: not under torchrun (only rank 0 reads the guards); run the suggested change as its own launch")
    first = run_once(source, overrides, out=out, **kwargs)
    step = first.metrics.get("next_step") if first.metrics else None
    if not (retry_on_fail and step and step["set"]):
        return first
    target = retry_dir(first.run_dir)
    # the retry is a new run: it is never resumed, and it replaces an earlier retry only when the first run was replaced
    again = {**kwargs, "resume": False, "overwrite": bool(kwargs.get("overwrite"))}
    second = run_once(source, [*(overrides or []), *step["set"]], out=target, **again)
    primary = second.metrics["primary_metric"]
    first.metrics["retry"] = {"run_dir": str(second.run_dir), "set": step["set"],
                              "validation": second.metrics["validation"].get(primary), "test": second.metrics["test"].get(primary),
                              "guards": {name: g["status"] for name, g in second.metrics["guards"].items()}}
    second.metrics["retry_of"] = {"run_dir": str(first.run_dir), "set": step["set"], "failure": step["failure"]}
    for result in (first, second):
        write_json_atomic(result.run_dir / "metrics.json", result.metrics)
        build_report(result.run_dir)
    first.retry = second
    return first
