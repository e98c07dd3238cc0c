"""The Task protocol: everything that differs between tasks, as one frozen row of functions.

The run (honed/run.py) calls only these fields, so a new task is a new folder and a new row in
tasks/__init__.py, never a branch in the run. Capabilities a task does not have are `None`
(no linear probe, no cached-feature head, no bias guard, not servable), never stubs that raise.
The contract test (tests/test_task_contract.py) checks every row; docs/adding-a-task.md
walks through writing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from ..errors import RecipeError
from ..recipe import SeriesModelSpec
from ..train.precision import device as pick_device
from ..train.precision import resolve_precision


class Splits(Protocol):
    """What a task's load_splits returns: a frame per split, the classes (None without classes) and audit notes."""

    train: Any
    validation: Any
    test: Any
    labels: list[str] | None
    notes: list[dict]


@dataclass
class Reference:
    """Inputs from the model's original world; labels when the original task can be scored."""

    name: str
    encoded: Any
    labels: torch.Tensor | None
    on_validation: bool


@dataclass
class FeatureSplit:
    """Cached features and their targets: what the head stage trains and is scored on."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class CachedHead:
    """The head stage trains the final linear layer on cached backbone features (head, LP-FT).

    target_scale(bundle) -> (mean, std) standardises regression targets for the head; None for
    classes.
    """

    loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    target_scale: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass(frozen=True)
class Task:
    """One task's whole lifecycle. Signatures use these names:

    recipe: honed.recipe.Recipe; splits: what load_splits returns (frames per split, `labels`,
    `notes`); bundle: honed.models.load.ModelBundle; split: an encoded split (what encode
    returns); session: honed.session.Session (everything prepared for a run); tuner:
    honed.finetune.FineTuner (fine-tunes copies of the pre-trained model).
    """

    name: str
    primary: str  # the metric the loop maximises and early-stops on; higher is better
    lower_is_better: frozenset[str]  # metrics this task reports where lower is better (the report and tune read it)
    default_family: str  # the model family `auto` settings use when the recipe names a Hub id or folder
    methods: tuple[str, ...]  # the methods this task can fine-tune with

    # recipe and data: everything `honed check` does, no model needed
    check_recipe: Callable[[Any], None]  # (recipe) raises RecipeError for a combination this task cannot run
    load_splits: Callable[[Any], Any]  # (recipe) -> splits, with every data error raised before a model loads
    audit: Callable[..., dict]  # (recipe, splits, bundle=None, encoded=None) -> audit.json

    # the model and its data path
    load_model: Callable[[Any, Any], Any]  # (recipe, splits) -> bundle
    sequence_length: Callable[[Any, torch.nn.Module], int]  # (recipe, model) -> tokens per example, for the memory check
    encode: Callable[[Any, Any, Any, Any], Any]  # (bundle, frame, labels, recipe) -> split
    subset: Callable[[Any, torch.Tensor], Any]  # (split, indices) -> split
    collate: Callable[..., dict]  # (split, indices, pad_id) -> batch
    batches: Callable[[Any, Any, int, int], Any]  # (split, recipe, seed, pad_id) -> train.loop.Batches
    loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    predict: Callable[..., torch.Tensor]  # (model, split, pad_id, batch_size, precision, device) -> outputs
    metrics: Callable[[torch.Tensor, Any], dict]  # (outputs, split) -> {metric: value}
    features: Callable[..., torch.Tensor] | None  # (bundle, model, split, batch_size, precision, device) -> the head's inputs
    probe: Callable[..., dict] | None  # linear probe on cached features (train_x, train_y, val_x, val_y, test_x, test_y, seed)
    cached_head: CachedHead | None  # None: the head stage trains inside the frozen model

    # the guards' inputs
    before: Callable[[Any, dict | None], dict]  # (session, cache) -> the pre-trained state: {"test", "validation", "summary", ...}
    before_needs_untouched_model: bool  # True: `before` runs before training (the model trains in place)
    load_reference: Callable[[Any, Any, dict], tuple[Reference, torch.nn.Module | None]]  # (recipe, bundle, encoded) -> (reference, original head)
    forgetting: Callable[..., tuple[dict, torch.nn.Module]]  # (session, tuner, model, before) -> (guard, exported model)
    overfitting: Callable[..., dict]  # (session, history, best_step, test_outputs, seeds) -> guard
    baseline: Callable[..., dict]  # (session, tuner, test_metrics, before, train_seconds, say) -> guard
    bias: Callable[..., dict] | None  # (session, test_outputs, before) -> guard; None: not measured for this task
    class_counts: Callable[[Any], dict | None]  # (session) -> examples per class, or None without classes
    curve_subsets: Callable[[Any, list[float], int], list[torch.Tensor]]  # (train split, fractions, seed) -> nested subsets

    # outputs
    write_predictions: Callable[[Any, Any, torch.Tensor], None]  # (path, session, test_outputs) -> predictions.csv
    model_meta: Callable[[Any, Any], dict]  # (recipe, splits) -> what honed.json needs for `honed predict`
    summary: Callable[..., dict]  # (session, model, before, test_outputs, guards) -> task-specific metrics.json keys
    predict_file: Callable[..., Any]  # (model_dir, meta, input_path, batch_size) -> predictions DataFrame (`honed predict`)
    request_schema: type | None = None  # the pydantic model `honed serve` validates a request with; None: not servable
    tie_break: str | None = None  # a metric (lower is better) that decides between evaluations with equal primary metrics


TOKEN_MIXTURE_TASKS = ("chat", "causal-lm", "text-classification")  # the tasks whose mixtures can be weighted by tokens (data.mix_by: tokens)


def refuse_mix_by_tokens(recipe) -> None:
    """`data.mix_by: tokens` in a task that does not count tokens when it mixes sources."""
    if recipe.data.mix_by == "tokens":
        raise RecipeError(f"data.mix_by: tokens weighs a mixture by the tokens of its rows, which task {recipe.task} does not mix by "
                          f"(only {', '.join(TOKEN_MIXTURE_TASKS)} do); remove data.mix_by or set it to examples")


def mixture_counter(recipe, make: Callable[[Any], Callable]) -> Callable | None:
    """The per-row token counter a task hands data.sources.mix when the recipe weighs a mixture by
    tokens (make(recipe) builds it, loading the tokenizer only then); None otherwise."""
    spec = recipe.data
    if spec.mix_by != "tokens" or not any(isinstance(getattr(spec, role), list) for role in ("train", "validation", "test")):
        return None
    return make(recipe)


def refuse_series_model(recipe) -> None:
    """A forecasting architecture spec (`model: {architecture: patchtst}`) in a task that is not forecasting."""
    if isinstance(recipe.model, SeriesModelSpec):
        raise RecipeError(f"model: architecture {recipe.model.architecture!r} is a forecasting model; task {recipe.task} cannot use it")


def saved_device_and_precision(meta: dict):
    """For `honed predict`: the best device, and the precision the run was evaluated in (honed.json),
    so predictions match predictions.csv."""
    dev = pick_device()
    return dev, resolve_precision(meta.get("precision", "auto"), dev)


def saved_columns(recipe) -> dict:
    """The input columns `honed predict` reads, as every task's honed.json records them."""
    return {"max_length": recipe.data.max_length, "text_column": recipe.data.text, "image_column": recipe.data.image,
            "features": recipe.data.features}
