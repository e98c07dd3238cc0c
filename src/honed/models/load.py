"""Model families: load a pre-trained model, save a fine-tuned one, reload it for predict.

One row per family in a literal dict (FAMILIES): how a family saves RUN_DIR/model, reloads
it, and builds the same architecture with fresh weights. The families' modules build on
models/bundle.py and models/hf.py and never import this one; this module imports them all.

Layout of honed.models:
  bundle.py     ModelBundle, logits_of, relabel, the run's model folder (honed.json)
  hf.py         what every Hugging Face family shares: folder checks, config, tokenizer, save_pretrained
  hf_text.py    "hf"           sequence classifiers
  hf_image.py   "hf-image"     image classifiers
  wordllama.py  "wordllama"    WordLlama embeddings and a linear head
  causal_lm.py  "causal-lm"    chat models
  forecast.py   "ts-forecast"  PatchTST / PatchTSMixer
  mlp.py        "mlp"          tables
  load.py       this table, and the entry points over it
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from ..errors import HonedError, RecipeError
from ..fileio import fault, free_space, fsync_dir, fsync_file, write_advice, write_error_reason
from . import causal_lm, forecast, hf_image, hf_text, mlp, wordllama
from .bundle import HONED_MODEL_FILE, ModelBundle, TextEncoder, logits_of, read_model_meta, relabel, run_model_dir
from .hf import hf_tokenizer, quiet_transformers, save_hf
from .hf_image import load_hf_image
from .hf_text import hf_text_encoder, load_hf
from .wordllama import load_wordllama, wordllama_encoder, wordllama_files

# what callers import from here; logits_of, relabel and the loaders are re-exported from their homes
__all__ = [
    "FAMILIES", "HONED_MODEL_FILE", "ModelBundle", "TextEncoder", "load_hf", "load_hf_image", "load_pretrained", "load_saved",
    "load_text_encoder", "load_wordllama", "logits_of", "relabel", "run_model_dir", "save_model", "scratch_copy",
]

# family → save(bundle, model, folder) -> extra honed.json fields, reload(folder, meta) -> ModelBundle,
# scratch(model) -> the same architecture with fresh weights (the from-scratch baseline)
FAMILIES = {
    "wordllama": {"save": wordllama.save_wordllama, "reload": wordllama.reload_wordllama, "scratch": wordllama.scratch_wordllama},
    "hf": {"save": save_hf, "reload": hf_text.reload_hf, "scratch": hf_text.scratch_hf},
    "mlp": {"save": mlp.save_mlp, "reload": mlp.reload_mlp, "scratch": mlp.scratch_mlp},
    "hf-image": {"save": save_hf, "reload": hf_image.reload_hf_image, "scratch": hf_image.scratch_hf_image},
    "causal-lm": {"save": save_hf, "reload": causal_lm.reload_causal_lm, "scratch": causal_lm.scratch_causal_lm},
    "ts-forecast": {"save": save_hf, "reload": forecast.reload_forecaster, "scratch": forecast.scratch_forecaster},
}


def load_pretrained(source: str, labels: list[str], recipe=None) -> ModelBundle:
    """Load the starting point of a classifier fine-tune: 'wordllama', a honed run, or a Hugging Face checkpoint."""
    if source == "wordllama":
        return load_wordllama(labels, recipe)
    path = Path(source)
    if path.is_absolute() and not path.exists():
        raise RecipeError(f"model: {source} does not exist; give a checkpoint folder, a Hub id, 'wordllama' or a honed run directory")
    honed_dir = run_model_dir(path) if path.exists() else None
    if honed_dir is not None:
        return relabel(load_saved(honed_dir), labels)
    return load_hf(source, labels, recipe)


def load_text_encoder(source: str, recipe=None) -> TextEncoder:
    """The tokenizer side of what `load_pretrained(source, ...)` would give, without loading the weights:
    the same family, tokenizer, encoders and pad id, so it tokenises (and keys the tokenisation cache)
    exactly as the bundle will."""
    if source == "wordllama":
        return wordllama_encoder(wordllama_files()[1])
    path = Path(source)
    if path.is_absolute() and not path.exists():
        raise RecipeError(f"model: {source} does not exist; give a checkpoint folder, a Hub id, 'wordllama' or a honed run directory")
    honed_dir = run_model_dir(path) if path.exists() else None
    if honed_dir is None:
        quiet_transformers()
        return hf_text_encoder(hf_tokenizer(source, bool(recipe and recipe.trust_remote_code)))
    family = read_model_meta(honed_dir)["family"]
    if family == "wordllama":
        return wordllama_encoder(honed_dir / "tokenizer.json")
    if family == "hf":
        quiet_transformers()
        return hf_text_encoder(hf_tokenizer(str(honed_dir), False))
    bundle = load_saved(honed_dir)  # another family's run: its own reload decides how it tokenises
    return TextEncoder(bundle.family, bundle.tokenizer, bundle.encode, bundle.pad_id, bundle.encode_flat)


def load_saved(model_dir: str | Path) -> ModelBundle:
    """Reload a model written by `save_model` (RUN_DIR/model)."""
    model_dir = Path(model_dir)
    meta = read_model_meta(model_dir)
    if meta["family"] not in FAMILIES:
        raise RecipeError(f"{model_dir / HONED_MODEL_FILE}: not a valid honed model description (unknown family "
                          f"{meta['family']!r}; one of {', '.join(FAMILIES)})")
    return FAMILIES[meta["family"]]["reload"](model_dir, meta)


def save_model(bundle: ModelBundle, model: nn.Module, out: Path, extra: dict | None = None) -> None:
    """Write RUN_DIR/model: weights (safetensors), tokenizer and honed.json (labels, family, max_length).

    Everything is written into `model.tmp`, fsynced, then renamed into place: a kill or a full
    disk leaves either no model folder or a complete one. A failed write is one clear error;
    the training checkpoint is untouched, so `--resume` finishes the run without training again.
    """
    tmp = out.with_name(out.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        meta = {"family": bundle.family, "labels": bundle.labels, "source": bundle.source}
        meta.update(FAMILIES[bundle.family]["save"](bundle, model, tmp) or {})
        fault("model-write")
        meta.update(extra or {})
        (tmp / HONED_MODEL_FILE).write_text(json.dumps(meta, indent=2))
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_file(path)
        fsync_dir(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except Exception as exc:
        reason = write_error_reason(exc)
        if reason is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise HonedError(f"model: could not write {out} ({reason}; {free_space(out.parent)}); the training checkpoint is intact: "
                         f"{write_advice(reason)}") from None


def scratch_copy(bundle: ModelBundle) -> nn.Module:
    """The same architecture with fresh random weights: the from-scratch baseline."""
    return FAMILIES[bundle.family]["scratch"](bundle.model).float()
