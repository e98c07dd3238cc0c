"""Text classifiers (family "hf"): any checkpoint AutoModelForSequenceClassification loads, by
folder or Hub id, with a new head sized for the recipe's labels.

transformers is imported inside the functions that use it (seconds to import; see hf.py).
"""

from __future__ import annotations

import pickle
from pathlib import Path

from torch import nn

from ..errors import RecipeError
from .bundle import ModelBundle, TextEncoder, clip_texts, find_head_name
from .hf import hf_config, hf_tokenizer, reload_hf_dir
from .quantise import CLASSIFIER_HEADS, attention_kwargs, is_quantised, load_settings, pretrained

FAMILY = "hf"


def _hf_encoder(tokenizer):
    def encode(texts: list[str], max_length: int) -> list[list[int]]:
        return tokenizer(clip_texts(texts, max_length), truncation=True, max_length=max_length)["input_ids"]

    return encode


def hf_text_encoder(tokenizer) -> TextEncoder:
    """A loaded tokenizer with the encoder and pad id a family "hf" bundle tokenises with."""
    return TextEncoder(FAMILY, tokenizer, _hf_encoder(tokenizer), tokenizer.pad_token_id)


def load_hf(source: str, labels: list[str], recipe=None) -> ModelBundle:
    """Any checkpoint AutoModelForSequenceClassification can load, by folder or Hub id."""
    from transformers import AutoModelForSequenceClassification

    trust = bool(recipe and recipe.trust_remote_code)
    allow_pickle = bool(recipe and recipe.allow_pickle)
    config = hf_config(source, recipe, "a sequence-classification (or 'wordllama')")
    if not _is_sequence_classifier(config, trust):
        raise RecipeError(
            f"model: {source} is a '{config.model_type}' model ({type(config).__name__}), which cannot be loaded as a sequence "
            "classifier; choose a text model such as BERT, RoBERTa or Llama"
        )
    tokenizer = hf_tokenizer(source, trust)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

        model, info = pretrained(
            AutoModelForSequenceClassification, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, source, config,
            load_settings(recipe, skip=CLASSIFIER_HEADS), trust_remote_code=trust, use_safetensors=None if allow_pickle else True,
            ignore_mismatched_sizes=True, output_loading_info=True, **attention_kwargs(recipe),
        )
    except ValueError as exc:
        first = str(exc).splitlines()[0][:240]
        raise RecipeError(f"model: {source} cannot be loaded as a sequence classifier ({first})") from None
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0][:240]
        raise RecipeError(f"model: the weights in {source} could not be loaded ({first})") from None
    if not is_quantised(model):
        model.float()
    head = find_head_name(model, len(labels))
    _refuse_mismatched(source, info.get("mismatched_keys", []), head)
    return ModelBundle(FAMILY, model, _hf_encoder(tokenizer), tokenizer.pad_token_id, head, labels, source, tokenizer)


def _refuse_mismatched(source: str, mismatched, head: str) -> None:
    """ignore_mismatched_sizes lets a new head replace the checkpoint's; any other tensor whose
    shape disagrees with config.json would be silently re-initialised, i.e. not pre-trained at all."""
    backbone = sorted(m for m in mismatched if not m[0].startswith(head + "."))
    if backbone:
        key, in_file, in_config = backbone[0]
        raise RecipeError(
            f"model: the weights in {source} do not match its config.json ({len(backbone)} tensor(s) differ in shape, e.g. "
            f"{key}: {list(in_file)} in the weights, {list(in_config)} by config.json); use the config.json saved with these weights"
        )


def _is_sequence_classifier(config, trust_remote_code: bool) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    remote = trust_remote_code and "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    return remote or type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING


def reload_hf(model_dir: Path, meta: dict) -> ModelBundle:
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = reload_hf_dir(model_dir, AutoModelForSequenceClassification)
    labels = meta["labels"]
    return ModelBundle(FAMILY, model, _hf_encoder(tokenizer), tokenizer.pad_token_id, find_head_name(model, len(labels)), labels, str(model_dir), tokenizer)


def scratch_hf(model: nn.Module) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_config(model.config)
