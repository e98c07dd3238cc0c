"""Ragged token storage: the rows of a split stored flat with offsets, so a batch is built with a
few tensor copies and a subset with one concatenation. Text classification and chat share it."""

from __future__ import annotations

import numpy as np
import torch


def pack(rows: list[list], lengths: list[int] | None = None, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat, offsets, lengths) of `rows`; rows may be given already flattened with their lengths."""
    if lengths is None:
        lengths = [len(r) for r in rows]
        rows = [t for r in rows for t in r]
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    return torch.tensor(rows, dtype=dtype), offsets_of(lengths_t), lengths_t


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    return offsets


def take(offsets: torch.Tensor, lengths: torch.Tensor, idx, *flats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows `idx` of one or more flat tensors sharing `offsets`: (offsets, lengths, *flats)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    bounds = [(int(offsets[i]), int(offsets[i + 1])) for i in idx.tolist()]
    sub_lengths = lengths[idx]
    out = [torch.cat([flat[a:b] for a, b in bounds]) if bounds else torch.zeros(0, dtype=flat.dtype) for flat in flats]
    return (offsets_of(sub_lengths), sub_lengths, *out)


def spans(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions starts[i] .. starts[i] + lengths[i] - 1 for every i, concatenated (a ragged gather's index)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths) + np.arange(total, dtype=np.int64)
