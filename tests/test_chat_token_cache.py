"""The tokenisation cache of tasks chat and preference (tasks/chat/encoding.py over data/tokens.py): the cached
encoding equals rendering every conversation anew, token by token; a second encoding of the same conversations with
the same tokenizer renders and tokenises nothing; a changed conversation, tool list, chat template or masking rule
misses the cache; and a second `honed run` on the same chat data reports its splits read from the cache."""

from __future__ import annotations

import json
import random
import uuid

import pandas as pd
import pytest
import torch

from chat_helpers import TEMPLATE, TOOL_TEMPLATE, build_tiny_llama, build_tokenizer, conversation, write_chat_recipe
from helpers import cli
from honed.errors import DataError, RecipeError
from honed.tasks.chat import encoding
from honed.tasks.chat.model import encode_conversations, render_with_mask
from honed.tasks.preference.model import Objective, encode_pairs

TOOLS = [{"type": "function", "function": {"name": "order_status", "parameters": {"type": "object"}}}]
DPO = Objective("dpo", 0.1, 0.0, 0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def fresh(n: int, seed: int, long_every: int = 4) -> list[list[dict]]:
    """n conversations no cache has seen (a random marker in each), every long_every-th one long."""
    rng, marker = random.Random(seed), uuid.uuid4().hex[:10]
    out = []
    for i in range(n):
        messages = conversation(rng)["messages"]
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + f" {marker}{i}" + (" Restart it now." * 8 if i % long_every == 0 else "")}
        out.append(messages)
    return out


def oracle(tokenizer, conversations, max_length, tools=None):
    """The encoding without any cache: each conversation rendered alone, cut, the first token never a target."""
    ids_all, mask_all, lengths = [], [], []
    truncated = dropped = dropped_assistant = no_target = 0
    for k, messages in enumerate(conversations):
        ids, mask = render_with_mask(tokenizer, messages, tools[k] if tools else None)
        if len(ids) > max_length:
            truncated, dropped, dropped_assistant = truncated + 1, dropped + len(ids) - max_length, dropped_assistant + sum(mask[max_length:])
            ids, mask = ids[:max_length], mask[:max_length]
        mask[0] = False
        no_target += not any(mask)
        ids_all += ids
        mask_all += mask
        lengths.append(len(ids))
    return torch.tensor(ids_all), torch.tensor(mask_all), torch.tensor(lengths), (truncated, dropped, dropped_assistant, no_target)


def same_as_oracle(enc, expected):
    ids, mask, lengths, counts = expected
    assert enc.flat.dtype == torch.long and enc.mask.dtype == torch.bool and enc.lengths.dtype == torch.long
    assert torch.equal(enc.flat, ids) and torch.equal(enc.mask, mask) and torch.equal(enc.lengths, lengths)
    assert torch.equal(enc.offsets[1:], torch.cumsum(lengths, 0)) and int(enc.offsets[0]) == 0
    assert (enc.truncated, enc.dropped_tokens, enc.dropped_assistant_tokens, enc.no_target) == counts


class CountingTokenizer:
    """The test tokenizer, counting the calls that render or tokenise (everything else passes through)."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self.inner.apply_chat_template(*args, **kwargs)


def test_cached_encoding_is_the_rendering_token_by_token(tokenizer):
    convs = fresh(40, 1)
    first = encode_conversations(tokenizer, convs, 48, True)
    assert not first.from_cache and first.batches_tokenised > 0
    expected = oracle(tokenizer, convs, 48)
    assert expected[3][0] >= 10 and expected[3][2] > 0, "some conversations are cut, assistant tokens with them"
    same_as_oracle(first, expected)
    # another max_length reads the same cache entry (it holds whole conversations) and cuts it anew
    again = encode_conversations(tokenizer, convs, 256, False)
    assert again.from_cache and again.batches_tokenised == 0 and again.packing is False
    same_as_oracle(again, oracle(tokenizer, convs, 256))
    assert len(encode_conversations(tokenizer, [], 48, True)) == 0, "no conversations: an empty split, not an error"


def test_a_second_encoding_renders_and_tokenises_nothing(tokenizer):
    convs = fresh(30, 2)
    counting = CountingTokenizer(build_tokenizer())
    first = encode_conversations(counting, convs, 64, True)
    assert counting.calls >= 2 * len(convs), "the first encoding renders every conversation"
    counting.calls = 0
    again = encode_conversations(counting, convs, 64, True)
    assert counting.calls == 0 and again.from_cache and again.batches_tokenised == 0
    assert torch.equal(again.flat, first.flat) and torch.equal(again.mask, first.mask)
    same_as_oracle(again, oracle(tokenizer, convs, 64))


def test_what_changes_the_encoding_misses_the_cache(tokenizer):
    convs = fresh(12, 3)
    assert not encode_conversations(tokenizer, convs, 64, True).from_cache
    assert encode_conversations(tokenizer, convs, 64, True).from_cache
    edited = [list(c) for c in convs]
    edited[5] = edited[5][:-1] + [{**edited[5][-1], "content": edited[5][-1]["content"] + "!"}]
    changed = encode_conversations(tokenizer, edited, 64, True)
    assert not changed.from_cache and changed.batches_tokenised > 0, "one changed reply: another fingerprint"
    same_as_oracle(changed, oracle(tokenizer, edited, 64))

    other = build_tokenizer()
    other.chat_template = TEMPLATE.replace("<|end|>", "<|end|>\n")  # the same vocabulary, another rendering
    retemplated = encode_conversations(other, convs, 64, True)
    assert not retemplated.from_cache and retemplated.batches_tokenised > 0
    same_as_oracle(retemplated, oracle(other, convs, 64))

    tooled = build_tokenizer()
    tooled.chat_template = TOOL_TEMPLATE
    plain = encode_conversations(tooled, convs, 256, True)
    with_tools = encode_conversations(tooled, convs, 256, True, [TOOLS] * len(convs))
    assert not with_tools.from_cache, "the tools are part of each conversation's fingerprint"
    same_as_oracle(with_tools, oracle(tooled, convs, 256, [TOOLS] * len(convs)))
    assert int(with_tools.lengths.sum()) > int(plain.lengths.sum())

    final_only = encoding.encode_whole(tokenizer, convs, final_reply=True)  # preference's masking rule
    assert not final_only.from_cache and final_only.batches_tokenised > 0


def test_a_template_that_cannot_be_masked_fails_every_time(tokenizer):
    """The error raised inside the map leaves no cache entry behind: the second run fails the same way."""
    bad = build_tokenizer()
    bad.chat_template = "{{ messages | length }}" + TEMPLATE  # every prefix renders another count first
    convs = fresh(3, 4)
    for _ in range(2):
        with pytest.raises(RecipeError, match=r"^data.chat_template: the template does not render a conversation prefix by prefix"):
            encode_conversations(bad, convs, 64, True)


def pair_oracle(tokenizer, frame, max_length):
    """task preference's encoding without the cache: each reply rendered after its prompt, the mask on the final reply."""
    ids_all, mask_all, kept, truncated, identical = [], [], [], 0, 0
    for row, (prompt, chosen, rejected) in enumerate(zip(frame["prompt"], frame["chosen"], frame["rejected"])):
        pair = []
        for reply in (chosen, rejected):
            ids, mask = render_with_mask(tokenizer, prompt + [{"role": "assistant", "content": reply}])
            mask = encoding.final_reply_mask(mask)
            truncated += len(ids) > max_length
            ids, mask = ids[:max_length], mask[:max_length]
            mask[0] = False
            pair.append((ids, mask))
        if pair[0][0] == pair[1][0]:
            identical += 1
            continue
        kept.append(row)
        for ids, mask in pair:
            ids_all += ids
            mask_all += mask
    return torch.tensor(ids_all), torch.tensor(mask_all), kept, truncated, identical


def test_preference_pairs_through_the_cache(tokenizer):
    marker = uuid.uuid4().hex[:10]
    rows = [{"prompt": [{"role": "user", "content": f"Order {marker}{i}: my phone is very slow."}],
             "chosen": "Sorry, restart it." + (" Then update it." * 10 if i % 3 == 0 else ""),
             "rejected": "Right, restart it." + (" Then update it." * 10 if i % 3 == 0 else "")} for i in range(9)]
    rows.append({**rows[0], "chosen": rows[0]["rejected"] + " And wait.", "rejected": rows[0]["rejected"] + " And wait!"})
    frame = pd.DataFrame(rows)
    first = encode_pairs(tokenizer, frame, 48, DPO)
    ids, mask, kept, truncated, identical = pair_oracle(tokenizer, frame, 48)
    assert truncated > 0 and identical == 1, "cut replies, and a pair the cut makes identical"
    assert not first.from_cache
    assert torch.equal(first.flat, ids) and torch.equal(first.targets, mask) and first.kept.tolist() == kept
    assert (first.truncated, first.identical_after_truncation) == (truncated, identical)
    again = encode_pairs(tokenizer, frame, 48, DPO)
    assert again.from_cache and torch.equal(again.flat, first.flat) and torch.equal(again.targets, first.targets)
    with pytest.raises(DataError, match=r"^pair 1: the prompt is \d+ tokens, leaving no room for the reply within data.max_length=8"):
        encode_pairs(tokenizer, frame, 8, DPO)  # from the cache too, the crowded prompt is named


def test_mixture_token_counts_come_from_the_cache(tokenizer):
    convs = fresh(10, 5)
    frame = pd.DataFrame({"messages": convs})
    counting = CountingTokenizer(build_tokenizer())
    count = encoding.conversation_token_counter(counting)
    counts = count(frame)
    expected = [len(render_with_mask(tokenizer, c)[0]) for c in convs]
    assert counts == expected and counting.calls > 0
    counting.calls = 0
    assert count(frame) == expected and counting.calls == 0, "a second count renders nothing"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-cache"))


def test_a_second_run_reads_the_cache(tmp_path, tiny_llama, capsys):
    """Two runs on the same conversations, the first by the CLI, the second by the Python API (the same function)."""
    import honed

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": m}) + "\n" for m in fresh(40, 6, long_every=10)))
    recipe = write_chat_recipe(tmp_path, tiny_llama, train, **{"train.max_steps": 2, "train.epochs": 1})
    code, _, err = cli(["run", recipe], capsys)
    assert code == 0, err
    first = json.loads((tmp_path / "run" / "audit.json").read_text())["tokenisation"]
    assert set(first) == {"train", "validation", "test"} and not any(v["from_cache"] for v in first.values()), first
    result = honed.run(str(recipe), out=str(tmp_path / "again"), show_progress=False)
    second = json.loads((result.run_dir / "audit.json").read_text())["tokenisation"]
    assert all(v["from_cache"] for v in second.values()), second
    assert {k: v["conversations"] for k, v in second.items()} == {k: v["conversations"] for k, v in first.items()}
    assert sum(v["conversations"] for v in second.values()) == 40
