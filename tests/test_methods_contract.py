"""One contract every method must pass, on the tiny BERT and on WordLlama's real embeddings."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import honed
from honed.models.load import load_saved

METHODS = ["full", "head", "freeze", "lora", "qlora", "lp-ft"]
RUN_FILES = ["recipe.yaml", "metrics.json", "history.jsonl", "audit.json", "predictions.csv", "model/honed.json"]


def _weights(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("method", METHODS)
def test_method_contract_tiny_bert(method, recipe_factory, tiny_bert, tmp_path):
    # qlora learns more slowly through the 4-bit rounding of this random tiny model: at 6 epochs its test accuracy
    # sat at 0.67 on an avx512 EPYC (0.96 at 10 epochs; lora 0.92 at 6), so it gets 10
    recipe = recipe_factory(method=method, **({"train.epochs": 10} if method == "qlora" else {}))
    result = honed.run(str(recipe), show_progress=False)
    run_dir = result.run_dir
    for name in RUN_FILES:
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == "text-classification" and metrics["primary_metric"] == "accuracy"
    assert set(metrics["guards"]) == {"overfitting", "forgetting", "data", "bias", "baseline", "export"}
    for guard in metrics["guards"].values():
        assert guard["status"] in {"ok", "warn", "fail", "skipped"} and guard["summary"]
    assert {"accuracy", "f1_macro", "loss"} <= set(metrics["test"])
    assert 0.0 <= metrics["pretrained"]["accuracy"] <= 1.0
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history and {"step", "epoch", "train_loss", "val_loss", "val_accuracy", "lr", "samples_per_s"} <= set(history[0])

    # only what the method trains may change; the exported model is a plain HF checkpoint
    before = _weights(tiny_bert)
    after = _weights(run_dir / "model")
    assert not any("lora" in k for k in after), "LoRA adapters must be merged on export"
    changed = {k for k in before if k in after and before[k].shape == after[k].shape and not torch.equal(before[k], after[k])}
    head_keys = {k for k in after if k.startswith("classifier.")}
    embed_keys = {k for k in after if ".embeddings." in k}
    layer0 = {k for k in after if ".layer.0." in k}
    assert_trained_as_method(method, changed, head_keys, embed_keys, layer0, {k for k in embed_keys if "word_embeddings" in k})
    if method != "freeze":  # freeze on a random tiny model learns too slowly to assert on
        assert metrics["test"]["accuracy"] > 0.7

    # the model reloads, both through honed and through its own library
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    frame = honed.predict(run_dir, run_dir / "predictions.csv")
    saved = pd.read_csv(run_dir / "predictions.csv")
    assert (frame["prediction"] == saved["prediction"]).mean() == 1.0


def assert_trained_as_method(method, changed, head, embed, layer0, lora_embed) -> None:
    """Only what the method trains changed: the head alone, nothing below the frozen depth, adapters
    (merged) outside the embeddings but for `lora_embed` (weights LoRA may adapt), or everything."""
    if method == "head":
        assert changed and changed <= head
    elif method == "freeze":
        assert not (changed & (embed | layer0)) and changed - head
    elif method in ("lora", "qlora"):  # qlora: the dequantised base differs from the original by the 4-bit rounding too
        assert changed - head and not (changed & embed - lora_embed)
    else:
        assert changed & embed and changed & layer0


@pytest.mark.parametrize("method", ["full", "head", "lora"])
def test_method_contract_wordllama(method, text_csv, tmp_path):
    from helpers import write_recipe

    recipe = write_recipe(tmp_path, "wordllama", text_csv, method=method, **{"train.lr": 1e-2, "train.epochs": 3})
    result = honed.run(str(recipe), show_progress=False)
    assert result.metrics["test"]["accuracy"] > 0.8
    bundle = load_saved(result.run_dir / "model")
    assert bundle.family == "wordllama" and bundle.labels == ["neg", "pos"]
    state = load_file(str(result.run_dir / "model" / "model.safetensors"))
    assert set(state) == {"embedding.weight", "classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "qlora"])  # qlora quantises transformers' language models
def test_method_contract_forecasting(method, tmp_path):
    """Forecasting × every method, from a tiny local PatchTST checkpoint: what trains is what the method says."""
    from test_forecasting import make_series, spec
    from transformers import PatchTSTConfig, PatchTSTForPrediction

    config = PatchTSTConfig(num_input_channels=1, context_length=12, prediction_length=4, patch_length=4, patch_stride=4,
                            d_model=16, num_attention_heads=2, num_hidden_layers=2, ffn_dim=32)
    torch.manual_seed(0)
    PatchTSTForPrediction(config).save_pretrained(tmp_path / "ckpt")
    make_series(["a", "b", "c"]).to_csv(tmp_path / "train.csv", index=False)
    result = honed.run(spec(tmp_path, model=str(tmp_path / "ckpt"), method=method), show_progress=False)
    run_dir = result.run_dir
    for name in RUN_FILES:
        assert (run_dir / name).exists(), name
    metrics = result.metrics
    assert set(metrics["guards"]) == {"overfitting", "forgetting", "data", "bias", "baseline", "export"}
    assert {"mae", "rmse", "mase", "smape", "neg_mase"} <= set(metrics["test"]) and metrics["seasonal_naive"]["mase"] > 0

    before, after = _weights(tmp_path / "ckpt"), _weights(run_dir / "model")
    assert not any("lora" in k for k in after), "LoRA adapters must be merged on export"
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    head = {k for k in after if k.startswith("head.")}
    embed = {k for k in after if ".embedder." in k}
    layer0 = {k for k in after if ".layers.0." in k}
    assert_trained_as_method(method, changed, head, embed, layer0, {k for k in embed if k.endswith("weight")})
    if method in ("full", "lp-ft"):
        assert changed & head
    frame = pd.read_csv(run_dir / "predictions.csv")
    assert len(frame) == 12 and frame["prediction"].notna().all()


def test_head_starts_from_the_linear_probe_when_it_is_better(text_csv, tmp_path):
    """One head epoch at a tiny step: the head is where it started, and it started at the probe's solution."""
    from helpers import write_recipe

    recipe = write_recipe(tmp_path, "wordllama", text_csv, method="head",
                          **{"train.head_lr": 1e-9, "train.head_epochs": 1, "guards.baseline": False})
    metrics = honed.run(str(recipe), show_progress=False).metrics
    # the same weights as the probe (up to float32 rounding): the same test predictions, within a row or two
    assert abs(metrics["test"]["accuracy"] - metrics["pretrained"]["accuracy"]) <= 0.02 and metrics["test"]["accuracy"] > 0.7


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "qlora"])
def test_method_contract_causal_lm(method, tmp_path):
    """task: causal-lm × each of its methods on the tiny Llama and .txt documents: what trains is what the method says."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from chat_helpers import build_tiny_llama, write_documents
    from honed.tasks import TASKS

    assert TASKS["causal-lm"].methods == ("lora", "qlora", "full", "freeze")
    model = build_tiny_llama(tmp_path / "llama")
    docs = write_documents(tmp_path / "docs", 30, seed=5)
    recipe = {"task": "causal-lm", "model": str(model), "method": method, "data": {"train": str(docs), "max_length": 64},
              "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8, "seed": 0, "precision": "fp32", "threads": 1, "max_steps": 3,
                        "eval_every": 3, "patience": None},
              "guards": {"baseline": False}}
    result = honed.run(recipe, out=tmp_path / "run", show_progress=False)
    run_dir = result.run_dir
    for name in RUN_FILES:
        assert (run_dir / name).exists(), name
    metrics = result.metrics
    assert set(metrics["guards"]) == {"overfitting", "forgetting", "data", "bias", "baseline", "export"}
    assert metrics["guards"]["export"]["status"] == "ok" and metrics["test"]["perplexity"] > 1
    before, after = _weights(model), _weights(run_dir / "model")
    assert not any("lora" in k for k in after), "LoRA adapters must be merged on export"
    changed = {k for k in before if k in after and before[k].shape == after[k].shape and not torch.equal(before[k], after[k])}
    head = {k for k in after if k.startswith("lm_head.")}
    embed = {k for k in after if "embed_tokens" in k}
    layer0 = {k for k in after if ".layers.0." in k}
    assert_trained_as_method(method, changed, head, embed, layer0, set())
    if method in ("lora", "qlora"):
        assert not changed & head, "lm_head stays out of LoRA"
