"""Read tables (CSV, JSONL, Parquet) into DataFrames, with one clear error per way a file can be bad."""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
from pathlib import Path

import pandas as pd

from ..errors import DataError

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
MAX_FIELD_BYTES = 64 * 1024 * 1024


def _check_file(path: Path, field: str) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise DataError(f"{field}: {path} is a symbolic link to {os.readlink(path)}, which does not exist; point it at a readable file") from None
        hint = ""
        if path.parent.is_dir():
            near = sorted(p.name for p in path.parent.iterdir() if p.suffix.lower() in TABLE_SUFFIXES)[:5]
            if near:
                hint = f" (files there: {', '.join(near)})"
        raise DataError(f"{field}: file {path} not found{hint}") from None
    except OSError as exc:
        what = "a symbolic link loop" if exc.errno == errno.ELOOP else f"not readable ({exc.strerror or exc})"
        raise DataError(f"{field}: {path} is {what}; point it at a readable file") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{field}: {path} is a directory; expected a .csv, .jsonl or .parquet file")
    if info.st_size == 0:
        raise DataError(f"{field}: {path} is empty (0 bytes); expected a header row and data rows")


def decode_text(path: Path, field: str) -> str:
    """A text file's contents as UTF-8 (a byte-order mark dropped, line endings normalised to \\n);
    an unreadable or non-UTF-8 file is a DataError naming `field`, the file and the first bad byte."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{field}: {path} is not readable ({exc.strerror or exc}); check its permissions") from None
    try:
        # utf-8-sig strips a byte-order mark that spreadsheet programs add
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{field}: {path} is not UTF-8 (invalid byte 0x{raw[exc.start]:02x} at byte {exc.start}); re-save it as UTF-8"
        ) from None
    # mixed \r\n / \r / \n line endings are normalised so rows split the same everywhere
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_table(path: str | Path, field: str = "data.train") -> pd.DataFrame:
    """Read a CSV/TSV/JSONL/Parquet file; `field` names the recipe key in error messages."""
    path = Path(path)
    _check_file(path, field)
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        hint = "; save the sheet as CSV UTF-8" if path.suffix.lower() in {".xlsx", ".xls", ".ods"} else ""
        raise DataError(
            f"{field}: {path.name} has suffix '{path.suffix}'; expected one of {', '.join(sorted(TABLE_SUFFIXES))}{hint}"
        )
    if kind == "parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DataError(f"{field}: {path} is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    elif kind == "jsonl":
        frame = _read_jsonl(decode_text(path, field), path, field)
    else:
        frame = _read_delimited(decode_text(path, field), path, field, sep="\t" if kind == "tsv" else ",")
    if len(frame.columns) == 0:
        raise DataError(f"{field}: {path} has no columns; expected a header row")
    if len(frame) == 0:
        raise DataError(f"{field}: {path} has a header but no data rows")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def read_arrow_table(path: str | Path, field: str = "data.train"):
    """A table file as an Arrow table. Parquet is read by pyarrow, memory-mapped and never through
    pandas; CSV/TSV/JSONL go through `read_table` (its line-numbered errors), then are converted."""
    import pyarrow.parquet as pq

    path = Path(path)
    if TABLE_SUFFIXES.get(path.suffix.lower()) != "parquet":
        return frame_to_table(read_table(path, field))
    _check_file(path, field)
    try:
        table = pq.read_table(path, memory_map=True)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{field}: {path} is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    # a pandas index saved as a column is the frame's index, not data (as pandas reads it back)
    index_columns = [c for c in (table.schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)]
    table = table.drop_columns([c for c in index_columns if c in table.column_names])
    if table.num_columns == 0:
        raise DataError(f"{field}: {path} has no columns; expected a header row")
    if table.num_rows == 0:
        raise DataError(f"{field}: {path} has a header but no data rows")
    return table.rename_columns([str(c).strip() for c in table.column_names])


def frame_to_table(frame: pd.DataFrame):
    """A frame as an Arrow table, column by column; a column Arrow cannot type (a JSON field holding
    both numbers and strings) is kept as the values' strings, missing values as nulls."""
    import pyarrow as pa

    arrays = []
    for name in frame.columns:
        try:
            arrays.append(pa.array(frame[name], from_pandas=True))
        except pa.ArrowException:
            arrays.append(pa.array([None if value is None or (isinstance(value, float) and value != value) else str(value)
                                    for value in frame[name]], type=pa.large_string()))
    return pa.Table.from_arrays(arrays, names=[str(c) for c in frame.columns])


def _read_delimited(text: str, path: Path, field: str, sep: str) -> pd.DataFrame:
    csv.field_size_limit(MAX_FIELD_BYTES)
    try:
        return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_values=[""], engine="python")
    except pd.errors.ParserError as exc:
        raise DataError(f"{field}: {path} is not a well-formed table: {str(exc).strip()}; every row needs the header's number of fields") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{field}: {path} has no header row and no data") from None
    except csv.Error as exc:
        raise DataError(f"{field}: {path} could not be parsed as CSV ({exc})") from None


def _read_jsonl(text: str, path: Path, field: str) -> pd.DataFrame:
    import json

    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of records is accepted too
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{field}: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    else:
        records = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{field}: {path} line {number} is not valid JSON ({exc.msg}); expected one JSON object per line") from None
    bad = next((i for i, r in enumerate(records, start=1) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{field}: {path} record {bad} is not a JSON object; expected one object per line like {{\"text\": ..., \"label\": ...}}")
    return pd.DataFrame.from_records(records)
