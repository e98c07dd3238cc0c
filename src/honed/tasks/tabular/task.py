"""The tabular rows: classification and regression over feature columns, with an MLP from scratch
(`model: {architecture: mlp}`) or an earlier honed tabular run to fine-tune."""

from __future__ import annotations

from pathlib import Path

import torch

from ...data.load import read_table
from ...data.preprocess import fit_preprocessor
from ...errors import DataError, RecipeError
from ...models.load import ModelBundle, load_saved, relabel, run_model_dir
from ...models.mlp import build_mlp
from .. import labelled
from ..base import CachedHead, Task, refuse_mix_by_tokens, refuse_series_model, saved_columns, saved_device_and_precision
from ..text import model as text_model
from . import data, model


def check_recipe(recipe) -> None:
    refuse_series_model(recipe)
    refuse_mix_by_tokens(recipe)


def load_model(recipe, splits) -> ModelBundle:
    """A fresh MLP (`model: {architecture: mlp}`), or an earlier honed tabular run to fine-tune."""
    regression = recipe.task == "tabular-regression"
    if not isinstance(recipe.model, str):
        numeric, categorical = data.infer_types(splits.train, recipe.data.features, recipe.data.categorical, recipe.data.numeric)
        pre = fit_preprocessor(splits.train, numeric, categorical)
        module = build_mlp(recipe.model, pre.width, 1 if regression else len(splits.labels), regression)
        if regression:
            module.target_mean.fill_(float(splits.train["label"].mean()))
            module.target_std.fill_(float(splits.train["label"].std() or 1.0))
        bundle = ModelBundle("mlp", module, None, 0, "classifier", splits.labels or [], "mlp (random init)")
        bundle.preprocessor = pre
        return bundle
    model_dir = run_model_dir(Path(recipe.model)) if Path(recipe.model).exists() else None
    if model_dir is None:
        raise RecipeError(f"model: {recipe.model} is not a honed tabular run directory; give an earlier run, or {{architecture: mlp}} to start from scratch")
    bundle = load_saved(model_dir)
    if bundle.family != "mlp":
        raise RecipeError(f"model: {recipe.model} is a {bundle.family} model; a tabular task needs a tabular honed run or {{architecture: mlp}}")
    source_cols, wanted = set(bundle.preprocessor.columns), set(recipe.data.features)
    if source_cols != wanted:
        missing, extra = sorted(source_cols - wanted), sorted(wanted - source_cols)
        raise RecipeError("data.features: the source model was trained on other columns"
                          + (f"; missing here: {', '.join(missing)}" if missing else "")
                          + (f"; not in the source: {', '.join(extra)}" if extra else "")
                          + "; use the source's feature columns")
    if bundle.model.regression != regression:
        raise RecipeError(f"task: the source model is a {'regression' if bundle.model.regression else 'classification'} model; the recipe asks for {recipe.task}")
    if not regression:
        bundle = relabel(bundle, splits.labels)
    return bundle


def audit(recipe, splits, bundle=None, encoded=None) -> dict:
    if bundle is not None:
        return data.audit_tabular(splits, bundle.preprocessor)
    numeric, categorical = data.infer_types(splits.train, recipe.data.features, recipe.data.categorical, recipe.data.numeric)
    return data.audit_tabular(splits, fit_preprocessor(splits.train, numeric, categorical))


def encode_reference(recipe, bundle, frame, spec):
    return model.encode(bundle, frame.drop(columns=["label"], errors="ignore"), None)


def predict_file(model_dir: Path, meta: dict, input_path: Path, batch_size: int):
    """Predictions for a table with every feature column the model was trained on."""
    frame = read_table(input_path, "INPUT")
    dev, precision = saved_device_and_precision(meta)
    bundle = load_saved(model_dir)
    missing = [c for c in bundle.preprocessor.columns if c not in frame.columns]
    if missing:
        raise DataError(f"INPUT: feature column(s) {', '.join(missing)} not found in {Path(input_path).name} (columns: {', '.join(map(str, frame.columns[:30]))}); the model needs every feature it was trained on")
    split = model.TabularSplit(bundle.preprocessor.transform(frame, "INPUT"), torch.zeros(len(frame)))
    outputs = model.predict(bundle.model.to(dev), split, 0, 256, precision, dev)
    return labelled.with_predictions(frame, outputs, None if bundle.model.regression else bundle.labels)


def target_scale(bundle):
    return bundle.model.target_mean.cpu(), bundle.model.target_std.cpu()


COMMON = dict(
    default_family="mlp",
    methods=("full", "head", "freeze", "lora", "lp-ft"),
    check_recipe=check_recipe,
    load_splits=lambda recipe: data.load_tabular_splits(recipe, recipe.train.seed),
    audit=audit,
    load_model=load_model,
    sequence_length=lambda recipe, module: 1,
    encode=lambda bundle, frame, labels, recipe: model.encode(bundle, frame, labels),
    subset=model.subset,
    collate=model.collate,
    batches=lambda split, recipe, seed, pad_id: model.batches(split, recipe.train.batch_size, seed),
    predict=model.predict,
    features=model.features,
    load_reference=labelled.reference_loader(encode_reference, needs_text_column=False),
    model_meta=lambda recipe, splits: saved_columns(recipe),
    predict_file=predict_file,
)

CLASSIFICATION = Task(
    name="tabular-classification",
    primary="accuracy",
    lower_is_better=frozenset({"loss"}),
    loss=text_model.classification_loss,
    metrics=lambda outputs, split: model.classification_metrics(outputs, split.labels),
    probe=text_model.linear_probe,
    cached_head=CachedHead(text_model.head_loss),
    **labelled.WITH_CLASSES,
    **COMMON,
)

REGRESSION = Task(
    name="tabular-regression",
    primary="r2",
    lower_is_better=frozenset({"loss", "rmse", "mae"}),
    loss=model.regression_loss,
    metrics=lambda outputs, split: model.regression_metrics(outputs, split.labels),
    probe=model.ridge_probe,
    cached_head=CachedHead(model.head_regression_loss, target_scale=target_scale),
    **labelled.ON_VALUES,
    **COMMON,
)
