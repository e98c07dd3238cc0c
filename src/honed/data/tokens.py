"""Tokenisation through `datasets.Dataset.map` (batched, on several processes for large splits),
cached on disk under a fingerprint of the texts, the tokenizer, max_length and the pad id (an empty
encoding is stored as one pad token): a second run on the same data with the same tokenizer reads
the token ids back instead of tokenising again.

The result is ragged storage (data/ragged.py) taken straight from the Arrow column, without a
Python list per row. `tokenise_masked` caches a second ragged column beside the ids, a per-token
mask (chat's assistant tokens), from an encoder that returns both.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .ragged import spans as ragged_spans

CACHE_VERSION = "2"  # part of every fingerprint: bump it when what the cached columns mean changes
MAP_BATCH = 10_000  # texts per map batch: large enough that the Rust tokenizer's own threads stay busy
PARALLEL_FROM_ROWS = 200_000  # below this, starting worker processes costs more than it saves
SETTINGS = re.compile(r'"(truncation|padding)":(null|\{(?:[^{}]|\{[^{}]*\})*\}),?')


@dataclass
class Tokenised:
    flat: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    truncated: int
    from_cache: bool  # read back from the cache: nothing was tokenised
    batches_tokenised: int  # map batches this process tokenised (0 when read from the cache or tokenised in workers)
    mask: torch.Tensor | None = None  # bool per token (tokenise_masked); None from tokenise


def tokenizer_key(tokenizer, family: str) -> str:
    """What identifies a tokenizer's output: its serialised vocabulary and rules (fast tokenizers),
    else datasets' own hash of the object."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if hasattr(backend, "to_str"):
        # truncation and padding are set per call by the encoders (max_length is in the fingerprint);
        # cut out by pattern: parsing the JSON of a 32k vocabulary takes most of a second
        state = SETTINGS.sub("", backend.to_str())
        return family + hashlib.blake2b(state.encode(), digest_size=16).hexdigest()
    from datasets.fingerprint import Hasher

    return family + Hasher.hash(tokenizer)


def as_column(texts):
    """`texts` (a list, a pandas column, an Arrow array) as one Arrow large_string array, missing texts
    as "": the map's input, and what the fingerprint hashes, without a Python string per row when the
    texts are Arrow-backed already."""
    import pyarrow as pa

    if not isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = pa.array(texts) if hasattr(texts, "__arrow_array__") else pa.array(list(texts), type=pa.large_string())
    texts = one_chunk(texts) if isinstance(texts, pa.ChunkedArray) else texts
    if texts.type != pa.large_string():
        texts = texts.cast(pa.large_string())
    return texts.fill_null("") if texts.null_count else texts


def one_chunk(column):
    """An Arrow ChunkedArray as one Array: its only chunk as it is (combine_chunks copies even that)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def fingerprint(texts, key: str, max_length: int, pad_id: int) -> str:
    """A hash of the texts' bytes (the Arrow column's offsets and characters), the tokenizer, max_length
    and pad_id (the id an empty encoding is stored as: two tokenizers with the same vocabulary and rules
    but different pad ids must not share an entry)."""
    column = as_column(texts)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{CACHE_VERSION}|{key}|{max_length}|pad={pad_id}|{len(column)}|".encode())
    _, offsets_buffer, data = column.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[column.offset : column.offset + len(column) + 1]
    h.update((offsets - offsets[0]).tobytes())  # where each text ends: ["ab", "c"] is not ["a", "bc"]
    if data is not None and len(offsets):
        h.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])
    return h.hexdigest()


def cache_dir() -> Path:
    """Beside datasets' own cache (HF_DATASETS_CACHE, else ~/.cache/huggingface/datasets)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "honed-tokens"


def free_cores() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, int(cores - load))


def tokenise(texts, encode: Callable[[list[str], int], list[list[int]]], key: str, max_length: int,
             pad_id: int, encode_flat: Callable | None = None) -> Tokenised:
    """Token ids of `texts` (a list, a pandas column or an Arrow array), cut to max_length (and counted),
    an empty text becoming one pad token.

    encode_flat (the bundle's column-wise encoder, when its tokenizer has one) gets each map batch
    as an Arrow column and returns flat ids with offsets: no Python list per row on either side."""
    import pyarrow as pa
    from datasets import Features, List, Value

    texts = as_column(texts)
    calls = []

    def batch_fn(batch):
        ids = encode(batch["text"], max_length + 1)
        calls.append(len(ids))
        return {"ids": [x[:max_length] if x else [pad_id] for x in ids], "cut": [len(x) > max_length for x in ids]}

    def flat_fn(table):
        values, offsets = encode_flat(table.column("text"), max_length + 1)
        calls.append(len(offsets) - 1)
        lengths = offsets[1:] - offsets[:-1]
        keep = np.minimum(lengths, max_length)
        empty = keep == 0
        kept_offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(np.maximum(keep, 1), out=kept_offsets[1:])
        out = np.full(int(kept_offsets[-1]), pad_id, dtype=np.int32)  # an empty text keeps one pad token
        out[ragged_spans(kept_offsets[:-1][~empty], keep[~empty])] = values[ragged_spans(offsets[:-1][~empty], keep[~empty])]
        ids = pa.ListArray.from_arrays(pa.array(kept_offsets.astype(np.int32)), pa.array(out))
        return pa.table({"ids": ids, "cut": pa.array(lengths > max_length)})

    # the column-wise encoder tokenises each distinct word once: worker processes would only repeat that
    workers = min(4, free_cores()) if len(texts) >= PARALLEL_FROM_ROWS and encode_flat is None else 1
    out, existed = cached_map(texts, flat_fn if encode_flat is not None else batch_fn, fingerprint(texts, key, max_length, pad_id),
                              Features({"ids": List(Value("int32")), "cut": Value("bool")}), workers, arrow=encode_flat is not None)
    values, offsets = ragged_column(out, "ids")
    truncated = int(np.asarray(out.data.column("cut").to_numpy(zero_copy_only=False)).sum())
    offsets_t = torch.from_numpy(offsets)
    return Tokenised(torch.from_numpy(values.astype(np.int64)), offsets_t, offsets_t[1:] - offsets_t[:-1], truncated,
                     from_cache=existed and not calls, batches_tokenised=len(calls))


def tokenise_masked(texts, encode: Callable[[list[str]], tuple[list[list[int]], list[list[bool]]]], key: str, pad_id: int,
                    parallel_from: int = PARALLEL_FROM_ROWS) -> Tokenised:
    """Token ids and a per-token mask of each of `texts` (e.g. a conversation as JSON, which `encode`
    renders), whole: nothing is cut, so one cache entry serves every max_length and the caller
    counts what its cut drops. An empty encoding becomes one pad token, its mask False.

    parallel_from: the rows from which the map runs on several processes (an encoder that renders
    templates in Python pays for the workers' start much sooner than a Rust tokenizer does)."""
    from datasets import Features, List, Value

    texts = as_column(texts)
    if len(texts) == 0:  # a map over no rows writes no columns to read back
        empty = torch.zeros(0, dtype=torch.long)
        return Tokenised(empty, torch.zeros(1, dtype=torch.long), empty, 0, False, 0, torch.zeros(0, dtype=torch.bool))
    calls = []

    def batch_fn(batch):
        ids, masks = encode(batch["text"])
        calls.append(len(ids))
        return {"ids": [x if x else [pad_id] for x in ids], "mask": [m if x else [False] for x, m in zip(ids, masks)]}

    workers = min(4, free_cores()) if len(texts) >= parallel_from else 1
    out, existed = cached_map(texts, batch_fn, fingerprint(texts, key + "|masked-whole", 0, pad_id),
                              Features({"ids": List(Value("int32")), "mask": List(Value("bool"))}), workers)
    values, offsets = ragged_column(out, "ids")
    mask, _ = ragged_column(out, "mask")
    offsets_t = torch.from_numpy(offsets)
    return Tokenised(torch.from_numpy(values.astype(np.int64)), offsets_t, offsets_t[1:] - offsets_t[:-1], 0,
                     from_cache=existed and not calls, batches_tokenised=len(calls), mask=torch.from_numpy(mask.astype(bool)))


def cached_map(texts, fn: Callable, fp: str, features, workers: int, arrow: bool = False):
    """(the mapped dataset, whether its cache file existed): `fn` over `texts` (an Arrow string column)
    as a batched `Dataset.map` whose output is cached under the fingerprint `fp`."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # honed prints its own phase lines
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    existed = any(folder.glob(f"{fp}*.arrow"))
    dataset = Dataset.from_dict({"text": texts})
    if arrow:
        dataset = dataset.with_format("arrow")
    out = dataset.map(fn, batched=True, batch_size=MAP_BATCH, remove_columns=["text"], features=features,
                      cache_file_name=str(folder / f"{fp}.arrow"), load_from_cache_file=True, new_fingerprint=fp,
                      num_proc=workers if workers > 1 else None)
    return out.with_format(None), existed


def ragged_column(dataset, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets from 0) of a list column of a mapped dataset, straight from its Arrow buffers."""
    column = dataset.data.column(name).combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]
