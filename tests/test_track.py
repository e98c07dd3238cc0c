"""Experiment tracking: TensorBoard and MLflow receive every evaluation, the final metrics and the
guards; a resumed run continues its MLflow run; a missing tracker package is refused up front."""

from __future__ import annotations

import json

import pytest

import honed
from honed import track
from honed.errors import TrainingInterrupted

from helpers import cli

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def mlflow_run(run_dir):
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(saved["tracking_uri"])
    return client, client.get_run(saved["mlflow_run_id"])


def test_every_evaluation_and_the_guards_reach_tensorboard_and_mlflow(recipe_factory, tmp_path):
    recipe = recipe_factory(**{"train.epochs": 2, "train.track": ["tensorboard", "mlflow"], "guards.baseline": False})
    result = honed.run(recipe, out=tmp_path / "runs" / "first", show_progress=False)
    history = [json.loads(x) for x in (result.run_dir / "history.jsonl").read_text().splitlines()]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("model/val_accuracy")]
    assert logged == [(h["step"], pytest.approx(h["val_accuracy"])) for h in history]
    assert events.Scalars("final/test.accuracy")[0].value == pytest.approx(result.metrics["test"]["accuracy"])

    client, run = mlflow_run(result.run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert client.get_experiment(run.info.experiment_id).name == "runs"  # the folder holding the run
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert steps == [h["step"] for h in history]
    assert run.data.metrics["test.accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert run.data.params["train.lr"] == "0.003" and run.data.params["method"] == "full"
    levels = {"skipped": -1, "ok": 0, "warn": 1, "fail": 2}
    for name, guard in result.metrics["guards"].items():
        assert run.data.tags[f"guard.{name}"] == guard["status"]
        assert run.data.metrics[f"guard.{name}"] == levels[guard["status"]]
    assert (tmp_path / "runs" / "mlflow.db").exists()  # the default store sits beside the runs


def test_a_resumed_run_continues_its_mlflow_run(recipe_factory, tmp_path):
    recipe = recipe_factory(**{"train.epochs": 3, "train.track": ["mlflow"], "guards.baseline": False})
    run_dir = tmp_path / "runs" / "resumed"
    seen = []

    def stop_at_second_evaluation(record):
        seen.append(record["step"])
        if len(seen) == 2:
            raise TrainingInterrupted("stopped by the test")

    with pytest.raises(TrainingInterrupted):
        honed.run(recipe, out=run_dir, show_progress=False, on_evaluation=stop_at_second_evaluation)
    client, first = mlflow_run(run_dir)
    assert first.info.status == "KILLED"
    result = honed.run(recipe, out=run_dir, resume=True, show_progress=False)
    client, again = mlflow_run(run_dir)
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(again.info.run_id, "val_accuracy")]
    assert steps[-1] == result.metrics["run"]["steps"]
    assert len(client.search_runs([again.info.experiment_id])) == 1


def test_a_missing_tracker_package_is_refused_before_anything_is_written(recipe_factory, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(track.PACKAGES, "mlflow", "honed_no_such_module")
    recipe = recipe_factory(**{"train.track": ["mlflow"]})
    code, _, err = cli(["run", recipe, "--out", tmp_path / "never"], capsys)
    assert code == 2
    assert "train.track: mlflow is not installed" in err and 'honed[track]' in err
    assert not (tmp_path / "never").exists()


def test_an_unknown_tracker_is_a_recipe_error(recipe_factory, tmp_path, capsys):
    recipe = recipe_factory(**{"train.track": ["wandb"]})
    code, _, err = cli(["check", recipe], capsys)
    assert code == 2 and "train.track" in err
