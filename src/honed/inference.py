"""Predictions from a finished run for new data (CSV, JSONL or Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from .data.load import read_table
from .errors import DataError, RecipeError
from .models.load import load_saved, run_model_dir
from .tasks import text_classification as tc
from .train.precision import device as pick_device
from .train.precision import resolve_precision


def predict(run_dir: str | Path, input_path: str | Path, batch_size: int = 64) -> pd.DataFrame:
    """Return the input rows with `prediction` and one `prob_<label>` column per class."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RecipeError(f"RUN_DIR: {run_dir} does not exist; give the folder `honed run` wrote")
    model_dir = run_model_dir(run_dir)
    if model_dir is None:
        raise RecipeError(f"RUN_DIR: {run_dir} has no model/ folder with honed.json; was the run finished?")
    meta = json.loads((model_dir / "honed.json").read_text())
    frame = read_table(input_path, "INPUT")
    dev = pick_device()
    # the precision the run was evaluated in, so predictions match predictions.csv
    precision = resolve_precision(meta.get("precision", "auto"), dev)
    if meta.get("family") == "mlp":
        return _predict_table(model_dir, meta, frame, Path(input_path).name, precision, dev)
    column = meta.get("text_column", "text")
    if column not in frame.columns:
        raise DataError(f"INPUT: column '{column}' not found in {Path(input_path).name} (columns: {', '.join(map(str, frame.columns[:30]))}); the model was trained on '{column}'")
    bundle = load_saved(model_dir)
    texts = frame[column].fillna("").astype(str).tolist()
    encoded = tc.encode(bundle, texts, None, int(meta.get("max_length", 128)))
    model = bundle.model.to(dev)
    logits = tc.predict_logits(model, encoded, bundle.pad_id, batch_size, precision, dev)
    return _with_predictions(frame, logits, bundle.labels)


def _predict_table(model_dir: Path, meta: dict, frame: pd.DataFrame, name: str, precision: str, dev) -> pd.DataFrame:
    from .tasks import tabular

    bundle = load_saved(model_dir)
    missing = [c for c in bundle.preprocessor.columns if c not in frame.columns]
    if missing:
        raise DataError(f"INPUT: feature column(s) {', '.join(missing)} not found in {name} (columns: {', '.join(map(str, frame.columns[:30]))}); the model needs every feature it was trained on")
    split = tabular.TabularSplit(bundle.preprocessor.transform(frame, "INPUT"), torch.zeros(len(frame)))
    outputs = tabular.predict(bundle.model.to(dev), split, 0, 256, precision, dev)
    if bundle.model.regression:
        out = frame.copy()
        out["prediction"] = outputs.numpy()
        return out
    return _with_predictions(frame, outputs, bundle.labels)


def _with_predictions(frame: pd.DataFrame, logits: torch.Tensor, labels: list[str]) -> pd.DataFrame:
    probs = torch.softmax(logits, -1).numpy()
    out = frame.copy()
    out["prediction"] = [labels[i] for i in probs.argmax(1)]
    for i, label in enumerate(labels):
        out[f"prob_{label}"] = probs[:, i].round(6)
    return out
