"""Chat formats (tasks/chat/formats.py): messages, ShareGPT, Alpaca and OpenAI tool calls read into
one messages form; `data.format: auto` and its mixed-file error; a mixture of two formats; the
assistant mask of a tool-call conversation checked token by token. No model is trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat_helpers import TOOL_TEMPLATE, build_tokenizer  # sets HF_HUB_OFFLINE before anything imports huggingface_hub
from honed.errors import DataError
from honed.session import check_audit, prepare

TOOLS = [{"type": "function", "function": {"name": "order_status", "description": "Look up an order",
                                           "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}}]


def tool_conversation(order: int) -> dict:
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": "You are the support assistant."},
        {"role": "user", "content": f"Where is order {order}?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "order_status", "arguments": json.dumps({"order": str(order)})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "shipped on Monday"},
        {"role": "assistant", "content": f"Order {order} was shipped on Monday."},
    ]}


PAIRS = [(f"My router {i} will not turn on.", "Hold the power button for ten seconds.") for i in range(12)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sharegpt(question, answer) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], "system": "Be brief."}


def alpaca(question, answer) -> dict:
    return {"instruction": question, "input": "", "output": answer, "system": "Be brief."}


def messages(question, answer) -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def chat_recipe(train, **data) -> dict:
    return {"task": "chat", "model": "/nonexistent/model", "data": {"train": train, **data}}


def all_conversations(splits) -> list:
    return sorted(json.dumps(m) for f in (splits.train, splits.validation, splits.test) for m in f["messages"])


@pytest.mark.parametrize("fmt,make", [("sharegpt", sharegpt), ("alpaca", alpaca)])
def test_each_format_reads_as_the_same_messages(tmp_path, fmt, make):
    _, reference = prepare(chat_recipe(str(write_jsonl(tmp_path / "m.jsonl", [messages(*p) for p in PAIRS]))))
    resolved, splits = prepare(chat_recipe(str(write_jsonl(tmp_path / f"{fmt}.jsonl", [make(*p) for p in PAIRS]))))
    assert all_conversations(splits) == all_conversations(reference)
    assert check_audit(resolved, splits)["format"] == fmt  # auto-detected, and said so in audit.json
    _, declared = prepare(chat_recipe(str(tmp_path / f"{fmt}.jsonl"), format=fmt))
    assert all_conversations(declared) == all_conversations(reference)


def test_alpaca_input_joins_the_instruction(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate", "input": f"bonjour {i}", "output": f"hello {i}"} for i in range(6)])
    _, splits = prepare(chat_recipe(str(path)))
    first = sorted(all_conversations(splits))[0]
    assert json.loads(first)[0] == {"role": "user", "content": "Translate\n\nbonjour 0"}


def test_a_mixed_file_names_the_first_record_of_the_other_format(tmp_path):
    records = [messages(*p) for p in PAIRS[:4]] + [sharegpt(*PAIRS[4])] + [messages(*p) for p in PAIRS[5:]]
    with pytest.raises(DataError) as info:
        prepare(chat_recipe(str(write_jsonl(tmp_path / "mixed.jsonl", records))))
    assert str(info.value).startswith("data.train: mixed.jsonl record 5 is in the sharegpt format ('conversations') "
                                      "but record 1 is in the messages format")


def test_a_record_in_no_format_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"record 1 is in no known chat format \(columns: question, answer\)"):
        prepare(chat_recipe(str(write_jsonl(tmp_path / "x.jsonl", [{"question": q, "answer": a} for q, a in PAIRS]))))


def test_a_mixture_of_formats_is_read_per_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [sharegpt(*p) for p in PAIRS])
    b = write_jsonl(tmp_path / "b.jsonl", [alpaca(q + " again", r) for q, r in PAIRS])
    resolved, splits = prepare(chat_recipe([{"path": str(a)}, {"path": str(b)}]))
    audit = check_audit(resolved, splits)
    assert audit["format"] == "alpaca, sharegpt" and sum(len(f) for f in (splits.train, splits.validation, splits.test)) == 24


def test_tool_call_turns_are_trained_on_and_tool_results_are_not_token_by_token():
    from honed.tasks.chat.formats import validate_messages
    from honed.tasks.chat.model import render_with_mask

    tokenizer = build_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    record = tool_conversation(4711)
    conversation = validate_messages(record["messages"], "test")
    assert conversation[2]["tool_calls"][0]["function"]["arguments"] == {"order": "4711"}  # a JSON string is parsed
    ids, mask = render_with_mask(tokenizer, conversation, record["tools"])
    text = tokenizer.apply_chat_template(conversation, tools=record["tools"], tokenize=False)
    assert tokenizer.decode(ids) == text
    # the spans the model must learn: the tool call and the final reply, each with its end-of-turn marker
    call = '<tool_call>{"name": "order_status", "arguments": {"order": "4711"}}</tool_call><|end|>'
    reply = "Order 4711 was shipped on Monday.<|end|>"
    spans = [(text.index(call), text.index(call) + len(call)), (text.index(reply), text.index(reply) + len(reply))]
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == len(mask)
    for (start, end), masked in zip(offsets, mask):
        inside = any(a <= start and end <= b for a, b in spans)
        assert masked == inside, f"token {text[start:end]!r} at {start}: masked={masked}, expected {inside}"
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned == call + reply and "shipped on Monday<|end|>" not in learned.replace(reply, "")


def test_tool_conversations_reach_the_template_through_the_splits(tmp_path):
    """Read from a file, the record's tools go with its messages into the encoded split, and audit.json counts them."""
    from types import SimpleNamespace

    from honed.tasks.chat.data import audit_chat
    from honed.tasks.chat.model import encode, render_with_mask

    tokenizer = build_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    train = write_jsonl(tmp_path / "tools.jsonl", [tool_conversation(1000 + i) for i in range(10)])
    resolved, splits = prepare(chat_recipe(str(train), max_length=512))
    assert splits.train["tools"].tolist()[0] == TOOLS
    encoded = {name: encode(SimpleNamespace(tokenizer=tokenizer), getattr(splits, name), None, resolved)
               for name in ("train", "validation", "test")}
    first = splits.train.iloc[0]
    ids, mask = render_with_mask(tokenizer, first["messages"], first["tools"])
    got_ids, got_mask = encoded["train"].item(0)
    assert got_ids.tolist() == ids and got_mask.tolist() == [False] + mask[1:]
    assert "tools: [" in tokenizer.decode(ids)
    audit = audit_chat(splits, encoded, 512, True)
    assert audit["format"] == "messages" and audit["tool_conversations"]["train"] == len(splits.train)
    assert audit["splits"]["train"]["turns"]["tool"] == len(splits.train)


def test_tool_calls_with_a_template_without_tool_support_are_refused():
    from honed.errors import RecipeError
    from honed.tasks.chat.formats import validate_messages
    from honed.tasks.chat.model import encode_conversations

    conversation = validate_messages(tool_conversation(1)["messages"], "test")
    with pytest.raises(RecipeError, match=r"^data.chat_template: the conversations call tools but the chat template has no tool support"):
        encode_conversations(build_tokenizer(), [conversation], 128, True, [TOOLS])
