"""Row pieces shared by the tasks whose model ends in a linear head over backbone features and
whose rows carry a label: text, image and tabular classification, and tabular regression.

Each function takes the session (honed.session.Session) and, where it trains, the tuner
(honed.finetune.FineTuner); the rows in tasks/<task>/task.py pick the ones that fit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..checks.baseline import probe_baseline
from ..checks.forgetting import feature_forgetting
from ..data import rows as row_access
from ..data.load import read_table
from ..data.split import label_to_str
from ..data.subsets import nested_fractions, nested_prefixes
from ..errors import DataError, RecipeError
from ..guards import bias as bias_guard
from ..guards.overfit import overfitting_guard
from ..guards.status import skipped
from ..recipe import features_key, main_seed
from .base import FeatureSplit, Reference


# --------------------------------------------------------------------------- the pre-trained state: the linear probe

PROBE_ROWS = 50_000  # the probe's training rows at most: beyond this a linear model on fixed features gains little and costs minutes


def linear_probe(session, cache: dict | None) -> dict:
    """The task's linear probe on the cached pre-trained features (kept in `cache` across tune trials);
    fitted on a seeded sample of PROBE_ROWS training rows when there are more, and it says so."""
    key = ("probe", features_key(session.recipe, session.precision))
    probe = cache.get(key) if cache is not None else None
    if probe is None:
        f, enc = session.features, session.encoded
        seed = main_seed(session.recipe)
        train_x, train_y = f["train"], enc["train"].labels
        method = "linear probe on the pre-trained features"
        if len(train_y) > PROBE_ROWS:
            rows = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed + 29))[:PROBE_ROWS]
            train_x, train_y = train_x[rows], train_y[rows]
            method += f" (fitted on a sample of {PROBE_ROWS} of {len(enc['train'].labels)} training rows)"
        probe = session.task.probe(train_x, train_y, f["validation"], enc["validation"].labels, f["test"], enc["test"].labels, seed)
        probe = {**probe, "summary": {**probe["test"], "method": method, "C": probe["C"]}}
        if cache is not None:
            cache[key] = probe
    return probe


# --------------------------------------------------------------------------- the reference set and the original task

def original_head(bundle):
    """The head the source model had for its own task (kept when honed gave it a new one), frozen, in fp32."""
    original = getattr(bundle, "original_head", None)
    # the same classes as the source model: its own head, as loaded, is the original one
    module, labels = original if original is not None else (bundle.head(), list(bundle.labels))
    module = copy.deepcopy(module).float()
    for p in module.parameters():
        p.requires_grad_(False)
    return module, labels


def reference_loader(encode_frame, needs_text_column: bool = True):
    """load_reference for a task whose reference file is read like its training data.

    encode_frame(recipe, bundle, frame, spec) -> the encoded reference inputs.
    """

    def load_reference(recipe, bundle, encoded: dict):
        head, original_labels = original_head(bundle)
        spec = recipe.reference
        if spec is None:
            return Reference("the validation inputs (no reference set given)", encoded["validation"], None, True), head
        name = Path(spec.data).name
        frame = read_table(spec.data, "reference.data")
        if needs_text_column and spec.text not in frame.columns:
            raise DataError(f"reference.text: column '{spec.text}' not found in {name} (columns: {', '.join(map(str, frame.columns[:30]))})")
        labels = None
        if spec.label is not None:
            if spec.label not in frame.columns:
                raise DataError(f"reference.label: column '{spec.label}' not found in {name} (columns: {', '.join(map(str, frame.columns[:30]))})")
            if original_labels is None:
                raise RecipeError("reference.label: the model has no original head to score its original task with; "
                                  "start from a honed run directory, or drop reference.label (drift is still measured)")
            values = frame[spec.label].map(label_to_str)
            unknown = sorted(set(values) - set(original_labels))
            if unknown:
                raise DataError(f"reference.label: labels {unknown[:5]} are not classes of the original model ({', '.join(original_labels[:20])})")
            index = {label: i for i, label in enumerate(original_labels)}
            labels = torch.tensor([index[v] for v in values], dtype=torch.long)
        return Reference(name, encode_frame(recipe, bundle, frame, spec), labels, False), head

    return load_reference


def original_accuracy(session, model, features: torch.Tensor) -> float | None:
    """The source model's own head on the reference features, against the reference labels."""
    ref = session.reference
    if ref.labels is None or session.original_head is None:
        return None
    with torch.no_grad():
        logits = session.original_head.to(features.device)(features)
    return float((logits.argmax(-1).cpu() == ref.labels).float().mean())


def forgetting(session, tuner, model, before):
    return feature_forgetting(session, tuner, model, before, original_accuracy)


# --------------------------------------------------------------------------- classes

def predicted_classes(outputs: torch.Tensor) -> np.ndarray:
    return outputs.argmax(-1).numpy()


def overfitting_with_classes(session, history, best_step, test_outputs, seeds) -> dict:
    return overfitting_guard(history, best_step, session.task.primary, session.recipe.guards.overfitting.max_gap,
                             predicted_classes(test_outputs), len(session.bundle.labels), seeds)


def overfitting_on_values(session, history, best_step, test_outputs, seeds) -> dict:
    return overfitting_guard(history, best_step, session.task.primary, session.recipe.guards.overfitting.max_gap,
                             None, len(session.bundle.labels), seeds)


def majority_class(session) -> float:
    """The trivial model's test score: always the most frequent training class."""
    train_y, test_y = session.encoded["train"].labels, session.encoded["test"].labels
    return float((test_y == torch.bincount(train_y).argmax()).float().mean())


def training_mean(session) -> float:
    """The trivial regression model's test score: always the training mean."""
    train_y, test_y = session.encoded["train"].labels, session.encoded["test"].labels
    return session.task.metrics(torch.full_like(test_y, float(train_y.mean())), FeatureSplit(torch.zeros(0), test_y))[session.task.primary]


def baseline_with_classes(session, tuner, test_metrics, before, train_seconds, show_progress) -> dict:
    return probe_baseline(session, tuner, test_metrics, before, train_seconds, show_progress,
                          majority_class(session), "always predicting the majority class")


def baseline_on_values(session, tuner, test_metrics, before, train_seconds, show_progress) -> dict:
    return probe_baseline(session, tuner, test_metrics, before, train_seconds, show_progress,
                          training_mean(session), "always predicting the training mean")


def bias(session, test_outputs, before) -> dict:
    """Per-group metrics of the fine-tuned model and of the linear probe on the test split."""
    groups = session.recipe.data.groups
    if not groups:
        return skipped("no data.groups given; name the columns to check, e.g. data.groups: [region]")
    labels = session.bundle.labels
    wanted = list(dict.fromkeys([*groups, "label"]))  # only these columns become pandas, not the texts
    test = row_access.columns_frame(session.splits.test, wanted)
    y_true = test["label"].to_numpy()
    after = bias_guard.group_metrics(y_true, np.array([labels[i] for i in predicted_classes(test_outputs)]), test[groups], labels)
    probe = bias_guard.group_metrics(y_true, np.array([labels[i] for i in before["test_predictions"]]), test[groups], labels)
    train = row_access.columns_frame(session.splits.train, wanted)
    representation = bias_guard.group_representation(train, groups, "label", session.recipe.guards.min_group_size)
    return bias_guard.bias_guard(after, probe, representation, session.recipe.guards.bias_threshold)


def class_counts(session) -> dict:
    counts = torch.bincount(session.encoded["train"].labels, minlength=len(session.bundle.labels))
    return {str(session.bundle.labels[i]): int(c) for i, c in enumerate(counts)}


def no_classes(session) -> None:
    return None


def stratified_subsets(train_split, fractions: list[float], seed: int) -> list[torch.Tensor]:
    return nested_fractions(train_split.labels, fractions, seed)


def shuffled_subsets(train_split, fractions: list[float], seed: int) -> list[torch.Tensor]:
    return nested_prefixes(len(train_split), fractions, seed)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    return {"labels": labels, "matrix": matrix.tolist()}


def summary_with_classes(session, model, before, test_outputs, guards) -> dict:
    return {"majority": {session.task.primary: majority_class(session)},
            "confusion_matrix": confusion(session.encoded["test"].labels.numpy(), predicted_classes(test_outputs), session.bundle.labels)}


def summary_on_values(session, model, before, test_outputs, guards) -> dict:
    return {"majority": {session.task.primary: training_mean(session)}, "confusion_matrix": None}


# --------------------------------------------------------------------------- predictions

def with_predictions(frame: pd.DataFrame, outputs: torch.Tensor, labels: list[str] | None) -> pd.DataFrame:
    """The rows with `prediction` (a class and one `prob_<label>` column per class, or the predicted value)."""
    out = frame.copy()
    if labels is None:
        out["prediction"] = outputs.numpy()
        return out
    probs = torch.softmax(outputs, -1).numpy()
    out["prediction"] = [labels[i] for i in probs.argmax(1)]
    for i, label in enumerate(labels):
        out[f"prob_{label}"] = probs[:, i].round(6)
    return out


def write_class_predictions(path: Path, session, test_outputs) -> None:
    with_predictions(row_access.to_frame(session.splits.test), test_outputs, session.bundle.labels).to_csv(path, index=False)


def write_value_predictions(path: Path, session, test_outputs) -> None:
    with_predictions(row_access.to_frame(session.splits.test), test_outputs, None).to_csv(path, index=False)


# --------------------------------------------------------------------------- the rows' shared fields

WITH_CLASSES = dict(  # a classifier over a head: probe, original-head forgetting, class guards
    before=linear_probe,
    before_needs_untouched_model=False,
    forgetting=forgetting,
    overfitting=overfitting_with_classes,
    baseline=baseline_with_classes,
    bias=bias,
    class_counts=class_counts,
    curve_subsets=stratified_subsets,
    write_predictions=write_class_predictions,
    summary=summary_with_classes,
)

ON_VALUES = dict(  # a regressor over a head: the same, without classes
    before=linear_probe,
    before_needs_untouched_model=False,
    forgetting=forgetting,
    overfitting=overfitting_on_values,
    baseline=baseline_on_values,
    bias=None,
    class_counts=no_classes,
    curve_subsets=shuffled_subsets,
    write_predictions=write_value_predictions,
    summary=summary_on_values,
)
