"""FSDP2: each process holds 1/N of the parameters, gradients and optimizer state.

`Sharded` is the engine the loop steps through under `train.distributed: fsdp` (see
train/distributed.py for the choice and the tolerances). It shards a *twin* of the model, not
the model itself:

- the twin is a deep copy of the module tree whose every parameter and buffer is the model's
  own tensor (no copy of the weights is made), so `fully_shard` on each transformer block and
  then on the twin's root reads the full weights once and keeps this process's chunk;
- the model's parameters then give their storage back (each becomes an empty tensor of its
  dtype): while training, a process holds its shards only, not a second full copy;
- at the end, `get_model_state_dict(full_state_dict=True, cpu_offload=True)` gathers the full
  weights on rank 0, which puts them back into the model's own Parameter objects (tied weights
  stay tied, a peft wrapper keeps its layers), so the rest of the run (guards, test, the
  `save_pretrained` of model/) sees the plain module it passed in. The other processes get
  uninitialised tensors of the right shapes: they only run the method's export and return.

Processes other than rank 0 of a run that shards from the start built the model on the meta
device (models/meta_load.py: only rank 0 read the weights). After sharding, `fill_from_rank0`
gives them storage for their shards only and fills it from rank 0's model (set_model_state_dict
with broadcast_from_rank0; the buffers outside the state dict, such as rotary `inv_freq`, by
broadcast), adapters added before sharding included; a plain checkpoint's optimizer state
resumed into them comes from rank 0 the same way.

The caller's module keeps its identity and class throughout (fully_shard changes the class of
the modules it shards: only the twin's). Checkpoints go through torch.distributed.checkpoint:
`save_shards` (each process writes its own file; train/checkpoint.py commits the folder) and
`load_shards`, which loads into the twin at any world size, or into the plain model of one
process (DCP reshards on load).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     get_state_dict, set_model_state_dict, set_optimizer_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import RecipeError
from .distributed import Group, broadcast, gather
from .engines import LossModule

# checkpoints hold the trainable tensors only: a LoRA run's frozen base is the recipe's model, as loaded
CHECKPOINT_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def block_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of repeated blocks: the ModuleList of at least two modules of one class holding
    the most parameters (Llama's model.model.layers, BERT's encoder.layer; inside a peft wrapper too)."""
    found, most = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > most:
                found, most = module, size
    return found


def twin(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree over the same parameter and buffer tensors (no weights copied)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def local_numel(tensor: torch.Tensor) -> int:
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


class Sharded:
    """FSDP2 over the group's processes; the same interface as engines.Replicas."""

    sharded = True

    def __init__(self, model: nn.Module, loss_fn: Callable, regulariser: Callable | None, precision: str, device,
                 group: Group):
        self.plain, self.group, self.device = model, group, device
        # processes that built the model on the meta device (models/meta_load.py) get their shards from rank 0
        self.from_rank0 = any(gather(any(p.is_meta for p in model.parameters()), group))
        if self.from_rank0:
            check_same_layout(model, group)
        work = twin(model)
        mixed = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
                 else MixedPrecisionPolicy())
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if group.offload else OffloadPolicy()
        blocks = block_list(work)
        # one unit per block: a block's full weights exist only while it runs; the rest (embeddings, norm, head) is the root's
        for block in blocks if blocks is not None else []:
            fully_shard(block, mp_policy=mixed, offload_policy=offload)
        fully_shard(work, mp_policy=mixed, offload_policy=offload)
        if self.from_rank0:
            fill_from_rank0(work, model, device, group)
        self.blocks = 0 if blocks is None else len(blocks)
        self.layout = {name: (p.shape, p.dtype, p.device) for name, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():  # the twin holds this process's shards now; the full weights can go
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.module = work
        self.loss = LossModule(work, loss_fn, regulariser, precision, device)

    @property
    def world(self) -> int:
        return self.group.world

    def backward(self, batch: dict, weight: float, sync: bool) -> float:
        """Forward and backward of this process's share with its weight; returns the unweighted loss."""
        # accumulation micro-batches keep their gradients unreduced until the step's last one
        self.module.set_requires_gradient_sync(sync)
        loss = self.loss(batch)
        (loss * weight).backward()
        return float(loss.detach())

    def evaluate(self, fn: Callable[[nn.Module], dict]) -> dict:
        # every process runs the forward (each block all-gathers its weights); rank 0's figures decide
        metrics = fn(self.module)
        # the root keeps its weights gathered after a forward without backward: shard them again, so that
        # the parameters read next (best weights, checkpoints) are this process's shards
        for module in self.module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        return broadcast(metrics, self.group)

    def shard_counts(self, optimizer: torch.optim.Optimizer) -> dict:
        """Each process's local numbers of parameter and optimizer-state elements, next to the totals."""
        params = list(self.module.parameters())
        mine = {"params": sum(local_numel(p) for p in params),
                "trainable": sum(local_numel(p) for p in params if p.requires_grad),
                "optimizer_state": sum(local_numel(v) for st in optimizer.state.values() for v in st.values()
                                       if torch.is_tensor(v) and v.dim() > 0)}
        return {"engine": "fsdp", "world": self.group.world, "blocks": self.blocks,
                "params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad),
                "ranks": gather(mine, self.group)}

    def shard_like(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors (a plain checkpoint's best weights) as shards placed like the twin's parameters."""
        params = dict(self.module.named_parameters())
        # every process read the same file: each keeps its chunk, no data moves between them
        return {name: distribute_tensor(value.to(self.device), params[name].device_mesh, params[name].placements,
                                        src_data_rank=None) for name, value in full.items()}

    def finish(self) -> None:
        """Gather the trained weights into the plain model on rank 0 (collective)."""
        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with torch.no_grad():
            for name, p in self.plain.named_parameters():
                shape, dtype, device = self.layout[name]
                p.data = full[name].to(device=device, dtype=dtype) if self.group.main else torch.empty(shape, dtype=dtype, device=device)
            if self.group.main:
                for name, b in self.plain.named_buffers():
                    if name in full:
                        b.copy_(full[name])
        self.module = self.loss = None


def check_same_layout(model: nn.Module, group: Group) -> None:
    """Refuse to shard when rank 0's loaded model and the others' meta-built one differ (collective): a
    checkpoint whose config says tied embeddings but whose file holds two different matrices loads untied."""
    layout = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    layouts = gather(layout, group)
    if any(other != layouts[0] for other in layouts[1:]):
        differ = next(i for i, other in enumerate(layouts) if other != layouts[0])
        first = sorted(set(layouts[0]) ^ set(layouts[differ]))[:1]
        raise RecipeError(f"model: the checkpoint rank 0 loaded has other parameters than its config.json describes (e.g. {first}, "
                          "as when tie_word_embeddings is true but the file holds a separate lm_head); fix config.json, "
                          "or set train.distributed: ddp")


def fill_from_rank0(work: nn.Module, plain: nn.Module, device, group: Group) -> None:
    """The sharded twin's storage on the processes without weights, filled from rank 0's plain model (collective).

    Each process allocates its shards only (`to_empty`); set_model_state_dict sends rank 0's
    full tensors one by one and every process keeps its chunk. Buffers outside the state dict
    (non-persistent: a rotary embedding's inv_freq) are not sent by it: they are broadcast as they are.
    """
    if not group.main:
        work.to_empty(device=device)
    full = plain.state_dict() if group.main else {}
    set_model_state_dict(work, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    in_state = set(work.state_dict().keys())
    with torch.no_grad():
        for name, buffer in work.named_buffers():
            if name not in in_state:
                dist.broadcast(buffer, src=0)


def plain_optimizer_by_name(model: nn.Module, state: dict, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> dict:
    """A plain checkpoint's optimizer state (indexed by position) keyed by parameter name, for an FSDP resume.

    Built through a temporary optimizer on the plain model, before it is sharded (the model then
    holds the checkpoint's weights): the optimizer's full state exists once, for this moment.
    """
    optimizer = make_optimizer(model)
    optimizer.load_state_dict(state)
    return get_optimizer_state_dict(model, optimizer)


def load_plain_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, by_name: dict, from_rank0: bool = False) -> None:
    """plain_optimizer_by_name's state into the twin's optimizer: each process keeps its chunk.
    from_rank0: rank 0's state is sent to the others (theirs was read into a model on the meta device)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
    set_optimizer_state_dict(module, optimizer, by_name, options=options)


def checkpoint_state(module: nn.Module, optimizer: torch.optim.Optimizer, best: dict | None) -> dict:
    model_state, optimizer_state = get_state_dict(module, optimizer, options=CHECKPOINT_OPTIONS)
    state = {"model": model_state, "optimizer": optimizer_state}
    if best is not None:
        state["best"] = best
    return state


def save_shards(module: nn.Module, optimizer: torch.optim.Optimizer, best: dict | None, folder: Path) -> None:
    """The trainable weights, optimizer state and best weights through torch.distributed.checkpoint (collective)."""
    dcp.save(checkpoint_state(module, optimizer, best), checkpoint_id=str(folder))


def saved_tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a DCP checkpoint (its .metadata, without reading the shards)."""
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    return {key: tuple(entry.size) for key, entry in metadata.state_dict_metadata.items() if hasattr(entry, "size")}


def check_same_model(module: nn.Module, saved: dict[str, tuple[int, ...]], folder: Path) -> None:
    """Refuse a checkpoint written for another model: its trainable parameters' names and shapes differ."""
    expected = {f"model.{name}": tuple(p.shape) for name, p in module.named_parameters() if p.requires_grad}
    written = {k: v for k, v in saved.items() if k.startswith("model.")}
    missing = sorted(set(expected) - set(written))
    extra = sorted(set(written) - set(expected))
    changed = sorted(k for k in set(expected) & set(written) if expected[k] != written[k])

    def where(key: str) -> str:
        return key.removeprefix("model.")

    if missing or extra or changed:
        if changed:
            detail = f"{where(changed[0])} is {list(written[changed[0]])} there, {list(expected[changed[0]])} in this model"
        elif missing:
            detail = f"{where(missing[0])} is not in it"
        else:
            detail = f"it has {where(extra[0])}, which this model lacks"
        count = len(missing) + len(extra) + len(changed)
        raise RecipeError(f"model: the checkpoint {folder.parent} was written for another model ({detail}; {count} parameters "
                          "differ); resume with the model the run was started with, or start again with --overwrite")


def load_shards(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                best_template: Callable[[], dict]) -> dict | None:
    """A DCP checkpoint into `module` and `optimizer`; returns the best weights when it holds them.

    module: the twin under FSDP (any world size), or the plain model of one process; DCP reads
    each process's part of every tensor whatever world size wrote it. best_template builds
    tensors shaped like the trainable parameters, read into when the checkpoint has best weights.
    """
    saved = saved_tensors(folder)
    check_same_model(module, saved, folder)
    has_best = any(k.startswith("best.") for k in saved)
    state = checkpoint_state(module, optimizer, best_template() if has_best else None)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=CHECKPOINT_OPTIONS)
    return state.get("best")
