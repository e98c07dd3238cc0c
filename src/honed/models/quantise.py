"""What `from_pretrained` is asked besides the checkpoint: the attention kernel (`attention`) and,
for `method: qlora`, bitsandbytes quantisation of the frozen base weights at load time, so the
full-precision weights are never in memory.

A quantised load reads the checkpoint with pread, one tensor at a time (`pretrained`): through
from_pretrained's usual mapping of the .safetensors file, every fp32 page it read stayed resident
until the load ended, and after it while the unquantised tensors (embeddings, head, norms) were
views of the mapping: the whole fp32 file counted in the process's peak, 4.4 GB at 1.1B.

Quantised: every nn.Linear outside the classification head (transformers keeps the output
embeddings of a causal LM in full precision itself); 4-bit NF4 with double quantisation by
default, compute dtype bf16 under `train.precision: bf16`, fp32 otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

from ..errors import RecipeError
from ..train.allocator import mapped_while_loading

# a sequence classifier's new head trains in full precision: these are the head names transformers' classifiers use
CLASSIFIER_HEADS = ["classifier", "score", "out_proj", "pooler"]


def attention_kwargs(recipe) -> dict:
    """attn_implementation for from_pretrained; with `auto` transformers' own choice (SDPA where the
    architecture has it), or FlashAttention-2 on CUDA when the flash_attn package is installed."""
    choice = getattr(recipe, "attention", "auto") if recipe is not None else "auto"
    if choice == "auto":
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            return {"attn_implementation": "flash_attention_2"}
        return {}
    if choice == "flash_attention_2" and (not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None):
        raise RecipeError("attention: flash_attention_2 needs a CUDA device and the flash-attn package "
                          f"({'no CUDA device here' if not torch.cuda.is_available() else 'flash_attn is not installed'}); "
                          "use attention: auto or sdpa")
    return {"attn_implementation": choice}


def check_bitsandbytes(device: torch.device) -> None:
    """Refuse, in one line, when bitsandbytes is missing or has no kernel for this device."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("method: qlora needs bitsandbytes, which is not installed; pip install 'honed[qlora]' "
                          "(or use method: lora)")
    try:
        import bitsandbytes.functional as bnb_functional

        probe = torch.randn(64, 64, device=device)
        packed, state = bnb_functional.quantize_4bit(probe, quant_type="nf4")
        error = (bnb_functional.dequantize_4bit(packed, state) - probe).abs().max().item()
        if not error < 1.0:  # NF4 rounds a unit normal by ~0.2 at most: anything else is a broken kernel
            raise RuntimeError(f"a 4-bit round trip is off by {error:.3g}")
    except Exception as exc:  # an import error of its native library, or no kernel for this device
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise RecipeError(f"method: qlora: bitsandbytes has no 4-bit kernel for the {device.type} device here ({first}); "
                          "use method: lora, or a device bitsandbytes supports") from None


def quantisation_kwargs(recipe, precision: str, device: torch.device, skip: list[str] | None = None) -> dict:
    """quantization_config (and device_map) for `method: qlora`; empty for every other method."""
    if getattr(recipe, "method", None) != "qlora":
        return {}
    check_bitsandbytes(device)
    from transformers import BitsAndBytesConfig

    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")  # once per layer per step otherwise
    spec = recipe.qlora
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    if spec.bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type, bnb_4bit_use_double_quant=spec.double_quant,
                                    bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else device.type}
    return {"quantization_config": config, "device_map": device_map}


def load_settings(recipe, skip: list[str] | None = None) -> dict:
    """quantisation_kwargs for the device and precision this run will train on (a recipe-like object
    without a method, as some callers pass, loads in full precision)."""
    if getattr(recipe, "method", None) != "qlora":
        return {}
    from ..train.precision import device as pick_device
    from ..train.precision import resolve_precision

    dev = pick_device()
    return quantisation_kwargs(recipe, resolve_precision(recipe.train.precision, dev), dev, skip)


def is_quantised(model) -> bool:
    """True for a model loaded with bitsandbytes (its dtype cannot be changed with .float())."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "quantization_method", None))


def refuse_unquantised(model, source: str) -> None:
    """method: qlora on a model that loaded in full precision (a honed run's model folder) would silently be LoRA."""
    if not is_quantised(model):
        raise RecipeError(f"method: qlora: {source} is a honed run directory, which reloads in full precision; point model: at "
                          "its model/ folder (a Hugging Face checkpoint) to quantise it, or use method: lora")


def local_safetensors(source: str) -> list[Path]:
    """The checkpoint's .safetensors files when they are on this machine (a folder, or a Hub id already in
    the cache); empty otherwise (from_pretrained then resolves, or downloads, them itself)."""
    folder = Path(source)
    if not folder.is_dir():
        try:
            from transformers.utils import cached_file

            found = cached_file(source, "config.json", local_files_only=True, _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):
            return []
        if found is None:
            return []
        folder = Path(found).parent
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        files = [folder / name for name in names]
        return files if names and all(f.is_file() for f in files) else []
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def own_storage(model: torch.nn.Module) -> None:
    """Give every full-precision tensor of a quantised model its own memory, so that none is a view of a
    mapped checkpoint file and the mapping (and its resident pages) goes once the loader closes it."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and getattr(tensor, "quant_state", None) is None:
                tensor.data = tensor.data.clone()


def pretrained(model_class, mapping, source: str, config, load: dict, **kwargs):
    """`model_class.from_pretrained(source, config=config, **load, **kwargs)`, where `load` is
    load_settings' answer; with a quantization_config, a local safetensors checkpoint is read with
    pread, tensor by tensor, instead of through a mapping of the file.

    transformers takes a state dict of safetensors slices in place of the folder and materialises
    and quantises each slice as it goes, so a process holds the quantised weights plus the few tensors
    in flight, never the fp32 file. The folder's name and generation config are put back on the model
    (a PEFT adapter names its base by it). mapping: the auto class's config → model class table (the
    concrete class is needed: the auto classes refuse a state dict without a folder)."""
    # quantising: each fp32 buffer read gets its own mapping, so none leaves a hole in the heap (train/allocator.py)
    with mapped_while_loading() if "quantization_config" in load else nullcontext():
        loaded = _read_pretrained(model_class, mapping, source, config, load, **kwargs)
    if "quantization_config" in load:
        keep_training_layout(loaded[0] if isinstance(loaded, tuple) else loaded)
    return loaded


def keep_training_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference. On a CPU with avx512_bf16, Linear4bit's
    first forward in eval mode under no_grad (honed's validation pass) rewrites the weight in place into a
    bf16 inference layout; the next training step then fails in matmul_4bit ("a view of a leaf Variable that
    requires grad is being used in an in-place operation"), and layers narrower than the 64-value quantisation
    block fail at the repacking itself. Measured with bitsandbytes 0.50 on an AMD EPYC with avx512_bf16."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _read_pretrained(model_class, mapping, source: str, config, load: dict, **kwargs):
    quantised = "quantization_config" in load
    files = local_safetensors(source) if quantised else []
    remote = bool(kwargs.get("trust_remote_code") and getattr(config, "auto_map", None))  # the auto class picks the remote code
    concrete = mapping[type(config)] if files and not remote and type(config) in mapping else None
    if concrete is None:
        loaded = model_class.from_pretrained(source, config=config, **load, **kwargs)
        if quantised:
            own_storage(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded
    from safetensors import safe_open

    kwargs.pop("use_safetensors", None)  # the state dict is read from safetensors files
    with ExitStack() as stack:
        try:
            handles = [stack.enter_context(safe_open(str(f), framework="pt", backend="pread")) for f in files]
        except TypeError:  # a safetensors release without the pread backend
            loaded = model_class.from_pretrained(source, config=config, **load, **kwargs)
            own_storage(loaded[0] if isinstance(loaded, tuple) else loaded)
            return loaded
        slices = {name: handle.get_slice(name) for handle in handles for name in handle.keys()}
        loaded = concrete.from_pretrained(None, config=config, state_dict=slices, **load, **kwargs)
        del slices
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    model.config.name_or_path = model.name_or_path = source
    folder = files[0].parent
    if (folder / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return loaded
