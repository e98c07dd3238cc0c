"""What every model family gives and shares: the `ModelBundle`, and a honed run's model folder.

A bundle is an nn.Module whose forward(input_ids, attention_mask) (or pixel_values, or x)
yields logits, a tokenizer function, and the name of the final linear layer (the head) whose
input is the feature vector that the feature cache, the linear probe and CKA use.

This module imports no family module: each family (hf_text, hf_image, causal_lm, forecast,
mlp, wordllama) builds on it, and models/load.py dispatches over them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import RecipeError

HONED_MODEL_FILE = "honed.json"
CHARS_PER_TOKEN_CAP = 64  # far above any tokenizer's average on real text (English: ~4)


@dataclass
class ModelBundle:
    """A classifier and everything needed to feed, inspect and save it."""

    family: str
    model: nn.Module
    encode: Callable[[list[str], int], list[list[int]]]  # texts, max_length → token ids
    pad_id: int
    head_name: str  # dotted module name of the final nn.Linear
    labels: list[str]
    source: str
    tokenizer: object = None
    original_head: tuple | None = None  # (module, labels) of the source model's own task, when replaced
    preprocessor: object = None  # tabular models: the fitted feature preprocessing
    # the same ids as `encode`, as (ids, offsets) numpy arrays, for tokenizers that can do large splits
    # column-wise (models/word_memo.py); None: data/tokens.py calls `encode`
    encode_flat: Callable | None = None

    def head(self) -> nn.Linear:
        return self.model.get_submodule(self.head_name)


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    """Hugging Face models return an output object; honed's own return a tensor. Tables feed `x`."""
    if "x" in batch:
        return model(batch["x"])
    if "pixel_values" in batch:
        out = model(pixel_values=batch["pixel_values"])
        return out if isinstance(out, torch.Tensor) else out.logits
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out if isinstance(out, torch.Tensor) else out.logits


@dataclass
class TextEncoder:
    """A text classifier's tokenizer side without its weights (the same fields as its ModelBundle's):
    what `data.mix_by: tokens` counts a mixture with before any model loads."""

    family: str
    tokenizer: object
    encode: Callable[[list[str], int], list[list[int]]]  # texts, max_length → token ids
    pad_id: int
    encode_flat: Callable | None = None


def find_head_name(model: nn.Module, num_labels: int) -> str:
    """The last nn.Linear producing num_labels outputs: BERT's classifier, RoBERTa's out_proj, Llama's score."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            name = module_name
    if name is None:
        raise RecipeError(f"model: no linear classification layer with {num_labels} outputs found; is this a sequence-classification model?")
    return name


def clip_texts(texts: list[str], max_length: int) -> list[str]:
    """Cut each text to what max_length tokens could cover before tokenising: tokenizers read the
    whole text even when truncating, so one 10 MB text would otherwise take seconds."""
    limit = max_length * CHARS_PER_TOKEN_CAP
    return [t if len(t) <= limit else t[:limit] for t in texts]


def relabel(bundle: ModelBundle, labels: list[str]) -> ModelBundle:
    """Starting from an earlier run with other classes: keep the backbone, give it a fresh head."""
    if bundle.labels == labels:
        return bundle
    old = bundle.head()
    bundle.original_head = (old, list(bundle.labels))  # kept to score the original task (forgetting, replay)
    new = nn.Linear(old.in_features, len(labels), bias=old.bias is not None)
    parent_name, _, attr = bundle.head_name.rpartition(".")
    parent = bundle.model.get_submodule(parent_name) if parent_name else bundle.model
    setattr(parent, attr, new)
    if bundle.family in ("hf", "hf-image"):
        cfg = bundle.model.config
        cfg.num_labels = len(labels)
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {label: i for i, label in enumerate(labels)}
    bundle.labels = labels
    return bundle


# --------------------------------------------------------------------------- a run's model folder

def run_model_dir(path: Path) -> Path | None:
    """A honed run directory (or its model/ folder) holds honed.json; return the model folder."""
    for candidate in (path / "model", path):
        if (candidate / HONED_MODEL_FILE).exists():
            return candidate
    return None


def read_model_meta(model_dir: Path) -> dict:
    """honed.json of a model folder written by save_model: at least its family and labels."""
    meta_path = Path(model_dir) / HONED_MODEL_FILE
    if not meta_path.exists():
        raise RecipeError(f"{model_dir}: no {HONED_MODEL_FILE}; expected a honed run directory (one written by honed run)")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta.get("family"), str):
            raise KeyError("family")
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise RecipeError(f"{meta_path}: not a valid honed model description ({exc})") from None
    return meta
