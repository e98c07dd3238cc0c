"""The C heap under CPU training: keep freed tensor memory for the next step, give it back after.

PyTorch allocates CPU tensors with glibc's malloc. glibc serves blocks above its mmap
threshold (up to 32 MB, and always for bigger ones, such as a 30k-token embedding's gradient)
with a fresh mmap and unmaps them on free, so every training step faults the same memory in
again, page by page, and zeroes it. Keeping those blocks in the heap while a loop trains makes
CPU steps ~7 % faster and halves their page faults (benchmarks/RESULTS.md); the heap is handed
back when the loop ends. A no-op where glibc is not the allocator, and on GPUs (their tensors
are not malloc's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager
from functools import lru_cache

import torch

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc's default mmap threshold; setting it (at all) turns off the dynamic threshold for the process
DEFAULT_MMAP_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DYNAMIC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # where glibc's dynamic threshold settles after large frees
# Language-model steps: blocks from here up get their own mapping, smaller ones stay in the heap (below)
LANGUAGE_MODEL_OWN_MAPPING_FROM = 4 * 1024 * 1024
KEEP_UP_TO = 1 << 30  # free memory at the heap's top beyond this is still returned during training


@lru_cache(maxsize=1)
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim")):
        return None
    return libc


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim).

    Set-up runs the model over every split to cache features; glibc keeps the freed activation
    buffers mapped, so without this they stay in the process's resident memory under the
    training that follows.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def return_freed_memory(device: torch.device) -> None:
    """From now on every CPU block over 128 KB is its own mmap, handed back to the system when freed
    (the threshold fixed at glibc's default: no longer raised by the first large free). Set as soon
    as a run knows it checkpoints, before its data and evaluations leave large free chunks in the heap
    that later buffers would reuse and keep resident."""
    libc = _glibc()
    if libc is not None and device.type == "cpu":
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)


@contextmanager
def mapped_while_loading():
    """While the block runs, every CPU block over 128 KB gets its own mapping, unmapped when freed.

    A quantised load reads each full-precision weight into a buffer, quantises it and frees it; with
    glibc's dynamic threshold (raised to the size of the first large buffer freed) the later buffers
    came from the heap and left holes there that the small quantised tensors split: loading a 1.1B
    Llama in 4-bit left 435 MB free in the heap, resident, and peaked 383 MB higher (1,973 against
    1,590 MB with this; /proc/self/status and mallinfo2 after the load). The threshold is left where
    the dynamic one settles (32 MB) afterwards."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, DYNAMIC_MMAP_THRESHOLD_MAX)


@contextmanager
def keep_freed_memory(device: torch.device, return_at_once: bool = False, own_mapping_from: int | None = None):
    """While the block runs, freed CPU tensors stay in the C heap for reuse instead of being unmapped.

    own_mapping_from (bytes; language-model steps) keeps only the smaller blocks: larger ones get
    their own mapping, unmapped when freed. glibc 2.36 serves PyTorch's 64-byte-aligned requests
    with a padded chunk, so a freed activation buffer is slightly too small for the next request
    of the same size, and small allocations split the holes further: over three LoRA steps of a
    125M Llama at 4 x 512 tokens the heap grew 2.7-3.7 GB for 1.3 GB of live tensors, and 1.6-1.7
    GB with blocks from 4 MB up on their own mappings, at 8-10 % more step time (the pages faulted
    in again each step; benchmarks/heap_growth.py, figures in benchmarks/RESULTS.md).

    return_at_once (gradient checkpointing, where memory comes before speed) does the opposite:
    every block over 128 KB gets its own mmap and goes back to the system when freed. glibc's
    dynamic threshold otherwise rises to 32 MB after the first large free, and the blocks that
    the backward recomputes one at a time then pile up in the heap: one forward and backward of a
    checkpointed 125M Llama (LoRA, 4 x 256 tokens) grew RSS by 1,003 MB with the dynamic threshold
    and by 220 MB with it fixed (autograd itself saves 36 MB)."""
    libc = _glibc()
    if libc is None or device.type != "cpu":
        yield
        return
    if return_at_once:
        return_freed_memory(device)
        try:
            yield
        finally:
            libc.malloc_trim(0)
        return
    if own_mapping_from is None:
        libc.mallopt(M_MMAP_MAX, 0)
    else:
        libc.mallopt(M_MMAP_THRESHOLD, own_mapping_from)
    libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        if own_mapping_from is not None:  # setting it fixed the threshold: leave it where the dynamic one settles
            libc.mallopt(M_MMAP_THRESHOLD, DYNAMIC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)
