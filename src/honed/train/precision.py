"""Precision and threads: bf16 autocast where the hardware does bf16 matrix work fast."""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache

import torch

from ..errors import RecipeError


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run several times faster than fp32 on such CPUs."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(requested: str, dev: torch.device | None = None) -> str:
    """'auto' → 'bf16' on bf16-capable GPUs and CPUs, 'fp32' otherwise."""
    dev = dev or device()
    if requested == "fp32":
        return "fp32"
    capable = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_fast_bf16()
    if requested == "bf16":
        if dev.type == "cpu" and not capable:
            # bf16 still works on such CPUs, only slowly; the user asked for it explicitly
            return "bf16"
        return "bf16"
    if requested == "auto":
        return "bf16" if capable else "fp32"
    raise RecipeError(f"train.precision: must be auto, bf16 or fp32; got {requested!r}")


def autocast(precision: str, dev: torch.device):
    """bf16 autocast keeps fp32 master weights; the optimizer always updates fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(requested) -> int:
    """One intra-op thread per physical core; more only adds contention on small CPUs."""
    if requested == "auto":
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    else:
        n = int(requested)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()
