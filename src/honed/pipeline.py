"""The pipeline: recipe → data → model → method → train → evaluate → run directory.

`honed run` and `honed.run()` both call `run()`. Every stage is a plain function; this file
only sequences them, so it can be read in one sitting.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data.audit import audit_text_splits
from .data.text import load_text_splits
from .errors import RecipeError
from .guards.overfit import overfitting_guard
from .guards.status import skipped
from .methods import METHODS
from .models.load import load_pretrained, save_model
from .recipe import Recipe, dump_recipe, load_recipe
from .tasks import text_classification as tc
from .train.checkpoint import Checkpointer, write_json_atomic
from .train.loop import LoopConfig, load_trainable, train, trainable_state
from .train.precision import device as pick_device
from .train.precision import resolve_precision, set_threads
from .train.progress import TrainingProgress

PRIMARY_METRIC = "accuracy"
TRAIN_EVAL_ROWS = 2000  # training rows scored at each evaluation, for the train/validation gap


@dataclass
class RunResult:
    """What `honed.run` returns: the run directory and the contents of metrics.json."""

    run_dir: Path
    metrics: dict

    def __getitem__(self, key):
        return self.metrics[key]


# --------------------------------------------------------------------------- resolution of `auto`

AUTO_LR = {  # (family, method) → learning rate; design.md §4 "Expertise"
    ("hf", "full"): 3e-5, ("hf", "freeze"): 5e-5, ("hf", "lora"): 2e-4, ("hf", "lp-ft"): 2e-5,
    # WordLlama is an embedding table with no transformer layers: it tolerates far larger steps
    ("wordllama", "full"): 2e-3, ("wordllama", "freeze"): 2e-3, ("wordllama", "lora"): 5e-3, ("wordllama", "lp-ft"): 1e-3,
}
AUTO_HEAD_LR = 1e-2


def resolve_auto(recipe: Recipe, family: str, n_train: int) -> Recipe:
    """Fill every `auto` with its value for this model family, method and data size."""
    t = recipe.train
    if t.lr == "auto":
        t.lr = AUTO_HEAD_LR if recipe.method == "head" else AUTO_LR[(family, recipe.method)]
    if t.head_lr == "auto":
        t.head_lr = AUTO_HEAD_LR
    if t.batch_size == "auto":
        t.batch_size = 32 if family == "wordllama" else 16
    if t.epochs == "auto":
        # small data needs more passes; early stopping ends runs that stop improving
        t.epochs = 10 if n_train < 2000 else 5 if n_train < 20000 else 3
    if t.eval_every == "auto":
        per_epoch = math.ceil(n_train / t.batch_size / t.grad_accumulation)
        t.eval_every = max(1, per_epoch // 2)
    return recipe


# --------------------------------------------------------------------------- run directory

def default_run_dir(recipe: Recipe, source) -> Path:
    if recipe.out:
        return Path(recipe.out)
    stem = Path(source).stem if isinstance(source, (str, Path)) else "run"
    return Path("runs") / stem


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Never silently overwrite: an existing run needs --resume or --overwrite."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"out: {run_dir} exists and is a file; choose another --out")
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and resume:
        if not (run_dir / "recipe.yaml").exists():
            raise RecipeError(f"--resume: {run_dir} is not a honed run directory (no recipe.yaml)")
        return
    if exists and not overwrite:
        raise RecipeError(f"out: run directory {run_dir} already exists; pass --resume to continue it, --overwrite to replace it, or --out for a new one")
    if exists and overwrite:
        if not (run_dir / "recipe.yaml").exists():
            raise RecipeError(f"--overwrite: {run_dir} is not a honed run directory; refusing to delete it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def check_resume_recipe(run_dir: Path, recipe: Recipe) -> None:
    saved = (run_dir / "recipe.yaml").read_text()
    if saved != dump_recipe(recipe):
        raise RecipeError(f"--resume: the recipe differs from the one {run_dir} was started with; resume with the same recipe and overrides, or start a new run")


def write_history(run_dir: Path, history: list[dict]) -> None:
    tmp = run_dir / "history.jsonl.partial"
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    os.replace(tmp, run_dir / "history.jsonl")


# --------------------------------------------------------------------------- the pipeline

def prepare(source, overrides=None):
    """Recipe, data and audit: everything `honed check` does, without loading a model."""
    recipe = load_recipe(source, overrides)
    splits = load_text_splits(recipe.data, recipe.train.seed)
    return recipe, splits


def run(source, overrides: list[str] | None = None, out: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, show_progress: bool = True) -> RunResult:
    """Fine-tune as the recipe says and write the run directory. Returns a RunResult."""
    started = time.time()
    recipe, splits = prepare(source, overrides)
    if out is not None:
        recipe.out = str(Path(out).resolve())
    run_dir = default_run_dir(recipe, source).resolve()
    recipe.out = str(run_dir)
    seed = recipe.train.seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    threads = set_threads(recipe.train.threads)
    dev = pick_device()

    bundle = load_pretrained(recipe.model, splits.labels, recipe)
    recipe = resolve_auto(recipe, bundle.family, len(splits.train))
    precision = resolve_precision(recipe.train.precision, dev)
    max_len = recipe.data.max_length
    encoded = {name: tc.encode(bundle, frame["text"].tolist(), frame["label"].tolist(), max_len)
               for name, frame in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))}
    audit = audit_text_splits(splits, {k: v.truncated for k, v in encoded.items()}, max_len)

    prepare_run_dir(run_dir, resume, overwrite)
    if resume and (run_dir / "recipe.yaml").exists():
        check_resume_recipe(run_dir, recipe)
    else:
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    write_json_atomic(run_dir / "audit.json", audit)

    model = bundle.model.to(dev)
    eval_bs = max(32, 2 * recipe.train.batch_size)
    progress = TrainingProgress(enabled=show_progress)

    # what the backbone knew before fine-tuning: a linear probe on its frozen features
    features = {name: tc.extract_features(bundle, model, split, eval_bs, precision, dev) for name, split in encoded.items()}
    probe = tc.linear_probe(features["train"], encoded["train"].labels, features["validation"], encoded["validation"].labels,
                            features["test"], encoded["test"].labels, seed)

    g = torch.Generator().manual_seed(seed)
    train_eval_idx = torch.randperm(len(encoded["train"]), generator=g)[:TRAIN_EVAL_ROWS]
    train_eval = _subset(encoded["train"], train_eval_idx)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    history: list[dict] = []
    outcomes = []
    method = METHODS[recipe.method]
    for stage in method["stages"]:
        previous = list(history)
        on_eval = lambda stage_history, previous=previous: write_history(run_dir, previous + stage_history)
        if stage == "head":
            outcome = _train_head(bundle, model, features, encoded, train_eval_idx, recipe, precision, dev, checkpointer, progress, on_eval)
        else:
            model = method["prepare"](model, bundle, recipe)
            outcome = _train_model(bundle, model, encoded, train_eval, recipe, precision, dev, eval_bs, checkpointer, progress, on_eval)
        history[:] = previous + outcome.history
        outcomes.append(outcome)
    write_history(run_dir, history)
    if method["export"] is not None:
        model = method["export"](model)

    # the test split is touched once, here
    test_logits = tc.predict_logits(model, encoded["test"], bundle.pad_id, eval_bs, precision, dev)
    test_metrics = tc.metrics_from_logits(test_logits, encoded["test"].labels)
    val_metrics = tc.metrics_from_logits(
        tc.predict_logits(model, encoded["validation"], bundle.pad_id, eval_bs, precision, dev), encoded["validation"].labels)
    model.cpu()
    save_model(bundle, model, run_dir / "model", {"task": recipe.task, "max_length": max_len, "text_column": recipe.data.text, "precision": precision})
    _write_predictions(run_dir / "predictions.csv", splits.test, test_logits, bundle.labels)

    test_preds = test_logits.argmax(-1).numpy()
    best_step = outcomes[-1].best_step
    guards = {
        "overfitting": overfitting_guard(history, best_step, PRIMARY_METRIC, recipe.guards.overfitting.max_gap,
                                         test_preds, len(bundle.labels)),
        "forgetting": skipped("not measured yet in this version"),
        "data": skipped("learning curve not requested (guards.data_curve: true)"),
        "bias": skipped("no data.groups given"),
        "baseline": skipped("not measured yet in this version"),
    }
    majority = float((encoded["test"].labels == torch.bincount(encoded["train"].labels).argmax()).float().mean())
    train_seconds = sum(o.train_seconds for o in outcomes)
    samples = sum(o.samples_seen for o in outcomes)
    metrics = {
        "task": recipe.task,
        "primary_metric": PRIMARY_METRIC,
        "test": test_metrics,
        "validation": val_metrics,
        "pretrained": {**probe["test"], "method": "linear probe on the pre-trained features", "C": probe["C"]},
        "majority": {"accuracy": majority},
        "guards": guards,
        "confusion_matrix": _confusion(encoded["test"].labels.numpy(), test_preds, bundle.labels),
        "timing": {"train_seconds": round(train_seconds, 2), "samples_per_second": round(samples / max(train_seconds, 1e-9), 2),
                   "wall_seconds": round(time.time() - started, 2), "peak_rss_mb": _peak_rss_mb(), "threads": threads,
                   "precision": precision, "device": str(dev)},
        "run": {"run_dir": str(run_dir), "method": recipe.method, "model": recipe.model, "steps": sum(o.steps for o in outcomes),
                "stopped_early": any(o.stopped_early for o in outcomes)},
    }
    write_json_atomic(run_dir / "metrics.json", metrics)
    _build_report(run_dir)
    return RunResult(run_dir, metrics)


# --------------------------------------------------------------------------- stages

def _subset(split: tc.EncodedSplit, idx: torch.Tensor) -> tc.EncodedSplit:
    ids = [split.flat[int(split.offsets[i]) : int(split.offsets[i + 1])] for i in idx.tolist()]
    lengths = split.lengths[idx]
    offsets = torch.zeros(len(idx) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    flat = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    return tc.EncodedSplit(flat, offsets, lengths, split.labels[idx], 0)


def _loop_config(recipe: Recipe, stage: str, epochs: int, lr: float, n_train: int, batch_size: int, precision, dev) -> LoopConfig:
    t = recipe.train
    per_epoch = math.ceil(n_train / batch_size / t.grad_accumulation)
    eval_every = t.eval_every if stage == "model" else max(1, per_epoch)
    return LoopConfig(stage=stage, epochs=epochs, lr=lr, weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio,
                      grad_clip=t.grad_clip, grad_accumulation=t.grad_accumulation, eval_every=eval_every,
                      patience=t.patience, precision=precision, primary=PRIMARY_METRIC, device=dev)


def _train_model(bundle, model, encoded, train_eval, recipe, precision, dev, eval_bs, checkpointer, progress, on_eval):
    t = recipe.train

    def evaluate(m):
        out = {}
        for prefix, split in (("val", encoded["validation"]), ("train", train_eval)):
            logits = tc.predict_logits(m, split, bundle.pad_id, eval_bs, precision, dev)
            out.update({f"{prefix}_{k}": v for k, v in tc.metrics_from_logits(logits, split.labels).items()})
        out.pop("train_loss", None)  # the running training loss is the meaningful one
        return out

    batches = tc.token_batches(encoded["train"], t.batch_size, t.seed, bundle.pad_id, t.group_by_length)
    regulariser = _l2sp(model, bundle, recipe) if recipe.l2sp else None
    cfg = _loop_config(recipe, "model", t.epochs, t.lr, len(encoded["train"]), t.batch_size, precision, dev)
    return train(model, batches, tc.classification_loss, evaluate, cfg, checkpointer, progress, regulariser, on_eval)


def _train_head(bundle, model, features, encoded, train_eval_idx, recipe, precision, dev, checkpointer, progress, on_eval):
    """Train only the final linear layer on cached backbone features: epochs cost almost nothing.

    The head trains on standardised features (so one learning rate suits every backbone's
    feature scale) and the standardisation is then folded into the head's weights, so the
    exported model needs no extra layer.
    """
    t = recipe.train
    head = bundle.head()
    y = {k: v.labels for k, v in encoded.items()}
    mean = features["train"].mean(0)
    std = features["train"].std(0).clamp(min=1e-6)
    scaled = {k: (v - mean) / std for k, v in features.items()}
    work = torch.nn.Linear(head.in_features, head.out_features, bias=True).to(dev)
    with torch.no_grad():  # the same function as the current head, on standardised inputs
        work.weight.copy_(head.weight * std.to(dev))
        bias = head.bias if head.bias is not None else torch.zeros(head.out_features, device=dev)
        work.bias.copy_(bias + head.weight @ mean.to(dev))
    train_x_eval, train_y_eval = scaled["train"][train_eval_idx], y["train"][train_eval_idx]

    @torch.no_grad()
    def evaluate(h):
        out = {}
        for prefix, x, yy in (("val", scaled["validation"], y["validation"]), ("train", train_x_eval, train_y_eval)):
            logits = h(x.to(dev)).float().cpu()
            out.update({f"{prefix}_{k}": v for k, v in tc.metrics_from_logits(logits, yy).items()})
        out.pop("train_loss", None)
        return out

    batch_size = max(t.batch_size, 64)
    batches = tc.feature_batches(scaled["train"], y["train"], batch_size, t.seed)
    cfg = _loop_config(recipe, "head", t.head_epochs, t.head_lr, len(y["train"]), batch_size, "fp32", dev)
    cfg.patience = max(t.patience or 10, 10)
    cfg.checkpoint_evaluations = False  # a head stage takes seconds; redoing it is cheaper than saving it
    outcome = train(work, batches, tc.head_loss, evaluate, cfg, checkpointer, progress, None, on_eval)
    with torch.no_grad():
        folded = work.weight / std.to(dev)
        head.weight.copy_(folded)
        if head.bias is not None:
            head.bias.copy_(work.bias - folded @ mean.to(dev))
    return outcome


def _l2sp(model, bundle, recipe):
    """L2-SP (Li et al. 2018): α/2‖w − w⁰‖² on pre-trained weights + β/2‖w_head‖² on the new head."""
    alpha, beta = recipe.l2sp.alpha, recipe.l2sp.beta
    head_params = {id(p) for p in bundle.head().parameters()}
    anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad and id(p) not in head_params]
    head = [p for p in bundle.head().parameters() if p.requires_grad]

    def penalty(m):
        total = sum(((p - p0) ** 2).sum() for p, p0 in anchors) * (alpha / 2)
        if beta:
            total = total + sum((p**2).sum() for p in head) * (beta / 2)
        return total

    return penalty


# --------------------------------------------------------------------------- outputs

def _write_predictions(path: Path, frame: pd.DataFrame, logits: torch.Tensor, labels: list[str]) -> None:
    probs = torch.softmax(logits, -1).numpy()
    out = pd.DataFrame({"text": frame["text"].to_numpy(), "label": frame["label"].to_numpy(),
                        "prediction": [labels[i] for i in probs.argmax(1)]})
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
    try:
        from .report import build_report
    except ImportError:
        return
    build_report(run_dir)
