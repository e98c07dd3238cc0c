"""Text classification data: load the splits, validate columns and labels, carve missing splits.

The splits are Arrow tables from the source to the tokeniser: memory-mapped where `datasets` or the
Parquet reader maps them, and never all converted to pandas (a check that needs pandas converts the
one column it reads: the labels, a group column).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ...data.sources import TokenCounter, load_split, source_name, sources_note
from ...data.split import carve, label_to_str
from ...data.tokens import as_column
from ...errors import DataError
from ...recipe import DataSpec

MAX_CLASS_SHARE_OF_ROWS = 0.5  # more distinct labels than half the rows is an id column, not a label


@dataclass
class TextSplits:
    """The three splits. Text classification's are Arrow tables with `text` (large_string) and `label`
    (string) columns plus any group columns (string); causal-lm's document splits (tasks/causal_lm/data.py)
    reuse this holder with pandas frames of `text` and `source`."""

    train: pa.Table | pd.DataFrame
    validation: pa.Table | pd.DataFrame
    test: pa.Table | pd.DataFrame
    labels: list[str]
    notes: list[dict] = field(default_factory=list)  # audit findings produced while preparing


def _columns_error(field_name: str, column: str, path: str, names: list[str]) -> DataError:
    cols = ", ".join(map(str, names[:30]))
    return DataError(f"{field_name}: column '{column}' not found in {_name(path)} (columns: {cols})")


def _name(path) -> str:
    return source_name(path)


NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def _where(mask: pd.Series, path: str) -> str:
    """Where the flagged rows are: file lines for CSV/TSV (after the header), record numbers otherwise."""
    first = mask[mask].index[:5]
    if _name(path).lower().endswith((".csv", ".tsv")):
        return "file lines " + ", ".join(str(i + 2) for i in first)
    return "records " + ", ".join(str(i + 1) for i in first)


def _check_labels_are_classes(values: pd.Series, path: str, column: str) -> None:
    # judged on the distinct values (a handful of classes, however many rows); rows are located only for an error
    distinct = pd.Series(pd.unique(values.astype(str).str.strip()))
    numeric = pd.to_numeric(distinct, errors="coerce")
    if not (numeric.notna() | distinct.str.lower().isin(NON_FINITE)).all():
        return  # class names, not numbers
    finite = numeric.map(math.isfinite)  # NaN → False
    if not finite.all():
        text = values.astype(str).str.strip()
        bad = text.isin(set(distinct[~finite]))
        examples = ", ".join(sorted(set(distinct[~finite]))[:3])
        raise DataError(
            f"data.label: column '{column}' in {_name(path)} has {int(bad.sum())} NaN/inf value(s) ({examples}; "
            f"{_where(bad, path)}); expected class labels; fix or remove those rows"
        )
    if not (numeric == numeric.round()).all():
        example = values.astype(str).str.strip()[values.astype(str).str.strip().isin(set(distinct[numeric != numeric.round()]))].iloc[0]
        raise DataError(
            f"data.label: column '{column}' in {_name(path)} holds fractional numbers (e.g. {example}); "
            "text-classification needs class labels; for a numeric target use a regression task"
        )


def _prepare(table: pa.Table, spec: DataSpec, path: str, role: str, notes: list[dict]) -> pa.Table:
    names = table.column_names
    for column, key in ((spec.text, "data.text"), (spec.label, "data.label")):
        if column not in names:
            raise _columns_error(key, column, path, names)
    for column in spec.groups:
        if column not in names:
            raise _columns_error("data.groups", column, path, names)
    labels = table.column(spec.label).to_pandas()  # one column; the label checks below are pandas'
    missing = labels.isna() | (labels.astype(str).str.strip() == "")
    if missing.any():
        raise DataError(
            f"data.label: {int(missing.sum())} row(s) of {_name(path)} have no '{spec.label}' value "
            f"({_where(missing, path)}); fill them in or remove those rows"
        )
    _check_labels_are_classes(labels, path, spec.label)
    texts = _as_text(table.column(spec.text))
    no_text = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(texts), ""), True).to_numpy(zero_copy_only=False)
    if no_text.any():
        notes.append({
            "level": "warn", "code": "empty_text", "split": role,
            "message": f"{int(no_text.sum())} row(s) of {_name(path)} have an empty '{spec.text}'; they were left out",
        })
    kept = ~no_text
    if not kept.any():
        raise DataError(f"data.text: every row of {_name(path)} has an empty '{spec.text}' column")
    kept_labels = labels[kept]
    label_names = {value: label_to_str(value) for value in pd.unique(kept_labels)}  # per distinct label, not per row
    columns = {"text": texts if kept.all() else texts.filter(pa.array(kept)),  # no copy of a million texts to drop none
               "label": pa.array(kept_labels.map(label_names).to_numpy(dtype=object), type=pa.string())}
    for column in spec.groups:
        values = table.column(column).to_pandas()[kept]
        columns[column] = pa.array(values.fillna("(missing)").astype(str).to_numpy(dtype=object), type=pa.string())
    return pa.table(columns)


def _as_text(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """A text column as large_string (numbers as their text, as pandas' astype(str) wrote them; nulls kept)."""
    if pa.types.is_large_string(values.type):
        return values
    if pa.types.is_string(values.type) or pa.types.is_string_view(values.type):
        return values.cast(pa.large_string())
    return pa.chunked_array([pa.array(values.to_pandas().map(lambda v: None if pd.isna(v) else str(v)).to_numpy(dtype=object),
                                      type=pa.large_string())])


def load_text_splits(spec: DataSpec, seed: int, count_tokens: TokenCounter | None = None) -> TextSplits:
    """Read train (and validation/test when given), validate, and carve the missing splits.
    count_tokens: each row's tokens, when a mixture is weighed by tokens (data.mix_by: tokens)."""
    notes: list[dict] = []

    def read(role: str):
        loaded = load_split(getattr(spec, role), f"data.{role}", spec.subset, spec.split, seed,
                            lambda table, name: _prepare(table, spec, name, role, notes), count_tokens, as_table=True)
        notes.append(sources_note(loaded, role))
        return loaded.rows

    train = read("train")
    validation = read("validation") if spec.validation else None
    test = read("test") if spec.test else None

    classes = _labels(train).value_counts()
    if len(classes) < 2:
        raise DataError(
            f"data.label: column '{spec.label}' in {_name(spec.train)} has a single class ('{classes.index[0]}') "
            f"in its {len(train)} row(s); "
            "classification needs at least two"
        )
    if len(classes) > 100 and len(classes) > MAX_CLASS_SHARE_OF_ROWS * len(train):
        raise DataError(
            f"data.label: column '{spec.label}' has {len(classes)} distinct values in {len(train)} rows of "
            f"{_name(spec.train)}; that looks like an id or free text, not a class label"
        )
    needed = (validation is None) + (test is None)
    if len(train) < 3 * max(needed, 1) * len(classes) and needed:
        raise DataError(
            f"data.train: {_name(spec.train)} has {len(train)} rows for {len(classes)} classes; too few to carve "
            "validation and test splits out of it; give data.validation and data.test, or more rows"
        )
    if test is None:
        train, test, stratified = carve(train, spec.test_fraction, "label", seed)
        notes.append({"level": "info", "code": "split", "message": f"test split carved from train ({len(test)} rows, {'stratified' if stratified else 'random'}, seed {seed})"})
    if validation is None:
        fraction = spec.validation_fraction / (1 - spec.test_fraction) if not spec.test else spec.validation_fraction
        train, validation, stratified = carve(train, fraction, "label", seed + 1)
        notes.append({"level": "info", "code": "split", "message": f"validation split carved from train ({len(validation)} rows, {'stratified' if stratified else 'random'}, seed {seed + 1})"})

    labels = sorted(pc.unique(train.column("label")).to_pylist(), key=_label_sort_key)
    known = set(labels)
    for role, table, path in (("validation", validation, spec.validation), ("test", test, spec.test)):
        unseen = sorted(set(pc.unique(table.column("label")).to_pylist()) - known)
        if unseen:
            where = _name(path) if path else f"the carved {role} split"
            raise DataError(
                f"data.{role}: labels {', '.join(repr(u) for u in unseen[:10])} in {where} never occur in training "
                f"(training labels: {', '.join(labels[:20])}); add training examples for them or remove those rows"
            )
    return TextSplits(train=train, validation=validation, test=test, labels=labels, notes=notes)


def _labels(table: pa.Table) -> pd.Series:
    return table.column("label").to_pandas()


def _label_sort_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


MIN_PER_CLASS = 20


def audit_text_splits(splits, truncated: dict[str, int] | None = None, max_length: int | None = None) -> dict:
    """Class counts, empty texts, duplicates, train/validation/test leakage, truncation.

    Returns {"findings": [{level, code, message}], "splits": {name: {rows, class_counts}}, ...}.
    """
    findings: list[dict] = list(splits.notes)
    split_tables = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    counts = {name: _labels(f).value_counts() for name, f in split_tables.items()}  # each label column converted once
    summary = {
        name: {"rows": int(len(f)), "class_counts": {str(k): int(v) for k, v in counts[name].sort_index().items()}}
        for name, f in split_tables.items()
    }
    train_counts = counts["train"]
    small = train_counts[train_counts < MIN_PER_CLASS]
    if len(small):
        findings.append({
            "level": "warn", "code": "few_examples_per_class",
            "message": f"{len(small)} class(es) have fewer than {MIN_PER_CLASS} training examples: "
            + ", ".join(f"{k} ({v})" for k, v in small.items()),
        })
    majority_share = float(train_counts.max() / train_counts.sum())
    if majority_share > 0.9:
        findings.append({"level": "warn", "code": "imbalanced", "message": f"the largest class is {majority_share:.0%} of training rows; accuracy will look high even for a useless model"})

    duplicates, conflicting = duplicate_texts(splits.train)
    if duplicates:
        findings.append({"level": "warn" if duplicates / len(splits.train) > 0.05 else "info", "code": "duplicates",
                         "message": f"{duplicates} training row(s) repeat an earlier text exactly"
                         + (f"; {conflicting} text(s) appear with different labels" if conflicting else "")})

    train_texts = text_column(splits.train)
    leakage = {}
    for name in ("validation", "test"):
        shared = shared_texts(text_column(split_tables[name]), train_texts)
        leakage[name] = shared
        if shared:
            findings.append({"level": "warn", "code": "leakage",
                             "message": f"{shared} {name} row(s) have a text identical to a training text; their scores overstate how the model does on new data"})
    if truncated:
        total = sum(truncated.values())
        if total:
            rows = sum(len(f) for f in split_tables.values())
            findings.append({"level": "warn" if total / rows > 0.05 else "info", "code": "truncated",
                             "message": f"{total} of {rows} texts are longer than data.max_length={max_length} tokens and were truncated"})
    return {
        "findings": findings,
        "splits": summary,
        "sources": {n["split"]: n["sources"] for n in splits.notes if n.get("code") == "sources"},
        "duplicates_in_train": duplicates,
        "conflicting_labels": conflicting,
        "leakage": leakage,
        "truncated": truncated or {},
        "majority_share": majority_share,
    }


# --------------------------------------------------------------------------- column-wise checks (Arrow hash tables, no Python set of a million texts)

def text_column(table: pa.Table) -> pa.Array:
    """The split's `text` column as one Arrow large_string array."""
    return as_column(table.column("text"))


def duplicate_texts(table: pa.Table) -> tuple[int, int]:
    """(rows that repeat an earlier text, texts that occur with more than one label)."""
    import numpy as np

    texts = text_column(table).dictionary_encode()
    text_ids = texts.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    duplicates = len(text_ids) - len(texts.dictionary)
    if not duplicates:
        return 0, 0
    label_ids, labels = pd.factorize(_labels(table))
    pairs = np.unique(text_ids * max(1, len(labels)) + label_ids)  # each distinct (text, label) once
    per_text = np.bincount(pairs // max(1, len(labels)), minlength=len(texts.dictionary))
    return int(duplicates), int((per_text > 1).sum())


def shared_texts(texts, train_texts) -> int:
    """How many of `texts` also occur in `train_texts`."""
    return int(pc.sum(pc.is_in(texts, value_set=train_texts)).as_py() or 0)
