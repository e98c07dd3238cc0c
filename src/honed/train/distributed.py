"""Training over processes started by `torchrun` or `accelerate launch`: PyTorch DDP or FSDP2.

Both launchers set WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous address; honed joins the
process group they describe (NCCL on GPUs, gloo on CPUs) and trains on one of PyTorch's own
engines, chosen by `train.distributed`:

- `ddp`: every process holds the whole model; `torch.nn.parallel.DistributedDataParallel`
  averages the gradients during the backward pass (`no_sync` on accumulation micro-batches).
  DDP wraps a small module whose forward calls the task's loss on the plain model
  (`LossModule` in train/engines.py), so the task's loss functions see the same module in one process or many.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each transformer block and then the
  root (train/sharded.py): each process holds 1/N of the parameters, gradients and optimizer
  state; bf16 through `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`,
  `train.offload: true` through `CPUOffloadPolicy`. When the run asks for fsdp before the model
  loads (`fsdp`, an Accelerate FSDP config, `offload`), only rank 0 reads the pre-trained weights;
  the others build the model on the meta device and get their shards from rank 0 (models/meta_load.py).
- `auto`: fsdp when one device cannot hold the weights, gradients and optimizer state (the
  memory estimate against the device's free memory), ddp otherwise. An Accelerate config that
  asks for FSDP (ACCELERATE_USE_FSDP) picks fsdp; DeepSpeed is refused.

On either engine `train.batch_size` is the *global* batch: every process takes a strided share
of each planned batch and weighs its loss by share × N (the engines average over N), so N
processes compute the update of one process on the same batch up to the order of floating-point
sums. A process whose share of a batch is empty still runs forward and backward on one row with
weight 0 (the engines' collectives need every process); a parameter no process used keeps
grad None, as in one process. The running loss and the interrupt flag travel in one small
all-reduce per step, so a SIGTERM stops every process at the same step.

Measured tolerances (fp32, no dropout; tests/test_distributed.py, tests/test_fsdp.py): 2 DDP
processes match 1 process within 1e-3 on the weights and 1e-4 on the losses; 2 FSDP processes
match 1 process within 1e-4 on the weights (the reduce-scatter sums in another order). A killed
run resumes bit-for-bit at the same world size.

Only rank 0 writes files and prints. Under DDP rank 0 evaluates and broadcasts its metrics;
under FSDP every process runs the evaluation forward (it is made of collectives) and rank 0's
metrics are broadcast, so every process takes the same early-stopping and best-weights
decisions. Checkpoint layout (RUN_DIR/checkpoints/<stage>-<step>-<ns>/, train/checkpoint.py):
one process and DDP write `weights.safetensors` (+ `best`, `buffers`) from rank 0; FSDP writes
`sharded/` through `torch.distributed.checkpoint`, each process its own `__<rank>_0.distcp`
file plus rank 0's `.metadata`; both hold `state.pt` (optimizer for the plain layout,
scheduler, every process's RNG) and `state.json` (loop position). Either layout resumes at
another world size (DCP reshards on load; a sharded checkpoint loads into the unsharded model of
one process, a plain one is sharded on load).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import RecipeError

ENGINES = ("ddp", "fsdp")


@dataclass
class Group:
    rank: int
    world: int
    local_rank: int
    local_world: int
    engine: str = "ddp"  # ddp | fsdp, resolved from train.distributed by choose_engine
    offload: bool = False  # fsdp: parameters, gradients and optimizer state in CPU memory between uses

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world() -> int:
    """How many processes the launcher started (1 when honed runs on its own)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


# Accelerate config files that ask for sharded training set these
SHARDED = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "").lower() in ("1", "true")


def accelerate_asks_fsdp() -> bool:
    """True when an Accelerate config asked for FSDP (honed maps it to train.distributed: fsdp)."""
    return _flag("ACCELERATE_USE_FSDP")


def join() -> Group | None:
    """Join the launcher's process group; None when there is only one process."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise RecipeError("accelerate launch: DeepSpeed was requested by the Accelerate config, but honed trains on PyTorch's "
                          "DDP and FSDP2; use an Accelerate config with FSDP, or torchrun with train.distributed: fsdp")
    if launched_world() <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))))


def check_launch(setting: str, offload: bool, group: Group | None) -> None:
    """Refuse `train.distributed: ddp | fsdp` or `train.offload: true` in a process honed started alone."""
    if group is not None:
        return
    if setting in ENGINES:
        raise RecipeError(f"train.distributed: {setting} needs several processes, but honed was started as one; launch it with "
                          "`torchrun --nproc_per_node N -m honed run RECIPE` (or accelerate launch), or set train.distributed: auto")
    if offload:
        raise RecipeError("train.offload: true applies to FSDP, but honed was started as one process; launch it with "
                          "`torchrun --nproc_per_node N -m honed run RECIPE -s train.distributed=fsdp`, or set train.offload: false")


def choose_engine(setting: str, offload: bool, group: Group | None, needed_mb: float, available_mb: float) -> None:
    """Resolve `train.distributed` (auto | ddp | fsdp) onto the group, or refuse a combination that cannot run.

    needed_mb: weights + gradients + optimizer state of the whole model; available_mb: what one
    device has free. Both are only read for `auto`.
    """
    check_launch(setting, offload, group)
    if group is None:
        return
    fsdp_env = accelerate_asks_fsdp()
    if setting == "ddp" and fsdp_env:
        raise RecipeError("train.distributed: ddp, but the Accelerate config asks for FSDP (ACCELERATE_USE_FSDP); "
                          "set train.distributed: fsdp or auto, or launch with an Accelerate config without FSDP")
    if setting == "auto":
        setting = "fsdp" if fsdp_env or offload or needed_mb > available_mb else "ddp"
    if offload and setting != "fsdp":
        raise RecipeError("train.offload: true applies to FSDP, but train.distributed is ddp; "
                          "set train.distributed: fsdp (or auto), or train.offload: false")
    group.engine, group.offload = setting, offload


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True in a single process, and in rank 0 of a distributed run: the one that writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shard(indices: list[int], group: Group | None) -> list[int]:
    """This process's share of one planned batch (a strided slice, so shares differ by at most one)."""
    return indices if group is None else indices[group.rank :: group.world]


def sum_scalars(values: list[float], group: Group | None) -> list[float]:
    """One all-reduce (sum) of a few numbers: the step's loss and the interrupt flag travel together."""
    if group is None:
        return values
    flat = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(flat)
    return flat.tolist()


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
