"""A split's rows as either of the two forms tasks keep them in: an Arrow table (text classification,
whose million-row splits are never all held in pandas) or a pandas frame (tasks whose rows are
Python objects: chat messages, series, images, tabular features). Code shared by every task reads
rows through these functions, which take both; each pulls out only the columns it is asked for.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def is_table(rows) -> bool:
    """Whether `rows` is an Arrow table (else a pandas frame)."""
    import pyarrow as pa

    return isinstance(rows, pa.Table)


def column_names(rows) -> list[str]:
    """The rows' column names, in order."""
    return list(rows.column_names) if is_table(rows) else list(rows.columns)


def column(rows, name: str) -> pd.Series:
    """One column as a pandas Series (for an Arrow table, that column alone is converted)."""
    return rows.column(name).to_pandas() if is_table(rows) else rows[name]


def columns_frame(rows, names: list[str]) -> pd.DataFrame:
    """The named columns (and only those) as a pandas frame."""
    return rows.select(names).to_pandas() if is_table(rows) else rows[names]


def to_frame(rows) -> pd.DataFrame:
    """Every column as a pandas frame: for outputs written per row (predictions.csv of the test split)."""
    return rows.to_pandas() if is_table(rows) else rows


def take(rows, positions: np.ndarray):
    """The rows at `positions`, in that order, renumbered from 0 (a frame's index is reset)."""
    if is_table(rows):
        return rows.take(np.asarray(positions, dtype=np.int64))
    return rows.iloc[positions].reset_index(drop=True)


def concat(parts: list):
    """Rows of the same columns one after another (all tables or all frames)."""
    if parts and is_table(parts[0]):
        import pyarrow as pa

        return pa.concat_tables(parts, promote_options="permissive")
    return pd.concat(parts, ignore_index=True)


def select(rows, names: list[str]):
    """The named columns in that order, in the rows' own form."""
    return rows.select(names) if is_table(rows) else rows[names]
