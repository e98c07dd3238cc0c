"""Memory before launch: estimate what training will need and refuse, with a suggestion, when
the device does not have it, rather than dying with out-of-memory an hour in.

The estimate: fp32 weights (4 B/param), gradients and AdamW's two moments for the trainable
parameters (4 + 8 B/param), and activations. For transformer blocks the activation figure
follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"): about s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit, doubled for fp32; for
embedding-bag and MLP models, a few copies of the batch's hidden states.
"""

from __future__ import annotations

import psutil
import torch
from torch import nn

from .errors import RecipeError

MB = 1024 * 1024
HEADROOM = 0.9  # refuse above 90 % of what the device has free
RUNTIME_OVERHEAD_MB = 350  # the Python process, torch and the tokenizer before any tensor


def _config_value(model: nn.Module, *names, default=None):
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None) if config is not None and not isinstance(config, dict) else (config or {}).get(name)
        if value:
            return value
    return default


def estimate_training_memory(model: nn.Module, batch_size: int, seq_len: int, precision: str,
                             trainable_fraction: float | None = None) -> dict:
    """Bytes of weights, gradients, optimizer state and activations, in MB, for one training step."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable_fraction is not None:
        trainable = int(params * trainable_fraction)
    weights = 4 * params
    gradients = 4 * trainable
    optimizer = 8 * trainable
    layers = _config_value(model, "num_hidden_layers", "n_layer", "num_layers", default=0)
    hidden = _config_value(model, "hidden_size", "n_embd", "dim", default=0)
    heads = _config_value(model, "num_attention_heads", "n_head", default=1)
    bytes_per = 2 if precision == "bf16" else 4
    if layers and hidden:
        per_layer = seq_len * batch_size * hidden * (34 + 5 * heads * seq_len / hidden) * (bytes_per / 2)
        activations = layers * per_layer
    else:
        width = max((m.out_features for m in model.modules() if isinstance(m, nn.Linear)), default=256)
        activations = 6 * batch_size * max(seq_len, 1) * width * 4
    total = weights + gradients + optimizer + activations
    return {"params": params, "trainable": trainable, "weights_mb": weights / MB, "gradients_mb": gradients / MB,
            "optimizer_mb": optimizer / MB, "activations_mb": activations / MB,
            "total_mb": total / MB + RUNTIME_OVERHEAD_MB}


def available_mb(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / MB
    return psutil.virtual_memory().available / MB


def check_memory(estimate: dict, device: torch.device, method: str, batch_size: int) -> None:
    """Refuse before training when the estimate exceeds what the device has free."""
    have = available_mb(device)
    need = estimate["total_mb"]
    if need <= HEADROOM * have:
        return
    suggestions = []
    if method in ("full", "lp-ft"):
        suggestions.append("method: lora (trains a fraction of the parameters)")
    if batch_size > 1:
        suggestions.append(f"train.batch_size: {max(1, batch_size // 4)} with train.grad_accumulation: 4 (same effective batch)")
    suggestions.append("a shorter data.max_length")
    raise RecipeError(
        f"memory: training needs about {need:,.0f} MB (weights {estimate['weights_mb']:,.0f}, gradients {estimate['gradients_mb']:,.0f}, "
        f"optimizer {estimate['optimizer_mb']:,.0f}, activations {estimate['activations_mb']:,.0f}) but the {device.type} has "
        f"{have:,.0f} MB free; try " + ", or ".join(suggestions)
    )
