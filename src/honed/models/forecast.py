"""Forecasting models: PatchTST and PatchTSMixer through transformers (a fresh one sized by the
recipe, a checkpoint folder or Hub id), or an earlier honed forecasting run.

The head is the final linear projection (`head.projection` / `head.base_forecast_block`): the
head-only method trains it, LoRA leaves it out, and its input (pooled over patches) is the
feature vector the forgetting guard compares.

transformers is imported inside the functions that use it (seconds to import; see hf.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import RecipeError
from .bundle import ModelBundle, read_model_meta, run_model_dir
from .hf import hf_config, quiet_transformers, reload_hf_dir

FAMILY = "ts-forecast"
# model_type in config.json → the transformers class that forecasts with it
MODEL_TYPES = {"patchtst": "PatchTSTForPrediction", "patchtsmixer": "PatchTSMixerForPrediction"}
HEAD_NAMES = ("head.projection", "head.base_forecast_block")


def _class_for(model_type: str):
    import transformers

    return getattr(transformers, MODEL_TYPES[model_type])


def head_name(model: nn.Module, source: str) -> str:
    """The head's final linear layer; per-channel or distribution heads are refused (one shared point forecast)."""
    modules = dict(model.named_modules())
    for name in HEAD_NAMES:
        if isinstance(modules.get(name), nn.Linear):
            return name
    raise RecipeError(f"model: {source} has no shared linear forecasting head (head.projection); honed fine-tunes point "
                      "forecasters with share_projection: true and loss: mse")


def build_forecaster(spec, channels: int, context_length: int, horizon: int) -> ModelBundle:
    """A randomly initialised PatchTST / PatchTSMixer sized by the recipe."""
    import transformers

    quiet_transformers()
    patch = max(2, context_length // 8) if spec.patch_length == "auto" else int(spec.patch_length)
    if patch > context_length:
        raise RecipeError(f"model.patch_length: {patch} is longer than data.context_length {context_length}; choose at most {context_length}")
    common = dict(num_input_channels=channels, context_length=context_length, prediction_length=horizon, patch_length=patch,
                  patch_stride=patch, d_model=spec.d_model, scaling="std", loss="mse")
    if spec.architecture == "patchtst":
        if spec.d_model % spec.heads:
            raise RecipeError(f"model.heads: d_model {spec.d_model} must be a multiple of heads; got heads {spec.heads}")
        config = transformers.PatchTSTConfig(**common, num_attention_heads=spec.heads, num_hidden_layers=spec.layers,
                                             ffn_dim=2 * spec.d_model, dropout=spec.dropout, head_dropout=spec.dropout,
                                             share_projection=True)
    else:
        config = transformers.PatchTSMixerConfig(**common, num_layers=spec.layers, dropout=spec.dropout, head_dropout=spec.dropout)
    model = _class_for(config.model_type)(config).float()
    return ModelBundle(FAMILY, model, None, 0, head_name(model, spec.architecture), [], f"{spec.architecture} (random init)")


def _check_shape(model: nn.Module, source: str, channels: int, context_length: int, horizon: int) -> None:
    """A source model reads context_length points of `channels` series and forecasts `horizon`; the recipe must agree."""
    cfg = model.config
    found = {"data.context_length": cfg.context_length, "data.horizon": cfg.prediction_length,
             "channels (1 target + data.covariates)": cfg.num_input_channels}
    wanted = {"data.context_length": context_length, "data.horizon": horizon, "channels (1 target + data.covariates)": channels}
    differ = [f"{k}: {found[k]} in the source, {wanted[k]} here" for k in found if found[k] != wanted[k]]
    if differ:
        raise RecipeError(f"model: {source} was built for other windows ({'; '.join(differ)}); use the source's context_length, horizon and covariates")


def load_forecaster(source: str, recipe, channels: int) -> ModelBundle:
    """A checkpoint folder, a Hub id, or an earlier honed forecasting run."""
    quiet_transformers()
    context_length, horizon = recipe.data.context_length, recipe.data.horizon
    path = Path(source)
    model_dir = run_model_dir(path) if path.exists() else None
    if model_dir is not None:
        meta = read_model_meta(model_dir)
        if meta["family"] != FAMILY:
            raise RecipeError(f"model: {source} is a {meta['family']} run; forecasting needs a forecasting run, a PatchTST/PatchTSMixer checkpoint or {{architecture: patchtst}}")
        bundle = reload_forecaster(model_dir, meta)
        _check_shape(bundle.model, source, channels, context_length, horizon)
        return bundle
    if path.is_absolute() and not path.exists():
        raise RecipeError(f"model: {source} does not exist; give a PatchTST/PatchTSMixer checkpoint folder, a Hub id, a honed forecasting run or {{architecture: patchtst}}")
    config = hf_config(source, recipe, "a PatchTST/PatchTSMixer")
    if config.model_type not in MODEL_TYPES:
        raise RecipeError(f"model: {source} is a '{config.model_type}' model; forecasting fine-tunes {', '.join(MODEL_TYPES)} checkpoints")
    if getattr(config, "loss", "mse") != "mse":
        raise RecipeError(f"model: {source} is a probabilistic forecaster (loss: {config.loss}); honed fine-tunes point forecasters (loss: mse)")
    try:
        model = _class_for(config.model_type).from_pretrained(source, use_safetensors=None if recipe.allow_pickle else True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise RecipeError(f"model: the weights in {source} could not be loaded ({str(exc).splitlines()[0][:200]})") from None
    model.float()
    _check_shape(model, source, channels, context_length, horizon)
    return ModelBundle(FAMILY, model, None, 0, head_name(model, source), [], source)


def reload_forecaster(model_dir: Path, meta: dict) -> ModelBundle:
    """RUN_DIR/model of a forecasting run (save_pretrained layout, no tokenizer)."""
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type") if (model_dir / "config.json").exists() else None
    if model_type not in MODEL_TYPES:
        raise RecipeError(f"model: {model_dir}/config.json is not a PatchTST/PatchTSMixer config (model_type {model_type!r})")
    model, _ = reload_hf_dir(model_dir, _class_for(model_type), tokenizer=False)
    return ModelBundle(FAMILY, model, None, 0, head_name(model, str(model_dir)), [], str(model_dir))


def scratch_forecaster(model: nn.Module) -> nn.Module:
    """The same architecture and config, freshly initialised: the from-scratch baseline."""
    return type(model)(model.config).float()
