"""The column-wise text path (issue 17, a million rows): WordLlama's word-by-word tokenising
(models/word_memo.py) gives exactly the tokenizer's ids, the tokenisation cache is shared by both
paths, the carved splits are the rows the frame-wise split gave, and the audit's Arrow duplicate
and leakage counts are pandas' counts."""

from __future__ import annotations

import os
import random
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def wordllama():
    from honed.models.wordllama import load_wordllama

    return load_wordllama(["a", "b"])


def varied_texts(n: int, seed: int) -> list[str]:
    """Sentences, plus the cases that must go through the tokenizer whole: empty, leading, trailing and
    doubled spaces, '▁' and special-token text inside, tabs and newlines, non-Latin scripts, emoji, a long text."""
    rng = random.Random(seed)
    words = ["the", "router", "keeps", "dropping", "Wi-Fi", "naïve", "café", "漢字", "😀", "x9", "don't", "3.14", "a"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]
    alphabet = list("ab  cd,.!?'\n\té漢😀<>/s0") + ["<s>", "</s>", "<unk>", "\u2581", "  "]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n // 2)]
    return texts + ["", " ", "a  b", "  lead", "trail ", "word\u2581glued", "x" * 5000, " ".join(["word"] * 500)]


@pytest.mark.parametrize("max_length", [1, 2, 9, 33, 129])
def test_word_by_word_ids_are_the_tokenizers_ids(wordllama, max_length):
    assert wordllama.encode_flat is not None  # WordLlama's tokenizer meets the conditions (word_memo's docstring)
    texts = varied_texts(600, seed=max_length)
    expected = wordllama.encode(texts, max_length)
    ids, offsets = wordllama.encode_flat(texts, max_length)
    got = [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))]
    assert got == expected


def test_a_tokenizer_whose_words_can_merge_gets_no_word_by_word_encoder(wordllama):
    from tokenizers import Tokenizer

    from honed.models.word_memo import memo_encoder

    state = wordllama.tokenizer.to_str()
    assert memo_encoder(Tokenizer.from_str(state)) is not None
    # a vocabulary token with '▁' after a letter could join two words: the conditions fail, the tokenizer is used whole
    joined = state.replace('"vocab":{', '"vocab":{"a\u2581the":32000,', 1)
    assert joined != state and memo_encoder(Tokenizer.from_str(joined)) is None


def test_both_paths_write_and_read_the_same_tokenisation_cache(wordllama):
    from honed.data.tokens import tokenise, tokenizer_key

    marker = uuid.uuid4().hex  # texts no earlier session has cached
    texts = [f"{t} {marker}" if t.strip() else t for t in varied_texts(300, seed=7)]
    key = tokenizer_key(wordllama.tokenizer, wordllama.family)
    flat = tokenise(texts, wordllama.encode, key, 12, wordllama.pad_id, wordllama.encode_flat)
    assert not flat.from_cache and flat.batches_tokenised > 0
    again = tokenise(texts, wordllama.encode, key, 12, wordllama.pad_id)  # the per-row path finds the column-wise one's file
    assert again.from_cache and again.batches_tokenised == 0
    rows = [r[:12] or [wordllama.pad_id] for r in wordllama.encode(texts, 13)]
    assert flat.flat.tolist() == [t for r in rows for t in r] and flat.lengths.tolist() == [len(r) for r in rows]
    assert flat.truncated == sum(len(r) > 12 for r in wordllama.encode(texts, 13))


def test_carve_picks_the_rows_the_frame_wise_split_picked():
    from sklearn.model_selection import train_test_split

    from honed.data.split import carve

    rng = np.random.default_rng(0)
    for n, classes, fraction in ((1000, 7, 0.1), (300, 3, 0.25), (50, 30, 0.1)):
        frame = pd.DataFrame({"text": [f"t{i}" for i in range(n)], "label": rng.choice([f"c{j}" for j in range(classes)], n)})
        counts = frame["label"].value_counts()
        n_carved = max(1, int(round(n * fraction)))
        stratify = frame["label"] if counts.min() >= 2 and n_carved >= len(counts) else None
        rest, carved = train_test_split(frame, test_size=n_carved, random_state=4, shuffle=True, stratify=stratify)
        got_rest, got_carved, stratified = carve(frame, fraction, "label", 4)
        assert got_rest.equals(rest.reset_index(drop=True)) and got_carved.equals(carved.reset_index(drop=True))
        assert stratified == (stratify is not None)
        # the text task's Arrow tables: the same rows, in the same order
        table_rest, table_carved, _ = carve(pa.Table.from_pandas(frame, preserve_index=False), fraction, "label", 4)
        assert table_rest["text"].to_pylist() == got_rest["text"].tolist()
        assert table_carved["text"].to_pylist() == got_carved["text"].tolist()


def test_the_audits_arrow_counts_are_pandas_counts():
    from honed.tasks.text.data import duplicate_texts, shared_texts, text_column

    rng = np.random.default_rng(1)
    train = pd.DataFrame({"text": rng.choice([f"text {i}" for i in range(400)], 1000), "label": rng.choice(["x", "y"], 1000)})
    other = pd.DataFrame({"text": rng.choice([f"text {i}" for i in range(300, 700)], 200), "label": "x"})
    def table(frame):
        return pa.Table.from_pandas(frame, preserve_index=False)

    duplicates, conflicting = duplicate_texts(table(train))
    assert duplicates == int(train.duplicated(subset=["text"]).sum())
    assert conflicting == int((train.groupby("text")["label"].nunique() > 1).sum())
    assert shared_texts(text_column(table(other)), text_column(table(train))) == int(other["text"].isin(set(train["text"])).sum())
    assert duplicate_texts(table(train.drop_duplicates("text"))) == (0, 0)
