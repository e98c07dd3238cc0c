"""Experiment tracking: every evaluation, then the final metrics and the guards' verdicts.

`train.track: [tensorboard, mlflow]` in the recipe. Both are optional extras
(`pip install "honed[track]"`); a recipe that asks for one that is not installed is refused
before anything is loaded. MLflow logs to `train.tracking_uri`, by default a SQLite store next
to the run directory (RUNS/mlflow.db: `mlflow ui --backend-store-uri sqlite:///RUNS/mlflow.db`);
the experiment is `train.experiment`, by default the name of the folder holding the run (for
`honed tune`, the study's folder, so each trial is a run of one experiment). A resumed run keeps
logging to the MLflow run it started (its id is kept in RUN_DIR/tracking.json).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

from .errors import RecipeError
from .recipe import Recipe, dump_recipe
from .fileio import write_json_atomic

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # tracker → module it needs
TRACKING_FILE = "tracking.json"


def check_available(recipe: Recipe) -> None:
    """Refuse a tracker whose package is missing, before any data or model is loaded."""
    for name in recipe.train.track:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise RecipeError(f"train.track: {name} is not installed; pip install \"honed[track]\" (or {PACKAGES[name]}), "
                              f"or remove {name} from train.track")


def _numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numeric entries of a (nested) dict, with dotted keys."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def _flat_params(recipe: Recipe) -> dict[str, str]:
    import yaml

    def flatten(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", str(value)[:500]

    return dict(flatten(yaml.safe_load(dump_recipe(recipe))))


def _final_numbers(metrics: dict) -> dict[str, float]:
    out = _numbers({"test": metrics.get("test", {}), "validation": metrics.get("validation", {}),
                    "timing": metrics.get("timing", {}), "pretrained": metrics.get("pretrained", {}),
                    "majority": metrics.get("majority", {})})
    levels = {"skipped": -1.0, "ok": 0.0, "warn": 1.0, "fail": 2.0}  # a chartable verdict; a skipped guard is not charted as ok
    for name, guard in metrics.get("guards", {}).items():
        if guard.get("status") in levels:
            out[f"guard.{name}"] = levels[guard["status"]]
    return out


def open_tensorboard(recipe: Recipe, run_dir: Path) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def evaluation(record: dict) -> None:
        stage, step = record.get("stage", "model"), int(record["step"])
        for key, value in _numbers(record).items():
            if key not in ("step", "epoch"):
                writer.add_scalar(f"{stage}/{key}", value, step)
        writer.flush()

    def final(metrics: dict) -> None:
        for key, value in _final_numbers(metrics).items():
            writer.add_scalar(f"final/{key}", value, 0)
        verdicts = "\n".join(f"| {name} | {g['status']} | {g['summary']} |" for name, g in metrics.get("guards", {}).items())
        writer.add_text("guards", "| guard | status | summary |\n|---|---|---|\n" + verdicts, 0)
        writer.flush()

    def close(status: str) -> None:
        writer.close()

    return {"evaluation": evaluation, "final": final, "close": close}


def open_mlflow(recipe: Recipe, run_dir: Path) -> dict:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = recipe.train.tracking_uri or f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    name = recipe.train.experiment or run_dir.parent.name
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(
        name, artifact_location=str(run_dir.parent / "mlartifacts"))
    saved = run_dir / TRACKING_FILE
    try:
        previous = json.loads(saved.read_text()) if saved.exists() else {}
    except ValueError:  # unreadable: log to a new MLflow run rather than fail the resume
        previous = {}
    run_id = previous.get("mlflow_run_id")
    if run_id is not None and previous.get("tracking_uri") == uri:
        client.update_run(run_id, status="RUNNING")  # --resume: the same MLflow run continues
    else:
        run = client.create_run(experiment_id, run_name=run_dir.name,
                                tags={"honed.run_dir": str(run_dir), "honed.task": recipe.task, "honed.method": recipe.method})
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in _flat_params(recipe).items()])
        write_json_atomic(saved, {"mlflow_run_id": run_id, "tracking_uri": uri, "experiment": name})

    def evaluation(record: dict) -> None:
        step = int(record["step"])
        stage = record.get("stage", "model")
        values = {k if stage == "model" else f"{stage}.{k}": v for k, v in _numbers(record).items() if k not in ("step", "epoch")}
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def final(metrics: dict) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in _final_numbers(metrics).items()])
        for guard_name, guard in metrics.get("guards", {}).items():
            client.set_tag(run_id, f"guard.{guard_name}", guard["status"])
            client.set_tag(run_id, f"guard.{guard_name}.summary", guard["summary"][:4000])

    def close(status: str) -> None:
        client.set_terminated(run_id, status=status)

    return {"evaluation": evaluation, "final": final, "close": close}


TRACKERS = {"tensorboard": open_tensorboard, "mlflow": open_mlflow}


def open_trackers(recipe: Recipe, run_dir: Path) -> list[dict]:
    """One tracker per entry of train.track: functions evaluation(record), final(metrics), close(status)."""
    return [TRACKERS[name](recipe, run_dir) for name in recipe.train.track]


def close_trackers(trackers: list[dict], status: str) -> None:
    """status: FINISHED, FAILED or KILLED (MLflow's words)."""
    for tracker in trackers:
        tracker["close"](status)
