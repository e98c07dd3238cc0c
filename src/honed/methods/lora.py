"""LoRA (peft): low-rank adapters on every linear layer except the head (embeddings when there are none).

The head trains in full. On export the adapters are merged into the weights, so the saved
model is a plain checkpoint its own library loads; `lora.keep_adapter` also keeps the adapter.
"""

import os
import shutil
from pathlib import Path

from torch import nn

from .dropout import replace_adapter_dropout


def target_modules(model: nn.Module, head_name: str) -> list[str]:
    """Every linear layer outside the head; embeddings only for models that have no other layers (WordLlama)."""
    head_prefix = head_name.rpartition(".")[0] or head_name

    def outside_head(name: str) -> bool:
        return name != head_name and not (head_prefix != head_name and name.startswith(head_prefix + "."))

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and outside_head(n)]
    if linears:
        return linears
    return [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and outside_head(n)]


def apply(model: nn.Module, bundle, recipe) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    spec = recipe.lora
    targets = spec.target_modules or target_modules(model, bundle.head_name)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha or 2 * spec.r, lora_dropout=spec.dropout, target_modules=targets)
    peft_model = get_peft_model(model, config)
    replace_adapter_dropout(peft_model)  # the same dropout without a saved mask (methods/dropout.py)
    if bundle.family == "causal-lm":
        return peft_model  # a language model keeps its output layer (often tied to the embeddings) frozen
    head_prefix = bundle.head_name.rpartition(".")[0] or bundle.head_name
    for name, p in model.named_parameters():
        if name.startswith(head_prefix):
            p.requires_grad_(True)
    return peft_model


def export(model: nn.Module) -> nn.Module:
    """Merge the adapters into the base weights and return the plain model."""
    return model.merge_and_unload()


def keeps_adapter(recipe) -> bool:
    return recipe.lora.keep_adapter


def save_adapter(model: nn.Module, folder: Path) -> None:
    """The trained adapter alone, in PEFT's format (adapter_config.json names the base model), written
    beside its final place and renamed into it, so a kill never leaves half an adapter."""
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial), safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
