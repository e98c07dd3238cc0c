"""The head's inputs (the backbone's feature vectors), captured by a forward pre-hook.

Cached features, the linear probe, representation drift and replay all read the same tensor:
what the final linear layer receives."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn


def find_head(model: nn.Module, head_name: str) -> nn.Module:
    """The head by its dotted name; inside a PEFT wrapper the name gains a prefix, so a suffix match."""
    modules = dict(model.named_modules())
    if head_name in modules:
        return modules[head_name]
    return next(m for n, m in model.named_modules() if n.endswith("." + head_name))


@contextmanager
def head_inputs(model: nn.Module, head_name: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Yields a list that gets the head's input (after `transform`) at every forward pass."""
    captured: list[torch.Tensor] = []
    keep = transform or (lambda x: x)
    handle = find_head(model, head_name).register_forward_pre_hook(lambda module, args: captured.append(keep(args[0])))
    try:
        yield captured
    finally:
        handle.remove()


def features_while(predict_fn):
    """A task's `features`: the head's inputs (fp32, on the CPU), captured while `predict_fn` scores a split."""

    @torch.no_grad()
    def features(bundle, model: nn.Module, split, batch_size: int, precision: str, device) -> torch.Tensor:
        with head_inputs(model, bundle.head_name, lambda x: x.float().cpu()) as captured:
            predict_fn(model, split, 0, batch_size, precision, device)
        return torch.cat(captured) if captured else torch.zeros(0)

    return features
