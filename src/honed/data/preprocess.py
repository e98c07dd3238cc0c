"""Tabular preprocessing, fitted once on the training split and saved with the model: median
imputation (with a missingness indicator) and standardisation for numeric columns, one-hot for
categorical ones (an unseen category maps to its own column)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..errors import DataError
from .split import label_to_str


@dataclass
class Preprocessor:
    """Median-impute and standardise numeric columns; one-hot categorical ones (unseen → unknown)."""

    numeric: list[str]
    categorical: dict[str, list[str]]
    medians: dict[str, float]
    means: dict[str, float]
    stds: dict[str, float]

    @property
    def columns(self) -> list[str]:
        return self.numeric + list(self.categorical)

    @property
    def width(self) -> int:
        return len(self.numeric) * 2 + sum(len(v) + 1 for v in self.categorical.values())

    def transform(self, frame: pd.DataFrame, where: str = "data") -> torch.Tensor:
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise DataError(f"{where}: feature column(s) {', '.join(missing)} not found (columns: {', '.join(map(str, frame.columns[:30]))})")
        parts = []
        for col in self.numeric:
            values = pd.to_numeric(frame[col], errors="coerce").astype(float).replace([np.inf, -np.inf], np.nan)
            isna = values.isna().to_numpy()
            filled = values.fillna(self.medians[col]).to_numpy()
            parts.append(((filled - self.means[col]) / self.stds[col])[:, None])
            parts.append(isna.astype(float)[:, None])  # missingness can itself be informative
        for col, vocab in self.categorical.items():
            index = {v: i for i, v in enumerate(vocab)}
            codes = frame[col].map(lambda v: index.get(category(v), len(vocab))).to_numpy()
            onehot = np.zeros((len(frame), len(vocab) + 1))
            onehot[np.arange(len(frame)), codes] = 1.0
            parts.append(onehot)
        return torch.tensor(np.hstack(parts) if parts else np.zeros((len(frame), 0)), dtype=torch.float32)

    def to_json(self) -> dict:
        return {"numeric": self.numeric, "categorical": self.categorical, "medians": self.medians, "means": self.means, "stds": self.stds}

    @classmethod
    def from_json(cls, payload: dict) -> "Preprocessor":
        return cls(payload["numeric"], payload["categorical"], payload["medians"], payload["means"], payload["stds"])


def category(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "(missing)"
    return label_to_str(value)


def fit_preprocessor(frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> Preprocessor:
    medians, means, stds = {}, {}, {}
    for col in numeric:
        values = pd.to_numeric(frame[col], errors="coerce").astype(float).replace([np.inf, -np.inf], np.nan)
        median = float(values.median()) if values.notna().any() else 0.0
        filled = values.fillna(median)
        medians[col], means[col] = median, float(filled.mean())
        stds[col] = float(filled.std()) if float(filled.std() or 0) > 0 else 1.0
    vocab = {col: sorted({category(v) for v in frame[col]}) for col in categorical}
    return Preprocessor(numeric, vocab, medians, means, stds)
