"""LoRA's input dropout that keeps no mask for the backward pass.

peft drops each adapter's input with `nn.Dropout`, which on a CPU draws a float mask with
`bernoulli_` and saves it for the backward: four bytes per input element per adapted layer,
beside the dropped copy the adapter's first matrix saves anyway. Every projection of a Llama
block has its own dropout, so the masks are about a sixth of what a LoRA forward saves
(benchmarks/saved_activations.py), and `bernoulli_` took 7 % of a 125M chat step
(benchmarks/profiles/chat_sft_lora.md).

SeededDropout draws the same distribution (each element kept with probability 1 - p, p rounded
to a multiple of 1/65,536, and scaled by one over the keep rate) from a generator seeded per
call, saves only the seed, and draws the mask again in the backward. The draws are 16 bits
each, four to a 64-bit random number: a quarter of the generator's work of `torch.rand`, and a
one-byte mask instead of a float one (a 2048 x 768 mask 19.0 -> 8.6 ms; the 125M LoRA chat
benchmark 103 -> 118 tokens/s, benchmarks/RESULTS.md). The seed comes from torch's default
generator, so a run's masks follow its seed, and gradient checkpointing, which restores that
generator's state before it recomputes a block, replays the same masks.

Where the dropout feeds a plain LoRA adapter (peft's `lora_B(lora_A(dropout(x)))`), the two are
fused: DroppedLinear, in lora_A's place, applies the mask and the matrix in one autograd step and
saves the undropped input, which the adapted layer's own matrix product saves anyway, instead of
the dropped copy lora_A would keep: one input-sized tensor less per adapted projection (seven per
Llama block), for one elementwise product more in the backward.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

SEED_RANGE = 2**62


LEVELS = 1 << 16  # the draws are 16-bit: p is rounded to a multiple of 1 / LEVELS


def keep_probability(p: float) -> float:
    """The probability an element is kept: 1 - p with p rounded to a multiple of 1/65,536 (0.05 -> 0.9499969)."""
    return 1.0 - round(p * LEVELS) / LEVELS


def keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Which elements `seed` keeps (a bool tensor): those whose 16-bit uniform draw is not among the lowest p."""
    generator = torch.Generator(device=device).manual_seed(seed)
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1, generator=generator)
    draws = words.view(torch.int16)[:count].view(shape)
    return draws >= round(p * LEVELS) - LEVELS // 2


def dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x with the elements `seed` drops set to 0 and the others scaled by one over the keep probability."""
    return (x * keep_mask(x.shape, p, seed, x.device)).mul_(1.0 / keep_probability(p))


class SeededDropoutFunction(torch.autograd.Function):
    """x * mask with the mask drawn from `seed` in the forward and drawn again in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return dropped(x, p, seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return dropped(grad, ctx.p, ctx.seed), None, None


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
        return SeededDropoutFunction.apply(x, self.p, draw_seed())

    def extra_repr(self) -> str:
        return f"p={self.p}"


def draw_seed() -> int:
    """A mask seed from torch's default generator (so masks follow the run's seed and replay under checkpointing)."""
    return int(torch.randint(0, SEED_RANGE, (1,)).item())


class DroppedLinearFunction(torch.autograd.Function):
    """linear(x * mask, weight), saving x and the seed rather than the dropped product."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        ctx.save_for_backward(x, weight)
        # the scale goes on the adapter's narrow output (r columns), not on the input-sized product
        return F.linear(x * keep_mask(x.shape, p, seed, x.device), weight).mul_(1.0 / keep_probability(p))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        mask = keep_mask(x.shape, ctx.p, ctx.seed, x.device)
        grad = grad * (1.0 / keep_probability(ctx.p))
        # explicit dtypes: under autocast the forward's product (and so `grad`) may be in a lower precision
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype).mul_(mask)
        if ctx.needs_input_grad[1]:
            kept = (x * mask).to(grad.dtype)
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ kept.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None, None


class DroppedLinear(nn.Linear):
    """A bias-free nn.Linear (a LoRA adapter's first matrix) whose input is dropped with probability p in
    training; the same parameter under the same name, so peft's merging and saving see lora_A as before."""

    def __init__(self, linear: nn.Linear, p: float):
        if linear.bias is not None or not 0.0 < p < 1.0:
            raise ValueError(f"DroppedLinear takes a bias-free linear layer and 0 < p < 1, got bias={linear.bias is not None}, p={p}")
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight)
        return DroppedLinearFunction.apply(x, self.weight, self.p, draw_seed())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def replace_adapter_dropout(model: nn.Module) -> int:
    """Give every peft LoRA layer's `nn.Dropout` a replacement that saves no mask: fused into the adapter's
    first matrix (DroppedLinear, the dropout left as Identity) where the adapter is plain LoRA, else a
    SeededDropout of the same probability. Returns how many dropouts were replaced."""
    swapped = 0
    for module in model.modules():
        dropouts, first = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", None) or {}
        for name, dropout in list(dropouts.items()):
            if type(dropout) is not nn.Dropout or dropout.p == 0:
                continue
            linear = first[name] if isinstance(first, nn.ModuleDict) and name in first else None
            if type(linear) is nn.Linear and linear.bias is None and name not in variants:
                first[name] = DroppedLinear(linear, dropout.p)
                dropouts[name] = nn.Identity()
            else:
                dropouts[name] = SeededDropout(dropout.p)
            swapped += 1
    return swapped
