"""The task contract: one row per task (as PEFT's TEST_CASES), the same checks for every row.

Each case names a golden run (tests/golden/runs.py: a tiny model and data per task) and how
`honed predict` is fed for that task. For every task: the row is complete; the loss
backpropagates into the model; predict and the primary metric work on an encoded split; a run
writes predictions.csv and `honed predict` on a file reads it back; a run interrupted after its
first checkpoint and resumed ends with the same weights as the uninterrupted run; the served
request schema accepts one valid request and rejects one invalid one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import get_args

import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

import honed
from honed.errors import TrainingInterrupted
from honed.methods import METHODS
from honed.recipe import Recipe
from honed.serve.schemas import REQUEST_SCHEMAS
from honed.session import prepare, setup
from honed.tasks import TASKS
from honed.tasks.base import TOKEN_MIXTURE_TASKS, Task


def predict_text(run_dir: Path, recipe: dict, tmp: Path) -> tuple[Path, int]:
    return run_dir / "predictions.csv", len(pd.read_csv(run_dir / "predictions.csv"))


def predict_images(run_dir: Path, recipe: dict, tmp: Path) -> tuple[Path, int]:
    rows = pd.read_csv(run_dir / "predictions.csv")
    path = tmp / "images.csv"
    rows.rename(columns={"path": "image"}).to_csv(path, index=False)
    return path, len(rows)


def predict_series(run_dir: Path, recipe: dict, tmp: Path) -> tuple[Path, int]:
    history = pd.read_csv(recipe["data"]["train"])
    return Path(recipe["data"]["train"]), history["series"].nunique() * recipe["data"]["horizon"]


def predict_conversations(run_dir: Path, recipe: dict, tmp: Path) -> tuple[Path, int]:
    lines = Path(recipe["data"]["train"]).read_text().splitlines()[:2]
    path = tmp / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, 2


def predict_pairs(run_dir: Path, recipe: dict, tmp: Path) -> tuple[Path, int]:
    lines = Path(recipe["data"]["train"]).read_text().splitlines()[:3]
    path = tmp / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, 3


def predict_documents(run_dir: Path, recipe: dict, tmp: Path) -> tuple[Path, int]:
    folder = Path(recipe["data"]["train"])
    return folder, len(list(folder.glob("*.txt")))


VALID_TEXT = {"inputs": [{"text": "great service"}]}
VALID_CHAT = {"messages": [{"role": "user", "content": "hello"}]}

# task → (golden run, `honed predict` input, whether predict reproduces predictions.csv, valid and invalid requests)
CASES = {
    "text-classification": ("text_full", predict_text, True, VALID_TEXT, {"inputs": [{"text": 3}]}),
    "image-classification": ("image_full", predict_images, True, None, None),
    "tabular-classification": ("tabular_classification", predict_text, True, None, None),
    "tabular-regression": ("tabular_regression", predict_text, True, None, None),
    "forecasting": ("forecast_patchtst", predict_series, False, None, None),
    "chat": ("chat_lora", predict_conversations, False, VALID_CHAT, {"messages": "hello"}),
    "preference": ("preference_lora", predict_pairs, False, VALID_CHAT, {"messages": "hello"}),
    "causal-lm": ("causal_lm_lora", predict_documents, False, None, None),  # predict scores each document alone, the run packed rows
}


def test_every_task_has_a_case_and_the_recipe_knows_every_task_and_method():
    assert set(CASES) == set(TASKS)
    assert REQUEST_SCHEMAS == {name: t.request_schema for name, t in TASKS.items() if t.request_schema is not None}
    assert set(get_args(Recipe.model_fields["task"].annotation)) == set(TASKS)
    assert set(get_args(Recipe.model_fields["method"].annotation)) == set(METHODS)
    assert set(TOKEN_MIXTURE_TASKS) <= set(TASKS), "data.mix_by: tokens names tasks of the table"


@pytest.mark.parametrize("name", list(TASKS))
def test_row_is_complete(name):
    task = TASKS[name]
    assert isinstance(task, Task) and task.name == name
    optional = {"features", "probe", "cached_head", "bias", "request_schema", "tie_break"}
    for field in dataclasses.fields(Task):
        value = getattr(task, field.name)
        if field.name not in optional:
            assert value is not None, f"{name}: {field.name} is required"
    assert task.primary not in task.lower_is_better, "the loop maximises the primary metric"
    assert set(task.methods) <= set(METHODS)
    if task.probe is not None or task.cached_head is not None:
        assert task.features is not None, f"{name}: a probe or a cached head reads the head's features"


@pytest.fixture
def uninterrupted(golden_run):
    """Each case's golden run, run once per session (conftest.py): (recipe, run_dir)."""

    def get(name):
        recipe, _, run_dir, _ = golden_run(CASES[name][0])
        return recipe, run_dir

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_loss_backpropagates_and_predict_scores(name, uninterrupted):
    recipe, _ = uninterrupted(name)
    resolved, splits = prepare(recipe)
    session = setup(resolved, splits)
    task, model = session.task, session.bundle.model
    train = session.encoded["train"]
    batches = task.batches(train, resolved, 0, session.bundle.pad_id)
    batch = batches.collate(batches.plan(0)[0])
    model.train()
    loss = task.loss(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and math.isfinite(float(loss)), f"{name}: no gradient reached the model"
    assert any(float(g.abs().sum()) > 0 for g in grads)
    outputs = session.outputs(model, session.encoded["validation"])
    figures = task.metrics(outputs, session.encoded["validation"])
    assert math.isfinite(figures[task.primary]) and figures[task.primary] > -1e9


@pytest.mark.parametrize("name", list(CASES))
def test_predictions_written_and_predict_reads_a_file(name, uninterrupted, tmp_path):
    recipe, run_dir = uninterrupted(name)
    _, feed, reproduces, _, _ = CASES[name]
    written = pd.read_csv(run_dir / "predictions.csv")
    assert len(written) > 0
    path, rows = feed(run_dir, recipe, tmp_path)
    frame = honed.predict(run_dir, path)
    assert len(frame) == rows and "prediction" in frame.columns
    if reproduces:  # the saved model, read back by `honed predict`, gives the test predictions of the run
        if written["prediction"].dtype.kind == "f":
            assert frame["prediction"].to_numpy() == pytest.approx(written["prediction"].to_numpy(), rel=1e-4, abs=1e-5)
        else:
            assert (frame["prediction"].astype(str).to_numpy() == written["prediction"].astype(str).to_numpy()).all()


@pytest.mark.parametrize("name", list(CASES))
def test_interrupted_and_resumed_run_ends_with_the_same_weights(name, uninterrupted, tmp_path):
    recipe, reference_dir = uninterrupted(name)
    seen = []

    def stop_at_second_evaluation(record):
        seen.append(record)
        if len(seen) == 2:
            raise TrainingInterrupted("stopped by the contract test")

    with pytest.raises(TrainingInterrupted):
        honed.run(recipe, out=tmp_path / "run", show_progress=False, on_evaluation=stop_at_second_evaluation)
    assert not (tmp_path / "run" / "model").exists()
    resumed = honed.run(recipe, out=tmp_path / "run", resume=True, show_progress=False).run_dir
    files = sorted(p.name for p in (reference_dir / "model").glob("*.safetensors"))
    assert files
    for file in files:
        want, got = load_file(reference_dir / "model" / file), load_file(resumed / "model" / file)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), f"{name}: {file}:{key} differs after resume"
    assert json.loads((resumed / "metrics.json").read_text())["test"] == json.loads((reference_dir / "metrics.json").read_text())["test"]


@pytest.mark.parametrize("name", list(CASES))
def test_request_schema_accepts_a_valid_request_and_rejects_an_invalid_one(name):
    schema = TASKS[name].request_schema
    _, _, _, valid, invalid = CASES[name]
    if valid is None:
        assert schema is None, f"{name}: a servable task needs a valid and an invalid request in CASES"
        return
    assert schema is not None, f"{name}: the case has requests but the task declares no request_schema"
    schema.model_validate(valid)
    with pytest.raises(ValidationError):
        schema.model_validate(invalid)
