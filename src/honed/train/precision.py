"""Precision and threads: bf16 autocast where the hardware does bf16 matrix work fast."""

from __future__ import annotations

import contextlib
import math
import os
import time
from functools import lru_cache

import torch

from ..errors import RecipeError
from .distributed import launched_world


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
    """The GPU when there is one (this process's own under torchrun / accelerate launch), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if launched_world() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda")


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


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_AUTO = {"on": False, "cores": 1, "share": None, "checked": 0.0, "first": True}
FIT_EVERY_S = 5.0  # how often a bf16 training loop looks at the machine again
BACKGROUND_CORES = 0.2  # other processes' use below this (daemons, monitoring) leaves every core to us


def set_threads(requested) -> int:
    """One intra-op thread per physical core; more only adds contention on small CPUs.

    With "auto", bf16 work on the CPU later fits the count to the cores other processes leave
    free (see fit_threads); fp32 keeps this count for the whole run, because the thread count
    changes the order of floating-point sums and fp32 runs are reproducible bit for bit.
    """
    if requested == "auto":
        # processes launched side by side on one machine share its cores
        n = max(1, _cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        _AUTO.update(on=True, cores=n, share=CpuShare(), checked=time.monotonic(), first=True)  # the first window starts now
    else:
        n = int(requested)
        _AUTO["on"] = False
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


class CpuShare:
    """Cores busy with other processes (and the hypervisor) since the last reading, from
    /proc/stat minus this process's own CPU time; None where /proc is not available."""

    def __init__(self):
        self.last = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as fh:
                values = [int(v) for v in fh.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
            with open("/proc/self/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            own = int(fields[11]) + int(fields[12])  # utime + stime of every thread, in the same clock ticks
        except (OSError, ValueError, IndexError):
            return None
        return sum(values), values[3] + values[4], own

    def others(self) -> float | None:
        now = self._read()
        before, self.last = self.last, now
        if now is None or before is None:
            return None
        total, idle, own = (a - b for a, b in zip(now, before))
        if total <= 0:
            return None
        cpus = os.cpu_count() or 1
        return max(0.0, (total - idle - own) / (total / cpus))


def fit_threads(precision: str, dev: torch.device | None = None, force: bool = False) -> int:
    """bf16 on the CPU with threads "auto": use the cores other processes leave free.

    On a shared machine a busy neighbour deschedules one of our OpenMP threads, and every
    parallel region then waits for it at the barrier: with 2 threads on 2 busy cores a
    DistilBERT step measured 3.9× slower than with 1, and a WordLlama step 14×. Looked at again
    every FIT_EVERY_S seconds (or when forced); a no-op for fp32, GPUs, and pinned thread counts.
    """
    if not _AUTO["on"] or precision != "bf16" or (dev is not None and dev.type != "cpu"):
        return torch.get_num_threads()
    n = _fit(force)
    _USED[n] = _USED.get(n, 0) + 1
    return n


def threads_used() -> dict[int, int]:
    """How often fit_threads settled on each thread count in this process (for metrics.json)."""
    return dict(_USED)


_USED: dict[int, int] = {}


def _fit(force: bool) -> int:
    now = time.monotonic()
    if _AUTO["first"]:  # the first look, over the window since set_threads (loading, tokenising)
        _AUTO["first"] = False
        if now - _AUTO["checked"] < 0.2:
            time.sleep(0.2)
        force = True
    if not force and now - _AUTO["checked"] < FIT_EVERY_S:
        return torch.get_num_threads()
    _AUTO["checked"] = now
    others = _AUTO["share"].others()
    if others is None:
        return torch.get_num_threads()
    # a core that is busy even a third of the time stalls every barrier that waits on it: round towards fewer threads
    wanted = max(1, min(_AUTO["cores"], _AUTO["cores"] - math.ceil(others - BACKGROUND_CORES)))
    if wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)
    return torch.get_num_threads()
