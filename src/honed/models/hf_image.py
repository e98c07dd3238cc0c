"""Image classifiers (family "hf-image"): any checkpoint AutoModelForImageClassification loads,
with its image processor (kept in the bundle's `tokenizer` slot and saved beside the weights).

transformers is imported inside the functions that use it (seconds to import; see hf.py).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import RecipeError
from .bundle import ModelBundle, find_head_name
from .hf import hf_config

FAMILY = "hf-image"


def load_hf_image(source: str, labels: list[str], recipe=None) -> ModelBundle:
    """Any checkpoint AutoModelForImageClassification can load, with its image processor."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    trust = bool(recipe and recipe.trust_remote_code)
    allow_pickle = bool(recipe and recipe.allow_pickle)
    config = hf_config(source, recipe, "an image-classification")
    try:
        processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust)
    except Exception as exc:
        raise RecipeError(f"model: could not load the image processor of {source} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    try:
        model = AutoModelForImageClassification.from_pretrained(source, config=config, trust_remote_code=trust,
                                                                use_safetensors=None if allow_pickle else True, ignore_mismatched_sizes=True)
    except (ValueError, OSError, RuntimeError) as exc:
        raise RecipeError(f"model: {source} cannot be loaded as an image classifier ({str(exc).splitlines()[0][:200]})") from None
    model.float()
    return ModelBundle(FAMILY, model, None, 0, find_head_name(model, len(labels)), labels, source, processor)


def reload_hf_image(model_dir: Path, meta: dict) -> ModelBundle:
    bundle = load_hf_image(str(model_dir), meta["labels"])
    bundle.source = str(model_dir)
    return bundle


def scratch_hf_image(model: nn.Module) -> nn.Module:
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_config(model.config)
