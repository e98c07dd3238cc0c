"""`auto` values: learning rate, batch size, epochs and evaluation interval per model family,
method and data size (design.md §4 "Expertise"; the rules and their sources: docs/auto.md)."""

from __future__ import annotations

import math

from .recipe import Recipe

AUTO_LR = {  # (family, method) → learning rate; design.md §4 "Expertise"
    ("hf", "full"): 3e-5, ("hf", "freeze"): 5e-5, ("hf", "lora"): 2e-4, ("hf", "qlora"): 2e-4, ("hf", "lp-ft"): 2e-5,
    # WordLlama is an embedding table with no transformer layers: it tolerates far larger steps
    ("wordllama", "full"): 2e-3, ("wordllama", "freeze"): 2e-3, ("wordllama", "lora"): 5e-3, ("wordllama", "lp-ft"): 1e-3,
    ("hf-image", "full"): 5e-5, ("hf-image", "freeze"): 5e-5, ("hf-image", "lora"): 2e-4, ("hf-image", "lp-ft"): 3e-5,
    # small tabular MLPs: Adam's usual 1e-3
    ("mlp", "full"): 1e-3, ("mlp", "freeze"): 1e-3, ("mlp", "lora"): 3e-3, ("mlp", "lp-ft"): 1e-3,
    # causal LMs (task: chat): instruction-tuning defaults
    ("causal-lm", "full"): 2e-5, ("causal-lm", "freeze"): 3e-5, ("causal-lm", "lora"): 2e-4, ("causal-lm", "qlora"): 2e-4,
    # small PatchTST/PatchTSMixer forecasters (tens of thousands of weights): Adam's usual 1e-3
    ("ts-forecast", "full"): 3e-3, ("ts-forecast", "freeze"): 3e-3, ("ts-forecast", "lora"): 1e-2, ("ts-forecast", "lp-ft"): 1e-3,
}
# task: preference (DPO and its kin) steps far smaller than supervised tuning: Rafailov et al. 2023 and
# Zephyr (Tunstall et al. 2023) use 5e-7 in full; LoRA DPO recipes use 5e-6 to 5e-5
AUTO_PREFERENCE_LR = {"full": 5e-7, "lora": 5e-5, "qlora": 5e-5}
AUTO_HEAD_LR = 1e-2  # on standardised features
# `train.batch_size: auto`: the effective batch (rows per optimizer step) per family; the memory check
# then picks the largest micro-batch that fits and accumulates gradients up to it (docs/auto.md)
AUTO_BATCH = {"wordllama": 32, "mlp": 64, "ts-forecast": 32}
AUTO_BATCH_DEFAULT = 16  # transformers (Devlin et al. 2019: 16 or 32), causal LMs
FORECAST_STEPS = 500
SHORT_EPOCH = 6  # `eval_every: auto` evaluates once an epoch below this many optimizer steps per epoch  # `epochs: auto` for forecasters: about this many optimizer steps


def resolve_rates(recipe: Recipe, family: str) -> Recipe:
    """Fill the `auto` learning rates and batch size (what the memory check needs before any data is encoded).
    The batch size is the family's recommended effective batch; session.memory_estimate may then split
    it into a smaller micro-batch and gradient accumulation (memory.largest_fitting_batch)."""
    t = recipe.train
    if t.lr == "auto" and recipe.task == "preference":
        t.lr = AUTO_PREFERENCE_LR[recipe.method]
    elif t.lr == "auto":
        t.lr = AUTO_HEAD_LR if recipe.method == "head" else AUTO_LR[(family, recipe.method)]
    if t.head_lr == "auto":
        t.head_lr = AUTO_HEAD_LR
    if t.batch_size == "auto":
        t.batch_size = AUTO_BATCH.get(family, AUTO_BATCH_DEFAULT)
    return recipe


def resolve_auto(recipe: Recipe, family: str, n_train: int, batches_per_epoch: int | None = None) -> Recipe:
    """Fill every `auto` with its value for this model family, method and data size.

    batches_per_epoch: the training plan's length when the task knows it (packed chat rows are
    fewer than conversations); otherwise one batch per train.batch_size examples. train.max_steps
    and train.epochs are resolved together: a step bound with `epochs: auto` runs as many epochs as
    it takes, and without a bound max_steps is every epoch's steps.
    """
    resolve_rates(recipe, family)
    t = recipe.train
    batches = batches_per_epoch if batches_per_epoch is not None else math.ceil(n_train / t.batch_size)
    per_epoch = max(1, math.ceil(batches / t.grad_accumulation))
    bounded = t.max_steps is not None
    if t.epochs == "auto" and t.max_steps is not None:
        t.epochs = math.ceil(t.max_steps / per_epoch)
    elif t.epochs == "auto" and family == "ts-forecast":
        # a small forecaster trained from few windows needs a few hundred steps whatever the data size
        t.epochs = min(200, max(10, math.ceil(FORECAST_STEPS / per_epoch)))
    elif t.epochs == "auto":
        # small data needs more passes; early stopping ends runs that stop improving
        t.epochs = 10 if n_train < 2000 else 5 if n_train < 20000 else 3
    t.max_steps = per_epoch * t.epochs if t.max_steps is None else min(t.max_steps, per_epoch * t.epochs)
    if t.eval_every == "auto" and family == "ts-forecast":
        # about 20 evaluations per run: a handful of windows per epoch would otherwise stop early in the warm-up
        t.eval_every = max(per_epoch, per_epoch * t.epochs // 20)
    elif t.eval_every == "auto":
        # twice an epoch, and at least 4 times in a run the user bounded by max_steps; once an epoch when an
        # epoch is under SHORT_EPOCH steps: `patience` evaluations then span that many epochs, not one
        # (the panel's 60-image case stopped at step 6 of 30, one epoch of 3 steps after the start, collapsed)
        interval = per_epoch if per_epoch < SHORT_EPOCH else per_epoch // 2
        t.eval_every = max(1, min(interval, t.max_steps // 4) if bounded else interval)
    return recipe
