"""Ragged token storage: the rows of a split stored flat with offsets, so a batch is built with a
few tensor copies and a subset with one concatenation. Text classification and chat share it."""

from __future__ import annotations

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
