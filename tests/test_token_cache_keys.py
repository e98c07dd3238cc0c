"""What the tokenisation cache (data/tokens.py) keys on besides the texts and the tokenizer: the pad id an
empty encoding is stored as, and, for a chat template that prints today's date (`strftime_now`), the date
it prints (tasks/chat/encoding.py)."""

from __future__ import annotations

import random
import uuid
from datetime import datetime

import pytest

from chat_helpers import TEMPLATE, build_tokenizer, conversation
from honed.data import tokens
from honed.tasks.chat import encoding


def word_lengths(texts: list[str], limit: int) -> list[list[int]]:
    """A stand-in tokenizer: one id per word, the word's length; an empty text encodes to nothing."""
    return [[len(w) for w in t.split()][:limit] for t in texts]


def masked_word_lengths(texts: list[str]) -> tuple[list[list[int]], list[list[bool]]]:
    ids = word_lengths(texts, 1 << 20)
    return ids, [[True] * len(x) for x in ids]


@pytest.mark.parametrize("masked", [False, True], ids=["tokenise", "tokenise_masked"])
def test_encodings_that_differ_only_in_the_pad_id_do_not_share_an_entry(masked):
    marker = uuid.uuid4().hex
    texts = [f"{marker} one three", "", f"{marker} five"]  # the empty text is stored as one pad token

    def run(pad_id: int):
        if masked:
            return tokens.tokenise_masked(texts, masked_word_lengths, "pad-test", pad_id)
        return tokens.tokenise(texts, word_lengths, "pad-test", 8, pad_id)

    first = run(0)
    assert not first.from_cache and first.flat[int(first.offsets[1])].item() == 0
    other = run(7)
    assert not other.from_cache and other.batches_tokenised > 0, "another pad id is another entry"
    assert other.flat[int(other.offsets[1])].item() == 7 and other.lengths.tolist() == [3, 1, 2]
    again = run(0)
    assert again.from_cache and again.flat[int(again.offsets[1])].item() == 0


DATED = "{{ '<|system|>Today is ' + strftime_now('%d %B %Y') + '<|end|>' }}"  # a line Llama 3's template prints too


@pytest.fixture(scope="module")
def dated_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = DATED + TEMPLATE
    return tokenizer


def test_a_template_that_prints_the_date_is_keyed_on_the_date_it_prints(dated_tokenizer):
    monday, later, tuesday = datetime(2031, 3, 3, 9), datetime(2031, 3, 3, 23, 59), datetime(2031, 3, 4, 0, 1)
    assert encoding.printed_dates(dated_tokenizer.chat_template, monday) == ["03 March 2031"]
    key = lambda now: encoding.cache_key(dated_tokenizer, False, now)  # noqa: E731
    assert key(monday) == key(later) and key(monday) != key(tuesday)
    before = datetime.now()
    default = encoding.cache_key(dated_tokenizer, False)
    assert default in (key(before), key(datetime.now())), "by default the key holds what strftime_now prints now"
    plain = build_tokenizer()  # a template without strftime_now: one key whatever the day
    assert encoding.cache_key(plain, False, monday) == encoding.cache_key(plain, False, tuesday)

    # the rendering prints today's date; an entry written on one day is read back that day and missed the next
    convs = [conversation(random.Random(9))["messages"] for _ in range(3)]
    convs[0][0] = {**convs[0][0], "content": convs[0][0]["content"] + " " + uuid.uuid4().hex}
    rendered = dated_tokenizer.decode(encoding.render_with_mask(dated_tokenizer, convs[0])[0])
    assert any("Today is " + day.strftime("%d %B %Y") in rendered for day in (before, datetime.now()))

    def encode(now):
        return tokens.tokenise_masked(encoding.records(convs), encoding.conversation_encoder(dated_tokenizer), key(now),
                                      dated_tokenizer.pad_token_id)

    assert not encode(monday).from_cache
    assert encode(later).from_cache, "the same day: the same date printed, the entry reused"
    next_day = encode(tuesday)
    assert not next_day.from_cache and next_day.batches_tokenised > 0, "another day: rendered anew"


def test_a_date_format_that_is_not_a_literal_is_never_reused():
    template = "{% set f = '%Y' %}{{ strftime_now(f) }}{{ strftime_now('%Y') }}"
    now = datetime(2031, 3, 3, 9)
    assert encoding.printed_dates(template, now) == [now.isoformat()]
    assert encoding.printed_dates("{% if strftime_now is defined %}x{% endif %}", now) == [], "a test for it is no call"


def test_named_templates_are_read_for_their_dates():
    """A dict of named templates (default, tool_use) is keyed on what its templates print, as one template is."""
    named = build_tokenizer()
    double_quoted = DATED.replace("'%d %B %Y'", '"%d %B %Y"')  # as Llama 3's template writes it
    named.chat_template = {"default": double_quoted + TEMPLATE, "tool_use": TEMPLATE}
    monday, later = datetime(2031, 3, 3, 9), datetime(2031, 3, 3, 23, 59)
    assert encoding.cache_key(named, False, monday) == encoding.cache_key(named, False, later)
    assert encoding.cache_key(named, False, monday) != encoding.cache_key(named, False, datetime(2031, 3, 4, 9))
