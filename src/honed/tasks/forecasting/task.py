"""The forecasting row: long-format series (one row per series and time) cut into time-ordered
windows; PatchTST/PatchTSMixer from an architecture spec, a checkpoint or an earlier run."""

from __future__ import annotations

from pathlib import Path

from ...checks.baseline import scratch_model
from ...checks.forgetting import feature_forgetting
from ...data.load import read_table
from ...errors import RecipeError
from ...guards.status import guard_result
from ...models.forecast import build_forecaster, load_forecaster
from ...recipe import MLPSpec
from .. import labelled
from ..base import Reference, Task, refuse_mix_by_tokens, saved_columns, saved_device_and_precision
from . import data, model


def check_recipe(recipe) -> None:
    refuse_mix_by_tokens(recipe)
    if isinstance(recipe.model, MLPSpec):
        raise RecipeError("model: architecture 'mlp' is for tabular tasks; forecasting builds {architecture: patchtst} or {architecture: patchtsmixer}, or loads a checkpoint or an earlier run")
    if recipe.replay is not None:
        raise RecipeError("replay: not available for forecasting; remove the replay section (lora, freeze, l2sp or interpolate limit forgetting)")
    if recipe.reference is not None and recipe.reference.label is not None:
        raise RecipeError("reference.label: forecasting scores the reference series on their own target (data.target); remove reference.label")


def load_model(recipe, splits):
    """A fresh PatchTST/PatchTSMixer (`model: {architecture: patchtst}`), a checkpoint, or an earlier forecasting run."""
    channels = 1 + len(recipe.data.covariates)
    if isinstance(recipe.model, str):
        return load_forecaster(recipe.model, recipe, channels)
    return build_forecaster(recipe.model, channels, recipe.data.context_length, recipe.data.horizon)


def before(session, cache) -> dict:
    """The source model's own forecasts (or the untrained model's), before fine-tuning."""
    out = {"test": session.evaluate(session.bundle.model, "test"), "validation": session.evaluate(session.bundle.model, "validation")}
    method = ("the source model's own forecasts, before fine-tuning" if isinstance(session.recipe.model, str)
              else "the randomly initialised model, before training")
    return {**out, "summary": {**out["test"], "method": method}}


def load_reference(recipe, bundle, encoded: dict):
    """Series from the source model's world, in the training file's long format."""
    spec = recipe.reference
    if spec is None:
        return Reference("the validation inputs (no reference set given)", encoded["validation"], None, True), None
    frame = read_table(spec.data, "reference.data")
    checked = data.check_long_frame(frame, recipe.data, Path(spec.data).name, where="reference.data").reset_index(drop=True)
    windows = model.reference_windows(checked, recipe.data, int(recipe.data.season), recipe.data.horizon)
    return Reference(Path(spec.data).name, model.encode(bundle, windows, None, recipe), None, False), None


def original_mase(session, module, features) -> float | None:
    """The source model forecasting its own series: MASE on the reference windows."""
    ref = session.reference
    if ref.on_validation or module is None:
        return None
    return session.task.metrics(session.outputs(module, ref.encoded), ref.encoded)["mase"]


def forgetting(session, tuner, module, before):
    return feature_forgetting(session, tuner, module, before, original_mase, lower_is_better=True)


def baseline(session, tuner, test_metrics: dict, before: dict, train_seconds: float, show_progress: bool) -> dict:
    """Seasonal naive on the same test windows (always), and the same architecture trained from random
    initialisation (as `guards.baseline` says)."""
    naive = model.seasonal_naive_metrics(session.encoded["test"])
    wanted = session.recipe.guards.baseline
    details = {"scratch": None, "linear_probe": None, "majority": None, "seasonal_naive": naive, "fine_tuned": test_metrics[model.PRIMARY]}
    trained = scratch_model(session, tuner, train_seconds, show_progress)
    if trained is not None:
        details["scratch"] = session.evaluate(trained, "test")
    mase, naive_mase = test_metrics["mase"], naive["mase"]
    problems = []
    if not mase < naive_mase:
        problems.append(f"the model's test MASE ({mase:.3f}) does not beat the seasonal-naive forecast ({naive_mase:.3f}); use seasonal naive, or more data or context")
    scratch = details["scratch"]
    if scratch is not None and isinstance(session.recipe.model, str) and scratch["mase"] <= mase + 0.005:
        problems.append(f"the same model trained from scratch reaches MASE {scratch['mase']:.3f} against {mase:.3f}: the source model bought nothing here")
    if problems:
        return guard_result("warn", "; ".join(problems).capitalize() + ".", details)
    text = f"Test MASE {mase:.3f} (MAE {test_metrics['mae']:.4g}) against seasonal naive's {naive_mase:.3f} (MAE {naive['mae']:.4g})"
    if scratch is not None:
        text += f", from scratch {scratch['mase']:.3f}"
    elif wanted is not True:
        text += " (from-scratch baseline not run: set guards.baseline: true)"
    return guard_result("ok", text + ".", details)


def model_meta(recipe, splits) -> dict:
    """What `honed predict` needs to read new history and date its forecasts."""
    freqs = [f for f in splits.freq.values() if f]
    return {**saved_columns(recipe), "series_column": recipe.data.series, "time_column": recipe.data.time,
            "target_column": recipe.data.target, "covariates": recipe.data.covariates, "context_length": recipe.data.context_length,
            "horizon": recipe.data.horizon, "season": splits.season, "freq": max(set(freqs), key=freqs.count) if freqs else None}


def write_predictions(path, session, test_outputs) -> None:
    model.write_predictions(path, session.splits.test, test_outputs, session.encoded["test"].naive)


def summary(session, module, before, test_outputs, guards) -> dict:
    # the seasonal-naive forecast on the same test windows, always beside the model's figures
    return {"majority": {}, "confusion_matrix": None, "seasonal_naive": guards["baseline"]["details"]["seasonal_naive"]}


def predict_file(model_dir: Path, meta: dict, input_path: Path, batch_size: int):
    """History in long format → the next `horizon` values of each series, with their timestamps."""
    dev, precision = saved_device_and_precision(meta)
    return model.predict_future(model_dir, meta, Path(input_path), precision, dev)


TASK = Task(
    name="forecasting",
    primary=model.PRIMARY,
    lower_is_better=frozenset({"loss", "mae", "rmse", "mase", "smape"}),
    default_family="ts-forecast",
    methods=("full", "head", "freeze", "lora", "lp-ft"),
    check_recipe=check_recipe,
    load_splits=data.load_forecast_splits,
    audit=lambda recipe, splits, bundle=None, encoded=None: data.audit_forecast(splits),
    load_model=load_model,
    sequence_length=lambda recipe, module: 1,
    encode=model.encode,
    subset=model.subset,
    collate=model.collate,
    batches=model.batches,
    loss=model.loss,
    predict=model.predict,
    metrics=model.metrics,
    features=model.features,
    probe=None,
    cached_head=None,  # the head trains inside the frozen model: the forecaster rescales each window around its head
    before=before,
    before_needs_untouched_model=True,
    load_reference=load_reference,
    forgetting=forgetting,
    overfitting=labelled.overfitting_on_values,
    baseline=baseline,
    bias=None,
    class_counts=labelled.no_classes,
    curve_subsets=labelled.shuffled_subsets,
    write_predictions=write_predictions,
    model_meta=model_meta,
    summary=summary,
    predict_file=predict_file,
)
