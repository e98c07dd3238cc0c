"""Tabular data: feature columns (numeric and categorical), a label or numeric target, and the
preprocessing (imputation, scaling, one-hot) that is fitted once and saved with the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ...data.sources import read_frame, source_name
from ...data.split import carve, label_to_str
from ...data.preprocess import Preprocessor
from ...errors import DataError, RecipeError

UNKNOWN = "(unknown)"


@dataclass
class TabularSplits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: list[str] | None  # None for regression
    notes: list[dict] = field(default_factory=list)


def infer_types(frame: pd.DataFrame, features: list[str], categorical: list[str], numeric: list[str]) -> tuple[list[str], list[str]]:
    """Numeric when every present value parses as a number; the recipe's lists override."""
    num, cat = [], []
    for col in features:
        if col in categorical:
            cat.append(col)
        elif col in numeric:
            num.append(col)
        else:
            parsed = pd.to_numeric(frame[col], errors="coerce")
            present = frame[col].notna() & (frame[col].astype(str).str.strip() != "")
            (num if bool(parsed[present].notna().all()) and present.any() else cat).append(col)
    return num, cat


def load_tabular_splits(recipe, seed: int) -> TabularSplits:
    """Read the splits, check the feature and label columns, carve missing splits."""
    spec = recipe.data
    regression = recipe.task == "tabular-regression"
    if not spec.features:
        raise RecipeError(f"data.features: {recipe.task} needs the list of feature columns, e.g. features: [age, income, region]")
    notes: list[dict] = []

    def prepare(path, field_name):
        frame = read_frame(path, field_name, spec, seed)
        for col in [*spec.features, spec.label, *spec.groups]:
            if col not in frame.columns:
                key = "data.label" if col == spec.label else "data.groups" if col in spec.groups else "data.features"
                raise DataError(f"{key}: column '{col}' not found in {source_name(path)} (columns: {', '.join(map(str, frame.columns[:30]))})")
        target = frame[spec.label]
        missing = target.isna() | (target.astype(str).str.strip() == "")
        if missing.any():
            raise DataError(f"data.label: {int(missing.sum())} row(s) of {source_name(path)} have no '{spec.label}' value; fill them in or remove those rows")
        out = frame[[*spec.features, *[g for g in spec.groups if g not in spec.features]]].copy()
        if regression:
            y = pd.to_numeric(target, errors="coerce")
            bad = y.isna() | ~np.isfinite(y.astype(float))
            if bad.any():
                example = target[bad].iloc[0]
                raise DataError(f"data.label: '{spec.label}' in {source_name(path)} must be numeric for tabular-regression; found {example!r}")
            out["label"] = y.astype(float).to_numpy()
        else:
            out["label"] = target.map(label_to_str).to_numpy()
        for g in spec.groups:
            out[g] = frame[g].fillna("(missing)").astype(str).to_numpy()
        return out.reset_index(drop=True)

    train = prepare(spec.train, "data.train")
    validation = prepare(spec.validation, "data.validation") if spec.validation else None
    test = prepare(spec.test, "data.test") if spec.test else None
    stratify_col = "label"
    if regression:
        train["_bin"] = pd.qcut(train["label"], q=min(5, train["label"].nunique()), labels=False, duplicates="drop").astype(str)
        stratify_col = "_bin"
    if len(train) < 10 and (validation is None or test is None):
        raise DataError(f"data.train: {source_name(spec.train)} has {len(train)} rows; too few to carve validation and test splits")
    if test is None:
        train, test, _ = carve(train, spec.test_fraction, stratify_col, seed)
        notes.append({"level": "info", "code": "split", "message": f"test split carved from train ({len(test)} rows, seed {seed})"})
    if validation is None:
        train, validation, _ = carve(train, spec.validation_fraction / (1 - spec.test_fraction), stratify_col, seed + 1)
        notes.append({"level": "info", "code": "split", "message": f"validation split carved from train ({len(validation)} rows, seed {seed + 1})"})
    for frame in (train, validation, test):
        frame.drop(columns=["_bin"], errors="ignore", inplace=True)
    labels = None
    if not regression:
        classes = train["label"].value_counts()
        if len(classes) < 2:
            raise DataError(f"data.label: '{spec.label}' has a single class ('{classes.index[0]}') in training; classification needs at least two")
        labels = sorted(classes.index.tolist(), key=lambda v: (0, float(v), v) if _is_number(v) else (1, 0.0, v))
        for role, frame in (("validation", validation), ("test", test)):
            unseen = sorted(set(frame["label"]) - set(labels))
            if unseen:
                raise DataError(f"data.{role}: labels {unseen[:10]} never occur in training (training labels: {', '.join(labels[:20])})")
    return TabularSplits(train, validation, test, labels, notes)


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def audit_tabular(splits: TabularSplits, pre: Preprocessor) -> dict:
    findings = list(splits.notes)
    summary = {}
    for name in ("train", "validation", "test"):
        frame = getattr(splits, name)
        info = {"rows": int(len(frame))}
        if splits.labels is not None:
            info["class_counts"] = {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
        else:
            info["target_mean"] = float(frame["label"].mean())
        summary[name] = info
    missing = {}
    for col in pre.columns:
        col_values = splits.train[col]
        n = int((col_values.isna() | (col_values.astype(str).str.strip().isin(["", "nan", "None"]))).sum())
        if n:
            missing[col] = n
    if missing:
        findings.append({"level": "warn" if max(missing.values()) > 0.2 * len(splits.train) else "info", "code": "missing_values",
                         "message": "missing values (imputed with the training median / a 'missing' category): "
                         + ", ".join(f"{k} ({v})" for k, v in missing.items())})
    for col in pre.numeric:
        values = pd.to_numeric(splits.train[col], errors="coerce").astype(float)
        n_inf = int(np.isinf(values).sum())
        if n_inf:
            findings.append({"level": "warn", "code": "infinite_values", "message": f"{n_inf} infinite value(s) in '{col}' were treated as missing"})
    dup = int(splits.train.duplicated().sum())
    if dup:
        findings.append({"level": "info", "code": "duplicates", "message": f"{dup} training row(s) repeat an earlier row exactly"})
    return {"findings": findings, "splits": summary, "features": {"numeric": pre.numeric, "categorical": {k: len(v) for k, v in pre.categorical.items()}},
            "missing_values": missing}
