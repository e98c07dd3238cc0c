"""The memory-saving load of a sharded run: only rank 0 reads the pre-trained weights.

Under `train.distributed: fsdp` (or `auto` with an Accelerate FSDP config, or `train.offload`)
every process would otherwise hold a full copy of the model before FSDP2 keeps its 1/N of it.
Instead rank 0 loads the checkpoint as usual, and every other process builds the architecture
from its config on the meta device (shapes and dtypes, no storage, the weights file never
opened). The engine (train/sharded.py) shards both alike, gives the meta processes empty storage
for their shards only (`to_empty`), and fills them from rank 0 through
`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`; buffers outside the
state dict (a rotary embedding's `inv_freq`) are broadcast from rank 0 as they are. Whatever
is created on the model before sharding (LoRA adapters, by peft) is part of what rank 0 sends,
so the other processes' own initialisation of it does not matter.

Kept on the full load (every process reads the weights): method qlora (bitsandbytes quantises
while it reads the file, and 4-bit parameters cannot be built on the meta device), L2-SP (each
process's regulariser needs the pre-trained weights as its anchor), and `auto` without an
FSDP config (the engine is chosen after loading, from the loaded model's memory estimate).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..train.distributed import accelerate_asks_fsdp


def loads_on_meta(recipe) -> bool:
    """True in a process other than rank 0 of a run that will shard with FSDP2 and can skip the weights."""
    if recipe is None or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        return False
    t = recipe.train
    sharded = t.distributed == "fsdp" or (t.distributed == "auto" and (accelerate_asks_fsdp() or t.offload))
    return sharded and recipe.method != "qlora" and not recipe.l2sp


def on_meta(model: nn.Module) -> bool:
    """Whether the model was built without weights (loads_on_meta's processes)."""
    return any(p.is_meta for p in model.parameters())


def empty_model(model_class, config, **kwargs) -> nn.Module:
    """`model_class.from_config(config)` on the meta device: the architecture, tied weights tied, no storage."""
    kwargs.pop("use_safetensors", None)
    with torch.device("meta"):
        return model_class.from_config(config, **kwargs)
