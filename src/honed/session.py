"""A prepared run: the recipe checked, the data loaded and audited, the model loaded, every split
encoded once and the pre-trained features cached. `honed check` stops after `prepare`; `honed
run`, `honed curve` and `honed tune` go on to `setup`. Nothing here branches on the task: each
step is a field of the task's row (tasks/base.py)."""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from . import track
from .auto import resolve_auto, resolve_rates
from .data import rows as row_access
from .errors import RecipeError
from .hooks import Hooks
from .lr_range import applies as range_test_applies
from .lr_range import resolve_lr
from .methods import METHODS
from .memory import (Plan, available_mb, check_memory, estimate_training_memory, largest_fitting_batch,
                     resolve_gradient_checkpointing)
from .models.load import ModelBundle
from .models.meta_load import on_meta
from .phases import Phases
from .recipe import Recipe, features_key, load_recipe, main_seed
from .tasks import TASKS
from .tasks.base import Reference, Splits, Task
from .tasks.chat.loss import split_model as chunked_chat_loss
from .train.allocator import release_free_memory, return_freed_memory
from .train import distributed
from .train.distributed import launched_world
from .train.precision import device as pick_device
from .train.precision import resolve_precision

TRAIN_EVAL_ROWS = 2000  # at most this many training rows are scored at each evaluation, for the train/validation gap
SPLITS = ("train", "validation", "test")
PACKED_TASKS = ("chat", "causal-lm")  # pack sequences (a block mask per row) and score them with chat's chunked loss


@dataclass
class Session:
    """Everything a fine-tune needs that does not change between seeds, fractions or baselines."""

    recipe: Recipe
    task: Task
    splits: Splits  # what task.load_splits returned
    bundle: ModelBundle
    encoded: dict  # split name → encoded split
    features: dict  # split name → pre-trained features (the head's input); empty when the task has none
    precision: str
    device: torch.device
    eval_batch_size: int
    train_eval_idx: torch.Tensor
    reference: Reference
    original_head: torch.nn.Module | None  # the source model's head, for its original task
    memory_estimate: dict
    hooks: Hooks = field(default_factory=Hooks)
    lr_range: dict | None = None  # the learning-rate range test's curve (RUN_DIR/lr_range.json), when `train.lr: auto` ran it
    auto_notes: list[str] = field(default_factory=list)  # how each `auto` was resolved: comments at the top of RUN_DIR/recipe.yaml

    def outputs(self, model, split) -> torch.Tensor:
        """The task's outputs for an encoded split (logits, forecasts, per-conversation NLL)."""
        return self.task.predict(model, split, self.bundle.pad_id, self.eval_batch_size, self.precision, self.device)

    def evaluate(self, model, name: str) -> dict:
        """The task's metrics of `model` on the split `name`."""
        split = self.encoded[name]
        return self.task.metrics(self.outputs(model, split), split)

    def head_features(self, model, split) -> torch.Tensor:
        """The head's inputs for `split` from `model` (the bundle's head name, found inside wrappers)."""
        return timed_features(self.task, self.bundle_for(model), model, split, self.eval_batch_size, self.precision, self.device, self.hooks)

    def bundle_for(self, model) -> ModelBundle:
        """The bundle with another model in it (a fine-tuned copy, a scratch model)."""
        clone = copy.copy(self.bundle)
        clone.model = model
        return clone


def prepare(source, overrides=None) -> tuple[Recipe, object]:
    """Recipe and data: everything `honed check` does, without loading a model."""
    recipe = prepare_recipe(source, overrides)
    return recipe, load_data(recipe)


def prepare_recipe(source, overrides=None) -> Recipe:
    """The recipe, checked against its task and method; no data read yet (the run checks its run directory first)."""
    recipe = load_recipe(source, overrides)
    track.check_available(recipe)
    task = TASKS[recipe.task]
    task.check_recipe(recipe)
    if recipe.method not in task.methods:
        allowed = ", ".join(task.methods[:-1]) + " or " + task.methods[-1]
        raise RecipeError(f"method: {recipe.task} fine-tunes with {allowed}; got {recipe.method!r}")
    method_check = METHODS[recipe.method]["check"]
    if method_check is not None:
        method_check(recipe)
    if recipe.replay is not None and (recipe.reference is None or recipe.reference.label is None):
        raise RecipeError("replay: needs a reference section with a label column (reference.label), so the original task can be replayed")
    return recipe


def load_data(recipe: Recipe):
    """The task's splits, every data error raised here, before a model loads."""
    return TASKS[recipe.task].load_splits(recipe)


def check_audit(recipe: Recipe, splits) -> dict:
    """The audit `honed check` shows: everything that needs no model."""
    return TASKS[recipe.task].audit(recipe, splits)


def setup(recipe: Recipe, splits, cache: dict | None = None, hooks: Hooks | None = None,
          memory_mb: float | None = None, phases: Phases | None = None) -> Session:
    """Load the model, check it fits in memory, encode every split once, and cache the pre-trained features.

    cache (a dict the caller keeps, e.g. one per `honed tune` worker) holds the encoded splits and
    the pre-trained features between runs that differ only in training hyperparameters.
    memory_mb: the memory to plan for (default: what the device has free); `train.gradient_checkpointing:
    auto` is resolved against it and written back to the recipe as a bool. phases times (and prints) each step.
    """
    hooks = hooks or Hooks()
    phases = phases or Phases(enabled=False)
    seed = main_seed(recipe)
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = pick_device()
    task = TASKS[recipe.task]
    with phases.phase("loading the model"):
        bundle = task.load_model(recipe, splits)
    range_test = range_test_applies(recipe, bundle.family, recipe.train.lr == "auto")
    was_auto = {key: getattr(recipe.train, key) == "auto" for key in ("batch_size", "epochs", "eval_every", "gradient_checkpointing")}
    resolve_rates(recipe, bundle.family)  # the table's rate: the memory check's input and the range test's prior
    precision = resolve_precision(recipe.train.precision, dev)
    memory = memory_estimate(recipe, task, bundle, precision, splits, dev, memory_mb, batch_auto=was_auto["batch_size"])
    if was_auto["batch_size"] or was_auto["gradient_checkpointing"]:
        # every process of a distributed run must take the same steps: rank 0's memory decides (processes see different free memory)
        t = recipe.train
        t.batch_size, t.grad_accumulation, t.gradient_checkpointing = distributed.broadcast(
            (t.batch_size, t.grad_accumulation, t.gradient_checkpointing), distributed.join())
    if recipe.train.gradient_checkpointing is True:  # memory before speed: freed buffers go back at once
        return_freed_memory(dev)
    key = features_key(recipe, precision)
    cached = cache.get(key) if cache is not None else None
    if cached is None:
        with phases.phase("tokenising", lambda: f"{sum(len(getattr(splits, n)) for n in SPLITS)} rows"):
            encoded = {name: task.encode(bundle, getattr(splits, name), splits.labels, recipe) for name in SPLITS}
    if not on_meta(bundle.model):  # a sharded run's other processes have no weights yet (models/meta_load.py)
        bundle.model.to(dev)
    eval_bs = max(32, 2 * recipe.train.batch_size)
    if cached is None:
        with phases.phase("feature pass") if task.features is not None else nullcontext():
            features = {} if task.features is None else {
                name: timed_features(task, bundle, bundle.model, split, eval_bs, precision, dev, hooks) for name, split in encoded.items()}
        if cache is not None:
            cache[key] = (encoded, features)
    else:
        encoded, features = cached
    # epochs, max_steps and eval_every count the training plan's batches (packed chat rows, not conversations)
    plan = task.batches(encoded["train"], recipe, seed, bundle.pad_id).plan(0)
    resolve_auto(recipe, bundle.family, len(splits.train), len(plan))
    # after encoding (it needs batches) and before anything trains; the model and random state are restored
    with phases.phase("learning-rate range test") if range_test else nullcontext():
        lr_range = resolve_lr(recipe, task, bundle, encoded, features, precision, dev, seed) if range_test else None
    notes = auto_notes(recipe, was_auto, memory, lr_range, len(splits.train))
    g = torch.Generator().manual_seed(seed)
    # the gap needs the training score only as precisely as the validation score it is compared with
    train_eval_rows = min(TRAIN_EVAL_ROWS, max(256, len(encoded["validation"])))
    train_eval_idx = torch.randperm(len(encoded["train"]), generator=g)[:train_eval_rows]
    release_free_memory()
    reference, original_head = task.load_reference(recipe, bundle, encoded)
    return Session(recipe, task, splits, bundle, encoded, features, precision, dev, eval_bs, train_eval_idx,
                   reference, original_head, memory, hooks, lr_range, notes)


def memory_plan(recipe: Recipe, task: Task, bundle: ModelBundle, precision: str, splits=None) -> Plan:
    """The recipe's figures the memory estimate reads (train.gradient_checkpointing: auto counts as off)."""
    t = recipe.train
    eval_bs = max(32, 2 * t.batch_size)
    # every evaluation scores validation and up to TRAIN_EVAL_ROWS training rows in batches of eval_bs
    sizes = [len(getattr(splits, name)) for name in SPLITS] if splits is not None else []
    targets = recipe.lora.target_modules
    return Plan(method=recipe.method, batch_size=t.batch_size, seq_len=task.sequence_length(recipe, bundle.model), precision=precision,
                gradient_checkpointing=t.gradient_checkpointing is True, world_size=launched_world(),
                fsdp=t.distributed == "fsdp", offload=t.offload, grad_accumulation=t.grad_accumulation, family=bundle.family,
                head_name=bundle.head_name or "", lora_r=recipe.lora.r, lora_targets=tuple(targets) if targets else None,
                qlora_bits=recipe.qlora.bits, qlora_double_quant=recipe.qlora.double_quant, freeze_layers=recipe.freeze.layers,
                eval_rows=min(eval_bs, max(sizes)) if sizes and max(sizes) > 0 else eval_bs, packed_mask=recipe.task in PACKED_TASKS,
                chunked_logits=recipe.task in PACKED_TASKS and recipe.train.distributed != "fsdp" and chunked_chat_loss(bundle.model) is not None)


def memory_estimate(recipe: Recipe, task: Task, bundle: ModelBundle, precision: str, splits=None,
                    device: torch.device | None = None, memory_mb: float | None = None, batch_auto: bool = False) -> dict:
    """The peak training will need (docs/memory.md), refused with the cheapest change that fits when
    the device does not have it; resolves `train.gradient_checkpointing: auto` into the recipe first,
    and with batch_auto (the recipe said `train.batch_size: auto`; recipe.train.batch_size holds the
    family's effective batch) the largest micro-batch that fits, with gradient accumulation up to it.
    Returns the estimate's parts in MB ("total_mb" is the per-process peak; "auto_batch" with batch_auto; on a CPU
    "total_mb" counts the data the run is about to add: "data_mb")."""
    device = device or torch.device("cpu")
    have = available_mb(device) if memory_mb is None else memory_mb
    data_mb = data_memory_mb(recipe, task, bundle, splits) if device.type == "cpu" and splits is not None else 0.0
    have -= data_mb  # the token ids and cached features share the host memory with training
    plan = memory_plan(recipe, task, bundle, precision, splits)
    t = recipe.train
    if t.distributed == "auto" and plan.world_size > 1:
        # as the engine choice does: FSDP when one process cannot hold weights, gradients and optimizer state
        whole = estimate_training_memory(bundle.model, plan.but(world_size=1))
        state = whole["weights_mb"] + whole["gradients_mb"] + whole["optimizer_mb"]
        plan = plan.but(fsdp=t.offload or state > have)
    auto_batch = None
    if batch_auto:
        target, effective = plan.batch_size, plan.batch_size * plan.grad_accumulation
        fitted = largest_fitting_batch(bundle.model, plan, device, have)
        if fitted is None and t.gradient_checkpointing == "auto":  # no micro-batch fits without it: checkpointing comes next
            fitted = largest_fitting_batch(bundle.model, plan.but(gradient_checkpointing=True), device, have)
            t.gradient_checkpointing = True if fitted is not None else "auto"
        if fitted is not None:
            plan = fitted
            t.batch_size, t.grad_accumulation = plan.batch_size, plan.grad_accumulation
        whole = estimate_training_memory(bundle.model, plan.but(batch_size=target, grad_accumulation=1))
        auto_batch = {"effective": effective, "micro": plan.batch_size, "accumulation": plan.grad_accumulation,
                      "needed_at_effective_mb": round(whole["total_mb"], 1), "have_mb": round(have, 1)}
    if t.gradient_checkpointing == "auto":
        t.gradient_checkpointing = resolve_gradient_checkpointing(bundle.model, plan, device, have)
        plan = plan.but(gradient_checkpointing=t.gradient_checkpointing)
    estimate = check_memory(bundle.model, plan, device, tuple(task.methods), have)
    estimate = {**estimate, "data_mb": data_mb, "total_mb": estimate["total_mb"] + data_mb}
    return {**estimate, "auto_batch": auto_batch} if auto_batch is not None else estimate


def auto_notes(recipe: Recipe, was_auto: dict, memory: dict, lr_range: dict | None, n_train: int) -> list[str]:
    """One line per `auto` key the session resolved, saying from what (RUN_DIR/recipe.yaml's header; docs/auto.md)."""
    t = recipe.train
    notes = []
    if lr_range is not None:
        prior = "" if "table" in lr_range["rule"] else f"; the table's {lr_range['prior']:g}"
        notes.append(f"train.lr: auto -> {t.lr:g}: the learning-rate range test ({lr_range['rule']}{prior}; lr_range.json)")
    batch = memory.get("auto_batch")
    if batch is not None:
        if batch["accumulation"] > 1 or batch["micro"] < batch["effective"]:
            notes.append(f"train.batch_size: auto -> {batch['micro']} x train.grad_accumulation {batch['accumulation']} = "
                         f"{batch['effective']} rows per step: the memory check estimates {batch['needed_at_effective_mb'] / 1024:.1f} GB "
                         f"for a batch of {batch['effective']} against {batch['have_mb'] / 1024:.1f} GB free (90 % headroom)")
        else:
            notes.append(f"train.batch_size: auto -> {batch['micro']}: the family's effective batch, which fits "
                         f"({memory['total_mb'] / 1024:.1f} GB of {batch['have_mb'] / 1024:.1f} GB free)")
    if was_auto["epochs"]:
        notes.append(f"train.epochs: auto -> {t.epochs} for {n_train} training rows (early stopping after {t.patience} evaluations without improvement)")
    if was_auto["eval_every"]:
        notes.append(f"train.eval_every: auto -> {t.eval_every} optimizer steps")
    if was_auto["gradient_checkpointing"]:
        notes.append(f"train.gradient_checkpointing: auto -> {str(t.gradient_checkpointing).lower()}: "
                     f"{'needed to fit' if t.gradient_checkpointing else 'the run fits without it'} ({memory['total_mb'] / 1024:.1f} GB estimated)")
    return notes


TOKEN_BYTES = 8 + 4  # an int64 id in the ragged tensor, and its int32 copy in the tokenisation cache while it is read
CHARS_PER_TOKEN = 3.0  # a cautious average (English: ~4 with a 32k vocabulary)


def data_memory_mb(recipe: Recipe, task: Task, bundle: ModelBundle, splits) -> float:
    """MB the data adds once the splits are read: token ids for tokenised tasks, and the cached
    features the head trains on (the frames themselves are already in memory, so already not free)."""
    rows = sum(len(getattr(splits, name)) for name in SPLITS)
    total = 0.0
    if bundle.encode is not None:
        train = splits.train
        if "text" in row_access.column_names(train) and len(train):
            sample = row_access.column(row_access.take(train, np.arange(min(len(train), 10_000))), "text").astype(str).str.len().mean()
            per_row = min(recipe.data.max_length, sample / CHARS_PER_TOKEN + 2)
        else:
            per_row = task.sequence_length(recipe, bundle.model)
        total += rows * per_row * TOKEN_BYTES
    if task.features is not None:
        try:
            total += rows * bundle.head().in_features * 4
        except AttributeError:  # a head that is not one linear layer: its features are counted by the estimate
            pass
    return total / 2**20


def timed_features(task: Task, bundle, model, split, batch_size: int, precision: str, device, hooks: Hooks) -> torch.Tensor:
    """task.features, reported to hooks.on_features (rows, seconds)."""
    started = time.perf_counter()
    out = task.features(bundle, model, split, batch_size, precision, device)
    if hooks.on_features is not None:
        hooks.on_features(len(split), time.perf_counter() - started)
    return out
