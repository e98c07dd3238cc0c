"""Data-parallel training over processes started by `torchrun` or `accelerate launch`.

Both launchers set WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous address; honed joins the
process group they describe (NCCL on GPUs, gloo on CPUs). The recipe's `train.batch_size` is
the *global* batch: every process takes its share of each planned batch, and the gradients are
averaged with weights proportional to each share, so N processes compute the same update as one
process with the same batch (up to the order of floating-point sums). Only rank 0 writes files
and prints; evaluation runs on rank 0 and its result is broadcast, so every process takes the
same early-stopping and best-weights decisions.

The gradient average is an explicit all-reduce after the backward pass (what PyTorch's DDP does,
without overlapping communication with the backward pass): the model is never wrapped, so the
task's loss functions see the same module in one process or many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import RecipeError


@dataclass
class Group:
    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world() -> int:
    """How many processes the launcher started (1 when honed runs on its own)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


# Accelerate config files that ask for sharded training set these; honed replicates the model
SHARDED = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def join() -> Group | None:
    """Join the launcher's process group; None when there is only one process."""
    for variable, name in SHARDED.items():
        if os.environ.get(variable, "").lower() in ("1", "true"):
            raise RecipeError(f"accelerate launch: {name} was requested by the Accelerate config, but honed trains data-parallel "
                              "with a full copy of the model in each process; use `accelerate launch --multi_gpu` or torchrun, "
                              "and method: lora or freeze when the model does not fit one device")
    if launched_world() <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))))


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True in a single process, and in rank 0 of a distributed run: the one that writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shard(indices: list[int], group: Group | None) -> list[int]:
    """This process's share of one planned batch (a strided slice, so shares differ by at most one)."""
    return indices if group is None else indices[group.rank :: group.world]


def average_gradients(params: list[torch.nn.Parameter], loss_sum: float, interrupted: bool, group: Group) -> tuple[float, bool]:
    """All-reduce the (already share-weighted) gradients in one flat buffer.

    The running loss and the interrupt flag ride along in the same buffer, so every process logs
    the global loss and stops at the same step when any of them was asked to stop.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    # which parameters got a gradient anywhere: one no process used keeps grad None, as in one process
    present = [float(p.grad is not None) for p in params]
    extra = torch.tensor(present + [loss_sum, float(interrupted)], device=params[0].device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [extra])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n
    tail = flat[offset:].tolist()  # one read of the small tail, not a tensor comparison per parameter
    for p, anywhere in zip(params, tail):
        if anywhere == 0:
            p.grad = None
    return tail[len(params)], tail[len(params) + 1] > 0


def broadcast(value, group: Group | None):
    """rank 0's value, on every process."""
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value, group: Group | None) -> list:
    """Every process's value, in rank order (on every process)."""
    if group is None:
        return [value]
    out = [None] * group.world
    dist.all_gather_object(out, value)
    return out


def barrier(group: Group | None) -> None:
    if group is not None:
        dist.barrier()
