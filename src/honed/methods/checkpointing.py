"""Gradient checkpointing (`train.gradient_checkpointing`): keep each block's input and recompute
its activations in the backward pass, trading about a third more compute for activation memory
that no longer grows with the depth of the model (Chen et al. 2016).

Hugging Face models use transformers' own switch with the non-reentrant torch.utils.checkpoint
(the same gradients, dropout masks replayed from the saved random state); honed's tabular MLP
checkpoints its layers with torch.utils.checkpoint itself. With adapters (lora, qlora) the frozen
embeddings' outputs are made to require grad, as peft needs for checkpointed blocks.
"""

from __future__ import annotations

from torch import nn

from ..errors import RecipeError


def enable(model: nn.Module, method: str) -> None:
    """Switch gradient checkpointing on for `model` (before the method wraps it)."""
    if getattr(model, "supports_gradient_checkpointing", False) and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method in ("lora", "qlora") and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        return
    if hasattr(model, "checkpointed"):  # honed's own models that can recompute their layers
        model.checkpointed = True
        return
    raise RecipeError(f"train.gradient_checkpointing: {type(model).__name__} has no layers to recompute (it keeps almost no "
                      "activations); set train.gradient_checkpointing: false")
