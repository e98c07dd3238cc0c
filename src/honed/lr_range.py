"""`train.lr: auto` by a learning-rate range test (Smith 2017, "Cyclical Learning Rates"; what
fastai's `lr_find` and Lightning's `Tuner.lr_find` do): a few dozen AdamW steps on the real model
and training batches with the learning rate rising exponentially, the loss smoothed, and the rate
chosen by the rule in docs/auto.md. The model, its trainable flags, its buffers and every random
state are restored afterwards, so the run trains exactly as it would have with the chosen rate
written in the recipe."""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.distributed as dist

from .data.batching import shuffled_plan
from .errors import RecipeError
from .methods import METHODS, checkpointing
from .models.meta_load import on_meta
from .recipe import Recipe
from .train import distributed
from .train.checkpoint import rng_state, set_rng_state
from .train.engines import Replicas
from .train.loop import LoopConfig, make_optimizer

START_LR, END_LR = 1e-7, 1.0
MAX_STEPS, MIN_STEPS = 100, 50  # a few dozen steps; a tenth of the run's own steps when that is more (the 10 % wall-time target)
BETA = 0.8  # EMA of the loss: 50 steps cannot afford fastai's 0.98 (a lag of ~50 steps)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum (fastai, Lightning)
MIN_DESCENT = 0.005  # a curve whose minimum is less than 0.5 % below its start never descended,
NOISE_K = 4.0  # nor one whose descent is under 4 standard deviations of the smoothed loss's noise (docs/auto.md)
CAP = 3.0  # at most the minimum-loss rate / 3: within ×2 of the largest rate that converges (Smith 2017 §3.3), which the test overstates (docs/auto.md)
PRIOR_BELOW, PRIOR_ABOVE = 30.0, 100.0  # and within [table / 30, table × 100] (docs/auto.md)
# task: preference keeps the table (docs/auto.md): a DPO loss against a reference model, not checked against a grid;
# and causal-lm (continued pre-training), which issue 19's panel has no case for
TABLE_TASKS = ("preference", "causal-lm")
TABLE_FAMILIES: tuple[str, ...] = ()
TESTED_METHODS = ("full", "freeze", "lora", "head")  # lp-ft's second stage starts from a fitted head; qlora's model cannot be copied cheaply


def applies(recipe: Recipe, family: str, lr_was_auto: bool) -> bool:
    """Whether `train.lr: auto` is resolved by the range test (otherwise by the AUTO_LR table)."""
    head_auto = recipe.method != "head" or recipe.train.head_lr == "auto"
    return (lr_was_auto and head_auto and recipe.task not in TABLE_TASKS and family not in TABLE_FAMILIES
            and recipe.method in TESTED_METHODS)


def schedule(steps: int) -> list[float]:
    """Exponentially rising rates from START_LR to END_LR."""
    return [START_LR * (END_LR / START_LR) ** (i / max(1, steps - 1)) for i in range(steps)]


def range_steps(total_steps: int | None) -> int:
    """A tenth of the run's own optimizer steps, between MIN_STEPS and MAX_STEPS (MAX_STEPS when unknown)."""
    return MAX_STEPS if total_steps is None else int(min(MAX_STEPS, max(MIN_STEPS, total_steps // 10)))


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """Bias-corrected exponential moving average (the online curve the divergence stop reads)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def two_way(losses: list[float], beta: float = BETA) -> list[float]:
    """The EMA run forwards then backwards: smoothed without the forward EMA's lag (the curve the rule reads)."""
    return smooth(smooth(losses, beta)[::-1], beta)[::-1]


def noise(losses: list[float], beta: float = BETA) -> float:
    """The standard deviation of the two-way smoothed loss that batch-to-batch noise alone would give: the
    losses' own step-to-step spread (the median absolute first difference, ÷ 0.6745·√2 for a standard deviation:
    it ignores the trend and the few spikes of a diverging tail), times the two-way EMA's gain on white noise,
    sqrt(sum h_k^2) for its kernel h_k = (1-b)^2 b^|k| / (1-b^2): 0.24 for b = 0.8."""
    steps = np.diff(np.asarray(losses, dtype=float))
    if len(steps) < 2:
        return 0.0
    spread = float(np.median(np.abs(steps))) / (0.6745 * math.sqrt(2))
    gain = math.sqrt((1 - beta) ** 4 / (1 - beta ** 2) ** 2 * (1 + beta ** 2) / (1 - beta ** 2))
    return spread * gain


def choose(lrs: list[float], losses: list[float], prior: float, diverged: bool) -> tuple[float, str, list[float]]:
    """(rate, rule, smoothed curve): the steepest descent of the smoothed loss, at most the minimum-loss
    rate / CAP, within [prior / PRIOR_BELOW, prior × PRIOR_ABOVE]; the prior itself for a flat curve (one whose
    minimum is less than MIN_DESCENT of its start, or NOISE_K times noise(), below its start).
    Raises RecipeError when the loss rose at every rate tried."""
    finite = [x for x in losses if math.isfinite(x)]
    # the diverging tail would leak backwards into the two-way curve: losses above the start are clipped to it
    start = float(np.median(finite[:5])) if finite else math.inf
    clipped = [min(x, start) for x in finite]
    curve = two_way(clipped) if finite else []
    if not curve or curve[0] - min(curve) <= max(MIN_DESCENT * abs(curve[0]), NOISE_K * noise(finite)):
        # diverging with no loss after the first five below their median: no rate in the range trains it
        # (the losses themselves, not an EMA's first steps: with few batches cycled the first may be the lowest)
        if len(finite) < 3 or (diverged and (len(finite) <= 5 or min(finite[5:]) >= start)):
            raise RecipeError(f"train.lr: auto: the learning-rate range test's loss rose at every rate from {lrs[0]:.0e} to "
                              f"{lrs[len(losses) - 1]:.0e} (the model diverges); set an explicit train.lr, e.g. train.lr: {prior:.0e}")
        return prior, "flat curve: the table's rate", curve
    lowest = int(np.argmin(curve))
    logs = np.log10(lrs[:len(curve)])
    slope = np.gradient(np.asarray(curve[:lowest + 1]), logs[:lowest + 1]) if lowest > 0 else np.zeros(1)
    steepest = lrs[int(np.argmin(slope))]
    cap = lrs[lowest] / CAP
    chosen, rule = (steepest, "steepest descent") if steepest <= cap else (cap, f"minimum-loss rate / {CAP:g}")
    low, high = prior / PRIOR_BELOW, prior * PRIOR_ABOVE
    if chosen < low or chosen > high:
        chosen, rule = min(max(chosen, low), high), f"{rule}, bounded by the table's {prior:g} (÷{PRIOR_BELOW:g} … ×{PRIOR_ABOVE:g})"
    return float(f"{chosen:.2g}"), rule, curve


def sweep(model: torch.nn.Module, batch_at, loss_fn, steps: int, precision: str, device, weight_decay: float,
          grad_clip: float | None) -> tuple[list[float], list[float], bool]:
    """AdamW steps at rising rates on batch_at(i); returns (rates, losses before each step, diverged).
    Trains `model` in place: the caller restores it."""
    lrs = schedule(steps)
    engine = Replicas(model, loss_fn, None, precision, device, None)
    optimizer = make_optimizer(model, LoopConfig(stage="lr-range", epochs=1, lr=lrs[0], weight_decay=weight_decay, device=device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses: list[float] = []
    best = math.inf
    for i, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch_at(i).items()}
        loss = engine.backward(batch, 1.0, sync=True)
        losses.append(loss)
        if not math.isfinite(loss):
            return lrs, losses, True
        smoothed = smooth(losses)[-1]
        best = min(best, smoothed)
        if i >= 3 and smoothed > DIVERGED * best:
            return lrs, losses, True
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return lrs, losses, False


def sweep_model(recipe: Recipe, task, bundle, train_split, precision: str, device, seed: int, steps: int):
    """The range test on the method's trainable parameters of the model itself, restored afterwards
    (LoRA wraps the model in place: it is tested on a copy)."""
    model = bundle.model
    method = recipe.method
    copied = method == "lora"
    work = copy.deepcopy(model) if copied else model
    saved = None if copied else {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    plan = task.batches(train_split, recipe, seed, bundle.pad_id)
    batches = plan.plan(0)
    try:
        if recipe.train.gradient_checkpointing is True:  # as the fine-tune will: the memory check said it is needed
            checkpointing.enable(work, method)
        clone = copy.copy(bundle)
        clone.model = work
        work = METHODS[method]["prepare"](work, clone, recipe)
        return sweep(work, lambda i: plan.collate(batches[i % len(batches)]), task.loss, steps, precision, device,
                     recipe.train.weight_decay, recipe.train.grad_clip)
    finally:
        if not copied:
            model.load_state_dict(saved)
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
                p.grad = None
            for name, m in model.named_modules():
                m.train(modes[name])
            if recipe.train.gradient_checkpointing is True:
                disable_checkpointing(model)
        del work


def disable_checkpointing(model: torch.nn.Module) -> None:
    """Undo checkpointing.enable: the fine-tune switches it on itself, and nothing before it should see it."""
    if getattr(model, "is_gradient_checkpointing", False) and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    elif hasattr(model, "checkpointed"):
        model.checkpointed = False


def sweep_head(recipe: Recipe, task, bundle, features: dict, labels: torch.Tensor, device, seed: int, steps: int):
    """The range test of `method: head` on the cached features, standardised as FineTuner._train_head
    trains on them (a fresh linear layer: the model is not touched)."""
    head = bundle.model.get_submodule(bundle.head_name)
    x = features["train"]
    mean = x.mean(0)
    std = x.std(0).clamp(min=1e-6) if len(x) > 1 else torch.ones_like(mean)
    scaled = (x - mean) / std
    work = torch.nn.Linear(head.in_features, head.out_features, bias=True).to(device)
    with torch.no_grad():  # the current head, on standardised inputs
        work.weight.copy_(head.weight * std.to(device))
        bias = head.bias if head.bias is not None else torch.zeros(head.out_features, device=device)
        work.bias.copy_(bias + head.weight @ mean.to(device))
    y = labels
    if task.cached_head.target_scale is not None:
        mu, sd = task.cached_head.target_scale(bundle)
        y = (y - mu) / sd
    batches = shuffled_plan(len(y), max(recipe.train.batch_size, 64), seed)(0)
    return sweep(work, lambda i: {"features": scaled[batches[i % len(batches)]], "labels": y[batches[i % len(batches)]]},
                 task.cached_head.loss, steps, "fp32", device, recipe.train.weight_decay, recipe.train.grad_clip)


def resolve_lr(recipe: Recipe, task, bundle, encoded: dict, features: dict, precision: str, device, seed: int) -> dict:
    """Run the range test, write the chosen rate to recipe.train.lr (and train.head_lr for `head`), and
    return the curve for RUN_DIR/lr_range.json. recipe.train.lr holds the table's rate (the prior) on entry.
    Every process of a distributed run computes it and takes rank 0's result."""
    started = time.perf_counter()
    prior = float(recipe.train.lr)
    state = rng_state()
    if on_meta(bundle.model):  # a sharded run's process without the weights (models/meta_load.py) takes rank 0's rate
        return take_rank0_rate(recipe, None)
    try:
        if recipe.method == "head" and task.cached_head is not None:
            lrs, losses, diverged = sweep_head(recipe, task, bundle, features, encoded["train"].labels, device, seed, MAX_STEPS)
        else:
            steps = range_steps(recipe.train.max_steps if isinstance(recipe.train.max_steps, int) else None)
            lrs, losses, diverged = sweep_model(recipe, task, bundle, encoded["train"], precision, device, seed, steps)
    finally:
        set_rng_state(state)  # the run draws the same dropout masks and initialisations as without the test
    chosen, rule, curve = choose(lrs, losses, prior, diverged)
    record = {"lrs": lrs[:len(losses)], "losses": [x if math.isfinite(x) else None for x in losses], "smoothed": curve, "chosen": chosen, "rule": rule, "prior": prior,
              "diverged": diverged, "method": recipe.method, "seconds": round(time.perf_counter() - started, 3)}
    return take_rank0_rate(recipe, record)


def take_rank0_rate(recipe: Recipe, record: dict | None) -> dict:
    """rank 0's range test on every process (one rate, whatever each one's arithmetic), written to the recipe."""
    group = distributed.join() if dist.is_available() and dist.is_initialized() else None
    record = distributed.broadcast(record, group)
    recipe.train.lr = record["chosen"]
    if recipe.method == "head":
        recipe.train.head_lr = record["chosen"]
    return record
