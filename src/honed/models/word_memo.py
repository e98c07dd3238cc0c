"""Columnar tokenising for SentencePiece-style BPE tokenizers (WordLlama's Llama tokenizer): each
distinct word is tokenised once, and every text's ids are assembled from its words' ids with
numpy gathers, so a million short texts cost a few thousand tokenizer calls, not a million.

Why it is exact, not an approximation: such a tokenizer replaces every space with '▁', prepends
one '▁', and runs BPE over the whole text (no pre-tokenizer, so the tokenizer's own word cache
never hits). A BPE merge yields a vocabulary token, so when no token of the vocabulary has '▁'
after another character, no merge can join a piece ending in a non-'▁' character to the '▁' that
starts the next word: the words are tokenised independently, and tokenising "word" on its own
(the normalizer prepends its '▁') gives exactly the ids it gets inside the text. `memo_encoder`
checks those conditions on the tokenizer and returns None when they do not hold; texts that
could tokenise differently (empty, a leading, trailing or doubled space, a '▁' or an added
token's text inside) go through the tokenizer whole.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Callable

import numpy as np

from ..data.ragged import spans
from .bundle import CHARS_PER_TOKEN_CAP

INNER_SPACE = re.compile("[^\u2581]\u2581")  # a token with '▁' after another character could join two words


def memo_encoder(tokenizer) -> Callable[[list, int], tuple[np.ndarray, np.ndarray]] | None:
    """encode_flat(texts, max_length) -> (ids int32, offsets int64): the same ids as
    `tokenizer.encode_batch` with truncation to max_length, flat; None when the tokenizer's
    normalizer, model or vocabulary do not allow word-by-word tokenising."""
    state = json.loads(tokenizer.to_str())
    prefix = _prefix_ids(state)
    if prefix is None or not _words_independent(state):
        return None
    added = [t["content"] for t in state.get("added_tokens", []) if t.get("content")]
    memo: dict[str, np.ndarray] = {}  # word -> its ids, kept across batches (a split is tokenised in many)
    # the tokenizer's truncation is state: a server's threads must not cut one call's words to another's max_length
    lock = threading.Lock()

    def word_ids(words: list[str]) -> list[np.ndarray]:
        new = [w for w in words if w not in memo]
        if new:
            tokenizer.no_truncation()  # the per-row encoder leaves its last max_length set: a word is never cut
            for w, e in zip(new, tokenizer.encode_batch_fast(new, add_special_tokens=False)):
                memo[w] = np.asarray(e.ids, dtype=np.int32)
        return [memo[w] for w in words]

    def unlocked(texts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, pa.large_string())
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        arr = pc.utf8_slice_codeunits(arr.cast(pa.large_string()), 0, max_length * CHARS_PER_TOKEN_CAP)  # as clip_texts
        whole = pc.or_(pc.equal(pc.utf8_length(arr), 0),
                       pc.or_(pc.match_substring(arr, "  "), pc.or_(pc.starts_with(arr, " "), pc.ends_with(arr, " "))))
        for content in added + ["\u2581"]:  # a '▁' in the text itself could join words
            whole = pc.or_(whole, pc.match_substring(arr, content))
        whole = np.asarray(whole.fill_null(True).to_numpy(zero_copy_only=False), dtype=bool)
        n = len(arr)
        lengths = np.zeros(n, dtype=np.int64)
        pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (rows, ids, per-row lengths)
        simple_rows = np.flatnonzero(~whole)
        if len(simple_rows):
            ids, lens = _assemble(arr.take(pa.array(simple_rows)), word_ids, prefix, max_length)
            lengths[simple_rows] = lens
            pieces.append((simple_rows, ids, lens))
        odd_rows = np.flatnonzero(whole)
        if len(odd_rows):
            tokenizer.enable_truncation(max_length)
            encoded = tokenizer.encode_batch_fast(arr.take(pa.array(odd_rows)).to_pylist())
            tokenizer.no_truncation()
            lens = np.array([len(e.ids) for e in encoded], dtype=np.int64)
            ids = np.fromiter((i for e in encoded for i in e.ids), dtype=np.int32, count=int(lens.sum()))
            lengths[odd_rows] = lens
            pieces.append((odd_rows, ids, lens))
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        out = np.empty(int(offsets[-1]), dtype=np.int32)
        for rows, ids, lens in pieces:
            out[spans(offsets[rows], lens)] = ids
        return out, offsets

    def encode_flat(texts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
        with lock:
            return unlocked(texts, max_length)

    return encode_flat


def _assemble(arr, word_ids, prefix: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of texts that split into words at single spaces: prefix + each word's ids, cut to max_length."""
    import pyarrow.compute as pc

    words = pc.split_pattern(arr, " ")
    word_offsets = words.offsets.to_numpy().astype(np.int64)
    encoded = words.flatten().dictionary_encode()
    which = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    vocab = word_ids(encoded.dictionary.to_pylist())
    vocab_lens = np.array([len(v) for v in vocab], dtype=np.int64)
    vocab_flat = np.concatenate(vocab) if vocab else np.zeros(0, dtype=np.int32)
    vocab_starts = np.zeros(len(vocab), dtype=np.int64)
    np.cumsum(vocab_lens[:-1], out=vocab_starts[1:])
    occ_lens = vocab_lens[which]
    body = vocab_flat[spans(vocab_starts[which], occ_lens)]  # every word occurrence's ids, text after text
    per_text = np.add.reduceat(occ_lens, word_offsets[:-1]) if len(occ_lens) else np.zeros(len(arr), dtype=np.int64)
    body_starts = np.zeros(len(arr), dtype=np.int64)
    np.cumsum(per_text[:-1], out=body_starts[1:])
    keep = np.minimum(per_text, max(0, max_length - len(prefix)))  # truncation keeps the prefix, as the tokenizer's does
    lens = keep + len(prefix)
    offsets = np.zeros(len(arr) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.int32)
    for i, token in enumerate(prefix):
        out[offsets[:-1] + i] = token
    out[spans(offsets[:-1] + len(prefix), keep)] = body[spans(body_starts, keep)]
    return out, lens


def _prefix_ids(state: dict) -> np.ndarray | None:
    """The ids the post-processor puts before a single text (Llama: <s>), or None for any other template."""
    post = state.get("post_processor")
    if post is None:
        return np.zeros(0, dtype=np.int32)
    if post.get("type") != "TemplateProcessing":
        return None
    single = post.get("single", [])
    if not single or "Sequence" not in single[-1] or any("SpecialToken" not in s for s in single[:-1]):
        return None
    ids = []
    for s in single[:-1]:
        special = post.get("special_tokens", {}).get(s["SpecialToken"]["id"])
        if special is None:
            return None
        ids.extend(special["ids"])
    return np.array(ids, dtype=np.int32)


def _words_independent(state: dict) -> bool:
    """The conditions under which words tokenise independently (module docstring)."""
    norm = state.get("normalizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    expected = [{"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
    model = state.get("model") or {}
    if steps != expected or state.get("pre_tokenizer") is not None or model.get("type") != "BPE":
        return False
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return False
    return not any(INNER_SPACE.search(token) for token in model.get("vocab", {}))
