"""Model families: load a pre-trained classifier, save a fine-tuned one, reload it for predict.

One loader per family in a literal dict (FAMILIES). Every family gives a `ModelBundle`: an
nn.Module whose forward(input_ids, attention_mask) yields logits, a tokenizer function, and
the name of the final linear layer (the head) whose input is the feature vector that the
feature cache, the linear probe and CKA use.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import RecipeError

HONED_MODEL_FILE = "honed.json"


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


def find_head_name(model: nn.Module, num_labels: int) -> str:
    """The last nn.Linear producing num_labels outputs: BERT's classifier, RoBERTa's out_proj, Llama's score."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            name = module_name
    if name is None:
        raise RecipeError(f"model: no linear classification layer with {num_labels} outputs found; is this a sequence-classification model?")
    return name


CHARS_PER_TOKEN_CAP = 64  # far above any tokenizer's average on real text (English: ~4)


def _clip(texts: list[str], max_length: int) -> list[str]:
    """Cut each text to what max_length tokens could cover before tokenising: tokenizers read the
    whole text even when truncating, so one 10 MB text would otherwise take seconds."""
    limit = max_length * CHARS_PER_TOKEN_CAP
    return [t if len(t) <= limit else t[:limit] for t in texts]


# --------------------------------------------------------------------------- wordllama

class WordLlamaClassifier(nn.Module):
    """WordLlama's token embeddings, mean-pooled over the real tokens, and a linear head."""

    def __init__(self, vocab_size: int, dim: int, num_labels: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        summed = (self.embedding(input_ids) * mask).sum(dim=1)
        pooled = summed / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(pooled)


def wordllama_files() -> tuple[Path, Path]:
    """The weights and tokenizer inside the installed wordllama wheel (its own loader reaches for the network)."""
    import importlib.util

    spec = importlib.util.find_spec("wordllama")
    if spec is None or spec.origin is None:
        raise RecipeError("model: 'wordllama' needs the wordllama package (pip install wordllama)")
    root = Path(spec.origin).parent
    weights = sorted((root / "weights").glob("*.safetensors"))
    tokenizers = sorted((root / "tokenizers").glob("*.json"))
    if not weights or not tokenizers:
        raise RecipeError(f"model: the wordllama package at {root} has no weights/*.safetensors or tokenizers/*.json")
    return weights[0], tokenizers[0]


def _wordllama_encoder(tokenizer_path: Path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()

    def encode(texts: list[str], max_length: int) -> list[list[int]]:
        tokenizer.enable_truncation(max_length)
        return [e.ids for e in tokenizer.encode_batch(_clip(texts, max_length))]

    pad = tokenizer.token_to_id("</s>")
    return tokenizer, encode, (pad if pad is not None else 0)


def load_wordllama(labels: list[str], recipe=None) -> ModelBundle:
    weights_path, tokenizer_path = wordllama_files()
    embedding = load_file(str(weights_path))["embedding.weight"].float()
    model = WordLlamaClassifier(embedding.shape[0], embedding.shape[1], len(labels))
    with torch.no_grad():
        model.embedding.weight.copy_(embedding)
    tokenizer, encode, pad = _wordllama_encoder(tokenizer_path)
    return ModelBundle("wordllama", model, encode, pad, "classifier", labels, "wordllama", tokenizer)


def save_wordllama(bundle: ModelBundle, model: nn.Module, out: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_save_safetensors(state, out / "model.safetensors")
    bundle.tokenizer.no_truncation()
    bundle.tokenizer.save(str(out / "tokenizer.json"))
    dims = model.embedding.weight.shape
    return {"vocab_size": int(dims[0]), "dim": int(dims[1])}


def reload_wordllama(model_dir: Path, meta: dict) -> ModelBundle:
    model = WordLlamaClassifier(meta["vocab_size"], meta["dim"], len(meta["labels"]))
    state = _load_safetensors(model_dir / "model.safetensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RecipeError(f"model: {model_dir}/model.safetensors does not match {HONED_MODEL_FILE} ({str(exc).splitlines()[0]})") from None
    tokenizer, encode, pad = _wordllama_encoder(model_dir / "tokenizer.json")
    return ModelBundle("wordllama", model, encode, pad, "classifier", meta["labels"], str(model_dir), tokenizer)


# --------------------------------------------------------------------------- Hugging Face

def _check_hf_dir(path: Path, allow_pickle: bool) -> None:
    if not path.is_dir():
        raise RecipeError(f"model: {path} is not a directory; expected a Hugging Face checkpoint folder, a Hub id, 'wordllama' or a honed run directory")
    if not (path / "config.json").exists():
        raise RecipeError(f"model: {path} has no config.json; expected a Hugging Face checkpoint folder (save_pretrained layout) or a honed run directory")
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise RecipeError(
            f"model: {path} has only pickle weights (.bin/.pt), which can run code when loaded; convert them to "
            "safetensors, or set allow_pickle: true in the recipe (they are then loaded with weights_only=True)"
        )
    if not has_safetensors and not has_pickle:
        raise RecipeError(f"model: {path} has a config.json but no weights (*.safetensors)")
    if not has_safetensors and allow_pickle:
        for weights in sorted(path.glob("pytorch_model*.bin")):
            _check_pickle_weights(weights)
    for weights in sorted(path.glob("*.safetensors")):
        try:  # reads only the header, which also checks the file is as long as the header says
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as exc:
            raise RecipeError(
                f"model: {weights} is damaged or incomplete ({str(exc).splitlines()[0][:160]}); copy or download it again"
            ) from None


def _check_pickle_weights(weights: Path) -> None:
    """allow_pickle: true still never runs code: the file must load with torch.load(weights_only=True)
    (tensors and plain containers only), whatever the transformers version does with it afterwards."""
    import pickle
    import re

    try:
        try:
            torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            torch.load(weights, map_location="cpu", weights_only=True)  # the legacy (non-zip) format cannot be mmapped
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        text = str(exc)
        found = re.search(r"(unsupported (global|operand)[^\n]*?)(\.?\n|\.\s|$)", text, re.IGNORECASE)
        if found or isinstance(exc, pickle.UnpicklingError):
            why = found.group(1).strip()[:200] if found else "objects weights_only loading refuses"
            raise RecipeError(
                f"model: {weights} holds more than tensors ({why}): unpickling it would run code, so it is refused even with "
                "allow_pickle: true (pickle weights are loaded with weights_only=True); get safetensors weights from a source you trust"
            ) from None
        first = text.splitlines()[0][:160] if text else type(exc).__name__
        raise RecipeError(f"model: {weights} cannot be read as PyTorch weights ({type(exc).__name__}: {first}); copy or download it again") from None


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars would garble the one-line error and the verdict
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _hf_encoder(tokenizer):
    def encode(texts: list[str], max_length: int) -> list[list[int]]:
        return tokenizer(_clip(texts, max_length), truncation=True, max_length=max_length)["input_ids"]

    return encode


def _hf_tokenizer(source: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise RecipeError(f"model: could not load a tokenizer from {source} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):
        # transformers builds an empty tokenizer when the vocabulary files are missing: every word would be [UNK]
        raise RecipeError(f"model: the tokenizer in {source} has no vocabulary (tokenizer.json or vocab files missing); "
                          "save the tokenizer beside the model with tokenizer.save_pretrained")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise RecipeError(f"model: the tokenizer in {source} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models ship without a pad token
    return tokenizer


def hf_config(source: str, recipe, kind: str):
    """config.json of a checkpoint folder (after the folder's safety checks) or a Hub id, with
    one-line errors; `kind` names what the task needs, e.g. "a sequence-classification"."""
    from transformers import AutoConfig

    _quiet_transformers()
    local = Path(source)
    is_local = local.is_absolute() or local.exists()
    if is_local:
        _check_hf_dir(local, bool(recipe and recipe.allow_pickle))
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=bool(recipe and recipe.trust_remote_code))
    except Exception as exc:
        first = str(exc).splitlines()[0][:240] if str(exc) else type(exc).__name__
        if "custom code" in str(exc) or "trust_remote_code" in str(exc):
            raise RecipeError(f"model: {source} ships its own code (config.json auto_map); honed runs it only when the recipe "
                              "sets trust_remote_code: true, for a source you trust") from None
        if is_local:
            raise RecipeError(f"model: {local / 'config.json'} cannot be used ({first}); give {kind} checkpoint folder") from None
        raise RecipeError(f"model: '{source}' is neither a local checkpoint folder nor a Hub id that could be reached "
                          f"({type(exc).__name__}: {first}); give {kind} checkpoint folder or Hub id, or a honed run directory") from None


def load_hf(source: str, labels: list[str], recipe=None) -> ModelBundle:
    """Any checkpoint AutoModelForSequenceClassification can load, by folder or Hub id."""
    import pickle

    from transformers import AutoModelForSequenceClassification

    trust = bool(recipe and recipe.trust_remote_code)
    allow_pickle = bool(recipe and recipe.allow_pickle)
    config = hf_config(source, recipe, "a sequence-classification (or 'wordllama')")
    if not _is_sequence_classifier(config, trust):
        raise RecipeError(
            f"model: {source} is a '{config.model_type}' model ({type(config).__name__}), which cannot be loaded as a sequence "
            "classifier; choose a text model such as BERT, RoBERTa or Llama"
        )
    tokenizer = _hf_tokenizer(source, trust)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, trust_remote_code=trust, use_safetensors=None if allow_pickle else True,
            ignore_mismatched_sizes=True, output_loading_info=True,
        )
    except ValueError as exc:
        first = str(exc).splitlines()[0][:240]
        raise RecipeError(f"model: {source} cannot be loaded as a sequence classifier ({first})") from None
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0][:240]
        raise RecipeError(f"model: the weights in {source} could not be loaded ({first})") from None
    model.float()
    head = find_head_name(model, len(labels))
    _refuse_mismatched(source, info.get("mismatched_keys", []), head)
    return ModelBundle("hf", model, _hf_encoder(tokenizer), tokenizer.pad_token_id, head, labels, source, tokenizer)


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


def save_hf(bundle: ModelBundle, model: nn.Module, out: Path) -> dict:
    """Every Hugging Face family (text, image, causal LM) saves the same way: save_pretrained for
    the weights (safetensors) and for the tokenizer or image processor beside them."""
    model.save_pretrained(str(out), safe_serialization=True)
    if bundle.tokenizer is not None:  # forecasters read numbers: no tokenizer or processor to save
        bundle.tokenizer.save_pretrained(str(out))
    return {}


def reload_hf_dir(model_dir: Path, auto_class, tokenizer: bool = True):
    """A model folder written by save_hf, reloaded with its tokenizer (None when tokenizer=False): (model, tokenizer)."""
    _quiet_transformers()
    _check_hf_dir(model_dir, allow_pickle=False)
    tokenizer = _hf_tokenizer(str(model_dir), False) if tokenizer else None
    try:
        model = auto_class.from_pretrained(str(model_dir), use_safetensors=True)
    except Exception as exc:
        raise RecipeError(f"model: {model_dir} could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return model.float(), tokenizer


def reload_hf(model_dir: Path, meta: dict) -> ModelBundle:
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = reload_hf_dir(model_dir, AutoModelForSequenceClassification)
    labels = meta["labels"]
    return ModelBundle("hf", model, _hf_encoder(tokenizer), tokenizer.pad_token_id, find_head_name(model, len(labels)), labels, str(model_dir), tokenizer)


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
    return ModelBundle("hf-image", model, None, 0, find_head_name(model, len(labels)), labels, source, processor)


def reload_hf_image(model_dir: Path, meta: dict) -> ModelBundle:
    bundle = load_hf_image(str(model_dir), meta["labels"])
    bundle.source = str(model_dir)
    return bundle


def _causal_lm_reload(model_dir, meta):
    from .causal_lm import reload_causal_lm

    return reload_causal_lm(model_dir, meta)


def _mlp_save(bundle, model, out):
    from .mlp import save_mlp

    return save_mlp(bundle, model, out)


def _mlp_reload(model_dir, meta):
    from .mlp import reload_mlp

    return reload_mlp(model_dir, meta)


def _forecast_reload(model_dir, meta):
    from .forecast import reload_forecaster

    return reload_forecaster(model_dir, meta)


FAMILIES = {
    "wordllama": {"save": save_wordllama, "reload": reload_wordllama},
    "hf": {"save": save_hf, "reload": reload_hf},
    "mlp": {"save": _mlp_save, "reload": _mlp_reload},
    "hf-image": {"save": save_hf, "reload": reload_hf_image},
    "causal-lm": {"save": save_hf, "reload": _causal_lm_reload},
    "ts-forecast": {"save": save_hf, "reload": _forecast_reload},
}


# --------------------------------------------------------------------------- entry points

def run_model_dir(path: Path) -> Path | None:
    """A honed run directory (or its model/ folder) holds honed.json; return the model folder."""
    for candidate in (path / "model", path):
        if (candidate / HONED_MODEL_FILE).exists():
            return candidate
    return None


def load_pretrained(source: str, labels: list[str], recipe=None) -> ModelBundle:
    """Load the starting point of a fine-tune: 'wordllama', a honed run, or a Hugging Face checkpoint."""
    if source == "wordllama":
        return load_wordllama(labels, recipe)
    path = Path(source)
    if path.is_absolute() and not path.exists():
        raise RecipeError(f"model: {source} does not exist; give a checkpoint folder, a Hub id, 'wordllama' or a honed run directory")
    honed_dir = run_model_dir(path) if path.exists() else None
    if honed_dir is not None:
        bundle = load_saved(honed_dir)
        return _relabel(bundle, labels)
    return load_hf(source, labels, recipe)


def _relabel(bundle: ModelBundle, labels: list[str]) -> ModelBundle:
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


def load_saved(model_dir: str | Path) -> ModelBundle:
    """Reload a model written by `save_model` (RUN_DIR/model)."""
    model_dir = Path(model_dir)
    meta_path = model_dir / HONED_MODEL_FILE
    if not meta_path.exists():
        raise RecipeError(f"{model_dir}: no {HONED_MODEL_FILE}; expected a honed run directory (one written by honed run)")
    try:
        meta = json.loads(meta_path.read_text())
        family = FAMILIES[meta["family"]]
    except (json.JSONDecodeError, KeyError) as exc:
        raise RecipeError(f"{meta_path}: not a valid honed model description ({exc})") from None
    return family["reload"](model_dir, meta)


def save_model(bundle: ModelBundle, model: nn.Module, out: Path, extra: dict | None = None) -> None:
    """Write RUN_DIR/model: weights (safetensors), tokenizer and honed.json (labels, family, max_length).

    Everything is written into `model.tmp`, fsynced, then renamed into place: a kill or a full
    disk leaves either no model folder or a complete one. A failed write is one clear error;
    the training checkpoint is untouched, so `--resume` finishes the run without training again.
    """
    from ..errors import HonedError
    from ..train.checkpoint import _free_space, _fsync_dir, _fsync_file, fault, write_advice, write_error_reason

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
                _fsync_file(path)
        _fsync_dir(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except Exception as exc:
        reason = write_error_reason(exc)
        if reason is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise HonedError(f"model: could not write {out} ({reason}; {_free_space(out.parent)}); the training checkpoint is intact: "
                         f"{write_advice(reason)}") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:
        raise RecipeError(f"model: {path} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:160]})") from None


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """save_file under a temporary name, fsync, rename; a failed write leaves nothing behind and
    raises OSError (safetensors reports a full disk as a SafetensorError naming the OS error)."""
    import re

    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(state, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def scratch_copy(bundle: ModelBundle) -> nn.Module:
    """The same architecture with fresh random weights: the from-scratch baseline."""
    model = bundle.model
    if bundle.family == "hf":
        from transformers import AutoModelForSequenceClassification

        fresh = AutoModelForSequenceClassification.from_config(model.config)
    elif bundle.family == "hf-image":
        from transformers import AutoModelForImageClassification

        fresh = AutoModelForImageClassification.from_config(model.config)
    elif bundle.family == "causal-lm":
        from .causal_lm import scratch_causal_lm

        fresh = scratch_causal_lm(model)
    elif bundle.family == "ts-forecast":
        from .forecast import scratch_forecaster

        fresh = scratch_forecaster(model)
    elif bundle.family == "mlp":
        from .mlp import TabularMLP

        cfg = model.config
        fresh = TabularMLP(cfg["in_dim"], cfg["hidden"], cfg["layers"], model.classifier.out_features, cfg["dropout"], cfg["regression"])
        fresh.target_mean.copy_(model.target_mean)
        fresh.target_std.copy_(model.target_std)
    else:
        dims = model.embedding.weight.shape
        fresh = WordLlamaClassifier(int(dims[0]), int(dims[1]), len(bundle.labels))
    return fresh.float()
