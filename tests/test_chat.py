"""task: chat — assistant-only loss mask, packing boundaries, truncation, data validation,
the whole path `honed run` → metrics (perplexity, forgetting, generations) → `honed predict`."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch
import yaml

from chat_helpers import build_tiny_llama, build_tokenizer, conversation, write_chat_recipe, write_conversations, write_general
from helpers import cli
from honed.errors import DataError
from honed.tasks.chat import model as chat


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "My phone is very slow."},
    {"role": "assistant", "content": "Restart it."},
    {"role": "user", "content": "ok"},
    {"role": "assistant", "content": "Glad to help."},
]


def test_assistant_mask_token_by_token(tokenizer):
    ids, mask = chat.render_with_mask(tokenizer, CONVERSATION)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<s>" and len(ids) == len(mask)
    # oracle from the special tokens: inside an assistant turn = after <|assistant|>, through its <|end|>
    expected, inside = [], False
    for tok in tokens:
        if tok == "<|assistant|>":
            expected.append(False)
            inside = True
        elif inside and tok == "<|end|>":
            expected.append(True)
            inside = False
        else:
            expected.append(inside)
    assert mask == expected
    replies = []
    current = []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            replies.append(current)
            current = []
    if current:
        replies.append(current)
    assert [tokenizer.decode(r) for r in replies] == ["Restart it.<|end|>", "Glad to help.<|end|>"]
    # the encoded split never trains on the first token and keeps the mask as rendered
    enc = chat.encode_conversations(tokenizer, [CONVERSATION], 256, True)
    assert enc.mask.tolist() == expected and enc.truncated == 0


def test_generation_markers_template(tokenizer):
    """A template with {% generation %} markers: transformers' own assistant mask is used."""
    tok = build_tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
                         "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ids, mask = chat.render_with_mask(tok, CONVERSATION)
    assert ids == chat.render_with_mask(tokenizer, CONVERSATION)[0]
    assert mask == chat.render_with_mask(tokenizer, CONVERSATION)[1]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packing_boundaries(tokenizer, tiny_llama, attention):
    """With restarting position ids and no attention mask, each attention kernel keeps packed conversations apart."""
    from transformers import AutoModelForCausalLM

    rng = random.Random(3)
    convs = [conversation(rng)["messages"] for _ in range(3)]
    enc = chat.encode_conversations(tokenizer, convs, 256, True)
    batch = chat.collate(enc, [0, 1, 2], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 1, "three short conversations fit one row"
    starts = enc.offsets[:3].tolist()
    lengths = enc.lengths.tolist()
    pos, targets = batch["position_ids"][0], batch["targets"][0]
    for start, n in zip(starts, lengths):
        assert pos[start : start + n].tolist() == list(range(n)), "positions restart in every conversation"
        assert targets[start] == -100, "the first token of a conversation is never predicted from the previous one"
    # targets are exactly the assistant tokens
    flat_mask = enc.mask.clone()
    flat_mask[enc.offsets[:-1]] = False
    assert ((targets[: sum(lengths)] != -100) == flat_mask).all()

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attention).eval()
    with torch.no_grad():
        packed = chat._forward(model, batch).logits[0]
        for i, (start, n) in enumerate(zip(starts, lengths)):
            alone = chat._forward(model, chat.collate(enc, [i], tokenizer.pad_token_id, packing=False)).logits[0, :n]
            assert torch.allclose(packed[start : start + n], alone, atol=1e-4), f"conversation {i} sees across the boundary"
        # and the loss of the packed row equals the token-weighted loss of the rows alone
        unpacked = chat.collate(enc, [0, 1, 2], tokenizer.pad_token_id, packing=False)
        assert torch.allclose(chat.loss(model, batch), chat.loss(model, unpacked), atol=1e-5)

    # batches of the training plan: every conversation once per epoch, rows within max_length
    small = chat.encode_conversations(tokenizer, [conversation(rng)["messages"] for _ in range(40)], 64, True)
    plan = chat.batches(small, 4, 0, tokenizer.pad_token_id, True).plan(0)
    assert sorted(i for b in plan for i in b) == list(range(40))
    for b in plan:
        out = chat.collate(small, b, tokenizer.pad_token_id)
        assert out["input_ids"].shape[0] <= 4 and out["input_ids"].shape[1] <= 64


def test_truncation_is_counted(tokenizer):
    long = [{"role": "user", "content": "My router is very slow. " * 6}, {"role": "assistant", "content": "Restart it now please. " * 6}]
    enc = chat.encode_conversations(tokenizer, [long, CONVERSATION], 24, True)
    assert enc.truncated == 2 and enc.dropped_tokens > 0 and enc.dropped_assistant_tokens > 0
    assert int(enc.lengths.max()) == 24
    assert enc.no_target == 1, "the long conversation's reply was cut away entirely"


@pytest.mark.parametrize("record, words", [
    ({"messages": [{"role": "bot", "content": "hi"}]}, ["record 2", "role 'bot'", "system, user, assistant"]),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]},
     ["record 2", "system message may only come first"]),
    ({"messages": [{"role": "user", "content": "hi"}]}, ["record 2", "no assistant message"]),
    ({"messages": [{"role": "user"}]}, ["record 2", "no 'content'"]),
    ({"messages": "nope"}, ["record 2", "not JSON"]),
    ({"text": "hi"}, ["record 2", "no 'messages'"]),
])
def test_bad_conversations_are_named(tmp_path, tiny_llama, capsys, record, words):
    train = tmp_path / "train.jsonl"
    good = {"messages": CONVERSATION}
    train.write_text("\n".join(json.dumps(r) for r in [good, record, good]) + "\n")
    code, out, err = cli(["run", write_chat_recipe(tmp_path, tiny_llama, train)], capsys)
    assert code == 3, err
    assert err.startswith("error:") and "train.jsonl" in err
    for w in words:
        assert w in err


def test_tokenizer_without_template_exits_2(tmp_path, capsys):
    model = build_tiny_llama(tmp_path / "no-template", with_template=False)
    train = write_conversations(tmp_path / "train.jsonl", 30, 0)
    recipe = write_chat_recipe(tmp_path, model, train)
    code, out, err = cli(["run", recipe], capsys)
    assert code == 2 and "no chat template" in err and "data.chat_template" in err
    assert not (tmp_path / "run").exists()


def test_chat_run_predict_end_to_end(tmp_path, tiny_llama, capsys):
    train = write_conversations(tmp_path / "train.jsonl", 60, 1)
    general = write_general(tmp_path / "general.csv")
    recipe = write_chat_recipe(tmp_path, tiny_llama, train, **{"reference": {"data": str(general), "text": "text"},
                                                               "interpolate": [0.0, 1.0], "train.epochs": 2})
    code, out, err = cli(["run", recipe], capsys)
    assert code == 0, err
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == "chat" and metrics["primary_metric"] == "neg_perplexity"
    test = metrics["test"]
    assert test["perplexity"] > 1 and test["neg_perplexity"] == -test["perplexity"] and 0 <= test["token_accuracy"] <= 1
    assert test["perplexity"] < metrics["pretrained"]["perplexity"], "fine-tuning lowers the perplexity of the support replies"
    forgetting = metrics["guards"]["forgetting"]["details"]
    assert forgetting["perplexity_before"] > 0 and forgetting["perplexity_after"] > 0
    assert forgetting["reference"] == "general.csv" and forgetting["retention_source"] == "perplexity"
    assert 0 <= forgetting["cka"] <= 1
    assert [p["alpha"] for p in forgetting["interpolation"]] == [0.0, 1.0] and forgetting["chosen_alpha"] in (0.0, 1.0)
    assert metrics["guards"]["overfitting"]["status"] in ("ok", "warn")
    gens = metrics["generations"]
    assert len(gens) == 3 and all({"prompt", "before", "after"} <= set(g) for g in gens)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert all("val_neg_perplexity" in h and "val_perplexity" in h for h in history)
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["method"] == "lora", "chat defaults to lora"
    assert "lm_head" not in resolved["lora"]["target_modules"] and "q_proj" in resolved["lora"]["target_modules"]
    audit = json.loads((run_dir / "audit.json").read_text())
    assert audit["task"] == "chat" and "truncated" in audit["splits"]["train"] and "packing_stats" in audit
    assert "generations" in (run_dir / "report.html").read_text(), "the report shows the before/after replies"
    assert list(pd.read_csv(run_dir / "predictions.csv").columns) == ["messages", "assistant_tokens", "loss", "perplexity"]

    # the saved model is a plain causal LM (LoRA merged) with its tokenizer and chat template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert AutoTokenizer.from_pretrained(run_dir / "model").chat_template

    new = tmp_path / "ask.jsonl"
    new.write_text(json.dumps({"messages": [{"role": "user", "content": "My printer arrived broken."}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "My phone is very slow."},
                                              {"role": "assistant", "content": "Restart it."}]}) + "\n")
    out_file = tmp_path / "replies.csv"
    code, out, err = cli(["predict", run_dir, new, "--out", out_file], capsys)
    assert code == 0, err
    replies = pd.read_csv(out_file)
    assert len(replies) == 2 and "prediction" in replies.columns and replies["expected"].iloc[1] == "Restart it."

    reply = chat.generate_chat(run_dir, [{"role": "user", "content": "My laptop will not turn on."}], max_tokens=8, temperature=0.0)
    assert isinstance(reply, str)
    assert chat.generate_chat(run_dir, [{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.7) is not None
    with pytest.raises(DataError, match="role"):
        chat.generate_chat(run_dir, [{"role": "robot", "content": "hi"}], 4, 0.0)


def test_freeze_without_packing_or_reference(tmp_path, tiny_llama, capsys):
    train = write_conversations(tmp_path / "train.jsonl", 40, 2)
    recipe = write_chat_recipe(tmp_path, tiny_llama, train, **{"method": "freeze", "data.packing": False, "train.epochs": 1})
    code, out, err = cli(["run", recipe], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    forgetting = metrics["guards"]["forgetting"]["details"]
    assert forgetting["measured_on_validation"] and forgetting["perplexity_before"] is None and forgetting["cka"] is not None
    assert metrics["run"]["method"] == "freeze"


def test_head_method_is_refused(tmp_path, tiny_llama, capsys):
    train = write_conversations(tmp_path / "train.jsonl", 30, 0)
    code, out, err = cli(["run", write_chat_recipe(tmp_path, tiny_llama, train, method="head")], capsys)
    assert code == 2 and "lora, qlora, full or freeze" in err


def test_schedule_counts_packed_rows_and_max_steps():
    """epochs/eval_every/max_steps resolve from the training plan's batches (packed rows), not the conversations."""
    from honed.auto import resolve_auto
    from honed.recipe import load_recipe

    def resolved(**train):
        recipe = load_recipe({"task": "chat", "model": "m", "data": {"train": "t.jsonl"}, "train": {"batch_size": 8, **train}})
        return resolve_auto(recipe, "causal-lm", n_train=800, batches_per_epoch=10).train

    plain = resolved()
    assert (plain.epochs, plain.max_steps, plain.eval_every) == (10, 100, 5)  # 800 conversations packed into 10 batches
    bounded = resolved(max_steps=25)
    assert (bounded.epochs, bounded.max_steps, bounded.eval_every) == (3, 25, 5)
    short = resolved(max_steps=8)
    assert (short.epochs, short.max_steps, short.eval_every) == (1, 8, 2)  # at least 4 evaluations in a bounded run
    capped = resolved(max_steps=500, epochs=2)
    assert capped.max_steps == 20  # the epochs come first


def test_attention_key_reaches_the_model(tmp_path, tiny_llama, capsys):
    from honed.models.causal_lm import load_causal_lm
    from honed.recipe import load_recipe

    train = write_conversations(tmp_path / "train.jsonl", 30, 0)
    recipe = load_recipe(str(write_chat_recipe(tmp_path, tiny_llama, train, attention="eager")))
    assert load_causal_lm(recipe.model, recipe).model.config._attn_implementation == "eager"
    if not torch.cuda.is_available():
        code, _, err = cli(["run", write_chat_recipe(tmp_path, tiny_llama, train, attention="flash_attention_2")], capsys)
        assert code == 2 and "attention: flash_attention_2 needs a CUDA device" in err
