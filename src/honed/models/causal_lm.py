"""Causal language models (family "causal-lm"): any checkpoint AutoModelForCausalLM loads, with
its tokenizer and, for task chat, a chat template (the tokenizer's own, or `data.chat_template`
from the recipe); task causal-lm trains on raw text and needs none.

The bundle's "head" is `lm_head`; `labels` is empty. Saved in the save_pretrained layout
(safetensors) with the tokenizer, whose chat template travels with it.

transformers is imported inside the functions that use it (seconds to import; see hf.py).
"""

from __future__ import annotations

import pickle
from pathlib import Path

from torch import nn

from ..errors import RecipeError
from .bundle import HONED_MODEL_FILE, ModelBundle, read_model_meta, run_model_dir
from .meta_load import empty_model, loads_on_meta
from .hf import hf_config, hf_tokenizer, quiet_transformers, reload_hf_dir
from .quantise import attention_kwargs, is_quantised, load_settings, pretrained

FAMILY = "causal-lm"


def _head_name(model: nn.Module) -> str:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            return name
    return "lm_head"


def resolve_chat_template(tokenizer, template: str | None, base_dir: str | None, source: str, required: bool = True) -> None:
    """Set the recipe's template on the tokenizer (inline Jinja, or a path to a .jinja file); with
    `required`, refuse a tokenizer without one."""
    if template:
        path = Path(template).expanduser()
        if not path.is_absolute() and base_dir:
            path = Path(base_dir) / path
        looks_like_file = "{" not in template and len(template) < 1000
        if looks_like_file:
            if not path.is_file():
                raise RecipeError(f"data.chat_template: {template} is neither a Jinja template nor an existing file")
            template = path.read_text(encoding="utf-8")
        tokenizer.chat_template = template
    if required and not getattr(tokenizer, "chat_template", None):
        raise RecipeError(f"model: the tokenizer of {source} has no chat template; set data.chat_template in the recipe "
                          "(a Jinja template, or the path to a .jinja file) to say how conversations are rendered")


def load_causal_lm(source: str, recipe=None, chat: bool = True) -> ModelBundle:
    """A Hugging Face causal LM by folder or Hub id, or an earlier honed chat or causal-lm run.
    chat: the tokenizer must have a chat template (task chat); False for raw text (task causal-lm),
    where `data.chat_template`, when given, is still set on the tokenizer and saved with it."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    task = recipe.task if recipe is not None else "chat"
    trust = bool(recipe and recipe.trust_remote_code)
    allow_pickle = bool(recipe and recipe.allow_pickle)
    local = Path(source)
    if local.exists():
        honed_dir = run_model_dir(local)
        if honed_dir is not None:
            meta = read_model_meta(honed_dir)
            if meta["family"] != FAMILY:
                raise RecipeError(f"model: {source} is a {meta['family']} run; task {task} needs a causal language model")
            bundle = reload_causal_lm(honed_dir, meta, chat=False)
            if recipe is not None:
                resolve_chat_template(bundle.tokenizer, recipe.data.chat_template, recipe.base_dir, source, required=chat)
            return bundle
    weightless = loads_on_meta(recipe)  # FSDP2: rank 0 alone reads the weights and sends each process its shards (models/meta_load.py)
    config = hf_config(source, recipe, "a causal language model", read_weights=not weightless)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    remote = trust and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise RecipeError(f"model: {source} is a '{config.model_type}' model, which cannot be loaded as a causal language model; "
                          f"task {task} needs a decoder such as Llama, Qwen or GPT-2")
    tokenizer = hf_tokenizer(source, trust)
    resolve_chat_template(tokenizer, recipe.data.chat_template if recipe else None, recipe.base_dir if recipe else None, source,
                          required=chat)
    try:
        if weightless:
            model = empty_model(AutoModelForCausalLM, config, trust_remote_code=trust, **attention_kwargs(recipe))
        else:
            model = pretrained(AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING, source, config, load_settings(recipe),
                               trust_remote_code=trust, use_safetensors=None if allow_pickle else True, **attention_kwargs(recipe))
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise RecipeError(f"model: {source} could not be loaded as a causal language model ({str(exc).splitlines()[0][:240]})") from None
    if not is_quantised(model):
        model.float()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return _bundle(model, tokenizer, source)


def load_causal_tokenizer(source: str, recipe, chat: bool = True):
    """The tokenizer `load_causal_lm` would give (chat template resolved), without the model: what
    `data.mix_by: tokens` counts a mixture's tokens with before any model loads."""
    quiet_transformers()
    local = Path(source)
    honed_dir = run_model_dir(local) if local.exists() else None
    tokenizer = hf_tokenizer(str(honed_dir) if honed_dir is not None else source, bool(recipe.trust_remote_code))
    resolve_chat_template(tokenizer, recipe.data.chat_template, recipe.base_dir, source, required=chat)
    return tokenizer


def _bundle(model, tokenizer, source: str) -> ModelBundle:
    def encode(texts: list[str], max_length: int) -> list[list[int]]:
        return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]

    return ModelBundle(FAMILY, model, encode, tokenizer.pad_token_id, _head_name(model), [], source, tokenizer)


def reload_causal_lm(model_dir: Path, meta: dict, chat: bool | None = None) -> ModelBundle:
    """RUN_DIR/model of a chat, preference or causal-lm run. chat: whether the tokenizer must have a chat
    template; by default, unless honed.json says a causal-lm run wrote it (raw text needs none)."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = reload_hf_dir(model_dir, AutoModelForCausalLM)
    if chat is None:
        chat = meta.get("task") != "causal-lm"
    if chat and not getattr(tokenizer, "chat_template", None):
        raise RecipeError(f"model: the tokenizer in {model_dir} has no chat template; was {model_dir / HONED_MODEL_FILE} written by a chat run?")
    return _bundle(model, tokenizer, str(model_dir))


def scratch_causal_lm(model: nn.Module) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model.config)


def lora_targets(model: nn.Module, head_name: str) -> list[str]:
    """Short names of the projection layers inside the transformer blocks (q_proj, …; GPT-2's Conv1D c_attn, …)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = nn.Linear
    names = []
    for name, module in model.named_modules():
        if name == head_name or name.startswith(head_name + "."):
            continue
        if isinstance(module, (nn.Linear, Conv1D)):
            leaf = name.rpartition(".")[2]
            if leaf not in names:
                names.append(leaf)
    return names
