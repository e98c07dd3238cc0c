"""train.gradient_checkpointing: the same loss and gradients as without it (fp32, within 1e-5), for a
transformers model trained in full and with LoRA, and for honed's tabular MLP (dropout included:
the recomputation replays the same masks); a model with nothing to recompute is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from chat_helpers import build_tiny_llama, write_chat_recipe, write_conversations
from honed.errors import RecipeError
from honed.methods import METHODS, checkpointing
from honed.models.mlp import TabularMLP
from honed.session import prepare, setup

TOLERANCE = 1e-5


def loss_and_grads(model, loss_fn, batch, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(plain, checkpointed) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = plain, checkpointed
    assert abs(loss_a - loss_b) <= TOLERANCE
    assert grads_a.keys() == grads_b.keys() and grads_a
    worst = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    assert worst <= TOLERANCE, f"largest gradient difference {worst:.3g}"


@pytest.fixture(scope="module")
def chat_session(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpointing")
    llama = build_tiny_llama(folder / "llama")
    train = write_conversations(folder / "train.jsonl", 60, 0)
    # LoRA dropout off: without checkpointing a packed training batch runs flattened, without padding
    # (tasks/chat/attention.py), with it the padded rows (the recomputation runs outside that forward),
    # so the two would draw their dropout masks over different shapes. The masks' replay under
    # recomputation is checked on the MLP below.
    recipe, splits = prepare(str(write_chat_recipe(folder, llama, train, lora={"dropout": 0.0})))
    return setup(recipe, splits)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_transformers_model_same_loss_and_gradients(chat_session, method):
    s = chat_session
    batch = s.task.collate(s.encoded["train"], torch.arange(12), s.bundle.pad_id)
    torch.manual_seed(1)  # the same initial adapters in both copies
    plain = METHODS[method]["prepare"](copy.deepcopy(s.bundle.model), s.bundle, s.recipe)
    recomputed = copy.deepcopy(s.bundle.model)
    checkpointing.enable(recomputed, method)
    torch.manual_seed(1)
    recomputed = METHODS[method]["prepare"](recomputed, s.bundle, s.recipe)
    assert recomputed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert_same(loss_and_grads(plain, s.task.loss, batch), loss_and_grads(recomputed, s.task.loss, batch))
    # what the forward pass keeps for the backward pass: the blocks' activations are recomputed instead
    assert saved_bytes(recomputed, s.task.loss, batch) < 0.7 * saved_bytes(plain, s.task.loss, batch)


def saved_bytes(model, loss_fn, batch) -> int:
    """Bytes of the tensors autograd saves during one forward pass (activations, not weights)."""
    weights = {p.data_ptr() for p in model.parameters()}
    seen = {"bytes": 0}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            seen["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(model, batch)
    return seen["bytes"]


def test_mlp_same_loss_and_gradients_with_dropout():
    torch.manual_seed(0)
    plain = TabularMLP(12, 32, 4, 3, dropout=0.2)
    recomputed = copy.deepcopy(plain)
    checkpointing.enable(recomputed, "full")
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))

    def loss_fn(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    assert_same(loss_and_grads(plain, loss_fn, (x, y)), loss_and_grads(recomputed, loss_fn, (x, y)))


def test_a_model_without_layers_is_refused():
    with pytest.raises(RecipeError, match="train.gradient_checkpointing: Embedding has no layers to recompute"):
        checkpointing.enable(torch.nn.Embedding(10, 4), "full")
