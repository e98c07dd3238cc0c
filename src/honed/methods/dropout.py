"""LoRA's input dropout that keeps no mask for the backward pass.

peft drops each adapter's input with `nn.Dropout`, which on a CPU draws a float mask with
`bernoulli_` and saves it for the backward: four bytes per input element per adapted layer,
beside the dropped copy the adapter's first matrix saves anyway. Every projection of a Llama
block has its own dropout, so the masks are about a sixth of what a LoRA forward saves
(benchmarks/saved_activations.py), and `bernoulli_` took 7 % of a 125M chat step
(benchmarks/profiles/chat_sft_lora.md).

SeededDropout draws the same distribution (each element kept with probability 1 - p and
scaled by 1 / (1 - p)) from a generator seeded per call, saves only the seed, and draws the
mask again in the backward. The seed comes from torch's default generator, so a run's masks
follow its seed, and gradient checkpointing, which restores that generator's state before it
recomputes a block, replays the same masks.
"""

from __future__ import annotations

import torch
from torch import nn

SEED_RANGE = 2**62


def keep_mask(shape: torch.Size, p: float, seed: int, like: torch.Tensor) -> torch.Tensor:
    """The scaled keep mask for `seed`: 1 / (1 - p) where a uniform draw is at least p, else 0, in `like`'s dtype."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    uniform = torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)
    return (uniform >= p).to(like.dtype).mul_(1.0 / (1.0 - p))


class SeededDropoutFunction(torch.autograd.Function):
    """x * mask with the mask drawn from `seed` in the forward and drawn again in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return x * keep_mask(x.shape, p, seed, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * keep_mask(grad.shape, ctx.p, ctx.seed, grad), None, None


class SeededDropout(nn.Module):
    """nn.Dropout's behaviour (identity in eval mode) without a saved mask."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability should be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        seed = int(torch.randint(0, SEED_RANGE, (1,)).item())
        return SeededDropoutFunction.apply(x, self.p, seed)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def replace_adapter_dropout(model: nn.Module) -> int:
    """Swap every peft LoRA layer's `nn.Dropout` for a SeededDropout of the same probability; returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is nn.Dropout and dropout.p > 0:
                dropouts[name] = SeededDropout(dropout.p)
                swapped += 1
    return swapped
