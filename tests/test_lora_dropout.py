"""methods/dropout.py: LoRA's input dropout without a saved mask. The same distribution as nn.Dropout,
exact gradients from the mask drawn again, masks that follow the run's seed and replay under gradient
checkpointing, nothing saved for the backward pass, and every peft LoRA layer's dropout swapped (fused into
the adapter's first matrix, which then saves its undropped input and no dropped copy)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from honed.methods.dropout import DroppedLinear, SeededDropout, keep_probability, replace_adapter_dropout


def saved_storages(fn, x: torch.Tensor) -> dict[int, int]:
    """Bytes of each distinct storage autograd saves while fn(x) runs, by storage address."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved


def saved_bytes(fn, x: torch.Tensor) -> int:
    return sum(saved_storages(fn, x).values())


def test_same_distribution_as_dropout():
    torch.manual_seed(0)
    x = torch.rand(500, 500) + 0.5  # no zeros: a zero in the output is a dropped element
    y = SeededDropout(0.2).train()(x)
    kept = y != 0
    assert keep_probability(0.2) == pytest.approx(0.8, abs=1e-5) and keep_probability(0.05) == pytest.approx(0.95, abs=1e-5)
    assert kept.float().mean().item() == pytest.approx(0.8, abs=0.005)
    torch.testing.assert_close(y[kept], x[kept] / keep_probability(0.2))
    module = SeededDropout(0.2).eval()
    assert module(x) is x
    assert SeededDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SeededDropout(1.0)


def test_gradient_is_the_forward_mask_drawn_again():
    torch.manual_seed(1)
    x = (torch.rand(64, 300) + 0.5).requires_grad_()
    y = SeededDropout(0.3).train()(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected = torch.where(y != 0, grad / keep_probability(0.3), torch.zeros_like(grad))
    torch.testing.assert_close(x.grad, expected)


def test_masks_follow_the_seed():
    x = torch.ones(50, 50)
    module = SeededDropout(0.5).train()
    torch.manual_seed(7)
    first, second = module(x), module(x)
    torch.manual_seed(7)
    assert torch.equal(module(x), first)
    assert not torch.equal(first, second), "each call draws its own mask"


def test_saves_no_mask_for_the_backward():
    x = torch.randn(256, 512, requires_grad=True)
    plain, seeded = nn.Dropout(0.1).train(), SeededDropout(0.1).train()
    assert saved_bytes(plain, x) >= x.numel() * 4, "nn.Dropout saves a float mask the size of its input"
    assert saved_bytes(seeded, x) == 0


def tiny_lora_llama(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         vocab_size=96, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return model, get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))


def test_every_adapter_dropout_is_swapped_and_replays_under_checkpointing():
    gradients = []
    for checkpointing in (False, True):
        base, model = tiny_lora_llama(0.25)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        assert replace_adapter_dropout(model) == 2 * 7
        layers = [layer for layer in model.modules() if isinstance(getattr(layer, "lora_dropout", None), nn.ModuleDict)]
        assert len(layers) == 14
        assert all(type(layer.lora_dropout["default"]) is nn.Identity for layer in layers)
        assert all(type(layer.lora_A["default"]) is DroppedLinear and layer.lora_A["default"].p == 0.25 for layer in layers)
        model.train()
        ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
        torch.manual_seed(11)
        model(input_ids=ids, labels=ids).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, recomputed = gradients
    assert plain.keys() == recomputed.keys() and len(plain) == 2 * 7 * 2
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-5, rtol=1e-5)
    # and the masks matter: the same model without dropout has other gradients
    _, undropped = tiny_lora_llama(0.0)
    undropped.train()
    torch.manual_seed(11)
    undropped(input_ids=ids, labels=ids).loss.backward()
    assert any(not torch.allclose(p.grad, plain[n]) for n, p in undropped.named_parameters() if p.grad is not None)


def unfused_reference(x: torch.Tensor, linear: nn.Linear, p: float, seed: int) -> torch.Tensor:
    """lora_A(dropout(x)) as two steps with the mask DroppedLinear draws for `seed` (SeededDropout's, drawn the same way)."""
    from honed.methods.dropout import dropped

    return linear(dropped(x, p, seed))


def test_the_fused_adapter_matrix_equals_dropout_then_matrix():
    torch.manual_seed(2)
    linear = nn.Linear(48, 6, bias=False)
    fused = DroppedLinear(linear, 0.3).train()
    assert fused.weight is linear.weight, "the same parameter, so the optimizer, merging and saving see lora_A as before"
    assert list(dict(fused.named_parameters())) == ["weight"]
    x = torch.randn(3, 20, 48, requires_grad=True)
    grad = torch.randn(3, 20, 6)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    torch.manual_seed(5)
    out = fused(x)
    out.backward(grad)
    fused_grads = x.grad.clone(), linear.weight.grad.clone()
    x.grad, linear.weight.grad = None, None
    reference = unfused_reference(x, linear, 0.3, seed)
    reference.backward(grad)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(fused_grads[0], x.grad)
    torch.testing.assert_close(fused_grads[1], linear.weight.grad)
    kept = (reference != 0).any()  # the mask drops something and keeps something
    assert kept and not torch.allclose(out, linear(x)), "dropout in training mode changes the output"
    fused.eval()
    torch.testing.assert_close(fused(x), linear(x))
    with pytest.raises(ValueError, match="bias-free"):
        DroppedLinear(nn.Linear(4, 2), 0.1)


def test_the_fused_adapter_matrix_saves_its_input_and_no_dropped_copy():
    linear = nn.Linear(512, 8, bias=False)
    x = torch.randn(256, 512, requires_grad=True)
    fused_saved = saved_storages(DroppedLinear(linear, 0.1).train(), x)
    assert set(fused_saved) == {x.untyped_storage().data_ptr(), linear.weight.untyped_storage().data_ptr()}
    unfused_saved = saved_storages(lambda t: linear(SeededDropout(0.1).train()(t)), x)
    assert x.untyped_storage().data_ptr() not in unfused_saved, "unfused, lora_A saves the dropped copy instead"
    assert sum(unfused_saved.values()) - linear.weight.numel() * 4 >= x.numel() * 4


def test_every_16_bit_draw_is_uniform():
    """Four draws come from each 64-bit random number: each of the four places keeps at the same rate (a
    generator call that leaves the sign bit out would keep every element of one place at p = 0.5)."""
    from honed.methods.dropout import keep_mask

    for p in (0.05, 0.5):
        mask = keep_mask(torch.Size([400_000]), p, seed=3, device=torch.device("cpu")).view(-1, 4).float()
        for place in range(4):
            assert mask[:, place].mean().item() == pytest.approx(keep_probability(p), abs=0.005)
    assert not torch.equal(keep_mask(torch.Size([64]), 0.5, 1, torch.device("cpu")), keep_mask(torch.Size([64]), 0.5, 2, torch.device("cpu")))
