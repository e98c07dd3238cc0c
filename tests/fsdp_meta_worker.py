"""Run by tests/test_fsdp_meta.py under torchrun (2 gloo processes): load a tiny Llama the way a
`train.distributed: fsdp` run does, with rank 1 pointed at a folder that has the config and the
tokenizer but no weights file, shard it, and write each process's loss and logits on one batch
next to rank 0's unsharded model's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from honed.methods import METHODS
from honed.models.causal_lm import load_causal_lm
from honed.models.meta_load import on_meta
from honed.recipe import load_recipe
from honed.tasks.chat.model import collate, encode_texts, loss
from honed.train import distributed
from honed.train.sharded import Sharded, local_numel

TEXTS = ["My router keeps dropping the connection.", "Restart it and install the latest update.", "Thanks, that fixed it!"]


def main(recipe_path: str, weightless: str, out: str) -> None:
    group = distributed.join()
    group.engine = "fsdp"
    recipe = load_recipe(recipe_path, ["train.distributed=fsdp"])
    source = recipe.model if group.main else weightless  # only rank 0's folder has model.safetensors
    bundle = load_causal_lm(source, recipe)
    model = bundle.model
    built_on_meta = on_meta(model)
    torch.manual_seed(100 + group.rank)  # each process initialises LoRA its own way: rank 0's adapters must win
    model = METHODS["lora"]["prepare"](model, bundle, recipe)
    model.eval()  # no LoRA dropout: the same function on every process
    split = encode_texts(bundle.tokenizer, TEXTS, 32)
    batch = collate(split, list(range(len(TEXTS))), bundle.pad_id, packing=False)
    reference = None
    if group.main:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # B starts at zero; non-zero adapters make the check see them
                    p.normal_(0, 0.5)
            reference = {"loss": float(loss(model, batch)), "logits": model(input_ids=batch["input_ids"]).logits}
    full_numel = sum(p.numel() for p in model.parameters())
    engine = Sharded(model, loss, None, "fp32", torch.device("cpu"), group)
    local_params = sum(local_numel(p) for p in engine.module.parameters())  # before a forward gathers the root's
    with torch.no_grad():
        sharded_loss = float(engine.loss(batch))
        logits = engine.module(input_ids=batch["input_ids"]).logits
    reference = distributed.broadcast(reference, group)
    rotary = [b for n, b in engine.module.named_buffers() if n.endswith("inv_freq")]
    record = {"rank": group.rank, "built_on_meta": built_on_meta, "loss": sharded_loss, "reference_loss": reference["loss"],
              "logits_max_diff": float((logits - reference["logits"]).abs().max()),
              "local_params": local_params, "full_params": full_numel,
              "inv_freq": [float(x) for x in rotary[0]] if rotary else None}
    Path(out, f"rank{group.rank}.json").write_text(json.dumps(record))
    distributed.barrier(group)
    distributed.leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
