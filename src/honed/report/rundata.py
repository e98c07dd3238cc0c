"""Reading a run directory into `RunData`: metrics.json (required), history.jsonl,
audit.json and recipe.yaml (each optional; unreadable parts are noted, not raised), and which
metrics are lower-is-better."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from honed.errors import HonedError, RecipeError


def lower_is_better_metrics(metrics: dict) -> frozenset[str]:
    """The metric names for which smaller is better. The task knows, and the run writes its
    list into metrics.json as `lower_is_better`; a metrics.json written before that key existed
    falls back to the task's declared set. A task honed does not know: none."""
    declared = metrics.get("lower_is_better")
    if isinstance(declared, (list, tuple)):
        return frozenset(str(m) for m in declared)
    task = metrics.get("task")
    if not isinstance(task, str):
        return frozenset()
    # imported here, not at the top: honed.tasks imports torch, which neither `import honed.report`
    # nor a report on a metrics.json that carries its own list should pay for
    from honed.tasks import TASKS

    if task not in TASKS:
        return frozenset()
    return frozenset(TASKS[task].lower_is_better)


@dataclass
class RunData:
    run_dir: Path
    metrics: dict
    history: list[dict] = field(default_factory=list)
    history_skipped: int = 0
    audit: dict | None = None
    audit_problem: str | None = None
    recipe_text: str | None = None
    recipe: dict = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return str(self.metrics.get("primary_metric") or "accuracy")

    def guard(self, name: str) -> dict:
        g = (self.metrics.get("guards") or {}).get(name)
        return g if isinstance(g, dict) else {}

    def details(self, name: str) -> dict:
        d = self.guard(name).get("details")
        return d if isinstance(d, dict) else {}

    @cached_property
    def lower_is_better(self) -> frozenset[str]:
        """The metrics for which smaller is better (see `lower_is_better_metrics`)."""
        return lower_is_better_metrics(self.metrics)


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    mpath = run_dir / "metrics.json"
    if not run_dir.is_dir():
        raise RecipeError(
            f"run directory {run_dir} does not exist; pass the RUN_DIR a `honed run` wrote (its `out`)"
        )
    if not mpath.is_file():
        raise RecipeError(
            f"no metrics.json in {run_dir}; pass the RUN_DIR of a finished `honed run`, "
            "or finish the run (`honed run RECIPE --resume`) first"
        )
    try:
        metrics = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HonedError(f"cannot read {mpath}: {exc}; rerun `honed run` to write it again") from exc
    if not isinstance(metrics, dict):
        raise HonedError(f"{mpath} holds a {type(metrics).__name__}, expected a JSON object; rerun `honed run`")
    run = RunData(run_dir=run_dir, metrics=metrics)

    hpath = run_dir / "history.jsonl"
    if hpath.is_file():
        for line in hpath.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                run.history_skipped += 1
                continue
            if isinstance(rec, dict):
                run.history.append(rec)
            else:
                run.history_skipped += 1

    apath = run_dir / "audit.json"
    if apath.is_file():
        try:
            audit = json.loads(apath.read_text(encoding="utf-8", errors="replace"))
            if isinstance(audit, dict):
                run.audit = audit
            else:
                run.audit_problem = f"audit.json holds a {type(audit).__name__}, expected an object"
        except json.JSONDecodeError as exc:
            run.audit_problem = f"audit.json is not valid JSON ({exc})"

    rpath = run_dir / "recipe.yaml"
    if rpath.is_file():
        run.recipe_text = rpath.read_text(encoding="utf-8", errors="replace")
        try:
            import yaml

            parsed = yaml.safe_load(run.recipe_text)
            if isinstance(parsed, dict):
                run.recipe = parsed
        except Exception:  # the recipe is still shown verbatim
            pass
    return run
