"""The chat loss over the assistant positions only (tasks/chat/loss.py) against the plain masked
cross-entropy over full logits: the same value and the same gradients (fp32, within 1e-5), for
LoRA (the head frozen) and full fine-tuning (the head trained, tied to the embeddings or not), and
in chunks smaller than the batch; the evaluation's per-conversation figures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from honed.tasks.chat import loss as chat_loss
from honed.tasks.chat import model as chat_model

VOCAB = 97


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    if not tied:  # a bias-free head with weights unlike the embeddings'
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model


def packed_batch():
    """Two rows: one with two packed conversations (positions restart), one padded at the end."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 20), generator=g)
    position_ids = torch.cat([torch.arange(12), torch.arange(8)]).repeat(2, 1)
    position_ids[1] = torch.arange(20)
    targets = torch.full((2, 20), chat_model.IGNORE)
    targets[0, 4:12] = ids[0, 4:12]  # an assistant reply in each conversation
    targets[0, 15:20] = ids[0, 15:20]
    targets[1, 6:14] = ids[1, 6:14]  # then padding
    return {"input_ids": ids, "position_ids": position_ids, "targets": targets}


def plain_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["targets"][:, 1:].reshape(-1), ignore_index=chat_model.IGNORE)


def grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    value = fn(model, batch)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", [False, True])
def test_chunks_smaller_than_the_batch_give_the_plain_value_and_gradients(bias):
    torch.manual_seed(2)
    head = torch.nn.Linear(16, VOCAB, bias=bias)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (23,))
    want = F.cross_entropy(head(hidden), targets, reduction="sum")
    want_grads = torch.autograd.grad(want, [hidden, *head.parameters()])
    got = chat_loss.summed_nll(hidden, head, targets, rows=5)
    got_grads = torch.autograd.grad(got, [hidden, *head.parameters()])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-5)
    nll, correct = chat_loss.token_scores(hidden.detach(), head, targets, rows=5)
    with torch.no_grad():
        logits = head(hidden)
    assert torch.allclose(nll, F.cross_entropy(logits, targets, reduction="none"), atol=1e-5)
    assert torch.equal(correct, logits.argmax(-1) == targets)


@pytest.mark.parametrize("tied", [False, True])
def test_full_fine_tuning_matches_the_plain_cross_entropy(tied):
    model = tiny_llama(tied).train()
    assert chat_loss.split_model(model) is not None
    batch = packed_batch()
    want, want_grads = grads(model, plain_loss, batch)
    got, got_grads = grads(model, chat_model.loss, batch)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got, want)
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        assert torch.allclose(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4), name
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_lora_matches_the_plain_cross_entropy_and_trains_only_the_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(False), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():  # non-zero B matrices, so every adapter gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    assert chat_loss.split_model(model) is not None
    batch = packed_batch()
    want, want_grads = grads(model, plain_loss, batch)
    got, got_grads = grads(model, chat_model.loss, batch)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert all("lora_" in n for n in got_grads)
    for name in want_grads:
        assert torch.allclose(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4), name


def test_the_packed_conversations_do_not_see_each_other():
    """Changing the first conversation of a packed row leaves the second one's loss unchanged."""
    model = tiny_llama(False).eval()
    batch = packed_batch()
    second = {k: v[:1].clone() for k, v in batch.items()}
    second["targets"][0, :12] = chat_model.IGNORE
    before = chat_model.loss(model, second)
    second["input_ids"][0, :12] = (second["input_ids"][0, :12] + 1) % VOCAB
    assert torch.allclose(chat_model.loss(model, second), before, atol=1e-6)


def test_evaluation_figures_match_the_full_logits():
    """predict's [summed NLL, scored tokens, correct tokens] per conversation, against the full logits."""
    from honed.data import ragged

    model = tiny_llama(False).eval()
    g = torch.Generator().manual_seed(3)
    convs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 14, 6)]
    masks = [torch.arange(len(c)) >= 3 for c in convs]
    flat, offsets, lengths = ragged.pack([int(t) for c in convs for t in c], [len(c) for c in convs])
    split = chat_model.EncodedChat(flat, torch.cat(masks), offsets, lengths, max_length=16, packing=False)
    stats = chat_model.predict(model, split, 0, 2, "fp32", torch.device("cpu"))
    for i, (ids, mask) in enumerate(zip(convs, masks)):
        with torch.no_grad():
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
        keep = mask[1:]
        nll = F.cross_entropy(logits[keep], ids[1:][keep], reduction="sum")
        assert torch.isclose(stats[i, 0], nll, atol=1e-4), i
        assert stats[i, 1] == keep.sum()
        assert stats[i, 2] == (logits[keep].argmax(-1) == ids[1:][keep]).sum()


def test_a_transformed_head_takes_the_plain_path():
    model = tiny_llama(False)
    model.config.final_logit_softcapping = 30.0
    assert chat_loss.split_model(model) is None


def test_the_flattened_batch_drops_padding_and_attends_per_conversation():
    """attention.py: the real tokens end to end, one segment per conversation; the same loss and gradients as
    the masked rows (the eager kernel, which takes transformers' block mask), and SDPA restored afterwards."""
    from honed.tasks.chat import attention

    batch = packed_batch()
    batch["row_tokens"] = torch.tensor([20, 14])  # row 1: 6 tokens of padding
    flat, segments = attention.flatten(batch)
    assert flat["input_ids"].shape == (1, 34) and segments == [(0, 12), (12, 20), (20, 34)]
    assert torch.equal(flat["input_ids"][0, 20:], batch["input_ids"][1, :14])
    sdpa = tiny_llama(False).train()
    eager = tiny_llama(False).train()
    eager.config._attn_implementation = "eager"
    assert attention.supports(sdpa) and not attention.supports(eager)
    got, got_grads = grads(sdpa, chat_model.loss, batch)
    want, want_grads = grads(eager, chat_model.loss, batch)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got, want)
    for name in want_grads:
        assert torch.allclose(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4), name
    assert sdpa.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="honed_segments"), attention.segmented(sdpa):
        sdpa(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False)
    assert sdpa.config._attn_implementation == "sdpa"
