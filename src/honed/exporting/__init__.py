"""`honed export RUN_DIR --format F`: the trained model in the formats people deploy, each one
loaded back and compared with the run's model on validation inputs before it is kept.

FORMATS is the table: which model families each format covers, and its writer. A writer works
in a temporary folder beside the destination and returns the verification figures; the folder is
renamed into place only when they are within the format's tolerance, so an export that does not
behave like the model is never left where a user would pick it up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import HonedError, RecipeError
from ..models.bundle import logits_of, read_model_meta

SAMPLE_ROWS = 32
GGUF_TOLERANCE = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}  # max |Δ logit| relative to max(1, |logit|)
ONNX_TOLERANCE = 1e-4
ADAPTER_TOLERANCE = 1e-4


def _validation(run_dir: Path, bundle, rows: int):
    """(task, encoded sample) of the run's validation split, encoded with `bundle`'s tokenizer or preprocessing."""
    from ..recipe import load_recipe
    from ..tasks import TASKS

    recipe = load_recipe(run_dir / "recipe.yaml")
    task = TASKS[recipe.task]
    try:
        splits = task.load_splits(recipe)
    except HonedError as exc:
        raise HonedError(f"export: the run's data cannot be read to verify the export ({exc}); the data files named in "
                         f"{run_dir / 'recipe.yaml'} must still exist") from None
    encoded = task.encode(bundle, splits.validation, splits.labels, recipe)
    n = min(rows, len(encoded))
    return task, recipe, task.subset(encoded, torch.arange(n))


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    scale = max(1.0, float(ours.abs().max()))
    return float((ours - theirs).abs().max()), scale


def _refuse(figures: dict, limit: float, what: str) -> None:
    if not figures["max_abs_diff"] <= limit * figures["scale"]:
        raise HonedError(f"export: {what} differs from the run's model by up to {figures['max_abs_diff']:.3g} "
                         f"(tolerance {limit * figures['scale']:.3g}); nothing was written")


def write_hf(run_dir: Path, meta: dict, folder: Path, dtype: str, rows: int) -> dict:
    """model/ as it is (save_pretrained layout), reloaded from the copy and compared."""
    from ..models.load import load_saved

    shutil.copytree(run_dir / "model", folder)
    ours, theirs = load_saved(run_dir / "model"), load_saved(folder)
    task, recipe, sample = _validation(run_dir, ours, rows)
    a = task.predict(ours.model.eval(), sample, ours.pad_id, 32, "fp32", torch.device("cpu")).float()
    b = task.predict(theirs.model.eval(), sample, theirs.pad_id, 32, "fp32", torch.device("cpu")).float()
    diff, scale = _relative(a, b)
    figures = {"rows": len(sample), "max_abs_diff": diff, "scale": scale, "tolerance": ONNX_TOLERANCE, "loaded_with": "from_pretrained"}
    _refuse(figures, ONNX_TOLERANCE, "the copied model")
    return figures


def write_adapter(run_dir: Path, meta: dict, folder: Path, dtype: str, rows: int) -> dict:
    """RUN_DIR/adapter (PEFT's format), loaded onto its base with PeftModel.from_pretrained and compared with model/."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..models.load import load_saved
    from ..models.quantise import keep_training_layout, quantisation_kwargs

    if not (run_dir / "adapter" / "adapter_config.json").exists():
        raise RecipeError(f"--format adapter: {run_dir} kept no adapter; runs with method: qlora keep one, and method: lora with "
                          "lora.keep_adapter: true")
    shutil.copytree(run_dir / "adapter", folder)
    base_name = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    merged = load_saved(run_dir / "model")
    task, recipe, sample = _validation(run_dir, merged, rows)
    if not base_name or not (Path(base_name).exists() or "/" in base_name):
        raise HonedError(f"export: the adapter names no base model that can be loaded ({base_name!r}); nothing was written")
    # a QLoRA adapter was trained on the quantised base: it is verified on the same base
    load_kwargs = quantisation_kwargs(recipe, "fp32", torch.device("cpu")) if recipe.method == "qlora" else {}
    base = AutoModelForCausalLM.from_pretrained(base_name, **load_kwargs)
    if load_kwargs:
        keep_training_layout(base)  # the layout the adapter was trained on (not bitsandbytes' bf16 inference repacking)
    adapted = PeftModel.from_pretrained(base, str(folder)).eval()
    a = task.predict(merged.model.eval(), sample, merged.pad_id, 32, "fp32", torch.device("cpu")).float()
    b = task.predict(adapted, sample, merged.pad_id, 32, "fp32", torch.device("cpu")).float()
    diff, scale = _relative(a, b)
    figures = {"rows": len(sample), "max_abs_diff": diff, "scale": scale, "tolerance": ADAPTER_TOLERANCE, "base_model": base_name,
               "loaded_with": "PeftModel.from_pretrained" + (" on the 4-bit base" if load_kwargs else "")}
    _refuse(figures, ADAPTER_TOLERANCE, "the adapter on its base")
    return figures


def write_onnx_format(run_dir: Path, meta: dict, folder: Path, dtype: str, rows: int) -> dict:
    """model.onnx, run with onnxruntime on two validation batches of different sizes."""
    from ..models.load import load_saved
    from .onnx import run_onnx, write_onnx

    folder.mkdir(parents=True)
    bundle = load_saved(run_dir / "model")
    model = bundle.model.eval()
    task, recipe, sample = _validation(run_dir, bundle, rows)
    n = len(sample)
    path = write_onnx(model, task.collate(sample, torch.arange(n), bundle.pad_id), folder / "model.onnx")
    model.eval()
    worst, scale = 0.0, 1.0
    for size in sorted({n, max(1, n // 3)}):
        batch = task.collate(sample, torch.arange(size), bundle.pad_id)
        with torch.no_grad():
            ours = logits_of(model, batch).float()
        theirs = torch.from_numpy(run_onnx(path, batch)).float()
        diff, s = _relative(ours, theirs)
        worst, scale = max(worst, diff), max(scale, s)
    figures = {"rows": n, "max_abs_diff": worst, "scale": scale, "tolerance": ONNX_TOLERANCE, "loaded_with": "onnxruntime"}
    _refuse(figures, ONNX_TOLERANCE, "the ONNX graph under onnxruntime")
    return figures


def write_gguf_format(run_dir: Path, meta: dict, folder: Path, dtype: str, rows: int) -> dict:
    """model-<dtype>.gguf, loaded back with transformers' GGUF support; logits compared conversation by conversation."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.load import load_saved
    from .gguf import DTYPES, write_gguf

    if dtype not in DTYPES:
        raise RecipeError(f"--dtype: gguf is written in {', '.join(DTYPES)}; got {dtype!r}")
    folder.mkdir(parents=True)
    bundle = load_saved(run_dir / "model")
    model = bundle.model.eval()
    name = f"model-{dtype}.gguf"
    write_gguf(model, bundle.tokenizer, folder / name, dtype, run_dir.name)
    back = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    task, recipe, sample = _validation(run_dir, bundle, min(rows, 8))
    worst, scale, same_ids = 0.0, 1.0, True
    for i in range(len(sample.offsets) - 1):
        ids = sample.flat[int(sample.offsets[i]) : int(sample.offsets[i + 1])][None]
        with torch.no_grad():
            diff, s = _relative(model(input_ids=ids).logits.float(), back(input_ids=ids).logits.float())
        worst, scale = max(worst, diff), max(scale, s)
        text = bundle.tokenizer.decode(ids[0])
        same_ids = same_ids and bundle.tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    figures = {"sequences": len(sample.offsets) - 1, "dtype": dtype, "max_abs_diff": worst, "scale": scale,
               "tolerance": GGUF_TOLERANCE[dtype], "tokenizer_matches": same_ids,
               "chat_template_kept": tokenizer.chat_template == bundle.tokenizer.chat_template,
               "loaded_with": "transformers from_pretrained(gguf_file=...)",
               "llama_cpp": "checked" if importlib.util.find_spec("llama_cpp") else "llama-cpp-python not installed: not checked"}
    _refuse(figures, GGUF_TOLERANCE[dtype], f"the {dtype} GGUF file")
    if not figures["chat_template_kept"] or not same_ids:
        raise HonedError("export: the GGUF file's tokenizer or chat template does not match the run's; nothing was written")
    return figures


# format → the model families it covers, the packages it needs (honed[export]), its writer
FORMATS = {
    "hf": {"families": ("hf", "hf-image", "causal-lm", "ts-forecast"), "needs": (), "write": write_hf},
    "adapter": {"families": ("causal-lm",), "needs": (), "write": write_adapter},
    "onnx": {"families": ("hf", "hf-image", "wordllama", "mlp"), "needs": ("onnx", "onnxruntime"), "write": write_onnx_format},
    "gguf": {"families": ("causal-lm",), "needs": ("gguf",), "write": write_gguf_format},
}


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, dtype: str = "f16", rows: int = SAMPLE_ROWS) -> dict:
    """Write RUN_DIR's model in `fmt`, verified; returns {"format", "path", "verification"}."""
    run_dir = Path(run_dir)
    if not (run_dir / "model").is_dir():
        raise RecipeError(f"RUN_DIR: {run_dir} has no model/ folder; give a finished run directory")
    meta = read_model_meta(run_dir / "model")
    family = meta["family"]
    allowed = [name for name, spec in FORMATS.items() if family in spec["families"]]
    if fmt not in FORMATS or fmt not in allowed:
        raise RecipeError(f"--format {fmt}: a {meta.get('task', family)} run exports as {', '.join(allowed) or 'none of the formats'}"
                          f" (formats: {', '.join(FORMATS)})")
    import importlib.util

    missing = [name for name in FORMATS[fmt]["needs"] if importlib.util.find_spec(name) is None]
    if missing:
        raise RecipeError(f"--format {fmt} needs {', '.join(missing)}, which is not installed; pip install 'honed[export]'")
    out = Path(out) if out is not None else run_dir / "export" / fmt
    if out.exists():
        raise RecipeError(f"--out: {out} already exists; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        figures = FORMATS[fmt]["write"](run_dir, meta, partial, dtype, rows)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    report = {"format": fmt, "path": str(out), "verification": figures}
    (partial / "export.json").write_text(json.dumps(report, indent=2))
    os.replace(partial, out)
    return report
