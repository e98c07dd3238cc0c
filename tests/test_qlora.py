"""method: qlora — the base's linear layers are 4-bit (8-bit) while training and only the adapters
learn; the run's merged export loads in fp32 with plain transformers and computes what the adapter
on the quantised base computes; the adapter loads with peft; bad recipes are refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("bitsandbytes")

from chat_helpers import build_tiny_llama, write_chat_recipe, write_conversations  # noqa: E402
from helpers import cli  # noqa: E402
from honed.errors import RecipeError  # noqa: E402
from honed.methods import METHODS  # noqa: E402
from honed.models.quantise import check_bitsandbytes, keep_training_layout  # noqa: E402
from honed.session import prepare, setup  # noqa: E402

# Stated tolerance for the merged export: its weights are the exact fp32 values of the 4-bit codes
# plus B·A·(α/r), so it differs from the adapter on the quantised base only by fp32 rounding in
# the merge and in the order of the sums (seen: ~5e-7 on this model).
MERGED_LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("qlora-llama"))


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("qlora-data") / "train.jsonl", 120, 0)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_llama, conversations):
    """One QLoRA chat run through the CLI, shared by the tests that read its outputs."""
    import honed

    folder = tmp_path_factory.mktemp("qlora-run")
    # epochs and eval_every auto: resolved from the step bound and the packed rows (train.max_steps)
    recipe = write_chat_recipe(folder, tiny_llama, conversations, method="qlora",
                               **{"lora.r": 8, "train.max_steps": 24, "train.epochs": "auto", "train.eval_every": "auto"})
    result = honed.run(str(recipe), show_progress=False)
    return result.run_dir, result.metrics


@pytest.mark.parametrize("bits,layer_class", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_base_is_quantised_and_only_adapters_learn(tmp_path, tiny_llama, conversations, bits, layer_class):
    recipe_path = write_chat_recipe(tmp_path, tiny_llama, conversations, method="qlora", **{"qlora.bits": bits})
    recipe, splits = prepare(str(recipe_path))
    session = setup(recipe, splits)
    model = METHODS["qlora"]["prepare"](session.bundle.model, session.bundle, recipe)
    base_layers = [m.base_layer for name, m in model.named_modules() if hasattr(m, "base_layer") and name.endswith("proj")]
    assert base_layers and all(type(layer).__name__ == layer_class for layer in base_layers)
    assert all(layer.weight.dtype in (torch.uint8, torch.int8) for layer in base_layers)
    batch = session.task.collate(session.encoded["train"], torch.arange(8), session.bundle.pad_id)
    session.task.loss(model, batch).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and with_grad == trainable and all("lora_" in n for n in with_grad)

    # an evaluation pass (eval mode, no grad) between training steps leaves the base as it was trained on
    before = [layer.weight.data.clone() for layer in base_layers]
    model.eval()
    with torch.no_grad():
        session.task.loss(model, batch)
    model.train()
    assert all(torch.equal(layer.weight.data, kept) for layer, kept in zip(base_layers, before))
    model.zero_grad()
    session.task.loss(model, batch).backward()  # on avx512_bf16 CPUs bitsandbytes' repacking made this step fail
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable


@pytest.mark.slow  # they share a 4-bit run: ~45 s
def test_qlora_run_learns_and_exports_a_plain_model(qlora_run):
    run_dir, metrics = qlora_run
    assert metrics["run"]["method"] == "qlora" and metrics["run"]["steps"] == 24
    assert metrics["test"]["perplexity"] < metrics["pretrained"]["perplexity"]
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]
    assert resolved["max_steps"] == 24 and resolved["epochs"] >= 2 and len(history) >= 4  # a step-bounded run evaluates ≥ 4 times
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert "quantization_config" not in config  # the export needs no bitsandbytes
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] and adapter_config["r"] == 8


@pytest.mark.slow  # they share a 4-bit run: ~45 s
def test_merged_export_matches_the_adapter_on_the_quantised_base(qlora_run, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run_dir, _ = qlora_run
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    quantised = AutoModelForCausalLM.from_pretrained(
        tiny_llama, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    keep_training_layout(quantised)  # on avx512_bf16 CPUs bitsandbytes would repack these 32-wide layers, and fail
    adapted = PeftModel.from_pretrained(quantised, run_dir / "adapter").eval()
    ids = torch.randint(3, merged.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (a - b).abs().max().item() < MERGED_LOGIT_TOLERANCE
    with torch.no_grad(), adapted.disable_adapter():
        base_only = adapted(input_ids=ids).logits
    assert (base_only - a).abs().max().item() > 10 * MERGED_LOGIT_TOLERANCE  # the adapter did change the model


def test_qlora_on_wordllama_is_refused(tmp_path, capsys):
    from helpers import make_texts, write_recipe

    texts = tmp_path / "texts.csv"
    make_texts(40, 0).to_csv(texts, index=False)
    recipe = write_recipe(tmp_path, "wordllama", texts, method="qlora")
    code, _, err = cli(["check", recipe], capsys)
    assert code == 2 and "method: qlora" in err and "wordllama" in err and len(err.strip().splitlines()) == 1


def test_qlora_refuses_guards_that_need_full_precision_copies(tmp_path, tiny_llama, conversations, capsys):
    recipe = write_chat_recipe(tmp_path, tiny_llama, conversations, method="qlora", **{"guards.data_curve": True})
    code, _, err = cli(["check", recipe], capsys)
    assert code == 2 and "guards.data_curve" in err and "method: lora" in err


def test_a_device_without_a_kernel_is_refused():
    with pytest.raises(RecipeError, match="no 4-bit kernel for the meta device"):
        check_bitsandbytes(torch.device("meta"))


@pytest.mark.slow  # they share a 4-bit run: ~45 s
def test_adapter_export_is_verified_on_the_quantised_base(qlora_run, tmp_path):
    from honed.exporting import export_run

    run_dir, _ = qlora_run
    report = export_run(run_dir, "adapter", tmp_path / "adapter")["verification"]
    assert report["loaded_with"] == "PeftModel.from_pretrained on the 4-bit base"
    assert report["max_abs_diff"] <= report["tolerance"] * report["scale"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's mappings in /proc/self/maps")
def test_quantised_load_keeps_no_mapping_of_the_checkpoint(tmp_path, conversations):
    """The fp32 file is read tensor by tensor, not mapped: none of its pages stays in the process after the
    load (from_pretrained's mapped load kept the head, embeddings and norms as views of it), and the weights
    are those of transformers' own quantised load."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from honed.models.causal_lm import load_causal_lm
    from honed.recipe import load_recipe

    model_dir = build_tiny_llama(tmp_path / "llama")
    recipe = load_recipe(str(write_chat_recipe(tmp_path, model_dir, conversations, method="qlora")))
    model = load_causal_lm(str(model_dir), recipe).model
    files = [str(p.resolve()) for p in model_dir.glob("*.safetensors")]
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if any(f in line for f in files)]
    assert files and not mapped, mapped[:3]
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.name_or_path == str(model_dir)  # a PEFT adapter names its base by it
    reference = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
