"""Where a split's rows come from: a file, a folder of shards, a glob, a `save_to_disk` folder, a
Hugging Face Hub dataset (`hf:owner/name`), or a weighted mixture of these.

Hugging Face `datasets` is the reading layer for everything but a single file (which
data/load.py reads with its file-by-file errors): shards and Hub datasets are read into
Arrow (memory-mapped, cached by `datasets`). A task asks for its rows as an Arrow table
(`as_table=True`: text classification, whose rows are never all converted to pandas) or as a
pandas frame (tasks whose rows are Python objects). Every way a source can be wrong is one error
naming the recipe key, the file and what to do.
"""

from __future__ import annotations

import csv
import glob as globbing
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import DataError
from . import rows as row_access
from .load import TABLE_SUFFIXES, read_arrow_table, read_table

HUB_PREFIX = "hf:"
GLOB_CHARS = set("*?[")
# the files `Dataset.save_to_disk` writes: a Dataset folder has state.json, a DatasetDict folder dataset_dict.json
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")
BUILDERS = {"csv": "csv", "tsv": "csv", "jsonl": "json", "parquet": "parquet"}


# count_tokens(rows) -> the number of tokens of each row, counted with the run's tokenizer (data.mix_by: tokens)
TokenCounter = Callable[..., "list[int] | np.ndarray"]


@dataclass
class Loaded:
    """A split's rows (a frame, or an Arrow table when asked for) and where they came from: one
    entry per source, for audit.json."""

    rows: object
    sources: list[dict]


def source_name(value) -> str:
    """How errors name a source: a file's name, a folder or glob as given, the Hub id, or 'the mixture'."""
    if isinstance(value, list):
        return "the mixture of " + ", ".join(source_name(entry_path(v)) for v in value)
    text = str(value)
    if text.startswith(HUB_PREFIX) or GLOB_CHARS & set(text):
        return text
    return Path(text).name


def entry_path(entry) -> str:
    """The path of one mixture entry (a recipe `{path, weight}` section or a plain string)."""
    return entry if isinstance(entry, str) else entry.path


def read_source(value: str, field: str, subset: str | None = None, split: str | None = None, as_table: bool = False):
    """The rows of one source (not a mixture) as a frame, or as an Arrow table with `as_table`
    (memory-mapped where `datasets` or the Parquet reader allows); `field` names the recipe key in errors."""
    text = str(value)
    if text.startswith(HUB_PREFIX):
        return _read_hub(text[len(HUB_PREFIX):], field, subset, split, as_table)
    if GLOB_CHARS & set(text):
        files = sorted(p for p in globbing.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{field}: the pattern {text} matches no file; check the folder and the pattern (e.g. data/train-*.parquet)")
        return _read_shards([Path(p) for p in files], field, text, as_table)
    path = Path(text)
    if path.is_dir():
        if any((path / name).exists() for name in SAVED_DATASET_FILES):
            return _read_saved(path, field, split, as_table)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise DataError(f"{field}: {path} is a directory with no .csv, .jsonl or .parquet shard in it and no save_to_disk files; "
                            "point it at a file, a folder of shards or a save_to_disk folder")
        return _read_shards(files, field, str(path), as_table)
    return read_arrow_table(path, field) if as_table else read_table(path, field)


def load_split(value, field: str, subset: str | None, split: str | None, seed: int,
               prepare: Callable[[object, str], object] | None = None,
               count_tokens: TokenCounter | None = None, as_table: bool = False) -> Loaded:
    """One recipe split: a source, or a mixture (a list of `{path, weight}`).

    prepare(rows, name) turns each source's rows into the task's columns before sources are
    mixed, so sources in different formats (ShareGPT and Alpaca files) can be mixed.
    count_tokens: see `mix` (`data.mix_by: tokens`). as_table: every source read as an Arrow
    table (and `prepare` given and returning tables), not a frame.
    """
    prepare = prepare or (lambda rows, name: rows)
    if not isinstance(value, list):
        rows = prepare(read_source(value, field, subset, split, as_table), source_name(value))
        return Loaded(rows, [{"source": str(value), "rows": int(len(rows))}])
    parts = []
    for i, entry in enumerate(value):
        where = f"{field}[{i}]"
        parts.append(prepare(read_source(entry.path, f"{where}.path", entry.subset or subset, entry.split or split, as_table),
                             source_name(entry.path)))
    return mix(parts, [e.weight for e in value], [e.path for e in value], field, seed, count_tokens)


def mix(frames: list, weights: list[float | None], names: list[str], field: str, seed: int,
        count_tokens: TokenCounter | None = None) -> Loaded:
    """Sources mixed so each makes up its weight's share of the examples, deterministically per seed.

    Without weights every row of every source is kept. With weights the mixture is as large as
    it can be without repeating a row (a repeated row could land in both train and a carved
    validation split): the source that runs out first is used whole, the others are subsampled
    by a seeded permutation.

    `frames` are all pandas frames or all Arrow tables; the mixture is of the same form.
    count_tokens(rows) -> one token count per row (`data.mix_by: tokens`, counted with the run's
    tokenizer by the task): the weights are then shares of the mixture's tokens, not of its rows;
    each source's rows are taken in the same seeded order, as many as bring its tokens closest to
    its share, and audit.json reports each source's tokens and achieved token share.
    """
    columns = row_access.column_names(frames[0])
    for frame, name in zip(frames[1:], names[1:]):
        if row_access.column_names(frame) != columns and set(row_access.column_names(frame)) != set(columns):
            raise DataError(f"{field}: source {source_name(name)} has columns ({', '.join(row_access.column_names(frame))}) but "
                            f"{source_name(names[0])} has ({', '.join(map(str, columns))}); every source of a mixture needs the same columns")
    given = [w for w in weights if w is not None]
    if given and len(given) != len(weights):
        raise DataError(f"{field}: give a weight to every source of the mixture or to none (weights: {weights})")
    counts = [np.asarray(count_tokens(f), dtype=np.int64) for f in frames] if count_tokens is not None else None
    rng = np.random.default_rng(seed)
    if counts is not None:
        return _mix_by_tokens(frames, counts, weights if given else None, names, columns, rng)
    if not given:
        takes = [len(f) for f in frames]
    else:
        total = sum(weights)
        shares = [w / total for w in weights]
        size = min(len(f) / s for f, s in zip(frames, shares))
        takes = [max(1, min(len(f), int(round(size * s)))) for f, s in zip(frames, shares)]
    parts, sources = [], []
    for frame, take, name, weight in zip(frames, takes, names, weights):
        idx = np.sort(rng.permutation(len(frame))[:take]) if take < len(frame) else np.arange(len(frame))
        parts.append(row_access.select(row_access.take(frame, idx), columns))
        sources.append({"source": str(name), "weight": weight, "rows_available": int(len(frame)), "rows": int(take)})
    mixed = row_access.concat(parts)
    # interleaved, not source after source: a carved split and the first epoch both see every source
    mixed = row_access.take(mixed, rng.permutation(len(mixed)))
    for s in sources:
        s["share"] = round(s["rows"] / len(mixed), 4)
    return Loaded(mixed, sources)


def _mix_by_tokens(frames: list, counts: list[np.ndarray], weights: list[float] | None, names: list[str],
                   columns: list[str], rng: np.random.Generator) -> Loaded:
    """`mix` by tokens: the mixture holds as many tokens as it can without repeating a row; the source
    whose tokens run out first (relative to its share) is used whole, each other source contributes the
    prefix of its seeded permutation whose tokens come closest to its share."""
    orders = [rng.permutation(len(f)) for f in frames]
    totals = [int(c.sum()) for c in counts]
    if weights is None:
        takes = [len(f) for f in frames]
    else:
        shares = [w / sum(weights) for w in weights]
        size = min(t / s for t, s in zip(totals, shares))  # tokens of the whole mixture
        takes = []
        for order, count, share, frame in zip(orders, counts, shares, frames):
            running = np.cumsum(count[order])  # tokens after taking 1, 2, ... rows
            target = size * share
            k = int(np.searchsorted(running, target))  # the first prefix reaching the target
            if k >= len(frame):
                take = len(frame)
            elif k > 0 and target - running[k - 1] <= running[k] - target:
                take = k  # one row fewer comes closer
            else:
                take = k + 1
            takes.append(max(1, take))
    parts, sources = [], []
    for frame, order, count, take, name, weight in zip(frames, orders, counts, takes, names, weights or [None] * len(frames)):
        idx = np.sort(order[:take])
        parts.append(row_access.select(row_access.take(frame, idx), columns))
        sources.append({"source": str(name), "weight": weight, "rows_available": int(len(frame)), "rows": int(take),
                        "tokens_available": int(count.sum()), "tokens": int(count[idx].sum())})
    mixed = row_access.concat(parts)
    mixed = row_access.take(mixed, rng.permutation(len(mixed)))
    tokens = sum(s["tokens"] for s in sources) or 1
    for s in sources:
        s["share"] = round(s["rows"] / len(mixed), 4)
        s["token_share"] = round(s["tokens"] / tokens, 4)
    return Loaded(mixed, sources)


def _shard_columns(path: Path) -> list[str]:
    """A shard's columns without reading its rows (Parquet schema, CSV header, first JSON record)."""
    kind = TABLE_SUFFIXES[path.suffix.lower()]
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DataError(f"data: {path} is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    with open(path, encoding="utf-8-sig", newline="") as handle:
        if kind in ("csv", "tsv"):
            header = next(csv.reader(handle, delimiter="\t" if kind == "tsv" else ","), [])
            return [h.strip() for h in header]
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return []  # the reader below names the line
                return list(record) if isinstance(record, dict) else []
    return []


def _read_shards(files: list[Path], field: str, given: str, as_table: bool = False):
    """Shards of one kind, with the same columns, read through `datasets` into one frame (or table)."""
    kinds = {TABLE_SUFFIXES.get(p.suffix.lower()) for p in files}
    if None in kinds:
        odd = next(p for p in files if p.suffix.lower() not in TABLE_SUFFIXES)
        raise DataError(f"{field}: {odd.name} in {given} has suffix '{odd.suffix}'; expected .csv, .jsonl or .parquet shards")
    if len({BUILDERS[k] for k in kinds}) > 1:
        raise DataError(f"{field}: {given} mixes shard kinds ({', '.join(sorted(kinds))}); keep one kind per source, "
                        "or list them as a mixture")
    first = _shard_columns(files[0])
    for path in files[1:]:
        columns = _shard_columns(path)
        if columns != first:
            raise DataError(f"{field}: shard {path.name} has columns ({', '.join(columns)}) but {files[0].name} has ({', '.join(first)}); "
                            "every shard needs the same columns")
    if len(files) == 1:
        return read_arrow_table(files[0], field) if as_table else read_table(files[0], field)
    kind = next(iter(kinds))
    options = {"dtype": str, "keep_default_na": False, "na_values": [""]} if BUILDERS[kind] == "csv" else {}
    if kind == "tsv":
        options["sep"] = "\t"
    from datasets import load_dataset  # imported when used: `datasets` takes a second to import

    try:
        dataset = load_dataset(BUILDERS[kind], data_files=[str(p) for p in files], split="train", **options)
    except Exception as exc:  # datasets wraps the reader's error in DatasetGenerationError
        cause = exc.__cause__ or exc
        raise DataError(f"{field}: could not read the shards of {given} ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})") from None
    return _rows(dataset, field, given, as_table)


def _read_saved(path: Path, field: str, split: str | None, as_table: bool = False):
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{field}: {path} is not a readable save_to_disk folder ({type(exc).__name__}: {str(exc)[:200]})") from None
    if isinstance(dataset, DatasetDict):
        dataset = _pick_split(dataset, split, field, str(path))
    return _rows(dataset, field, str(path), as_table)


def _pick_split(dataset, split: str | None, field: str, given: str):
    names = list(dataset)
    if split is None:
        if len(names) == 1 or "train" in names:
            return dataset[names[0] if len(names) == 1 else "train"]
        raise DataError(f"{field}: {given} holds the splits {', '.join(names)}; name one with data.split")
    if split not in names:
        raise DataError(f"data.split: {given} has no split {split!r} (splits: {', '.join(names)})")
    return dataset[split]


def _read_hub(name: str, field: str, subset: str | None, split: str | None, as_table: bool = False):
    """A Hub dataset (or its copy in the local `datasets` cache, offline)."""
    from datasets import load_dataset

    given = HUB_PREFIX + name
    try:
        dataset = load_dataset(name, subset, split=split)
    except ConnectionError:
        raise DataError(f"{field}: could not reach the Hugging Face Hub for {given} (offline, and no copy in the datasets cache); "
                        f"where there is a network run datasets.load_dataset({name!r}).save_to_disk('folder') and set {field} "
                        "to that folder, or to its Parquet files") from None
    except ValueError as exc:  # an unknown config or split
        raise DataError(f"{field}: {given}: {str(exc).splitlines()[0][:300]} (data.subset / data.split)") from None
    except Exception as exc:  # DatasetNotFoundError and the loaders' own errors
        raise DataError(f"{field}: could not load {given} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if hasattr(dataset, "keys"):  # a DatasetDict: no data.split given
        dataset = _pick_split(dataset, split, field, given)
    return _rows(dataset, field, given, as_table)


def _rows(dataset, field: str, given: str, as_table: bool):
    """A `datasets.Dataset`'s rows: its Arrow table as `datasets` maps it from the cache (a slice, not
    a copy), or a frame."""
    if dataset.num_rows == 0:
        raise DataError(f"{field}: {given} has no rows")
    if as_table:
        table = dataset.with_format("arrow")[:]
        return table.rename_columns([str(c).strip() for c in table.column_names])
    frame = dataset.to_pandas()
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def sources_note(loaded: Loaded, role: str) -> dict:
    """The audit finding that says where a split's rows came from (each source's share for a mixture)."""
    if len(loaded.sources) == 1:
        s = loaded.sources[0]
        message = f"{role}: {s['rows']} rows from {source_name(s['source'])}"
    else:
        message = f"{role} mixes " + ", ".join(
            f"{source_name(s['source'])} ({s['share']:.1%}, {s['rows']} of {s['rows_available']} rows"
            + (f"; {s['token_share']:.1%} of the tokens, {s['tokens']} of {s['tokens_available']}" if "tokens" in s else "") + ")"
            for s in loaded.sources)
    return {"level": "info", "code": "sources", "split": role, "message": message, "sources": loaded.sources}


def read_frame(value, field: str, spec, seed: int = 0) -> pd.DataFrame:
    """Any recipe split form (a mixture included) as one frame, for tasks whose rows need no per-source
    preparation; `spec` is the recipe's data section (or any object: subset and split default to None)."""
    return load_split(value, field, getattr(spec, "subset", None), getattr(spec, "split", None), seed).rows
