"""The text-classification row: a column of texts and a column of labels (csv, jsonl, parquet)."""

from __future__ import annotations

from pathlib import Path

from ...data.load import read_table
from ...errors import DataError, RecipeError
from ...models.load import load_pretrained, load_saved, load_text_encoder
from ...models.quantise import refuse_unquantised
from ...serve.schemas import ClassifierRequest
from .. import labelled
from ..base import CachedHead, Task, mixture_counter, refuse_series_model, saved_columns, saved_device_and_precision
from . import data, model


def check_recipe(recipe) -> None:
    refuse_series_model(recipe)
    if not isinstance(recipe.model, str):
        raise RecipeError("model: an architecture spec is for tabular tasks; text-classification needs a checkpoint, a Hub id or 'wordllama'")
    if recipe.method == "qlora" and recipe.model == "wordllama":
        raise RecipeError("method: qlora quantises a transformers model's linear layers; wordllama is an embedding table with none "
                          "(use method: lora or full)")


def load_model(recipe, splits):
    bundle = load_pretrained(recipe.model, splits.labels, recipe)
    if recipe.method == "qlora":
        refuse_unquantised(bundle.model, recipe.model)
    return bundle


def audit(recipe, splits, bundle=None, encoded=None) -> dict:
    if encoded is None:
        return data.audit_text_splits(splits)
    audit = data.audit_text_splits(splits, {k: v.truncated for k, v in encoded.items()}, recipe.data.max_length)
    audit["tokenisation"] = {k: {"rows": len(v), "from_cache": v.from_cache} for k, v in encoded.items()}
    return audit


def encode(bundle, table, labels, recipe):
    """A split (an Arrow table from data.load_text_splits) as token ids and label indices."""
    return model.encode(bundle, table.column("text"), table.column("label") if "label" in table.column_names else None,
                        recipe.data.max_length)


def encode_reference(recipe, bundle, frame, spec):
    return model.encode(bundle, frame[spec.text].fillna("").astype(str).tolist(), None, recipe.data.max_length)


def predict_file(model_dir: Path, meta: dict, input_path: Path, batch_size: int):
    """Predictions for a table with the run's text column."""
    frame = read_table(input_path, "INPUT")
    dev, precision = saved_device_and_precision(meta)
    column = meta.get("text_column", "text")
    if column not in frame.columns:
        raise DataError(f"INPUT: column '{column}' not found in {Path(input_path).name} (columns: {', '.join(map(str, frame.columns[:30]))}); the model was trained on '{column}'")
    bundle = load_saved(model_dir)
    texts = frame[column].fillna("").astype(str).tolist()
    encoded = model.encode(bundle, texts, None, int(meta.get("max_length", 128)))
    logits = model.predict_logits(bundle.model.to(dev), encoded, bundle.pad_id, batch_size, precision, dev)
    return labelled.with_predictions(frame, logits, bundle.labels)


TASK = Task(
    name="text-classification",
    primary="accuracy",
    lower_is_better=frozenset({"loss"}),
    default_family="hf",
    methods=("full", "head", "freeze", "lora", "qlora", "lp-ft"),
    check_recipe=check_recipe,
    load_splits=lambda recipe: data.load_text_splits(recipe.data, recipe.train.seed, mixture_counter(
        recipe, lambda r: model.text_token_counter(load_text_encoder(r.model, r), r.data.max_length))),
    audit=audit,
    load_model=load_model,
    sequence_length=lambda recipe, module: recipe.data.max_length,
    encode=encode,
    subset=model.subset,
    collate=model.collate,
    batches=lambda split, recipe, seed, pad_id: model.token_batches(split, recipe.train.batch_size, seed, pad_id, recipe.train.group_by_length),
    loss=model.classification_loss,
    predict=model.predict_logits,
    metrics=model.metrics,
    features=model.extract_features,
    probe=model.linear_probe,
    cached_head=CachedHead(model.head_loss),
    load_reference=labelled.reference_loader(encode_reference),
    model_meta=lambda recipe, splits: saved_columns(recipe),
    **labelled.WITH_CLASSES,
    predict_file=predict_file,
    request_schema=ClassifierRequest,
)
