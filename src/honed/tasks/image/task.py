"""The image-classification row: a folder of class folders, or a table of image paths and labels."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...data.load import read_table
from ...errors import DataError, RecipeError
from ...models.load import load_hf_image, load_saved, relabel, run_model_dir
from .. import labelled
from ..base import CachedHead, Task, refuse_mix_by_tokens, refuse_series_model, saved_columns, saved_device_and_precision
from ..text import model as text_model
from . import data, model


def check_recipe(recipe) -> None:
    refuse_series_model(recipe)
    refuse_mix_by_tokens(recipe)
    if not isinstance(recipe.model, str):
        raise RecipeError("model: image-classification needs a checkpoint folder, a Hub id or a honed image run")


def load_model(recipe, splits):
    """An image checkpoint (folder or Hub id), or an earlier honed image run (given a new head when its classes differ)."""
    path = Path(recipe.model)
    model_dir = run_model_dir(path) if path.exists() else None
    if model_dir is not None:
        bundle = load_saved(model_dir)
        if bundle.family != "hf-image":
            raise RecipeError(f"model: {recipe.model} is a {bundle.family} run; image-classification needs an image model")
        return relabel(bundle, splits.labels)
    if path.is_absolute() and not path.exists():
        raise RecipeError(f"model: {recipe.model} does not exist; give an image checkpoint folder, a Hub id or a honed image run")
    return load_hf_image(recipe.model, splits.labels, recipe)


def sequence_length(recipe, module) -> int:
    """Patches plus the class token, for a ViT-style model."""
    size, patch = getattr(module.config, "image_size", 224), getattr(module.config, "patch_size", 16)
    return (size // patch) ** 2 + 1 if isinstance(size, int) and isinstance(patch, int) else 197


def encode_reference(recipe, bundle, frame, spec):
    paths = [str((Path(spec.data).parent / str(p)).resolve()) for p in frame[spec.text]]
    return model.encode(bundle, pd.DataFrame({"path": paths}), None, recipe)


def predict_file(model_dir: Path, meta: dict, input_path: Path, batch_size: int):
    """INPUT is a folder of images (searched recursively) or a table with the run's image column."""
    dev, precision = saved_device_and_precision(meta)
    if not input_path.exists():
        raise DataError(f"INPUT: {input_path} not found; give an image folder or a CSV of image paths")
    if input_path.is_dir():
        paths = sorted(str(p) for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in data.IMAGE_SUFFIXES)
        if not paths:
            raise DataError(f"INPUT: {input_path} holds no images ({', '.join(sorted(data.IMAGE_SUFFIXES))})")
        frame = pd.DataFrame({"path": paths})
    else:
        table = read_table(input_path, "INPUT")
        column = meta.get("image_column", "image")
        if column not in table.columns:
            raise DataError(f"INPUT: column '{column}' not found in {input_path.name} (columns: {', '.join(map(str, table.columns[:30]))})")
        frame = table.assign(path=[str((input_path.parent / str(p)).resolve()) for p in table[column]])
    frame = data.check_images(frame, "INPUT", 1.0, [])
    bundle = load_saved(model_dir)
    split = model.encode(bundle, frame, None, None)
    logits = model.predict(bundle.model.to(dev), split, 0, batch_size, precision, dev)
    return labelled.with_predictions(frame, logits, bundle.labels)


TASK = Task(
    name="image-classification",
    primary="accuracy",
    lower_is_better=frozenset({"loss"}),
    default_family="hf-image",
    methods=("full", "head", "freeze", "lora", "lp-ft"),
    check_recipe=check_recipe,
    load_splits=lambda recipe: data.load_image_splits(recipe, recipe.train.seed),
    audit=lambda recipe, splits, bundle=None, encoded=None: data.audit_images(splits),
    load_model=load_model,
    sequence_length=sequence_length,
    encode=model.encode,
    subset=model.subset,
    collate=model.collate,
    batches=model.batches,
    loss=text_model.classification_loss,
    predict=model.predict,
    metrics=text_model.metrics,
    features=model.features,
    probe=text_model.linear_probe,
    cached_head=CachedHead(text_model.head_loss),
    load_reference=labelled.reference_loader(encode_reference),
    model_meta=lambda recipe, splits: saved_columns(recipe),
    **labelled.WITH_CLASSES,
    predict_file=predict_file,
)
