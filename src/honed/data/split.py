"""Seeded splits: stratified by class when every class can be split, plain random otherwise."""

from __future__ import annotations

import pandas as pd


def carve(frame: pd.DataFrame, fraction: float, label: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """Split `fraction` of `frame` off; returns (rest, carved, stratified?)."""
    from sklearn.model_selection import train_test_split  # imported when used: scikit-learn is ~50 MB resident

    counts = frame[label].value_counts()
    n_carved = max(1, int(round(len(frame) * fraction)))
    stratify = frame[label] if counts.min() >= 2 and n_carved >= len(counts) else None
    rest, carved = train_test_split(frame, test_size=n_carved, random_state=seed, shuffle=True, stratify=stratify)
    return rest.reset_index(drop=True), carved.reset_index(drop=True), stratify is not None


def label_to_str(value) -> str:
    """Labels are kept as strings; 1.0 read from a Parquet float column becomes '1'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()
