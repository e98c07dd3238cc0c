"""Full fine-tuning: every parameter trains."""

from torch import nn


def apply(model: nn.Module, bundle, recipe) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
