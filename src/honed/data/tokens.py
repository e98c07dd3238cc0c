"""Tokenisation through `datasets.Dataset.map` (batched, on several processes for large splits),
cached on disk under a fingerprint of the texts, the tokenizer and max_length: a second run on
the same data with the same tokenizer reads the token ids back instead of tokenising again.

The result is ragged storage (data/ragged.py) taken straight from the Arrow column, without a
Python list per row.
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

CACHE_VERSION = "1"  # part of every fingerprint: bump it when what the cached columns mean changes
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


def fingerprint(texts: list[str], key: str, max_length: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{CACHE_VERSION}|{key}|{max_length}|{len(texts)}|".encode())
    for start in range(0, len(texts), 100_000):  # in chunks: one joined string of a million texts is a large copy
        h.update("\x00".join(texts[start : start + 100_000]).encode("utf-8", "surrogatepass"))
        h.update(b"\x01")
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


def tokenise(texts: list[str], encode: Callable[[list[str], int], list[list[int]]], key: str, max_length: int,
             pad_id: int) -> Tokenised:
    """Token ids of `texts`, cut to max_length (and counted), an empty text becoming one pad token."""
    from datasets import Dataset, Features, List, Value, disable_progress_bars

    disable_progress_bars()  # honed prints its own phase lines
    fp = fingerprint(texts, key, max_length)
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    existed = any(folder.glob(f"{fp}*.arrow"))
    calls = []

    def batch_fn(batch):
        ids = encode(batch["text"], max_length + 1)
        calls.append(len(ids))
        return {"ids": [x[:max_length] if x else [pad_id] for x in ids], "cut": [len(x) > max_length for x in ids]}

    workers = min(4, free_cores()) if len(texts) >= PARALLEL_FROM_ROWS else 1
    dataset = Dataset.from_dict({"text": texts})
    out = dataset.map(batch_fn, batched=True, batch_size=MAP_BATCH, remove_columns=["text"],
                      features=Features({"ids": List(Value("int32")), "cut": Value("bool")}),
                      cache_file_name=str(folder / f"{fp}.arrow"), load_from_cache_file=True, new_fingerprint=fp,
                      num_proc=workers if workers > 1 else None)
    column = out.data.column("ids").combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].astype(np.int64)
    offsets = offsets - offsets[0]
    truncated = int(np.asarray(out.data.column("cut").to_numpy(zero_copy_only=False)).sum())
    offsets_t = torch.from_numpy(offsets)
    return Tokenised(torch.from_numpy(values), offsets_t, offsets_t[1:] - offsets_t[:-1], truncated,
                     from_cache=existed and not calls, batches_tokenised=len(calls))
