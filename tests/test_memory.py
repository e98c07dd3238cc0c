"""Memory before launch: the estimate's parts follow the method, checkpointing and sharding; `auto`
checkpointing turns on when memory is short; a run that does not fit is refused, naming the cheapest change that fits."""

from __future__ import annotations

import re

import pytest
import torch
from chat_helpers import build_tiny_llama, write_chat_recipe, write_conversations

import honed
from honed.memory import HEADROOM, TRAIN_LOGIT_COPIES, Plan, check_memory, estimate_training_memory, lora_parameters
from honed.session import prepare, setup

CPU = torch.device("cpu")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(layers: int = 4, vocab: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=176, vocab_size=vocab, max_position_embeddings=128))


def chat_plan(**changes) -> Plan:
    return Plan(method="lora", batch_size=4, seq_len=64, family="causal-lm", head_name="lm_head", lora_targets=TARGETS, eval_rows=8).but(**changes)


def test_lora_count_is_exactly_what_peft_creates():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    expected = lora_parameters(model, chat_plan(lora_r=4))
    wrapped = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=list(TARGETS)))
    assert expected == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    # and for the wrapped model the estimate reads what peft marked trainable, with no second set of adapters
    assert estimate_training_memory(wrapped, chat_plan(lora_r=4))["trainable"] == expected
    assert estimate_training_memory(model, chat_plan(lora_r=4))["trainable"] == expected


def test_components_follow_the_method_and_checkpointing():
    model = tiny_llama()
    lora = estimate_training_memory(model, chat_plan())
    qlora = estimate_training_memory(model, chat_plan(method="qlora"))
    full = estimate_training_memory(model, chat_plan(method="full"))
    checkpointed = estimate_training_memory(model, chat_plan(gradient_checkpointing=True))
    params = sum(p.numel() for p in model.parameters())
    # chat LoRA keeps lm_head frozen: only the adapters have gradients and AdamW state
    assert lora["trainable"] == lora_parameters(model, chat_plan()) < params // 4
    assert lora["optimizer_mb"] == pytest.approx(8 * lora["trainable"] / 2**20)
    assert full["trainable"] == params and full["gradients_mb"] == pytest.approx(4 * params / 2**20)
    assert qlora["weights_mb"] < 0.6 * lora["weights_mb"]  # 4-bit blocks against fp32 (the embeddings stay fp32)
    assert qlora["trainable"] == lora["trainable"]
    assert checkpointed["activations_mb"] < lora["activations_mb"] / 2
    assert checkpointed["total_mb"] < lora["total_mb"]
    # logits: batch · seq · vocab fp32 in the copies cross-entropy holds
    assert lora["logits_mb"] == pytest.approx(TRAIN_LOGIT_COPIES * 4 * 64 * 512 * 4 / 2**20)


def test_quantised_weights_are_counted_as_loaded():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    expected = estimate_training_memory(model, chat_plan(method="qlora"))["weights_mb"]
    for block in model.model.layers:  # what transformers' bitsandbytes loader does to each linear layer
        for parent in (block.self_attn, block.mlp):
            for name, linear in list(parent.named_children()):
                if isinstance(linear, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, quant_type="nf4", compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
                    setattr(parent, name, q.to("cpu"))
    loaded = estimate_training_memory(model, chat_plan(method="qlora"))["weights_mb"]
    # the loaded packed weights (parameters only; the per-block constants live in quant_state) against the prediction
    assert loaded == pytest.approx(expected, rel=0.05)


def test_fsdp_holds_a_share_of_the_state_per_process():
    model = tiny_llama()
    one = estimate_training_memory(model, chat_plan(method="full"))
    two = estimate_training_memory(model, chat_plan(method="full", world_size=2, fsdp=True))
    ddp = estimate_training_memory(model, chat_plan(method="full", world_size=2))
    assert two["per_process_state_mb"] < 0.55 * one["per_process_state_mb"] + 2 * 4 * (64 * 64 * 4 + 3 * 64 * 176) / 2**20
    assert two["activations_mb"] < one["activations_mb"]  # half the global batch per process
    assert two["total_mb"] < ddp["total_mb"]


def test_estimate_scales_with_batch_for_a_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128))
    plan = Plan(method="full", batch_size=8, seq_len=64, family="transformers", head_name="classifier")
    small, big = estimate_training_memory(model, plan), estimate_training_memory(model, plan.but(batch_size=32))
    assert big["activations_mb"] == pytest.approx(4 * small["activations_mb"], rel=0.3)
    assert small["logits_mb"] == 0  # a classifier's logits are a few numbers per row
    lora = estimate_training_memory(model, plan.but(method="lora"))
    head = sum(p.numel() for p in model.classifier.parameters())
    assert lora["trainable"] == lora_parameters(model, plan) + head  # a classifier's LoRA trains its head too


def needs(model, plan) -> float:
    return estimate_training_memory(model, plan)["total_mb"]


def test_refusal_names_the_cheapest_change_that_fits():
    model = tiny_llama(layers=8, vocab=4096)
    plan = chat_plan(method="full", batch_size=16, seq_len=128, eval_rows=1)
    without, with_gc = needs(model, plan), needs(model, plan.but(gradient_checkpointing=True))
    assert with_gc < without
    between = (with_gc + without) / 2 / HEADROOM
    with pytest.raises(honed.RecipeError) as info:
        check_memory(model, plan, CPU, ("lora", "full"), have_mb=between)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"set train\.gradient_checkpointing: true \([\d.]+ GB, the cheapest change that fits\)", message), message
    assert f"{without / 1024:.1f} GB" in message
    # with less memory checkpointing is not enough: the next change that fits is named instead
    lora = needs(model, plan.but(method="lora"))
    with pytest.raises(honed.RecipeError, match=r"set (train\.batch_size|method: lora)") as info:
        check_memory(model, plan, CPU, ("lora", "full"), have_mb=min(with_gc, lora) * 0.999 / HEADROOM)
    assert "train.gradient_checkpointing: true" in str(info.value)  # still listed with its figure
    with pytest.raises(honed.RecipeError, match="nothing tried fits"):
        check_memory(model, plan, CPU, ("lora", "full"), have_mb=1.0)
    assert check_memory(model, plan, CPU, ("lora", "full"), have_mb=without / HEADROOM * 1.01)["total_mb"] == pytest.approx(without)


@pytest.fixture
def chat_recipe(tmp_path):
    model = build_tiny_llama(tmp_path / "llama", layers=6)
    train = write_conversations(tmp_path / "train.jsonl", 48, seed=1)
    # batch 16 through 6 blocks: the training step, not the evaluation batch, sets this tiny model's peak
    return write_chat_recipe(tmp_path, model, train, method="lora", **{"train.batch_size": 16})


def test_auto_checkpointing_turns_on_only_when_memory_is_short(chat_recipe):
    recipe, splits = prepare(str(chat_recipe))
    assert recipe.train.gradient_checkpointing == "auto"
    roomy = setup(recipe, splits, memory_mb=10**7)
    assert roomy.recipe.train.gradient_checkpointing is False
    plan = roomy.memory_estimate["plan"]
    model = roomy.bundle.model
    without = needs(model, Plan(**plan))
    with_gc = needs(model, Plan(**{**plan, "gradient_checkpointing": True}))
    assert with_gc < without
    recipe, splits = prepare(str(chat_recipe))
    tight = setup(recipe, splits, memory_mb=(with_gc + without) / 2 / HEADROOM)
    assert tight.recipe.train.gradient_checkpointing is True
    # total_mb counts the data too (the token ids the run holds beside training, on a CPU)
    assert tight.memory_estimate["data_mb"] > 0
    assert tight.memory_estimate["total_mb"] == pytest.approx(with_gc + tight.memory_estimate["data_mb"])
    # an explicit setting passes through even when it does not fit
    recipe, splits = prepare(str(chat_recipe), ["train.gradient_checkpointing=false"])
    with pytest.raises(honed.RecipeError, match="train.gradient_checkpointing: true"):
        setup(recipe, splits, memory_mb=(with_gc + without) / 2 / HEADROOM)


def test_run_refuses_before_training_when_memory_is_short(recipe_factory, tmp_path):
    recipe, splits = prepare(str(recipe_factory()))
    with pytest.raises(honed.RecipeError, match="memory: training needs"):
        setup(recipe, splits, memory_mb=1.0)
    assert not (tmp_path / "run").exists()


def test_estimate_is_recorded_beside_the_measured_peak(recipe_factory):
    timing = honed.run(str(recipe_factory()), show_progress=False).metrics["timing"]
    # the tiny model's tensors are negligible: both figures are dominated by the process itself
    assert 0 < timing["memory_estimate_mb"] < 4 * timing["peak_rss_mb"]
    # training's peak is read before the evaluation, export and guards that follow it
    assert 0 < timing["training_peak_rss_mb"] <= timing["peak_rss_mb"]


def test_the_recorded_plan_holds_plain_values_not_the_model(chat_recipe):
    # a Plan field once held the (decoder, output layer) pair: asdict deep-copied it, and the copy of the
    # whole decoder stayed in memory under training (+486 MB at train start for a 125M Llama)
    recipe, splits = prepare(str(chat_recipe))
    session = setup(recipe, splits, memory_mb=10**7)
    plan = session.memory_estimate["plan"]
    assert plan["chunked_logits"] is True
    assert all(isinstance(v, (bool, int, float, str, tuple, type(None))) for v in plan.values())
    assert not any(isinstance(x, torch.nn.Module) for v in plan.values() if isinstance(v, tuple) for x in v)
