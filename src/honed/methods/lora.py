"""LoRA (peft): low-rank adapters on every linear (and embedding) layer except the head.

The head trains in full. On export the adapters are merged into the weights, so the saved
model is a plain checkpoint its own library loads; `lora.keep_adapter` also keeps the adapter.
"""

from torch import nn


def target_modules(model: nn.Module, head_name: str) -> list[str]:
    head_prefix = head_name.rpartition(".")[0] or head_name
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if name == head_name or (head_prefix != head_name and name.startswith(head_prefix + ".")):
            continue  # the classification head trains in full
        names.append(name)
    return names


def apply(model: nn.Module, bundle, recipe) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    spec = recipe.lora
    targets = spec.target_modules or target_modules(model, bundle.head_name)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha or 2 * spec.r, lora_dropout=spec.dropout, target_modules=targets)
    peft_model = get_peft_model(model, config)
    head_prefix = bundle.head_name.rpartition(".")[0] or bundle.head_name
    for name, p in model.named_parameters():
        if name.startswith(head_prefix):
            p.requires_grad_(True)
    return peft_model


def export(model: nn.Module) -> nn.Module:
    """Merge the adapters into the base weights and return the plain model."""
    return model.merge_and_unload()
