"""What the tokenisation cache (data/tokens.py) keys on besides the texts and the tokenizer: the pad id an
empty encoding is stored as, and, for a chat template that prints today's date (`strftime_now`), the date
it prints (tasks/chat/encoding.py)."""

from __future__ import annotations

import uuid

import pytest

from honed.data import tokens


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
