"""Head-only: the backbone is frozen; only the final linear layer trains, on cached features."""

from torch import nn


def apply(model: nn.Module, bundle, recipe) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in bundle.head().parameters():
        p.requires_grad_(True)
    return model
