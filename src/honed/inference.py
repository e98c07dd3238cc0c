"""Predictions from a finished run for new data: the run's task reads the input as it was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .errors import RecipeError
from .models.load import run_model_dir
from .tasks import TASKS


def predict(run_dir: str | Path, input_path: str | Path, batch_size: int = 64) -> pd.DataFrame:
    """The input rows with the model's predictions (for classes: `prediction` and one `prob_<label>` per class)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RecipeError(f"RUN_DIR: {run_dir} does not exist; give the folder `honed run` wrote")
    model_dir = run_model_dir(run_dir)
    if model_dir is None:
        raise RecipeError(f"RUN_DIR: {run_dir} has no model/ folder with honed.json; was the run finished?")
    meta = json.loads((model_dir / "honed.json").read_text())
    task = meta.get("task", "text-classification")  # runs written before honed.json named the task were text classifiers
    if task not in TASKS:
        raise RecipeError(f"RUN_DIR: {run_dir} holds a '{task}' model, which this version of honed cannot read; tasks: {', '.join(TASKS)}")
    return TASKS[task].predict_file(model_dir, meta, Path(input_path), batch_size)
