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
    dev = pick_device()
    if meta.get("family") == "causal-lm":  # task: chat — a JSONL of conversations → the assistant's replies
        from .tasks.chat import predict_conversations

        return predict_conversations(model_dir, meta, Path(input_path))
    if meta.get("family") == "ts-forecast":  # history in long format → the next `horizon` values of each series
        from .tasks.forecasting import predict_future

        return predict_future(model_dir, meta, Path(input_path), resolve_precision(meta.get("precision", "auto"), dev), dev)
    if meta.get("family") == "hf-image":
        return _predict_images(model_dir, meta, Path(input_path), resolve_precision(meta.get("precision", "auto"), dev), dev, batch_size)
    frame = read_table(input_path, "INPUT")
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


def _predict_images(model_dir: Path, meta: dict, input_path: Path, precision: str, dev, batch_size: int) -> pd.DataFrame:
    """INPUT is a folder of images (searched recursively) or a table with the run's image column."""
    from .data.images import IMAGE_SUFFIXES, check_images
    from .tasks import image

    if not input_path.exists():
        raise DataError(f"INPUT: {input_path} not found; give an image folder or a CSV of image paths")
    if input_path.is_dir():
        paths = sorted(str(p) for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DataError(f"INPUT: {input_path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        frame = pd.DataFrame({"path": paths})
    else:
        table = read_table(input_path, "INPUT")
        column = meta.get("image_column", "image")
        if column not in table.columns:
            raise DataError(f"INPUT: column '{column}' not found in {input_path.name} (columns: {', '.join(map(str, table.columns[:30]))})")
        frame = table.assign(path=[str((input_path.parent / str(p)).resolve()) for p in table[column]])
    frame = check_images(frame, "INPUT", 1.0, [])
    bundle = load_saved(model_dir)
    split = image.encode(bundle, frame, None, None)
    logits = image.predict(bundle.model.to(dev), split, 0, batch_size, precision, dev)
    return _with_predictions(frame, logits, bundle.labels)
