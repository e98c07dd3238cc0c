"""Seeded splits: stratified by class when every class can be split, plain random otherwise."""

from __future__ import annotations

import pandas as pd


def carve(frame: pd.DataFrame, fraction: float, label: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """Split `fraction` of `frame` off; returns (rest, carved, stratified?).

    The split is drawn over row positions with the labels as integer codes in sorted order, then
    the frame is indexed once: the same rows, in the same order, as splitting the frame itself,
    without sorting a million label strings (scikit-learn's np.unique) or copying the frame twice."""
    import numpy as np
    from sklearn.model_selection import train_test_split  # imported when used: scikit-learn is ~50 MB resident

    codes, classes = pd.factorize(frame[label], sort=True)  # NaN: code -1, as value_counts leaves it out
    counts = np.bincount(codes[codes >= 0], minlength=len(classes))
    n_carved = max(1, int(round(len(frame) * fraction)))
    stratify = codes if (codes >= 0).all() and len(counts) and counts.min() >= 2 and n_carved >= len(counts) else None
    if stratify is None and (codes < 0).any() and len(counts) and counts.min() >= 2 and n_carved >= len(counts):
        stratify = frame[label]  # labels with gaps: as before (scikit-learn refuses them with its own error)
    rest, carved = train_test_split(np.arange(len(frame)), test_size=n_carved, random_state=seed, shuffle=True, stratify=stratify)
    return (frame.iloc[rest].reset_index(drop=True), frame.iloc[carved].reset_index(drop=True), stratify is not None)


def label_to_str(value) -> str:
    """Labels are kept as strings; 1.0 read from a Parquet float column becomes '1'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()
