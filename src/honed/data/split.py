"""Seeded splits: stratified by class when every class can be split, plain random otherwise."""

from __future__ import annotations

import pandas as pd

from . import rows as row_access


def carve(rows, fraction: float, label: str, seed: int) -> tuple:
    """Split `fraction` of `rows` (a frame or an Arrow table) off; returns (rest, carved, stratified?),
    in the rows' own form.

    The split is drawn over row positions with the labels as integer codes in sorted order, then
    the rows are indexed once: the same rows, in the same order, as splitting a frame itself,
    without sorting a million label strings (scikit-learn's np.unique) or copying the rows twice;
    of an Arrow table only the label column is converted."""
    import numpy as np
    from sklearn.model_selection import train_test_split  # imported when used: scikit-learn is ~50 MB resident

    labels = row_access.column(rows, label)
    codes, classes = pd.factorize(labels, sort=True)  # NaN: code -1, as value_counts leaves it out
    counts = np.bincount(codes[codes >= 0], minlength=len(classes))
    n_carved = max(1, int(round(len(rows) * fraction)))
    stratify = codes if (codes >= 0).all() and len(counts) and counts.min() >= 2 and n_carved >= len(counts) else None
    if stratify is None and (codes < 0).any() and len(counts) and counts.min() >= 2 and n_carved >= len(counts):
        stratify = labels  # labels with gaps: as before (scikit-learn refuses them with its own error)
    rest, carved = train_test_split(np.arange(len(rows)), test_size=n_carved, random_state=seed, shuffle=True, stratify=stratify)
    return row_access.take(rows, rest), row_access.take(rows, carved), stratify is not None


def label_to_str(value) -> str:
    """Labels are kept as strings; 1.0 read from a Parquet float column becomes '1'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()
