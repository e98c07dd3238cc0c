"""What every Hugging Face family shares: the checkpoint folder's safety checks, config.json and
the tokenizer with one-line errors, and the save_pretrained layout (save_hf, reload_hf_dir).

transformers is imported inside the functions that use it: it takes seconds to import, and
runs of the wordllama and mlp families never need it.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import RecipeError
from .bundle import ModelBundle


def _check_hf_dir(path: Path, allow_pickle: bool, read_weights: bool = True) -> None:
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
    if not read_weights:  # a process that builds the model without weights (models/meta_load.py): rank 0 checks the files
        return
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


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars would garble the one-line error and the verdict
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def hf_tokenizer(source: str, trust_remote_code: bool):
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


def hf_config(source: str, recipe, kind: str, read_weights: bool = True):
    """config.json of a checkpoint folder (after the folder's safety checks) or a Hub id, with
    one-line errors; `kind` names what the task needs, e.g. "a sequence-classification".
    read_weights: False skips opening the weights files' headers (a process that will not load them)."""
    from transformers import AutoConfig

    quiet_transformers()
    local = Path(source)
    is_local = local.is_absolute() or local.exists()
    if is_local:
        _check_hf_dir(local, bool(recipe and recipe.allow_pickle), read_weights)
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


def save_hf(bundle: ModelBundle, model: nn.Module, out: Path) -> dict:
    """Every Hugging Face family (text, image, causal LM) saves the same way: save_pretrained for
    the weights (safetensors) and for the tokenizer or image processor beside them."""
    model.save_pretrained(str(out), safe_serialization=True)
    if bundle.tokenizer is not None:  # forecasters read numbers: no tokenizer or processor to save
        bundle.tokenizer.save_pretrained(str(out))
    return {}


def reload_hf_dir(model_dir: Path, auto_class, tokenizer: bool = True):
    """A model folder written by save_hf, reloaded with its tokenizer (None when tokenizer=False): (model, tokenizer)."""
    quiet_transformers()
    _check_hf_dir(model_dir, allow_pickle=False)
    tokenizer = hf_tokenizer(str(model_dir), False) if tokenizer else None
    try:
        model = auto_class.from_pretrained(str(model_dir), use_safetensors=True)
    except Exception as exc:
        raise RecipeError(f"model: {model_dir} could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return model.float(), tokenizer
