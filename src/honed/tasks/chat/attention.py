"""Attention over each packed conversation alone, on the flattened batch: no padding, no dense mask.

A packed training batch is rows of max_length, each holding several conversations and padding
at its end. Given restarting position ids and no mask, transformers builds a block-diagonal
boolean mask per row and SDPA runs over every row in full: the padding's tokens go through every
layer, the kernel computes each row's whole [length × length] score matrix (the masked blocks
too), and grouped-query models repeat their key/value heads (SDPA's grouped path takes no mask).

Here the batch's real tokens are laid end to end in one row (`flatten`), and the attention of each
layer runs once per conversation with `is_causal=True` on its own slice of the queries, keys and
values: the causal flash kernel skips the blocks above the diagonal, nothing is computed across
conversations or on padding, and the key/value heads stay grouped. The projections, MLPs and
norms see only real tokens. The same weights, tokens and positions give the same outputs as the
masked rows (tests/test_chat_loss.py).

The implementation is registered with transformers' AttentionInterface as SEGMENTS and applies
only inside `segmented(model)`, which names it in the model's config for one forward pass (the
backward pass needs nothing of it); every other call of the model (evaluation, generation, the
guards) keeps SDPA with transformers' own masks.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

SEGMENTS = "honed_segments"


def segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, honed_segments: list[tuple[int, int]] | None = None, **kwargs):
    """transformers' attention signature ([batch, heads, tokens, head_dim] in, [batch, tokens, heads, head_dim] out):
    causal SDPA on each (start, end) slice of `honed_segments` along the tokens."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if honed_segments is None:
        raise ValueError(f"attention '{SEGMENTS}' needs honed_segments (the conversations' (start, end) in the row); "
                         "call the model inside segmented() with flatten()'s segments")
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                                    scaling=scaling, is_causal=True, **kwargs)[0] for a, b in honed_segments]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


def no_mask(**kwargs) -> None:
    """SEGMENTS's mask: none (each conversation's slice is causal on its own)."""
    return None


def register() -> bool:
    """Register SEGMENTS with transformers (idempotent); False when this transformers has no attention interface."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - transformers before 4.48
        return False
    if SEGMENTS not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(SEGMENTS, segment_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENTS, no_mask)
    return True


def supports(model: nn.Module) -> bool:
    """Whether the model attends with SDPA through transformers' attention interface, every layer with full causal
    attention (a sliding window, or layers of other kinds, would need their own masks: those take the masked rows),
    and without gradient checkpointing (its recomputation in backward runs outside segmented())."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "is_encoder_decoder", False):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(type(base), "_supports_attention_backend", False):
        return False
    checkpointing = getattr(base, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    if checkpointing:  # the backward pass re-runs the layers outside segmented(): they must not need it
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True) is not False:
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    return register()


@contextmanager
def segmented(model: nn.Module):
    """The model's layers attend with SEGMENTS inside the block (a forward pass; backward needs nothing of it)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = SEGMENTS
    try:
        yield
    finally:
        config._attn_implementation = previous


def flatten(batch: dict) -> tuple[dict, list[tuple[int, int]]]:
    """The batch's real tokens end to end in one row, and each conversation's (start, end) in it.

    `row_tokens` (collate's, per row: how many leading tokens are real; absent: all are) drops the
    padding; a conversation starts wherever the position ids do not continue by one."""
    ids, positions, targets = batch["input_ids"], batch["position_ids"], batch["targets"]
    width = ids.shape[1]
    used = batch.get("row_tokens")
    if used is None:
        real = torch.ones_like(ids, dtype=torch.bool)
    else:
        real = torch.arange(width, device=ids.device)[None, :] < used.to(ids.device)[:, None]
    flat_positions = positions[real]
    starts = torch.ones_like(flat_positions, dtype=torch.bool)
    starts[1:] = flat_positions[1:] != flat_positions[:-1] + 1
    bounds = starts.nonzero().flatten().tolist() + [len(flat_positions)]
    flat = {"input_ids": ids[real][None], "position_ids": flat_positions[None], "targets": targets[real][None]}
    return flat, list(zip(bounds[:-1], bounds[1:]))
