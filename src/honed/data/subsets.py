"""Nested subsets of a training split for the learning curve: each contains the smaller ones."""

from __future__ import annotations

import math

import torch


def nested_fractions(labels: torch.Tensor, fractions: list[float], seed: int) -> list[torch.Tensor]:
    """Nested, stratified subsets: every class keeps its share, and each subset contains the smaller ones."""
    g = torch.Generator().manual_seed(seed + 17)
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in
                 (torch.nonzero(labels == c).flatten() for c in torch.unique(labels))]
    subsets = []
    for fraction in fractions:
        parts = [idx[: max(1, math.ceil(fraction * len(idx)))] for idx in per_class]
        subsets.append(torch.sort(torch.cat(parts)).values)
    return subsets


def nested_prefixes(n: int, fractions: list[float], seed: int) -> list[torch.Tensor]:
    """Nested subsets without classes to stratify by (regression targets, forecasting windows): prefixes of one seeded shuffle."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 17))
    return [torch.sort(order[: max(1, math.ceil(f * len(order)))]).values for f in fractions]
