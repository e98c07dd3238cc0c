"""Memory before launch: the estimate grows with the work, and an impossible run is refused before training."""

from __future__ import annotations

import pytest
import torch

import honed
from honed.memory import check_memory, estimate_training_memory


def test_estimate_scales_with_batch_and_trainable_parameters():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128))
    small = estimate_training_memory(model, 8, 64, "fp32")
    big = estimate_training_memory(model, 32, 64, "fp32")
    lora = estimate_training_memory(model, 8, 64, "fp32", trainable_fraction=0.02)
    assert big["activations_mb"] == pytest.approx(4 * small["activations_mb"])
    assert lora["optimizer_mb"] < small["optimizer_mb"] / 10
    assert estimate_training_memory(model, 8, 64, "bf16")["activations_mb"] < small["activations_mb"]


def test_check_memory_refuses_with_suggestions():
    estimate = {"total_mb": 10**9, "weights_mb": 1, "gradients_mb": 1, "optimizer_mb": 1, "activations_mb": 1}
    with pytest.raises(honed.RecipeError, match="lora.*grad_accumulation"):
        check_memory(estimate, torch.device("cpu"), "full", 16)
    check_memory({**estimate, "total_mb": 1.0}, torch.device("cpu"), "full", 16)


def test_run_refuses_before_training_when_memory_is_short(recipe_factory, tmp_path, monkeypatch):
    import honed.memory

    monkeypatch.setattr(honed.memory, "available_mb", lambda device: 1.0)
    with pytest.raises(honed.RecipeError, match="memory: training needs about"):
        honed.run(str(recipe_factory()), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_estimate_is_recorded_beside_the_measured_peak(recipe_factory):
    timing = honed.run(str(recipe_factory()), show_progress=False).metrics["timing"]
    # the tiny model's tensors are negligible: both figures are dominated by the process itself
    assert 0 < timing["memory_estimate_mb"] < 4 * timing["peak_rss_mb"]
