"""Bias guard: representation of each group before training, per-group metrics after.

Group values and labels become strings in every returned dict: metrics.json keys must be
strings, and "(missing)" has to sit beside real values.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd

from honed.errors import DataError
from honed.guards.status import guard_result

MISSING = "(missing)"


def _as_groups(values: pd.Series) -> pd.Series:
    # fillna after astype(object) so categorical and numeric columns accept the sentinel.
    return values.astype(object).where(values.notna(), MISSING).map(str)


def group_representation(
    frame: pd.DataFrame, group_columns: list[str], label_column: str | None, min_group_size: int = 30
) -> dict:
    """Who is in the data: per group column, per value, its count, share and label mix.

    Returns ``{"columns": {column: {value: {"count", "share", "label_rate": {label: share}}}},
    "small_groups": [(column, value, count), ...], "min_group_size": int}``. Missing group
    values (and missing labels) count as "(missing)". Values are ordered by count, largest
    first. Raises DataError naming a missing column and listing the columns that exist. A task
    without labels (chat, preference) passes label_column None: counts and shares only.
    """
    for col in [*group_columns, *([label_column] if label_column is not None else [])]:
        if col not in frame.columns:
            kind = "group" if col in group_columns else "label"
            raise DataError(
                f"The {kind} column {col!r} is not in the data; the columns are {list(map(str, frame.columns))}. "
                "Fix data.groups / data.label in the recipe."
            )
    n = len(frame)
    labels = _as_groups(frame[label_column]) if label_column is not None else pd.Series(["(no labels)"] * n, index=frame.index)
    columns: dict[str, dict] = {}
    small: list[tuple[str, str, int]] = []
    for col in group_columns:
        groups = _as_groups(frame[col])
        table = pd.crosstab(groups, labels)
        counts = table.sum(axis=1).sort_values(ascending=False, kind="stable")
        per_value: dict[str, dict] = {}
        for value, count in counts.items():
            row = table.loc[value]
            per_value[value] = {
                "count": int(count),
                "share": float(count / n),
                "label_rate": {str(lab): float(row[lab] / count) for lab in table.columns if row[lab] > 0},
            }
            if count < min_group_size:
                small.append((str(col), value, int(count)))
        columns[str(col)] = per_value
    return {"columns": columns, "small_groups": small, "min_group_size": min_group_size}


def _sensitive_frame(sensitive: pd.DataFrame | pd.Series, n: int) -> pd.DataFrame:
    if isinstance(sensitive, pd.Series):
        sensitive = sensitive.to_frame(name=sensitive.name if sensitive.name is not None else "group")
    if not isinstance(sensitive, pd.DataFrame):
        raise ValueError(f"'sensitive' must be a pandas DataFrame or Series. Got {type(sensitive).__name__}.")
    if len(sensitive) != n:
        raise ValueError(f"'sensitive' has {len(sensitive)} rows but there are {n} predictions.")
    if sensitive.shape[1] == 0:
        raise ValueError("'sensitive' has no columns.")
    return sensitive.reset_index(drop=True)


def _spread(values: pd.Series) -> float | None:
    """max − min over groups where the figure is defined (NaN = undefined)."""
    v = values.astype(float).dropna()
    return float(v.max() - v.min()) if len(v) else None


def _max_or_none(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return max(vals) if vals else None


def group_metrics(y_true, y_pred, sensitive: pd.DataFrame | pd.Series, labels: list | None = None) -> dict:
    """Per-group accuracy, macro-F1 and selection rate, and the fairness gaps, via fairlearn.

    Each sensitive column is treated separately. Macro-F1 averages over the classes present in
    a group's truth or predictions (sklearn's default). selection_rate is the share of the group
    predicted positive for binary labels (positive = labels[1], or the larger of the two sorted
    labels: 1, True, "yes"), and a dict label → share predicted for multi-class.
    demographic_parity_difference and equalized_odds_difference need binary labels, so they are
    computed one-vs-rest for every class and the largest over classes and columns is reported
    (for two classes this equals the binary figure). Equalized odds ignores a group whose
    TPR (no true positives of that class) or FPR (no true negatives) is undefined, where
    fairlearn's own function would count it as 0 and report a spurious gap.
    largest_accuracy_gap is the largest best-minus-worst group accuracy over the columns.
    """
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        false_positive_rate,
        true_positive_rate,
    )
    from sklearn.metrics import accuracy_score, f1_score

    yt = pd.Series(np.asarray(y_true)).reset_index(drop=True)
    yp = pd.Series(np.asarray(y_pred)).reset_index(drop=True)
    if len(yt) != len(yp):
        raise ValueError(f"y_true has {len(yt)} rows but y_pred has {len(yp)}.")
    if len(yt) == 0:
        raise ValueError("group_metrics needs at least one prediction.")
    sens = _sensitive_frame(sensitive, len(yt))
    if labels is None:
        labels = sorted(set(yt.tolist()) | set(yp.tolist()), key=lambda v: (str(type(v)), v))
    labels = list(labels)
    binary = len(labels) == 2

    groups: dict[str, dict] = {}
    by_column: dict[str, dict] = {}
    for col in sens.columns:
        g = _as_groups(sens[col])
        mf = MetricFrame(
            metrics={
                "accuracy": accuracy_score,
                # No labels= here: a class absent from a group's truth and predictions has no F1,
                # and counting it as 0 would halve a perfect group's score.
                "f1_macro": partial(f1_score, average="macro", zero_division=0),
            },
            y_true=yt,
            y_pred=yp,
            sensitive_features=g,
        )
        counts = g.value_counts()
        per_value: dict[str, dict] = {}
        for value in counts.index:
            mask = (g == value).to_numpy()
            picked = yp[mask]
            if binary:
                selection = float((picked == labels[1]).mean())
            else:
                selection = {str(lab): float((picked == lab).mean()) for lab in labels}
            per_value[value] = {
                "count": int(counts[value]),
                "accuracy": float(mf.by_group.loc[value, "accuracy"]),
                "f1_macro": float(mf.by_group.loc[value, "f1_macro"]),
                "selection_rate": selection,
            }
        groups[str(col)] = per_value

        dpd: list[float | None] = []
        eod: list[float | None] = []
        # For two classes one-vs-rest on either class gives the same gaps; use the positive one.
        for lab in labels[1:] if binary else labels:
            t = (yt == lab).astype(int).to_numpy()
            p = (yp == lab).astype(int).to_numpy()
            dpd.append(float(demographic_parity_difference(t, p, sensitive_features=g)))
            rates = MetricFrame(
                metrics={
                    "tpr": partial(true_positive_rate, pos_label=1),
                    "fpr": partial(false_positive_rate, pos_label=1),
                    "pos": lambda yt_, yp_: int(np.sum(yt_)),
                    "neg": lambda yt_, yp_: int(len(yt_) - np.sum(yt_)),
                },
                y_true=t,
                y_pred=p,
                sensitive_features=g,
            ).by_group
            tpr = rates["tpr"].where(rates["pos"] > 0)
            fpr = rates["fpr"].where(rates["neg"] > 0)
            eod.append(_max_or_none([_spread(tpr), _spread(fpr)]))
        by_column[str(col)] = {
            "demographic_parity_difference": _max_or_none(dpd),
            "equalized_odds_difference": _max_or_none(eod),
            "accuracy_gap": float(mf.difference(method="between_groups")["accuracy"]),
        }

    return {
        "groups": groups,
        "demographic_parity_difference": _max_or_none([c["demographic_parity_difference"] for c in by_column.values()]),
        "equalized_odds_difference": _max_or_none([c["equalized_odds_difference"] for c in by_column.values()]),
        "largest_accuracy_gap": _max_or_none([c["accuracy_gap"] for c in by_column.values()]),
        "by_column": by_column,
        "labels": [str(lab) for lab in labels],
    }


def bias_guard(after: dict, before: dict | None, representation: dict | None, threshold: float = 0.1) -> dict:
    """The bias guard's result from group_metrics after (and before) fine-tuning.

    warn when, after fine-tuning, demographic_parity_difference or equalized_odds_difference
    exceeds threshold; when fine-tuning widened the largest accuracy gap by more than
    threshold/2 over the pre-trained probe; or when representation lists small groups.
    ok otherwise. details["groups"] is after["groups"] with each group's share and label_rate
    from representation (the data it was computed on) merged in when available.
    """
    if not (0 < threshold < 1):
        raise ValueError(f"The 'threshold' of the bias guard must be in (0, 1). Got {threshold!r} instead.")
    dpd = after.get("demographic_parity_difference")
    eod = after.get("equalized_odds_difference")
    gap = after.get("largest_accuracy_gap")
    gap_before = None if before is None else before.get("largest_accuracy_gap")
    widened = gap is not None and gap_before is not None and gap - gap_before > threshold / 2
    small = [] if representation is None else list(representation.get("small_groups", []))

    groups: dict[str, dict] = {}
    rep_cols = {} if representation is None else representation.get("columns", {})
    for col, per_value in after.get("groups", {}).items():
        groups[col] = {}
        for value, figures in per_value.items():
            merged = dict(figures)
            rep = rep_cols.get(col, {}).get(value)
            if rep is not None:
                merged["share"] = rep["share"]
                merged["label_rate"] = rep["label_rate"]
            groups[col][value] = merged

    sentences: list[str] = []
    problems = 0
    if dpd is not None:
        over = dpd > threshold
        problems += over
        sentences.append(
            f"How often the model predicts each class differs by up to {dpd:.2f} between groups "
            f"(demographic parity difference; threshold {threshold:.2f}{', exceeded' if over else ''})."
        )
    if eod is not None:
        over = eod > threshold
        problems += over
        sentences.append(
            f"Its hit and false-alarm rates differ by up to {eod:.2f} between groups "
            f"(equalized odds difference{', above the threshold' if over else ''})."
        )
    if gap is not None:
        if gap_before is not None:
            change = "widened" if widened else ("narrowed" if gap < gap_before else "barely changed")
            sentences.append(
                f"The accuracy gap between the best and worst group {change} with fine-tuning, "
                f"from {gap_before:.2f} to {gap:.2f}."
            )
        else:
            sentences.append(f"The accuracy gap between the best and worst group is {gap:.2f}.")
    problems += widened
    if small:
        problems += 1
        floor = representation.get("min_group_size")
        listed = ", ".join(f"{c}={v} ({k})" for c, v, k in small[:5])
        more = f" and {len(small) - 5} more" if len(small) > 5 else ""
        sentences.append(
            f"{len(small)} group(s) have fewer than {floor} examples, so their figures are unreliable: {listed}{more}."
        )

    details = {
        "groups": groups,
        "demographic_parity_difference": dpd,
        "equalized_odds_difference": eod,
        "largest_accuracy_gap": gap,
        "before": before,
        "widened": bool(widened),
        "representation": representation,
        "threshold": threshold,
    }
    if not sentences:
        return guard_result("skipped", "No group figures were available to check for bias.", details)
    return guard_result("warn" if problems else "ok", " ".join(sentences), details)
