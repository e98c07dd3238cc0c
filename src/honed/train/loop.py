"""The training loop: explicit, one screen of logic, task-agnostic.

The task supplies batches (a deterministic plan of index lists per epoch, and a collate
function), a loss function and an evaluation function; the loop does AdamW with warm-up and
linear decay, accumulation, clipping, bf16 autocast, periodic evaluation with early stopping,
checkpoints and resume, and restores the best weights at the end.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import HonedError, TrainingInterrupted
from ..hooks import Hooks
from . import distributed
from .allocator import keep_freed_memory, return_freed_memory
from .checkpoint import Checkpointer, rng_state, set_rng_state
from .engines import Replicas
from .precision import fit_threads
from .sharded import Sharded, load_plain_optimizer, load_shards, plain_optimizer_by_name, save_shards


@dataclass
class LoopConfig:
    stage: str
    epochs: int
    lr: float
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float | None = 1.0
    grad_accumulation: int = 1
    eval_every: int = 50
    max_steps: int | None = None  # stop after this many optimizer steps, even mid-epoch
    patience: int | None = 3
    precision: str = "fp32"
    primary: str = "accuracy"  # key of the evaluation dict; higher is better
    tie_break: str | None = None  # a metric whose lower value decides between evaluations with the same primary (e.g. loss)
    checkpoint_evaluations: bool = True  # False: only the end-of-stage state is saved (cheap stages)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: distributed.Group | None = None  # the processes sharing each batch (torchrun / accelerate launch)
    memory_first: bool = False  # gradient checkpointing or FSDP: return freed memory at once rather than keep it for speed
    own_mapping_from: int | None = None  # keep only freed blocks below this many bytes (train/allocator.py; language models)


@dataclass
class Batches:
    """plan(epoch) → list of index lists (deterministic per epoch); collate(indices) → tensors."""

    size: int
    plan: Callable[[int], list[list[int]]]
    collate: Callable[[list[int]], dict]
    # how much of a batch's mean loss some of its rows carry (default: how many they are); a loss that
    # averages over tokens gives their token counts, so N processes' shares add up to one process's batch
    weight: Callable[[list[int]], float] | None = None


@dataclass
class Outcome:
    history: list[dict]
    best_step: int | None
    best_metric: float | None
    steps: int
    train_seconds: float
    samples_seen: int
    stopped_early: bool
    shards: dict | None = None  # FSDP: each process's local parameter and optimizer-state sizes (Sharded.shard_counts)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def snapshot_trainable(model: nn.Module, into: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """trainable_state, written into `into`'s tensors when it has them: no second copy alive at once."""
    if into is None or into.keys() != {n for n, p in model.named_parameters() if p.requires_grad}:
        return trainable_state(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                into[name].copy_(p.detach())
    return into


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def load_trainable_file(model: nn.Module, path) -> None:
    """load_trainable from a safetensors file, one tensor at a time (no second copy of the weights)."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt") as fh, torch.no_grad():
        for name in fh.keys():
            params[name].copy_(fh.get_tensor(name))


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers saved with the model (running statistics, counters), by name."""
    saved = set(model.state_dict())
    return {n: b.detach() for n, b in model.named_buffers() if n in saved}


def load_buffers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in state.items():
            buffers[name].copy_(value)


def make_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    """AdamW; no decay on biases and norms (1-D tensors); fused where the build supports it."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    allocate_state(optimizer)
    return optimizer


def allocate_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state now, before the first batch, instead of at its first step.

    AdamW allocates its moments (twice the trainable weights) lazily, at the first step, in the
    heap holes the first batch's activations just left; there they split the free memory that
    later batches need, and the heap grows around them. A step at learning rate 0 with zero
    gradients allocates them first and changes nothing: the weights stay bit-for-bit, the
    moments stay zero, and the step count is reset.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
        else:
            state["step"] = 0
    optimizer.zero_grad(set_to_none=True)


def improves(value: float, tie: float | None, best: float | None, best_tie: float | None) -> bool:
    """A higher primary metric, or the same one with a lower tie-break metric (an accuracy that saturates at 1.0
    keeps improving in its loss)."""
    if best is None or value > best:
        return True
    return value == best and tie is not None and best_tie is not None and tie < best_tie


def planned_steps(per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of a stage: every epoch's, or max_steps when that comes first."""
    return per_epoch * epochs if max_steps is None else min(per_epoch * epochs, max_steps)


def linear_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextmanager
def interrupt_flag():
    """Ctrl-C / SIGTERM set a flag; the loop checkpoints at the next step and stops cleanly."""
    flag = {"set": False}

    def handler(signum, frame):
        flag["set"] = True

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(
    model: nn.Module,
    batches: Batches,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    evaluate: Callable[[nn.Module], dict],
    cfg: LoopConfig,
    checkpointer: Checkpointer | None = None,
    progress=None,
    regulariser: Callable[[nn.Module], torch.Tensor] | None = None,
    on_evaluation: Callable[[list[dict]], None] | None = None,
    hooks: Hooks | None = None,
) -> Outcome:
    """Train `model` in place and leave it holding the best weights seen at an evaluation.

    In a distributed run (cfg.group) the model trains on the group's engine (DDP, or FSDP2 on a
    sharded twin: train/sharded.py); afterwards rank 0's `model` holds the trained weights.
    """
    hooks = hooks or Hooks()
    if hooks.on_train_start is not None:  # before the optimizer's state exists, as Trainer's figure is read
        hooks.on_train_start(cfg.stage)
    group = cfg.group
    sharded = group is not None and group.engine == "fsdp"
    s = {"epoch": 0, "batch": 0, "step": 0, "best_metric": None, "best_tie": None, "best_step": None, "bad_evals": 0,
         "history": [], "loss_sum": 0.0, "loss_count": 0, "samples": 0, "interval_samples": 0,
         "train_seconds": 0.0, "stopped_early": False, "done": False}
    best: dict[str, torch.Tensor] | None = None
    # the best step's persistent buffers (batch norms' running statistics): the best weights need the
    # statistics they were evaluated with, not the last step's (small: kept in memory and in every checkpoint)
    best_buffers: dict[str, torch.Tensor] | None = None if sharded else {}
    ckpt_name = f"{cfg.stage}"
    # with a checkpoint at every evaluation the best weights live in the checkpoints, not in memory:
    # a copy of every trainable weight is the largest thing honed would otherwise add to training.
    # (FSDP keeps them in memory: a process's share of them is 1/N, and its checkpoints are shards)
    best_on_disk = checkpointer is not None and cfg.checkpoint_evaluations and not sharded
    resume = checkpointer is not None and checkpointer.exists(ckpt_name)
    from_shards = resume and checkpointer.is_sharded(ckpt_name)
    plain_best = optimizer_by_name = None
    if resume:
        tensors, saved, objects = checkpointer.load(ckpt_name, ("weights", "buffers", "best_buffers") if best_on_disk else None)
        if not from_shards:  # into the plain model, before an FSDP engine shards it
            load_trainable(model, tensors["weights"])
            load_buffers(model, tensors.get("buffers", {}))
            if best_buffers is not None:
                best_buffers.update(tensors.get("best_buffers", {}))
            best = tensors.get("best")
            if sharded:
                plain_best = best if best is not None else tensors["weights"] if saved["best_step"] is not None else None
                # a process without the weights (built on the meta device) takes rank 0's optimizer state in Sharded
                weightless = any(p.is_meta for p in model.parameters())
                optimizer_by_name = {} if weightless else plain_optimizer_by_name(model, objects["optimizer"], lambda m: make_optimizer(m, cfg))
                best = None
        del tensors

    if cfg.memory_first:  # before sharding: the full tensors it frees and the collectives' buffers go back to the system
        return_freed_memory(cfg.device)
    engine = (Sharded if sharded else Replicas)(model, loss_fn, regulariser, cfg.precision, cfg.device, group)
    work = engine.module  # what trains and evaluates: the model itself, or its sharded twin
    optimizer = make_optimizer(work, cfg)
    per_epoch = math.ceil(len(batches.plan(0)) / cfg.grad_accumulation)
    total = planned_steps(per_epoch, cfg.epochs, cfg.max_steps)
    scheduler = linear_schedule(optimizer, int(cfg.warmup_ratio * total), total)
    if resume:
        if from_shards:
            best = load_shards(work, optimizer, checkpointer.shards(ckpt_name), lambda: trainable_state(work))
        elif sharded:
            load_plain_optimizer(work, optimizer, optimizer_by_name, engine.from_rank0)
            best = engine.shard_like(plain_best) if plain_best is not None else None
            optimizer_by_name = plain_best = None
        else:
            optimizer.load_state_dict(objects["optimizer"])
        scheduler.load_state_dict(objects["scheduler"])
        rng = objects["rng"]  # one state per process in a distributed run, whatever world size wrote it
        set_rng_state(rng[(group.rank if group else 0) % len(rng)] if isinstance(rng, list) else rng)
        s.update(saved)
    resumed_done = s["done"]
    trainable = [p for p in work.parameters() if p.requires_grad]

    def best_file():
        """The best weights on disk: the latest checkpoint's best file, or its weights when it was saved at the best step."""
        found = checkpointer.group_file(ckpt_name, "best") or checkpointer.group_file(ckpt_name, "weights")
        if found is None:
            raise HonedError(f"checkpoint: the best weights (step {s['best_step']}) are missing from {checkpointer.root}; "
                             "another process may be writing to the same run directory; start the run again with --overwrite")
        return found

    def save_checkpoint() -> None:
        if checkpointer is None:
            return
        # every process's random state (dropout masks differ per process); collective, so all call it
        rng = distributed.gather(rng_state(), group) if group is not None else rng_state()
        if sharded:
            checkpointer.save_sharded(ckpt_name, s["step"], lambda folder: save_shards(work, optimizer, best, folder), s,
                                      {"scheduler": scheduler.state_dict(), "rng": rng}, group)
            return
        if not distributed.is_main():
            return
        # the live weights: the checkpointer writes them out as they are, no copy needed
        tensors = {"weights": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}}
        buffers = persistent_buffers(model)
        if buffers:  # batch norms' running statistics change while training: a resumed run must start from them too
            tensors["buffers"] = buffers
        if best_buffers:
            tensors["best_buffers"] = best_buffers
        carry = {}
        if best is not None:  # in memory: kept so, or read from a sharded checkpoint
            tensors["best"] = best
        elif best_on_disk and s["best_step"] is not None and s["best_step"] != s["step"]:
            carry["best"] = best_file()
        objects = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}
        checkpointer.save(ckpt_name, s["step"], tensors, s, objects, carry)

    if not resumed_done:
        best = _run(s, best, work, engine, batches, evaluate, cfg, optimizer, scheduler, trainable, total, best_on_disk,
                    save_checkpoint, progress, on_evaluation, hooks, best_buffers)
    if best is not None:
        load_trainable(work, best)
    elif best_on_disk and not resumed_done and s["best_step"] not in (None, s["step"]) and distributed.is_main():
        # (the other processes of a distributed run return their copy unused: rank 0 reports)
        load_trainable_file(model, best_file())
    if best_buffers and not resumed_done:
        load_buffers(work, best_buffers)
    if not resumed_done:
        s["done"] = True
        save_checkpoint()
    shards = engine.shard_counts(optimizer)
    engine.finish()
    return _outcome(s, shards)


def _run(s: dict, best, work: nn.Module, engine, batches: Batches, evaluate, cfg: LoopConfig, optimizer, scheduler,
         trainable: list, total: int, best_on_disk: bool, save_checkpoint, progress, on_evaluation, hooks: Hooks,
         best_buffers: dict | None = None):
    """The epochs: steps, evaluations, checkpoints; returns the in-memory best weights (None when on disk).
    best_buffers (a dict, None under FSDP) is refilled with the persistent buffers at each new best step."""
    group = cfg.group
    if progress is not None:
        progress.start(cfg.stage, total, s["step"])
    work.train()
    interval_start = time.perf_counter()
    step_loss = 0.0  # this process's share-weighted loss since the last optimizer step
    with interrupt_flag() as interrupted, keep_freed_memory(
            cfg.device, return_at_once=cfg.memory_first, own_mapping_from=cfg.own_mapping_from):
        while s["epoch"] < cfg.epochs and not s["stopped_early"] and s["step"] < total:
            plan = batches.plan(s["epoch"])
            while s["batch"] < len(plan):
                threads = fit_threads(cfg.precision, cfg.device)
                if hooks.on_threads is not None:
                    hooks.on_threads(threads)
                indices = plan[s["batch"]]
                mine = distributed.shard(indices, group)
                # each process weighs its loss by its share of the batch (× N: the engines average over the N
                # processes), so the summed gradients are the batch mean's
                share = len(mine) / len(indices) if batches.weight is None else batches.weight(mine) / max(batches.weight(indices), 1e-12)
                if hooks.on_collate is not None and mine:
                    hooks.on_collate()
                # an empty share still runs forward and backward, on one row with weight 0: the engines'
                # collectives need every process
                rows = mine or indices[:1]
                batch = {k: v.to(cfg.device) if isinstance(v, torch.Tensor) else v for k, v in batches.collate(rows).items()}
                boundary = (s["batch"] + 1) % cfg.grad_accumulation == 0 or s["batch"] + 1 >= len(plan)
                loss = engine.backward(batch, share * engine.world / cfg.grad_accumulation, sync=boundary)
                if mine:
                    step_loss += loss * share
                del batch
                s["loss_count"] += 1
                s["samples"] += len(indices)
                s["interval_samples"] += len(indices)
                s["batch"] += 1
                if not boundary:
                    continue
                stop = interrupted["set"]
                if group is not None:
                    # every process stops on the all-reduced flag alone: a signal landing after the all-reduce on one
                    # process only is acted on at the next step, by all of them together
                    step_loss, flag = distributed.sum_scalars([step_loss, float(interrupted["set"])], group)
                    stop = flag > 0
                s["loss_sum"] += step_loss
                step_loss = 0.0
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                s["step"] += 1
                if hooks.on_step is not None:
                    hooks.on_step(s["step"])
                last = s["step"] >= total
                if progress is not None:
                    progress.step(s["step"], s["loss_sum"] / max(1, s["loss_count"]))
                if s["step"] % cfg.eval_every == 0 or last:
                    elapsed = time.perf_counter() - interval_start
                    s["train_seconds"] += elapsed
                    record = {"stage": cfg.stage, "step": s["step"], "epoch": round(s["epoch"] + s["batch"] / len(plan), 3),
                              "train_loss": s["loss_sum"] / max(1, s["loss_count"]), "lr": scheduler.get_last_lr()[0],
                              "samples_per_s": s["interval_samples"] / max(elapsed, 1e-9)}
                    # every process takes the same best-weights and stopping decisions: rank 0's metrics
                    evaluation_started = time.perf_counter()
                    metrics = engine.evaluate(evaluate)
                    if hooks.on_evaluated is not None:
                        hooks.on_evaluated(evaluation_started, metrics)
                    work.train()
                    record.update(metrics)
                    s["loss_sum"], s["loss_count"], s["interval_samples"] = 0.0, 0, 0
                    value = metrics[f"val_{cfg.primary}"]
                    tie = metrics.get(f"val_{cfg.tie_break}") if cfg.tie_break else None
                    if improves(value, tie, s.get("best_metric"), s.get("best_tie")):
                        s["best_metric"], s["best_tie"], s["best_step"], s["bad_evals"] = value, tie, s["step"], 0
                        # on disk, the checkpoint written below holds them; in memory, a snapshot
                        best = None if best_on_disk else snapshot_trainable(work, best)
                        if best_buffers is not None:
                            best_buffers.clear()
                            best_buffers.update({n: b.detach().clone() for n, b in persistent_buffers(work).items()})
                    else:
                        s["bad_evals"] += 1
                        if cfg.patience is not None and s["bad_evals"] >= cfg.patience:
                            s["stopped_early"] = True
                    s["history"].append(record)
                    if on_evaluation is not None and distributed.is_main():
                        on_evaluation(s["history"])
                    if progress is not None:
                        progress.evaluation(record, cfg.primary)
                    if cfg.checkpoint_evaluations:
                        save_checkpoint()
                    interval_start = time.perf_counter()
                if stop:
                    s["train_seconds"] += time.perf_counter() - interval_start
                    save_checkpoint()
                    raise TrainingInterrupted("training interrupted; a checkpoint was saved")
                if s["stopped_early"] or last:
                    break
            if not s["stopped_early"]:
                s["epoch"] += 1
                s["batch"] = 0
    if progress is not None:
        progress.finish()
    return best


def _outcome(s: dict, shards: dict | None = None) -> Outcome:
    return Outcome(history=s["history"], best_step=s["best_step"], best_metric=s["best_metric"], steps=s["step"],
                   train_seconds=s["train_seconds"], samples_seen=s["samples"], stopped_early=s["stopped_early"], shards=shards)
