"""Seeded batch plans: an epoch's batches depend only on (seed, epoch), so a resumed run sees the
same batches as an uninterrupted one. Every task's training batches come from here."""

from __future__ import annotations

import torch

MEGABATCH = 50  # batches per length-sorted pool and per descending run, as in Hugging Face's group_by_length


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def shuffled_plan(n: int, batch_size: int, seed: int):
    """plan(epoch): a seeded shuffle split into batches; the same epoch always gives the same batches."""

    def plan(epoch: int) -> list[list[int]]:
        perm = torch.randperm(n, generator=epoch_generator(seed, epoch))
        return [perm[i : i + batch_size].tolist() for i in range(0, n, batch_size)]

    return plan


def batch_plan(lengths: torch.Tensor, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """A shuffled epoch; with group_by_length, batches of similar lengths played in descending runs.

    Pools of 50 batches are sorted by length, so padding is small. The batches are shuffled and
    cut into runs (at least four an epoch, as Hugging Face's group_by_length has at least four
    mega-batches); each run is played longest batch first, and the runs in the order of their
    longest batches. So the epoch's longest batch comes first (an out-of-memory shows at the
    first step), and each batch's buffers fit into memory an earlier, longer batch freed: in
    random order the C allocator keeps growing its heap (on the DistilBERT-size benchmark,
    ~300 MB more peak memory; benchmarks/RESULTS.md).
    """
    g = epoch_generator(seed, epoch)
    perm = torch.randperm(len(lengths), generator=g)
    if not group_by_length:
        return [perm[i : i + batch_size].tolist() for i in range(0, len(perm), batch_size)]
    pool = batch_size * MEGABATCH
    batches = []
    for start in range(0, len(perm), pool):
        chunk = perm[start : start + pool]
        chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        batches.extend(chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    longest = [int(lengths[b].max()) for b in batches]
    run = max(1, min(MEGABATCH, len(batches) // 4))
    runs = [sorted(range(s, min(s + run, len(batches))), key=lambda i: -longest[i]) for s in range(0, len(batches), run)]
    runs.sort(key=lambda r: -longest[r[0]])
    return [batches[i] for r in runs for i in r]
