"""QLoRA (Dettmers et al. 2023): LoRA adapters over a base model whose frozen linear layers are
held in 4-bit NF4 (or 8-bit, `qlora.bits: 8`) by bitsandbytes.

The model arrives already quantised (models/quantise.py loads it that way, so the full-precision
weights never sit in memory). `apply` runs peft's `prepare_model_for_kbit_training` (norms and
the embeddings' outputs in fp32, input gradients on, gradient checkpointing as the recipe
resolved it) and adds the adapters as `method: lora` does. `export` gives the model a user can
load with no bitsandbytes: every quantised weight dequantised into a full-precision copy of the
architecture, the trained adapters merged into it. The adapter alone is saved beside it
(RUN_DIR/adapter, in PEFT's format, naming the base model) by the run.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import RecipeError
from . import lora


def keeps_adapter(recipe) -> bool:
    """The adapter is the small file of a QLoRA run, and the only form that stays exact on the quantised base."""
    return True


def check_recipe(recipe) -> None:
    """The guards that fine-tune fresh copies of the pre-trained model start from its full-precision
    weights, which a QLoRA run never loads: refuse them by name."""
    asks = [(bool(recipe.train.seeds and len(recipe.train.seeds) > 1), "train.seeds (more than one seed)"),
            (bool(recipe.guards.data_curve), "guards.data_curve: true"), (bool(recipe.interpolate), "interpolate")]
    refused = [key for asked, key in asks if asked]
    if refused:
        raise RecipeError(f"method: qlora keeps only the 4-bit base in memory, so {', '.join(refused)} (which re-train or "
                          "interpolate from the full-precision weights) cannot run; remove it, or use method: lora")


def apply(model: nn.Module, bundle, recipe) -> nn.Module:
    from peft import prepare_model_for_kbit_training

    checkpointing = recipe.train.gradient_checkpointing is True
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return lora.apply(model, bundle, recipe)


def dequantised_weight(param: torch.Tensor, module: nn.Module) -> torch.Tensor | None:
    """The full-precision value of a bitsandbytes 4-bit or 8-bit weight; None for an ordinary tensor."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:  # Params4bit: packed uint8, its scales in quant_state
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(param.data, quant_state).float()
    if param.dtype == torch.int8:  # Int8Params: row-wise absmax scaling (LLM.int8); the scales move to the layer's state once used
        scales = getattr(param, "SCB", None)
        if scales is None:
            scales = getattr(getattr(module, "state", None), "SCB", None)
        if scales is None:
            raise RuntimeError(f"qlora export: the 8-bit weight of {type(module).__name__} has no scales (SCB) to dequantise with")
        return param.data.float() * scales.float().unsqueeze(1) / 127.0
    return None


def dequantised_state(base: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights in fp32 under the plain architecture's names (no `base_layer`, no adapters)."""
    saved = set(base.state_dict())
    state = {}
    for module_name, module in base.named_modules():
        if "lora_" in module_name:
            continue
        own = [*module.named_parameters(recurse=False), *((n, b) for n, b in module.named_buffers(recurse=False)
                                                          if f"{module_name}.{n}".lstrip(".") in saved)]
        for leaf, tensor in own:
            name = f"{module_name}.{leaf}" if module_name else leaf
            value = dequantised_weight(tensor, module)
            if value is None:
                value = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
            state[name.replace(".base_layer.", ".")] = value
    return state


def plain_copy(base: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The same architecture without quantisation, holding `state` (built on the meta device: no random init)."""
    config = copy.deepcopy(base.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    with torch.device("meta"):
        fresh = type(base)(config)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"qlora export: weights with no place in {type(base).__name__}: {unexpected[:5]}")
    fresh.tie_weights()
    left = [n for n, p in fresh.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"qlora export: no dequantised value for {left[:5]} (missing {missing[:5]})")
    built = dict(base.named_buffers())
    for name, buffer in list(fresh.named_buffers()):  # non-persistent buffers (rotary frequencies): computed at init, not saved
        if buffer.is_meta:
            prefix, _, leaf = name.rpartition(".")
            source = built.get(name, built.get(name.replace(".", ".base_layer.", 0)))
            if source is None:
                raise RuntimeError(f"qlora export: buffer {name} has no value in the trained model")
            fresh.get_submodule(prefix).register_buffer(leaf, source.detach().clone(), persistent=False)
    return fresh.float()


def export(model: nn.Module) -> nn.Module:
    """Dequantise the base into fp32, put the trained adapters on it and merge them: a plain model."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base = model.get_base_model()
    adapter_config = copy.deepcopy(model.peft_config["default"])
    adapters = {k: v.detach().float() for k, v in get_peft_model_state_dict(model).items()}
    fresh = plain_copy(base, dequantised_state(base))
    fresh.to(next(iter(adapters.values())).device if adapters else "cpu")
    rebuilt = get_peft_model(fresh, adapter_config)
    set_peft_model_state_dict(rebuilt, adapters)
    return rebuilt.merge_and_unload()
