"""The pipeline: recipe → data → model → method → train → evaluate → guards → run directory.

`honed run` and `honed.run()` both call `run()`. Every stage is a plain function; this file
only sequences them. The fine-tuning itself (`fine_tune`) is reused by the guards that need
more than one training run: seeds, the learning curve and the from-scratch baseline.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import track
from .data.audit import audit_text_splits
from .data.load import read_table
from .data.images import audit_images, load_image_splits
from .data.tabular import audit_tabular, fit_preprocessor, infer_types, load_tabular_splits
from .data.text import TextSplits, label_to_str, load_text_splits
from .errors import DataError, RecipeError, TrainingInterrupted
from .guards import bias as bias_guard_mod
from .guards import data_curve
from .guards.forgetting import choose_interpolation_alpha, forgetting_guard, interpolate_state, linear_cka
from .guards.overfit import overfitting_guard
from .guards.status import guard_result, skipped
from .memory import check_memory, estimate_training_memory
from .methods import METHODS
from .models.load import ModelBundle, _relabel, load_hf_image, load_pretrained, load_saved, logits_of, run_model_dir, save_model, scratch_copy
from .recipe import MLPSpec, Recipe, dump_recipe, load_recipe
from .tasks import TASKS
from .tasks import text_classification as tc
from .train import distributed
from .train.allocator import release_free_memory
from .train.checkpoint import Checkpointer, StateOnDisk, write_json_atomic
from .train.loop import LoopConfig, Outcome, train
from .train.precision import device as pick_device
from .train.precision import resolve_precision, set_threads
from .train.progress import TrainingProgress, quiet

TRAIN_EVAL_ROWS = 2000  # at most this many training rows are scored at each evaluation, for the train/validation gap
PROBE_MARGIN = 0.01  # the baseline guard warns when fine-tuning scores this far below the linear probe
BASELINE_AUTO_SECONDS = 300  # `baseline: auto` trains the scratch model when fine-tuning took less than this
DEFAULT_ALPHAS = [round(0.1 * i, 1) for i in range(11)]


@dataclass
class RunResult:
    """What `honed.run` returns: the run directory and the contents of metrics.json."""

    run_dir: Path
    metrics: dict

    def __getitem__(self, key):
        return self.metrics[key]


@dataclass
class Context:
    """Everything a fine-tune needs that does not change between seeds, fractions or baselines."""

    recipe: Recipe
    splits: TextSplits
    task: dict  # the row of tasks.TASKS for recipe.task
    bundle: ModelBundle
    pristine: dict | StateOnDisk  # the pre-trained state dict, before any training (on disk during a run)
    encoded: dict  # split name → EncodedSplit
    features: dict  # split name → pre-trained features (the head's input)
    precision: str
    device: torch.device
    eval_batch_size: int
    train_eval_idx: torch.Tensor
    reference: "Reference | None" = None
    original_head: torch.nn.Module | None = None  # the source model's head, for the original task
    extra: dict = field(default_factory=dict)


@dataclass
class Reference:
    """Inputs from the model's original world; labels when the original task can be scored."""

    name: str
    encoded: object
    labels: torch.Tensor | None
    on_validation: bool


# --------------------------------------------------------------------------- resolution of `auto`

AUTO_LR = {  # (family, method) → learning rate; design.md §4 "Expertise"
    ("hf", "full"): 3e-5, ("hf", "freeze"): 5e-5, ("hf", "lora"): 2e-4, ("hf", "lp-ft"): 2e-5,
    # WordLlama is an embedding table with no transformer layers: it tolerates far larger steps
    ("wordllama", "full"): 2e-3, ("wordllama", "freeze"): 2e-3, ("wordllama", "lora"): 5e-3, ("wordllama", "lp-ft"): 1e-3,
    ("hf-image", "full"): 5e-5, ("hf-image", "freeze"): 5e-5, ("hf-image", "lora"): 2e-4, ("hf-image", "lp-ft"): 3e-5,
    # small tabular MLPs: Adam's usual 1e-3
    ("mlp", "full"): 1e-3, ("mlp", "freeze"): 1e-3, ("mlp", "lora"): 3e-3, ("mlp", "lp-ft"): 1e-3,
    # causal LMs (task: chat): instruction-tuning defaults
    ("causal-lm", "full"): 2e-5, ("causal-lm", "freeze"): 3e-5, ("causal-lm", "lora"): 2e-4,
    # small PatchTST/PatchTSMixer forecasters (tens of thousands of weights): Adam's usual 1e-3
    ("ts-forecast", "full"): 3e-3, ("ts-forecast", "freeze"): 3e-3, ("ts-forecast", "lora"): 1e-2, ("ts-forecast", "lp-ft"): 1e-3,
}
AUTO_HEAD_LR = 1e-2  # on standardised features
FORECAST_STEPS = 500  # `epochs: auto` for forecasters: about this many optimizer steps


def resolve_auto(recipe: Recipe, family: str, n_train: int) -> Recipe:
    """Fill every `auto` with its value for this model family, method and data size."""
    t = recipe.train
    if t.lr == "auto":
        t.lr = AUTO_HEAD_LR if recipe.method == "head" else AUTO_LR[(family, recipe.method)]
    if t.head_lr == "auto":
        t.head_lr = AUTO_HEAD_LR
    if t.batch_size == "auto":
        t.batch_size = {"wordllama": 32, "mlp": 64, "ts-forecast": 32}.get(family, 16)
    per_epoch = math.ceil(n_train / t.batch_size / t.grad_accumulation)
    if t.epochs == "auto" and family == "ts-forecast":
        # a small forecaster trained from few windows needs a few hundred steps whatever the data size
        t.epochs = min(200, max(10, math.ceil(FORECAST_STEPS / per_epoch)))
    elif t.epochs == "auto":
        # small data needs more passes; early stopping ends runs that stop improving
        t.epochs = 10 if n_train < 2000 else 5 if n_train < 20000 else 3
    if t.eval_every == "auto" and family == "ts-forecast":
        # about 20 evaluations per run: a handful of windows per epoch would otherwise stop early in the warm-up
        t.eval_every = max(per_epoch, per_epoch * t.epochs // 20)
    elif t.eval_every == "auto":
        t.eval_every = max(1, per_epoch // 2)
    return recipe


# --------------------------------------------------------------------------- run directory

def default_run_dir(recipe: Recipe, source) -> Path:
    if recipe.out:
        return Path(recipe.out)
    stem = Path(source).stem if isinstance(source, (str, Path)) else "run"
    return Path("runs") / stem


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse what would lose or overwrite work, before anything is loaded (writes nothing)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"out: {run_dir} exists and is a file; choose another --out")
    exists = run_dir.exists() and any(run_dir.iterdir())
    if resume and exists and not (run_dir / "recipe.yaml").exists():
        raise RecipeError(f"--resume: {run_dir} is not a honed run directory (no recipe.yaml)")
    if resume and not exists:
        raise RecipeError(f"--resume: {run_dir} holds no run to resume; drop --resume to start one")
    if exists and not resume and not overwrite:
        raise RecipeError(f"out: run directory {run_dir} already exists; pass --resume to continue it, --overwrite to replace it, or --out for a new one")
    if exists and overwrite and not (run_dir / "recipe.yaml").exists():
        raise RecipeError(f"--overwrite: {run_dir} is not a honed run directory; refusing to delete it")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Never silently overwrite: an existing run needs --resume or --overwrite."""
    check_run_dir(run_dir, resume, overwrite)
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and overwrite and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def check_resume_recipe(run_dir: Path, recipe: Recipe) -> None:
    try:  # read with today's defaults, so a field added by an upgrade does not block a resume
        saved = dump_recipe(load_recipe(run_dir / "recipe.yaml"))
    except RecipeError:
        saved = None
    if saved != dump_recipe(recipe):
        raise RecipeError(f"--resume: the recipe differs from the one {run_dir} was started with; resume with the same recipe and overrides, or start a new run")


def write_history(run_dir: Path, history: list[dict]) -> None:
    tmp = run_dir / "history.jsonl.partial"
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    os.replace(tmp, run_dir / "history.jsonl")


# --------------------------------------------------------------------------- set-up

def prepare(source, overrides=None):
    """Recipe and data: everything `honed check` does, without loading a model."""
    recipe = load_recipe(source, overrides)
    track.check_available(recipe)
    if recipe.task != "forecasting" and not isinstance(recipe.model, (str, MLPSpec)):
        raise RecipeError(f"model: architecture {recipe.model.architecture!r} is a forecasting model; task {recipe.task} cannot use it")
    if recipe.task.startswith("tabular"):
        splits = load_tabular_splits(recipe, recipe.train.seed)
    elif recipe.task == "forecasting":
        from .data.forecasting import load_forecast_splits

        if isinstance(recipe.model, MLPSpec):
            raise RecipeError("model: architecture 'mlp' is for tabular tasks; forecasting builds {architecture: patchtst} or {architecture: patchtsmixer}, or loads a checkpoint or an earlier run")
        if recipe.replay is not None:
            raise RecipeError("replay: not available for forecasting; remove the replay section (lora, freeze, l2sp or interpolate limit forgetting)")
        if recipe.reference is not None and recipe.reference.label is not None:
            raise RecipeError("reference.label: forecasting scores the reference series on their own target (data.target); remove reference.label")
        return recipe, load_forecast_splits(recipe)
    elif recipe.task == "image-classification":
        if not isinstance(recipe.model, str):
            raise RecipeError("model: image-classification needs a checkpoint folder, a Hub id or a honed image run")
        splits = load_image_splits(recipe, recipe.train.seed)
    elif recipe.task == "chat":
        from .data.chat import load_chat_splits

        if not isinstance(recipe.model, str):
            raise RecipeError("model: chat needs a causal language model checkpoint folder, a Hub id or a honed chat run")
        if recipe.method not in ("lora", "full", "freeze"):
            raise RecipeError(f"method: chat fine-tunes with lora, full or freeze; got {recipe.method!r}")
        if recipe.replay is not None:
            raise RecipeError("replay: not available for task chat yet; remove the replay section (lora, freeze or interpolate limit forgetting)")
        if recipe.reference is not None and recipe.reference.label is not None:
            raise RecipeError("reference.label: chat measures forgetting as perplexity on reference text; remove reference.label")
        splits = load_chat_splits(recipe, recipe.train.seed)
        return recipe, splits
    else:
        if not isinstance(recipe.model, str):
            raise RecipeError("model: an architecture spec is for tabular tasks; text-classification needs a checkpoint, a Hub id or 'wordllama'")
        splits = load_text_splits(recipe.data, recipe.train.seed)
    if recipe.replay is not None and (recipe.reference is None or recipe.reference.label is None):
        raise RecipeError("replay: needs a reference section with a label column (reference.label), so the original task can be replayed")
    return recipe, splits


def check_audit(recipe: Recipe, splits) -> dict:
    """The audit `honed check` shows: everything that needs no model."""
    if recipe.task.startswith("tabular"):
        numeric, categorical = infer_types(splits.train, recipe.data.features, recipe.data.categorical, recipe.data.numeric)
        return audit_tabular(splits, fit_preprocessor(splits.train, numeric, categorical))
    if recipe.task == "image-classification":
        return audit_images(splits)
    if recipe.task == "forecasting":
        from .data.forecasting import audit_forecast

        return audit_forecast(splits)
    if recipe.task == "chat":  # token-level figures need the tokenizer: `honed run` reports them
        return {"findings": list(splits.notes),
                "splits": {name: {"rows": int(len(getattr(splits, name)))} for name in ("train", "validation", "test")}}
    return audit_text_splits(splits)


def main_seed(recipe: Recipe) -> int:
    return recipe.train.seeds[0] if recipe.train.seeds else recipe.train.seed


def features_key(recipe: Recipe, precision: str) -> str:
    """What the tokenised splits and the pre-trained features depend on; none of it is a training hyperparameter."""
    model = recipe.model if isinstance(recipe.model, str) else recipe.model.model_dump(mode="json")
    return json.dumps({"task": recipe.task, "model": model, "data": recipe.data.model_dump(mode="json"),
                       "seed": main_seed(recipe), "precision": precision}, sort_keys=True)


def setup(recipe: Recipe, splits: TextSplits, cache: dict | None = None) -> Context:
    """Load the model, tokenise every split once, and cache the pre-trained features.

    cache (a dict the caller keeps, e.g. one per `honed tune` worker) holds the tokenised splits and
    the pre-trained features between runs that differ only in training hyperparameters.
    """
    seed = main_seed(recipe)
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = pick_device()
    task = dict(TASKS[recipe.task])
    if "batches_for" in task:  # batches that depend on the recipe (image augmentation)
        task["batches"] = task["batches_for"](recipe)
    if recipe.task.startswith("tabular"):
        bundle = load_tabular_model(recipe, splits)
    elif recipe.task == "forecasting":
        bundle = load_forecast_model(recipe)
    elif recipe.task == "image-classification":
        bundle = load_image_model(recipe, splits.labels)
    elif recipe.task == "chat":
        from .models.causal_lm import load_causal_lm, lora_targets

        bundle = load_causal_lm(recipe.model, recipe)
        if recipe.lora.target_modules is None:  # the blocks' projections; lm_head stays out
            recipe.lora.target_modules = lora_targets(bundle.model, bundle.head_name)
    else:
        bundle = load_pretrained(recipe.model, splits.labels, recipe)
    resolve_auto(recipe, bundle.family, len(splits.train))
    precision = resolve_precision(recipe.train.precision, dev)
    memory = _memory_estimate(recipe, bundle, precision)
    check_memory(memory, dev, recipe.method, recipe.train.batch_size)
    key = features_key(recipe, precision)
    cached = cache.get(key) if cache is not None else None
    if cached is None:
        encoded = {name: task["encode"](bundle, frame, splits.labels, recipe)
                   for name, frame in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))}
    bundle.model.to(dev)
    eval_bs = max(32, 2 * recipe.train.batch_size)
    if cached is None:
        features = {name: task["features"](bundle, bundle.model, split, eval_bs, precision, dev) for name, split in encoded.items()}
        if cache is not None:
            cache[key] = (encoded, features)
    else:
        encoded, features = cached
    g = torch.Generator().manual_seed(seed)
    # the gap needs the training score only as precisely as the validation score it is compared with
    train_eval_rows = min(TRAIN_EVAL_ROWS, max(256, len(encoded["validation"])))
    train_eval_idx = torch.randperm(len(encoded["train"]), generator=g)[:train_eval_rows]
    # no clone: bundle.model is never trained in place (fine_tune trains a deep copy)
    ctx = Context(recipe, splits, task, bundle, {k: v.detach() for k, v in bundle.model.state_dict().items()},
                  encoded, features, precision, dev, eval_bs, train_eval_idx)
    ctx.extra["memory_estimate"] = memory
    release_free_memory()
    if recipe.task == "chat":  # no original head; forgetting is perplexity and drift on reference text
        from .tasks import chat

        ctx.reference = chat.load_reference(recipe, bundle, encoded)
        return ctx
    ctx.original_head, original_labels = _original_head(bundle)
    ctx.reference = _load_reference(recipe, bundle, encoded, original_labels)
    return ctx


def _memory_estimate(recipe: Recipe, bundle: ModelBundle, precision: str) -> dict:
    model = bundle.model
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in bundle.head().parameters())
    fraction = {"head": head / total, "lora": 0.02 + head / total, "freeze": 0.5}.get(recipe.method, 1.0)
    if recipe.task in ("text-classification", "chat"):
        seq_len = recipe.data.max_length
    elif recipe.task == "image-classification":
        size, patch = getattr(model.config, "image_size", 224), getattr(model.config, "patch_size", 16)
        seq_len = (size // patch) ** 2 + 1 if isinstance(size, int) and isinstance(patch, int) else 197
    else:
        seq_len = 1
    return estimate_training_memory(model, recipe.train.batch_size, seq_len, precision, fraction)


def load_image_model(recipe: Recipe, labels: list[str]) -> ModelBundle:
    """An image checkpoint (folder or Hub id), or an earlier honed image run (given a new head when its classes differ)."""
    path = Path(recipe.model)
    model_dir = run_model_dir(path) if path.exists() else None
    if model_dir is not None:
        bundle = load_saved(model_dir)
        if bundle.family != "hf-image":
            raise RecipeError(f"model: {recipe.model} is a {bundle.family} run; image-classification needs an image model")
        return _relabel(bundle, labels)
    if path.is_absolute() and not path.exists():
        raise RecipeError(f"model: {recipe.model} does not exist; give an image checkpoint folder, a Hub id or a honed image run")
    return load_hf_image(recipe.model, labels, recipe)


def load_forecast_model(recipe: Recipe) -> ModelBundle:
    """A fresh PatchTST/PatchTSMixer (`model: {architecture: patchtst}`), a checkpoint, or an earlier forecasting run."""
    from .models.forecast import build_forecaster, load_forecaster

    channels = 1 + len(recipe.data.covariates)
    if isinstance(recipe.model, str):
        return load_forecaster(recipe.model, recipe, channels)
    return build_forecaster(recipe.model, channels, recipe.data.context_length, recipe.data.horizon)


def load_tabular_model(recipe: Recipe, splits) -> ModelBundle:
    """A fresh MLP (`model: {architecture: mlp}`), or an earlier honed tabular run to fine-tune."""
    from .models.mlp import build_mlp

    regression = recipe.task == "tabular-regression"
    if not isinstance(recipe.model, str):
        numeric, categorical = infer_types(splits.train, recipe.data.features, recipe.data.categorical, recipe.data.numeric)
        pre = fit_preprocessor(splits.train, numeric, categorical)
        model = build_mlp(recipe.model, pre.width, 1 if regression else len(splits.labels), regression)
        if regression:
            model.target_mean.fill_(float(splits.train["label"].mean()))
            model.target_std.fill_(float(splits.train["label"].std() or 1.0))
        bundle = ModelBundle("mlp", model, None, 0, "classifier", splits.labels or [], "mlp (random init)")
        bundle.preprocessor = pre
        return bundle
    model_dir = run_model_dir(Path(recipe.model)) if Path(recipe.model).exists() else None
    if model_dir is None:
        raise RecipeError(f"model: {recipe.model} is not a honed tabular run directory; give an earlier run, or {{architecture: mlp}} to start from scratch")
    bundle = load_saved(model_dir)
    if bundle.family != "mlp":
        raise RecipeError(f"model: {recipe.model} is a {bundle.family} model; a tabular task needs a tabular honed run or {{architecture: mlp}}")
    source_cols, wanted = set(bundle.preprocessor.columns), set(recipe.data.features)
    if source_cols != wanted:
        missing, extra = sorted(source_cols - wanted), sorted(wanted - source_cols)
        raise RecipeError("data.features: the source model was trained on other columns"
                          + (f"; missing here: {', '.join(missing)}" if missing else "")
                          + (f"; not in the source: {', '.join(extra)}" if extra else "")
                          + "; use the source's feature columns")
    if bundle.model.regression != regression:
        raise RecipeError(f"task: the source model is a {'regression' if bundle.model.regression else 'classification'} model; the recipe asks for {recipe.task}")
    if not regression:
        bundle = _relabel(bundle, splits.labels)
    return bundle


def _original_head(bundle: ModelBundle):
    """The head the source model had for its own task (kept when honed gave it a new one)."""
    original = getattr(bundle, "original_head", None)
    # the same classes as the source model: its own head, as loaded, is the original one
    module, labels = original if original is not None else (bundle.head(), list(bundle.labels))
    module = copy.deepcopy(module).float()
    for p in module.parameters():
        p.requires_grad_(False)
    return module, labels


def _load_reference(recipe: Recipe, bundle: ModelBundle, encoded: dict, original_labels) -> Reference:
    spec = recipe.reference
    if spec is None:
        return Reference("the validation inputs (no reference set given)", encoded["validation"], None, True)
    frame = read_table(spec.data, "reference.data")
    if recipe.task == "forecasting":  # series from the source model's world, in the training file's long format
        from .data.forecasting import check_long_frame
        from .tasks.forecasting import reference_windows

        checked = check_long_frame(frame, recipe.data, Path(spec.data).name, where="reference.data").reset_index(drop=True)
        enc = TASKS[recipe.task]["encode"](bundle, reference_windows(checked, recipe.data, int(recipe.data.season), recipe.data.horizon), None, recipe)
        return Reference(Path(spec.data).name, enc, enc.labels, False)
    if not recipe.task.startswith("tabular") and spec.text not in frame.columns:
        raise DataError(f"reference.text: column '{spec.text}' not found in {Path(spec.data).name} (columns: {', '.join(map(str, frame.columns[:30]))})")
    labels = None
    if spec.label is not None:
        if spec.label not in frame.columns:
            raise DataError(f"reference.label: column '{spec.label}' not found in {Path(spec.data).name} (columns: {', '.join(map(str, frame.columns[:30]))})")
        if original_labels is None:
            raise RecipeError("reference.label: the model has no original head to score its original task with; "
                              "start from a honed run directory, or drop reference.label (drift is still measured)")
        values = frame[spec.label].map(label_to_str)
        unknown = sorted(set(values) - set(original_labels))
        if unknown:
            raise DataError(f"reference.label: labels {unknown[:5]} are not classes of the original model ({', '.join(original_labels[:20])})")
        index = {label: i for i, label in enumerate(original_labels)}
        labels = torch.tensor([index[v] for v in values], dtype=torch.long)
    if recipe.task.startswith("tabular"):
        enc = TASKS[recipe.task]["encode"](bundle, frame.drop(columns=["label"], errors="ignore"), None, recipe)
    elif recipe.task == "image-classification":
        paths = [str((Path(spec.data).parent / str(p)).resolve()) for p in frame[spec.text]]
        enc = TASKS[recipe.task]["encode"](bundle, pd.DataFrame({"path": paths}), None, recipe)
    else:
        texts = frame[spec.text].fillna("").astype(str).tolist()
        enc = tc.encode(bundle, texts, None, recipe.data.max_length)
    return Reference(Path(spec.data).name, enc, labels, False)


# --------------------------------------------------------------------------- one fine-tune

def fine_tune(ctx: Context, seed: int, train_idx: torch.Tensor | None = None, checkpointer: Checkpointer | None = None,
              progress=None, on_history=None, model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, list[Outcome], list[dict]]:
    """Train a fresh copy of the pre-trained model with the recipe's method; returns (model, outcomes, history).

    train_idx restricts training to a subset (the learning curve); the validation split is always the same.
    """
    recipe = ctx.recipe
    torch.manual_seed(seed)
    if model is None:
        model = copy.deepcopy(ctx.bundle.model)
        model.load_state_dict(pristine_state(ctx))
        for p in model.parameters():  # as loaded: an earlier fine-tune of bundle.model may have frozen some
            p.requires_grad_(True)
    bundle = _bundle_for(ctx.bundle, model)
    subset = ctx.task["subset"]
    train_split = ctx.encoded["train"] if train_idx is None else subset(ctx.encoded["train"], train_idx)
    train_features = ctx.features["train"] if train_idx is None else ctx.features["train"][train_idx]
    eval_pool = torch.arange(len(train_split))[:TRAIN_EVAL_ROWS] if train_idx is not None else ctx.train_eval_idx
    history: list[dict] = []
    outcomes = []
    method = METHODS[recipe.method]
    for stage in method["stages"]:
        previous = list(history)
        on_eval = (lambda stage_history, previous=previous: on_history(previous + stage_history)) if on_history else None
        if stage == "head" and ctx.task.get("cached_head", True):
            probe_head = ctx.extra.get("probe_head") if train_idx is None else None  # fitted on the whole training split
            outcome = _train_head(ctx, bundle, train_features, train_split.labels, eval_pool, seed, checkpointer, progress, on_eval, probe_head)
        elif stage == "head":  # the head trains inside the frozen model (forecasters rescale each window around their head)
            model = METHODS["head"]["prepare"](model, bundle, recipe)
            outcome = _train_model(ctx, bundle, model, train_split, subset(train_split, eval_pool), seed, checkpointer, progress, on_eval,
                                   stage="head", lr=recipe.train.head_lr)
        else:
            model = method["prepare"](model, bundle, recipe)
            outcome = _train_model(ctx, bundle, model, train_split, subset(train_split, eval_pool), seed, checkpointer, progress, on_eval)
        history[:] = previous + outcome.history
        outcomes.append(outcome)
    if method["export"] is not None:
        model = method["export"](model)
    return model, outcomes, history


def needs_pristine_again(recipe: Recipe) -> bool:
    """After the main fine-tune, the pre-trained weights are read again only by extra seeds, the
    learning curve, WiSE-FT interpolation and the forgetting guard on a reference set."""
    return bool(recipe.interpolate or (recipe.train.seeds and len(recipe.train.seeds) > 1)
                or recipe.guards.data_curve or recipe.reference is not None)


def pristine_state(ctx: Context) -> dict[str, torch.Tensor]:
    """The pre-trained weights as a plain state dict (read back from disk during a run)."""
    return ctx.pristine.load() if isinstance(ctx.pristine, StateOnDisk) else ctx.pristine


def _bundle_for(bundle: ModelBundle, model) -> ModelBundle:
    clone = copy.copy(bundle)
    clone.model = model
    return clone


def _loop_config(ctx: Context, stage: str, epochs: int, lr: float, n_train: int, batch_size: int) -> LoopConfig:
    t = ctx.recipe.train
    per_epoch = math.ceil(n_train / batch_size / t.grad_accumulation)
    eval_every = t.eval_every if stage == "model" else max(1, per_epoch)
    return LoopConfig(stage=stage, epochs=epochs, lr=lr, weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio,
                      grad_clip=t.grad_clip, grad_accumulation=t.grad_accumulation, eval_every=eval_every,
                      patience=t.patience, precision=ctx.precision, primary=ctx.task["primary"], device=ctx.device,
                      group=ctx.extra.get("group"))


def _train_model(ctx: Context, bundle, model, train_split, train_eval, seed, checkpointer, progress, on_eval,
                 stage: str = "model", lr: float | None = None):
    t, task = ctx.recipe.train, ctx.task
    val = ctx.encoded["validation"]

    def evaluate(m):
        out = {}
        for prefix, split in (("val", val), ("train", train_eval)):
            logits = task["predict"](m, split, bundle.pad_id, ctx.eval_batch_size, ctx.precision, ctx.device)
            out.update({f"{prefix}_{k}": v for k, v in task["metrics"](logits, split.labels).items()})
        out.pop("train_loss", None)  # the running training loss is the meaningful one
        return out

    batches = task["batches"](train_split, t.batch_size, seed, bundle.pad_id, t.group_by_length)
    regulariser = _l2sp(model, bundle, ctx.recipe) if ctx.recipe.l2sp else None
    loss_fn = task["loss"]
    if ctx.recipe.replay is not None:
        loss_fn = _with_replay(ctx, bundle, seed)
    cfg = _loop_config(ctx, stage, t.epochs, t.lr if lr is None else lr, len(train_split), t.batch_size)
    return train(model, batches, loss_fn, evaluate, cfg, checkpointer, progress, regulariser, on_eval)


def _train_head(ctx: Context, bundle, train_x, train_y, eval_pool, seed, checkpointer, progress, on_eval, probe_head=None):
    """Train only the final linear layer on cached backbone features: epochs cost almost nothing.

    The head trains on standardised features (so one learning rate suits every backbone's
    feature scale) and the standardisation is then folded into the head's weights, so the
    exported model needs no extra layer. With `probe_head` (the linear probe's logistic
    regression, fitted to convergence) training starts from whichever of it and the model's own
    head scores better on validation: a new head starts where the probe ended (as in LP-FT),
    a source model's head that already fits the task keeps its head start.
    """
    t = ctx.recipe.train
    dev = ctx.device
    head = bundle.model.get_submodule(bundle.head_name)
    mean = train_x.mean(0)
    std = train_x.std(0).clamp(min=1e-6) if len(train_x) > 1 else torch.ones_like(mean)
    scale = lambda x: (x - mean) / std  # noqa: E731
    work = torch.nn.Linear(head.in_features, head.out_features, bias=True).to(dev)
    with torch.no_grad():  # the same function as the current head, on standardised inputs
        work.weight.copy_(head.weight * std.to(dev))
        bias = head.bias if head.bias is not None else torch.zeros(head.out_features, device=dev)
        work.bias.copy_(bias + head.weight @ mean.to(dev))
    train_scaled = scale(train_x)
    val_scaled, val_y = scale(ctx.features["validation"]), ctx.encoded["validation"].labels
    if ctx.task["kind"] == "regression":  # the head predicts the standardised target; the model rescales it
        mu, sd = bundle.model.target_mean.cpu(), bundle.model.target_std.cpu()
        train_y, val_y = (train_y - mu) / sd, (val_y - mu) / sd
    eval_x, eval_y = train_scaled[eval_pool], train_y[eval_pool]

    @torch.no_grad()
    def evaluate(h):
        out = {}
        for prefix, x, yy in (("val", val_scaled, val_y), ("train", eval_x, eval_y)):
            logits = h(x.to(dev)).float().cpu()
            if ctx.task["kind"] == "regression":
                logits = logits.squeeze(-1)
            out.update({f"{prefix}_{k}": v for k, v in ctx.task["metrics"](logits, yy).items()})
        out.pop("train_loss", None)
        return out

    if probe_head is not None and probe_head["weight"].shape == work.weight.shape:
        own = evaluate(work)[f"val_{ctx.task['primary']}"]
        kept = {k: v.detach().clone() for k, v in work.state_dict().items()}
        with torch.no_grad():  # the probe's standardisation (population std) in this head's (sample std)
            work.weight.copy_((probe_head["weight"] * (std / probe_head["scale"])).to(dev))
            work.bias.copy_((probe_head["bias"] + probe_head["weight"] @ ((mean - probe_head["mean"]) / probe_head["scale"])).to(dev))
        if evaluate(work)[f"val_{ctx.task['primary']}"] < own:
            work.load_state_dict(kept)
    batch_size = max(t.batch_size, 64)
    batches = tc.feature_batches(train_scaled, train_y, batch_size, seed)
    cfg = _loop_config(ctx, "head", t.head_epochs, t.head_lr, len(train_y), batch_size)
    cfg.precision = "fp32"
    cfg.patience = max(t.patience or 10, 10)
    cfg.checkpoint_evaluations = False  # a head stage takes seconds; redoing it is cheaper than saving it
    outcome = train(work, batches, ctx.task["head_loss"], evaluate, cfg, checkpointer, progress, None, on_eval)
    with torch.no_grad():
        folded = work.weight / std.to(dev)
        head.weight.copy_(folded)
        if head.bias is not None:
            head.bias.copy_(work.bias - folded @ mean.to(dev))
    return outcome


def _l2sp(model, bundle, recipe):
    """L2-SP (Li et al. 2018): α/2‖w − w⁰‖² on pre-trained weights + β/2‖w_head‖² on the new head."""
    alpha, beta = recipe.l2sp.alpha, recipe.l2sp.beta
    head_module = model.get_submodule(bundle.head_name) if bundle.head_name in dict(model.named_modules()) else bundle.head()
    head_params = {id(p) for p in head_module.parameters()}
    anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad and id(p) not in head_params]
    head = [p for p in head_module.parameters() if p.requires_grad]

    def penalty(m):
        total = sum(((p - p0) ** 2).sum() for p, p0 in anchors) * (alpha / 2)
        if beta:
            total = total + sum((p**2).sum() for p in head) * (beta / 2)
        return total

    return penalty


def _with_replay(ctx: Context, bundle, seed: int):
    """Mix reference batches, scored by the original head, into every step (experience replay).

    The replay rows for a step are drawn from a generator seeded by the step's own batch, so a
    resumed run replays exactly what the uninterrupted run would have.
    """
    ref = ctx.reference
    spec = ctx.recipe.replay
    head_name = bundle.head_name
    original = ctx.original_head.to(ctx.device)
    per_step = max(1, round(spec.fraction * ctx.recipe.train.batch_size))

    def loss_fn(model, batch):
        base = ctx.task["loss"](model, batch)
        key = next(batch[k] for k in ("input_ids", "pixel_values", "x") if k in batch)  # text, image, tabular
        g = torch.Generator().manual_seed(seed * 7919 + int(key.double().sum() * 1000) % (2**31))
        idx = torch.randint(len(ref.encoded), (per_step,), generator=g)
        replay_batch = {k: v.to(ctx.device) for k, v in ctx.task["collate"](ref.encoded, idx, bundle.pad_id).items() if k != "labels"}
        captured = []
        head = dict(model.named_modules()).get(head_name) or next(m for n, m in model.named_modules() if n.endswith(head_name))
        handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            logits_of(model, replay_batch)
        finally:
            handle.remove()
        replay = F.cross_entropy(original(captured[-1]).float(), ref.labels[idx].to(ctx.device))
        return base + spec.weight * replay

    return loss_fn


# --------------------------------------------------------------------------- the run

def run(source, overrides: list[str] | None = None, out: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, show_progress: bool = True, on_evaluation=None, cache: dict | None = None) -> RunResult:
    """Fine-tune as the recipe says, measure the guards, and write the run directory.

    on_evaluation(record) is called after every evaluation (honed tune feeds its pruner from it;
    an exception raised there, such as optuna.TrialPruned, stops the run).

    Started by `torchrun` or `accelerate launch`, every process runs this function: they share
    the main fine-tune (train/distributed.py); rank 0 alone writes the run directory and measures
    the guards, and the other processes return a RunResult with empty metrics once training ends.
    """
    started = time.time()
    group = distributed.join()
    trackers: list[dict] = []  # opened by _run once the run directory exists; closed here however it ends
    status = "FAILED"
    try:
        result = _run(source, overrides, out, resume, overwrite, show_progress, on_evaluation, cache, started, group, trackers)
        status = "FINISHED"
        # the helper processes wait for rank 0's guards: gloo aborts a process that leaves the group while a peer is still in it
        distributed.barrier(group)
        return result
    except (TrainingInterrupted, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        track.close_trackers(trackers, status)
        distributed.leave()


def _run(source, overrides, out, resume, overwrite, show_progress, on_evaluation, cache, started, group, trackers) -> RunResult:
    main = group is None or group.main
    show_progress = show_progress and main
    recipe, splits = prepare(source, overrides)
    if out is not None:
        recipe.out = str(Path(out).resolve())
    run_dir = default_run_dir(recipe, source).resolve()
    recipe.out = str(run_dir)
    check_run_dir(run_dir, resume, overwrite)
    threads = set_threads(recipe.train.threads)
    ctx = setup(recipe, splits, cache)
    if recipe.task.startswith("tabular"):
        audit = audit_tabular(splits, ctx.bundle.preprocessor)
    elif recipe.task == "image-classification":
        audit = audit_images(splits)
    elif recipe.task == "forecasting":
        audit = check_audit(recipe, splits)
    elif recipe.task == "chat":
        from .data.chat import audit_chat

        audit = audit_chat(splits, ctx.encoded, recipe.data.max_length, recipe.data.packing)
    else:
        audit = audit_text_splits(splits, {k: v.truncated for k, v in ctx.encoded.items()}, recipe.data.max_length)
    if recipe.data.groups:
        audit["groups"] = bias_guard_mod.group_representation(splits.train, recipe.data.groups, "label", recipe.guards.min_group_size)

    if main:
        prepare_run_dir(run_dir, resume, overwrite)
        if resume and (run_dir / "recipe.yaml").exists():
            check_resume_recipe(run_dir, recipe)
        else:
            tmp = run_dir / "recipe.yaml.partial"  # a kill mid-write must not leave a run that cannot resume
            tmp.write_text(dump_recipe(recipe))
            os.replace(tmp, run_dir / "recipe.yaml")
        write_json_atomic(run_dir / "audit.json", audit)
    distributed.barrier(group)  # the run directory is ready (and an --overwrite'd one gone) before anyone trains
    if main:
        trackers.extend(track.open_trackers(recipe, run_dir))

    seed = main_seed(recipe)
    task, primary, classify = ctx.task, ctx.task["primary"], ctx.task["kind"] == "classification"
    lm = task["kind"] == "lm"  # task: chat — no linear probe, majority class, confusion matrix or bias guard
    forecast = task["kind"] == "forecast"  # forecasting — the source model's own forecasts instead of a probe; seasonal naive
    probe = None  # classification and regression: fitted after training, on the cached features, unless a head starts from it
    if lm:
        from .tasks import chat

        before = chat.before_fine_tuning(ctx)  # the pre-trained model: reference perplexity, features, generations
    elif forecast:
        from .tasks import forecasting as fc

        probe = {"test": _evaluate(ctx, ctx.bundle.model, "test"), "validation": _evaluate(ctx, ctx.bundle.model, "validation")}
    elif "head" in METHODS[recipe.method]["stages"]:  # the head starts from the probe's fit
        probe = _linear_probe(ctx, cache, seed)
    progress = TrainingProgress(enabled=show_progress)

    def on_history(records: list[dict]) -> None:
        write_history(run_dir, records)
        for tracker in trackers:
            tracker["evaluation"](records[-1])
        if on_evaluation is not None and records:
            on_evaluation(records[-1])

    ctx.extra["probe_head"] = probe.get("head") if probe is not None and not (lm or forecast) else None
    ctx.extra["group"] = group  # only the main fine-tune is shared; seeds, curve and baseline run on rank 0 alone
    # the model trains in place, not beside a second copy; the pre-trained weights wait on disk when a guard needs them again
    ctx.pristine = (StateOnDisk.write(ctx.bundle.model.state_dict(), run_dir / "checkpoints" / "pristine.safetensors")
                    if main and needs_pristine_again(recipe) else {})
    model, outcomes, history = fine_tune(ctx, seed, checkpointer=Checkpointer(run_dir / "checkpoints"), progress=progress,
                                         on_history=on_history, model=ctx.bundle.model)
    ctx.extra["group"] = None
    if not main:
        return RunResult(run_dir, {})
    write_history(run_dir, history)
    train_seconds = sum(o.train_seconds for o in outcomes)

    forgetting, model = chat.forgetting(ctx, model, before) if lm else _forgetting(ctx, model, progress)
    val_metrics = _evaluate(ctx, model, "validation")
    test_logits = _logits(ctx, model, ctx.encoded["test"])  # the test split is touched once, here
    test_metrics = task["metrics"](test_logits, ctx.encoded["test"].labels)
    test_preds = test_logits.argmax(-1).numpy() if classify else test_logits.numpy()
    model.cpu()
    save_model(ctx.bundle, model, run_dir / "model", {"task": recipe.task, "max_length": recipe.data.max_length,
                                                     "text_column": recipe.data.text, "image_column": recipe.data.image, "features": recipe.data.features,
                                                     "precision": ctx.precision, **({"messages_column": recipe.data.messages} if lm else {}),
                                                     **(_forecast_meta(recipe, splits) if forecast else {})})
    if lm:
        chat.write_predictions(run_dir / "predictions.csv", splits.test, test_logits)
    elif forecast:
        fc.write_predictions(run_dir / "predictions.csv", splits.test, test_logits, ctx.encoded["test"].naive)
    else:
        _write_predictions(run_dir / "predictions.csv", splits.test, test_logits, ctx.bundle.labels if classify else None)
    model.to(ctx.device)

    if probe is None and not lm:  # after training: scikit-learn stays out of the training's memory
        probe = _linear_probe(ctx, cache, seed)
    seeds = {seed: test_metrics[primary]}
    for extra_seed in (recipe.train.seeds or [])[1:]:
        _say(show_progress, f"seed {extra_seed}: fine-tuning again for the seed spread")
        other, _, _ = fine_tune(ctx, extra_seed, progress=quiet())
        seeds[extra_seed] = _evaluate(ctx, other, "test")[primary]
    majority = None if (lm or forecast) else _majority(ctx)
    guards = {
        "overfitting": chat.overfitting(history, outcomes[-1].best_step, recipe.guards.overfitting.max_gap, seeds if len(seeds) > 1 else None) if lm else
        overfitting_guard(history, outcomes[-1].best_step, primary, recipe.guards.overfitting.max_gap,
                          test_preds if classify else None, len(ctx.bundle.labels), seeds if len(seeds) > 1 else None),
        "forgetting": forgetting,
        "data": _data_guard(ctx, history, show_progress),
        "bias": _bias(ctx, test_preds, probe["test_predictions"]) if classify else skipped("the bias guard covers classification tasks in this version"),
        "baseline": chat.baseline(ctx, test_metrics, before, train_seconds, show_progress) if lm else
        _forecast_baseline(ctx, test_metrics, train_seconds, show_progress) if forecast else
        _baseline(ctx, test_metrics, probe, majority, train_seconds, show_progress),
    }
    samples = sum(o.samples_seen for o in outcomes)
    metrics = {
        "task": recipe.task,
        "primary_metric": primary,
        "test": test_metrics,
        "validation": val_metrics,
        "pretrained": {**before["test"], "method": "the pre-trained model, before fine-tuning"} if lm else
        {**probe["test"], "method": "the source model's own forecasts, before fine-tuning" if isinstance(recipe.model, str) else
         "the randomly initialised model, before training"} if forecast else
        {**probe["test"], "method": "linear probe on the pre-trained features", "C": probe["C"]},
        "majority": {} if (lm or forecast) else {primary: majority},
        "seeds": {str(k): v for k, v in seeds.items()},
        "guards": guards,
        "confusion_matrix": _confusion(ctx.encoded["test"].labels.numpy(), test_preds, ctx.bundle.labels) if classify else None,
        "timing": {"train_seconds": round(train_seconds, 2), "samples_per_second": round(samples / max(train_seconds, 1e-9), 2),
                   "wall_seconds": round(time.time() - started, 2), "peak_rss_mb": _peak_rss_mb(), "threads": threads,
                   "memory_estimate_mb": round(ctx.extra["memory_estimate"]["total_mb"], 1),
                   "precision": ctx.precision, "device": str(ctx.device)},
        "run": {"run_dir": str(run_dir), "method": recipe.method, "model": recipe.model if isinstance(recipe.model, str) else recipe.model.model_dump(), "steps": sum(o.steps for o in outcomes),
                "stopped_early": any(o.stopped_early for o in outcomes), "seed": seed},
    }
    if forecast:  # the seasonal-naive forecast on the same test windows, always beside the model's figures
        metrics["seasonal_naive"] = guards["baseline"]["details"]["seasonal_naive"]
    if lm:  # replies to a few validation prompts, greedy, before and after fine-tuning
        metrics["generations"] = chat.generation_records(before, chat.generations(model, ctx.bundle.tokenizer, before["prompts"], ctx.device))
        guards["baseline"]["details"]["generations"] = metrics["generations"]  # the report renders guard details
    if guards["overfitting"]["details"].get("seeds"):
        metrics["guards"]["overfitting"]["details"]["seeds"] = {str(k): v for k, v in seeds.items()}
    write_json_atomic(run_dir / "metrics.json", metrics)
    if isinstance(ctx.pristine, StateOnDisk):
        ctx.pristine.remove()
    for tracker in trackers:
        tracker["final"](metrics)
    _build_report(run_dir)
    return RunResult(run_dir, metrics)


def _say(enabled: bool, text: str) -> None:
    if enabled:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[dim]{text}[/dim]")


def _logits(ctx: Context, model, split) -> torch.Tensor:
    return ctx.task["predict"](model, split, ctx.bundle.pad_id, ctx.eval_batch_size, ctx.precision, ctx.device)


def _evaluate(ctx: Context, model, name: str) -> dict:
    return ctx.task["metrics"](_logits(ctx, model, ctx.encoded[name]), ctx.encoded[name].labels)


def _linear_probe(ctx: Context, cache: dict | None, seed: int) -> dict:
    """The task's linear probe on the cached pre-trained features (kept in `cache` across tune trials)."""
    key = ("probe", features_key(ctx.recipe, ctx.precision))
    probe = cache.get(key) if cache is not None else None
    if probe is None:
        f, enc = ctx.features, ctx.encoded
        probe = ctx.task["probe"](f["train"], enc["train"].labels, f["validation"], enc["validation"].labels,
                                  f["test"], enc["test"].labels, seed)
        if cache is not None:
            cache[key] = probe
    return probe


def _majority(ctx: Context) -> float:
    """The trivial model's test score: the most frequent class, or the training mean for regression."""
    train_y, test_y = ctx.encoded["train"].labels, ctx.encoded["test"].labels
    if ctx.task["kind"] == "classification":
        return float((test_y == torch.bincount(train_y).argmax()).float().mean())
    return ctx.task["metrics"](torch.full_like(test_y, float(train_y.mean())), test_y)[ctx.task["primary"]]


# --------------------------------------------------------------------------- guards that need the engine

def _features(ctx: Context, model, split) -> torch.Tensor:
    return ctx.task["features"](_bundle_for(ctx.bundle, model), model, split, ctx.eval_batch_size, ctx.precision, ctx.device)


def _original_task_metric(ctx: Context, features: torch.Tensor, model=None) -> float | None:
    ref = ctx.reference
    if ctx.task["kind"] == "forecast":  # the source model forecasts its own series: MASE on the reference windows
        if ref.on_validation or model is None:
            return None
        return ctx.task["metrics"](_logits(ctx, model, ref.encoded), ref.labels)["mase"]
    if ref.labels is None or ctx.original_head is None:
        return None
    with torch.no_grad():
        logits = ctx.original_head.to(features.device)(features)
    return float((logits.argmax(-1).cpu() == ref.labels).float().mean())


def _forgetting(ctx: Context, model, progress) -> tuple[dict, torch.nn.Module]:
    """Retention of the original task and representation drift on the reference inputs; with
    `interpolate`, the WiSE-FT sweep and the exported weights at the chosen α."""
    recipe, ref = ctx.recipe, ctx.reference
    pristine = None  # the pre-trained model, rebuilt only for a reference set (the validation features are cached)
    if not ref.on_validation:
        pristine = copy.deepcopy(model)
        pristine.load_state_dict({k: v for k, v in pristine_state(ctx).items() if k in pristine.state_dict()}, strict=False)
    before = ctx.features["validation"] if ref.on_validation else _features(ctx, pristine, ref.encoded)
    after = _features(ctx, model, ref.encoded)
    metric_before = _original_task_metric(ctx, before, pristine)
    del pristine
    metric_after = _original_task_metric(ctx, after, model)
    retention = _retention(ctx, metric_before, metric_after)
    floor, cka_floor = recipe.guards.forgetting.floor, recipe.guards.forgetting.cka_floor
    sweep, chosen = None, None
    if recipe.interpolate:
        alphas = DEFAULT_ALPHAS if recipe.interpolate is True else sorted(recipe.interpolate)
        sweep, chosen, model = _interpolation_sweep(ctx, model, alphas, metric_before, floor)
        after = _features(ctx, model, ref.encoded)
        metric_after = _original_task_metric(ctx, after, model)
        retention = _retention(ctx, metric_before, metric_after)
    try:
        cka = linear_cka(before, after)
    except ValueError:  # e.g. a single validation window (one series): CKA needs two inputs
        cka = None
    guard = forgetting_guard(reference=ref.name, retention=retention, cka=cka, interpolation=sweep, chosen_alpha=chosen,
                             retention_floor=floor, cka_floor=cka_floor, measured_on_validation=ref.on_validation)
    guard["details"].update({"original_metric_before": metric_before, "original_metric_after": metric_after})
    return guard, model


def _retention(ctx: Context, before: float | None, after: float | None) -> float | None:
    """After ÷ before on the original task; before ÷ after for forecasting's MASE, where lower is better."""
    if before is None or after is None:
        return None
    if ctx.task["kind"] == "forecast":
        return before / after if after > 0 else None
    return after / before if before else None


def _interpolation_sweep(ctx: Context, model, alphas, metric_before, floor):
    """WiSE-FT: θ_α = (1−α)θ⁰ + αθ_ft for the backbone (the new head always from θ_ft)."""
    head_prefix = ctx.bundle.head_name + "."
    theta_ft = {k: v.detach().clone() for k, v in model.state_dict().items()}
    theta0 = {k: v for k, v in pristine_state(ctx).items() if not k.startswith(head_prefix)}
    sweep = []
    for alpha in alphas:
        model.load_state_dict(interpolate_state(theta0, theta_ft, alpha))
        val = _evaluate(ctx, model, "validation")[ctx.task["primary"]]
        after = _original_task_metric(ctx, _features(ctx, model, ctx.reference.encoded), model)
        retention = _retention(ctx, metric_before, after)
        sweep.append({"alpha": alpha, "metric": val, "retention": retention})
    chosen = choose_interpolation_alpha(sweep, floor)
    model.load_state_dict(interpolate_state(theta0, theta_ft, chosen))
    return sweep, chosen, model


def nested_fractions(labels: torch.Tensor, fractions: list[float], seed: int) -> list[torch.Tensor]:
    """Nested, stratified subsets: every class keeps its share, and each subset contains the smaller ones."""
    g = torch.Generator().manual_seed(seed + 17)
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in
                 (torch.nonzero(labels == c).flatten() for c in torch.unique(labels))]
    subsets = []
    for fraction in fractions:
        parts = [idx[: max(1, math.ceil(fraction * len(idx)))] for idx in per_class]
        subsets.append(torch.sort(torch.cat(parts)).values)
    return subsets


def learning_curve(ctx: Context, show_progress: bool = False, full_score: float | None = None) -> dict:
    """Fine-tune on nested fractions of the training set; each scored on the same validation split."""
    recipe = ctx.recipe
    fractions = sorted(recipe.guards.curve_fractions)
    if ctx.task["kind"] == "classification":
        subsets = nested_fractions(ctx.encoded["train"].labels, fractions, main_seed(recipe))
    else:  # no classes to stratify by (regression targets, forecasting windows): nested prefixes of one seeded shuffle
        order = torch.randperm(len(ctx.encoded["train"]), generator=torch.Generator().manual_seed(main_seed(recipe) + 17))
        subsets = [torch.sort(order[: max(1, math.ceil(f * len(order)))]).values for f in fractions]
    scores = []
    for fraction, idx in zip(fractions, subsets):
        if fraction == 1.0 and full_score is not None:
            scores.append(full_score)
            continue
        _say(show_progress, f"learning curve: {fraction:.0%} of the training data ({len(idx)} rows)")
        model, _, _ = fine_tune(ctx, main_seed(recipe), train_idx=idx, progress=quiet())
        scores.append(_evaluate(ctx, model, "validation")[ctx.task["primary"]])
    details = data_curve.data_sufficiency(fractions, len(ctx.encoded["train"]), scores, metric=ctx.task["primary"],
                                          target=recipe.guards.target, epsilon=recipe.guards.epsilon)
    details["n"] = [len(idx) for idx in subsets]
    return details


def curve(source, overrides: list[str] | None = None, show_progress: bool = True) -> dict:
    """`honed curve`: the learning curve and data-sufficiency verdict, without a run directory."""
    recipe, splits = prepare(source, overrides)
    set_threads(recipe.train.threads)
    ctx = setup(recipe, splits)
    details = learning_curve(ctx, show_progress)
    return data_curve.data_guard(details, _class_counts(ctx), recipe.guards.min_per_class)


def _class_counts(ctx: Context) -> dict | None:
    if ctx.task["kind"] != "classification":
        return None
    counts = torch.bincount(ctx.encoded["train"].labels, minlength=len(ctx.bundle.labels))
    return {str(ctx.bundle.labels[i]): int(c) for i, c in enumerate(counts)}


def _data_guard(ctx: Context, history: list[dict], show_progress: bool) -> dict:
    counts = _class_counts(ctx)
    if not ctx.recipe.guards.data_curve:
        guard = data_curve.data_guard({}, counts, ctx.recipe.guards.min_per_class)
        guard["summary"] += " (learning curve not run: set guards.data_curve: true)"
        return guard
    best = max((h[f"val_{ctx.task['primary']}"] for h in history), default=None)
    details = learning_curve(ctx, show_progress, full_score=best)
    return data_curve.data_guard(details, counts, ctx.recipe.guards.min_per_class)


def _bias(ctx: Context, test_preds: np.ndarray, probe_preds: np.ndarray) -> dict:
    groups = ctx.recipe.data.groups
    if not groups:
        return skipped("no data.groups given; name the columns to check, e.g. data.groups: [region]")
    labels = ctx.bundle.labels
    test = ctx.splits.test
    y_true = test["label"].to_numpy()
    after = bias_guard_mod.group_metrics(y_true, np.array([labels[i] for i in test_preds]), test[groups], labels)
    before = bias_guard_mod.group_metrics(y_true, np.array([labels[i] for i in probe_preds]), test[groups], labels)
    representation = bias_guard_mod.group_representation(ctx.splits.train, groups, "label", ctx.recipe.guards.min_group_size)
    return bias_guard_mod.bias_guard(after, before, representation, ctx.recipe.guards.bias_threshold)


def train_from_scratch(ctx: Context) -> torch.nn.Module:
    """The same architecture from random initialisation, trained in full with the same budget and
    seed and without the forgetting mitigations (there is nothing to forget)."""
    scratch_ctx = copy.copy(ctx)
    scratch_ctx.recipe = ctx.recipe.model_copy(deep=True)
    scratch_ctx.recipe.method, scratch_ctx.recipe.replay, scratch_ctx.recipe.l2sp = "full", None, None
    trained, _, _ = fine_tune(scratch_ctx, main_seed(ctx.recipe), progress=quiet(), model=scratch_copy(ctx.bundle).to(ctx.device))
    return trained


def _baseline(ctx: Context, test_metrics: dict, probe: dict, majority: float, train_seconds: float, show_progress: bool) -> dict:
    """The same architecture from random initialisation with the same budget: what pre-training bought."""
    wanted = ctx.recipe.guards.baseline
    primary = ctx.task["primary"]
    fine_tuned = test_metrics[primary]
    details = {"scratch": None, "linear_probe": probe["test"][primary], "majority": majority, "fine_tuned": fine_tuned}
    run_it = wanted is True or (wanted == "auto" and train_seconds < BASELINE_AUTO_SECONDS)
    if run_it:
        _say(show_progress, "baseline: training the same architecture from random initialisation")
        trained = train_from_scratch(ctx)
        details["scratch"] = _evaluate(ctx, trained, "test")[primary]
    problems = []
    if fine_tuned <= majority + 0.01:
        trivial = "always predicting the majority class" if ctx.task["kind"] == "classification" else "always predicting the training mean"
        problems.append(f"the fine-tuned model ({fine_tuned:.3f}) is no better than {trivial} ({majority:.3f})")
    if details["scratch"] is not None and details["scratch"] >= fine_tuned - 0.005:
        problems.append(f"the same model trained from scratch scores {details['scratch']:.3f} against {fine_tuned:.3f}: pre-training bought nothing here")
    if fine_tuned < details["linear_probe"] - PROBE_MARGIN:
        problems.append(f"a linear probe on the frozen pre-trained features scores {details['linear_probe']:.3f} against {fine_tuned:.3f}: "
                        "fine-tuning lost what the features already gave; try lp-ft, more epochs, or (method: head) a higher train.head_lr")
    if problems:
        return guard_result("warn", "; ".join(problems).capitalize() + ".", details)
    parts = [f"Fine-tuned {primary} {fine_tuned:.3f}", f"majority class {majority:.3f}", f"linear probe {details['linear_probe']:.3f}"]
    if details["scratch"] is not None:
        parts.append(f"from scratch {details['scratch']:.3f}")
        return guard_result("ok", ", ".join(parts) + ": pre-training and fine-tuning both pay.", details)
    return guard_result("ok", ", ".join(parts) + " (from-scratch baseline not run: set guards.baseline: true).", details)


def _forecast_baseline(ctx: Context, test_metrics: dict, train_seconds: float, show_progress: bool) -> dict:
    """Forecasting's reference points: seasonal naive on the same test windows (always), and the
    same architecture trained from random initialisation (as `guards.baseline` says)."""
    from .tasks.forecasting import seasonal_naive_metrics

    naive = seasonal_naive_metrics(ctx.encoded["test"])
    wanted = ctx.recipe.guards.baseline
    details = {"scratch": None, "linear_probe": None, "majority": None, "seasonal_naive": naive, "fine_tuned": test_metrics[ctx.task["primary"]]}
    if wanted is True or (wanted == "auto" and train_seconds < BASELINE_AUTO_SECONDS):
        _say(show_progress, "baseline: training the same architecture from random initialisation")
        trained = train_from_scratch(ctx)
        details["scratch"] = _evaluate(ctx, trained, "test")
    mase, naive_mase = test_metrics["mase"], naive["mase"]
    problems = []
    if not mase < naive_mase:
        problems.append(f"the model's test MASE ({mase:.3f}) does not beat the seasonal-naive forecast ({naive_mase:.3f}); use seasonal naive, or more data or context")
    scratch = details["scratch"]
    if scratch is not None and isinstance(ctx.recipe.model, str) and scratch["mase"] <= mase + 0.005:
        problems.append(f"the same model trained from scratch reaches MASE {scratch['mase']:.3f} against {mase:.3f}: the source model bought nothing here")
    if problems:
        return guard_result("warn", "; ".join(problems).capitalize() + ".", details)
    text = f"Test MASE {mase:.3f} (MAE {test_metrics['mae']:.4g}) against seasonal naive's {naive_mase:.3f} (MAE {naive['mae']:.4g})"
    if scratch is not None:
        text += f", from scratch {scratch['mase']:.3f}"
    elif wanted is not True:
        text += " (from-scratch baseline not run: set guards.baseline: true)"
    return guard_result("ok", text + ".", details)


def _forecast_meta(recipe: Recipe, splits) -> dict:
    """What `honed predict` needs to read new history and date its forecasts."""
    freqs = [f for f in splits.freq.values() if f]
    return {"series_column": recipe.data.series, "time_column": recipe.data.time, "target_column": recipe.data.target,
            "covariates": recipe.data.covariates, "context_length": recipe.data.context_length, "horizon": recipe.data.horizon,
            "season": splits.season, "freq": max(set(freqs), key=freqs.count) if freqs else None}


# --------------------------------------------------------------------------- outputs

def _write_predictions(path: Path, frame: pd.DataFrame, logits: torch.Tensor, labels: list[str] | None) -> None:
    out = frame.copy()
    if labels is None:  # regression: the predicted value
        out["prediction"] = logits.numpy()
        out.to_csv(path, index=False)
        return
    probs = torch.softmax(logits, -1).numpy()
    out["prediction"] = [labels[i] for i in probs.argmax(1)]
    for i, label in enumerate(labels):
        out[f"prob_{label}"] = probs[:, i].round(6)
    out.to_csv(path, index=False)


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    return {"labels": labels, "matrix": matrix.tolist()}


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _build_report(run_dir: Path) -> None:
    from .report import build_report

    build_report(run_dir)
