"""Loading a finished run for serving: LOADERS (task → loader of a `Served`). Each loader checks
the model metadata it needs itself; torch and the model code are imported inside the loaders."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import RecipeError

if TYPE_CHECKING:  # for annotations only: the functions that need torch import it themselves
    import torch


@dataclass
class Served:
    """A loaded run: what the endpoints need, nothing about how it was trained."""

    model_id: str
    task: str
    labels: list[str]
    input_column: str
    created: int
    predict: Callable[[list[str]], list[dict]]  # texts → [{"label", "probabilities"}]; only ever called from the batcher's one worker thread
    info: dict = field(default_factory=dict)


def model_meta_path(run_dir: Path) -> Path:
    return run_dir / "model" / "honed.json"


def finished_run(run_dir: str | Path) -> tuple[Path, dict]:
    """The run directory and its model/honed.json, or a RecipeError saying what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RecipeError(f"RUN_DIR: {run_dir} does not exist; give the folder `honed run` wrote")
    if not run_dir.is_dir():
        raise RecipeError(f"RUN_DIR: {run_dir} is not a folder; give the folder `honed run` wrote")
    meta_path = model_meta_path(run_dir)
    if not meta_path.is_file():
        raise RecipeError(f"RUN_DIR: {run_dir} has no model/honed.json; give a finished run directory (one `honed run` completed)")
    if not (run_dir / "metrics.json").is_file():
        raise RecipeError(f"RUN_DIR: {run_dir} has no metrics.json, so the run did not finish; "
                          f"finish it with `honed run RECIPE --out {run_dir} --resume`")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecipeError(f"RUN_DIR: {meta_path} is not readable JSON ({type(exc).__name__}); the run directory is damaged") from None
    if not isinstance(meta, dict):
        raise RecipeError(f"RUN_DIR: {meta_path} is not a JSON object; the run directory is damaged")
    return run_dir, meta


# --------------------------------------------------------------------------- text classification

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)  # rows per forward pass (CHUNK at most)
CHUNK = ROW_BUCKETS[-1]


def bucket_rows(rows: int) -> int:
    return next(b for b in ROW_BUCKETS if b >= rows)


def bucket_width(width: int, max_length: int) -> int:
    """Round a padded width up: to 8 below 64 tokens, 16 below 128, 32 below 256, then 64;
    never past the run's max_length (the model may have no positions beyond it)."""
    step = 8 if width <= 64 else 16 if width <= 128 else 32 if width <= 256 else 64
    return max(width, min(-(-width // step) * step, max_length))


def bucketed_logits(model, split, pad_id: int, max_length: int, precision: str, dev) -> torch.Tensor:
    """text_model.predict_logits, with every forward pass padded to a few fixed shapes (rows from
    ROW_BUCKETS, widths from bucket_width). On CPU, oneDNN builds (JIT-compiles) a kernel for
    every new matrix shape and keeps it: a server fed every batch size × length grows by
    hundreds of MB (measured: +330 MB over 8,000 requests in bf16); with the shapes bounded its
    memory levels off. Extra rows are single-token dummies; extra columns are masked padding,
    so the real rows' logits are those of predict_logits (to float rounding)."""
    import torch

    from ..models.load import logits_of
    from ..tasks.text import model as text_model
    from ..train.precision import autocast

    order = torch.argsort(split.lengths, descending=True, stable=True)
    out = None
    for start in range(0, len(order), CHUNK):
        idx = order[start : start + CHUNK]
        batch = text_model.collate(split, idx, pad_id)
        rows, width = batch["input_ids"].shape
        shape = (bucket_rows(rows), bucket_width(width, max_length))
        input_ids = torch.full(shape, pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        input_ids[:rows, :width] = batch["input_ids"]
        attention_mask[:rows, :width] = batch["attention_mask"]
        attention_mask[rows:, 0] = 1  # dummy rows attend to one (pad) token: no empty softmax
        with autocast(precision, dev):
            logits = logits_of(model, {"input_ids": input_ids.to(dev), "attention_mask": attention_mask.to(dev)})
        logits = logits[:rows].float().cpu()
        if out is None:
            out = torch.empty((len(order), logits.shape[1]))
        out[idx] = logits
    return out


def load_text_classifier(run_dir: Path, meta: dict) -> Served:
    """The run's classifier in eval mode on the best device, in the precision the run was evaluated in.
    Needs a non-empty 'labels' list in model/honed.json."""
    if not isinstance(meta.get("labels"), list) or not meta["labels"]:
        raise RecipeError(f"RUN_DIR: {model_meta_path(run_dir)} has no 'labels' list; the run directory is damaged")

    import torch

    from ..models.load import load_saved
    from ..tasks.text import model as text_model
    from ..train.precision import device as pick_device
    from ..train.precision import resolve_precision

    bundle = load_saved(run_dir / "model")
    dev = pick_device()
    precision = resolve_precision(meta.get("precision", "auto"), dev)
    max_length = int(meta.get("max_length", 128))
    model = bundle.model.to(dev).eval()
    labels = [str(label) for label in bundle.labels]

    def predict(texts: list[str]) -> list[dict]:
        with torch.inference_mode():
            encoded = text_model.encode(bundle, texts, None, max_length)
            logits = bucketed_logits(model, encoded, bundle.pad_id, max_length, precision, dev)
            probs = torch.softmax(logits, -1)
        best = probs.argmax(-1).tolist()
        return [{"label": labels[b], "probabilities": {label: round(p, 6) for label, p in zip(labels, row)}}
                for b, row in zip(best, probs.tolist())]

    predict(["warm-up"])  # the first forward pass pays one-off costs; not a request's latency
    created = int((run_dir / "metrics.json").stat().st_mtime)
    return Served(model_id=run_dir.resolve().name, task="text-classification", labels=labels,
                  input_column=str(meta.get("text_column", "text")), created=created, predict=predict,
                  info={"max_length": max_length, "precision": precision, "device": dev.type})


# --------------------------------------------------------------------------- chat

def load_chat_model(run_dir: Path, meta: dict) -> Served:
    """A chat run: a ChatGenerator (serve/generation.py) over the loaded model, which encodes each
    request's prompt and generates token by token. Needs no labels; model/honed.json's family and
    tokenizer are checked by load_saved, the messages themselves per request."""
    from ..models.load import load_saved
    from .generation import ChatGenerator

    bundle = load_saved(run_dir / "model")
    if bundle.family != "causal-lm":
        raise RecipeError(f"RUN_DIR: {run_dir} is a {bundle.family} model, not a chat model; the run directory is damaged")
    bundle.model.eval()
    created = int((run_dir / "metrics.json").stat().st_mtime)
    return Served(model_id=run_dir.resolve().name, task="chat", labels=[],
                  input_column=str(meta.get("messages_column", "messages")), created=created,
                  predict=lambda texts: [], info={"generator": ChatGenerator(bundle)})


LOADERS: dict[str, Callable[[Path, dict], Served]] = {
    "text-classification": load_text_classifier,
    "chat": load_chat_model,
    "preference": load_chat_model,  # a preference-tuned model is served as the chat model it is
}


def load_run(run_dir: str | Path) -> Served:
    run_dir, meta = finished_run(run_dir)
    task = meta.get("task", "text-classification")
    if task not in LOADERS:
        raise RecipeError(f"RUN_DIR: the run's task '{task}' cannot be served yet; servable tasks: {', '.join(LOADERS)}")
    return LOADERS[task](run_dir, meta)
