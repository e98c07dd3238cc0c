"""The engines the training loop steps through: one process, DDP (here) and FSDP2 (sharded.py).

See train/distributed.py for how the engine is chosen and what stays equal between them.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from .distributed import Group, broadcast, is_main
from .precision import autocast


class LossModule(nn.Module):
    """forward(batch) = loss_fn(model, batch) (+ regulariser(model)), under the run's autocast.

    The engines wrap this module, not the model: the task's loss functions receive the plain
    model (its submodules and hooks as in one process), and the engine still sees every
    parameter the loss used.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, regulariser: Callable | None, precision: str, device):
        super().__init__()
        self.model = model
        self.loss_fn, self.regulariser, self.precision, self.device = loss_fn, regulariser, precision, device

    def forward(self, batch: dict) -> torch.Tensor:
        with autocast(self.precision, self.device):
            loss = self.loss_fn(self.model, batch)
            if self.regulariser is not None:
                loss = loss + self.regulariser(self.model)
        return loss


class Replicas:
    """One process, or DDP: the engine the loop steps through (train/sharded.py has FSDP's).

    module: what trains and evaluates (the plain model here); backward(batch, weight, sync):
    one share's forward and backward, the gradient average skipped on accumulation micro-batches
    (sync False);
    evaluate(fn): the evaluation's metrics on every process; finish(): the plain model holds
    the trained weights again (on rank 0 at least).
    """

    sharded = False

    def __init__(self, model: nn.Module, loss_fn: Callable, regulariser: Callable | None, precision: str, device,
                 group: Group | None):
        self.module, self.group = model, group
        self.loss = LossModule(model, loss_fn, regulariser, precision, device)
        self.ddp = None
        if group is not None:
            # find_unused_parameters: a parameter the batch did not reach (a task-specific head branch,
            # a frozen-but-trainable layer) is marked ready instead of stalling the reduction; one no
            # process used keeps grad None, as in one process
            self.ddp = nn.parallel.DistributedDataParallel(
                self.loss, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    @property
    def world(self) -> int:
        return 1 if self.group is None else self.group.world

    def backward(self, batch: dict, weight: float, sync: bool) -> float:
        """Forward and backward of this process's share with its weight; returns the unweighted loss."""
        engine = self.loss if self.ddp is None else self.ddp
        # DDP decides at forward time whether the backward all-reduces: no_sync covers both
        with nullcontext() if sync or self.ddp is None else self.ddp.no_sync():
            loss = engine(batch)
            (loss * weight).backward()
        return float(loss.detach())

    def evaluate(self, fn: Callable[[nn.Module], dict]) -> dict:
        return broadcast(fn(self.module) if is_main() else None, self.group)

    def shard_counts(self, optimizer) -> dict | None:
        """Only FSDP has shards to count (Sharded.shard_counts)."""
        return None

    def finish(self) -> None:
        self.ddp = None  # drops DDP's hooks on the parameters: later fine-tunes of this model run alone
