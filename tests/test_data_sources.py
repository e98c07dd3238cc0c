"""Data sources (data/sources.py): Parquet shards, save_to_disk folders, globs, mixtures, the Hub
form offline, and the tokenisation cache (data/tokens.py). No model is loaded except wordllama's
tokenizer for the cache test."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import make_texts  # noqa: E402
from honed.errors import DataError  # noqa: E402
from honed.session import check_audit, prepare  # noqa: E402


def recipe(train, **data) -> dict:
    return {"task": "text-classification", "model": "wordllama", "data": {"train": train, **data}}


def shards(folder: Path, n_shards: int = 3, rows: int = 60, kind: str = "parquet") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        frame = make_texts(rows, seed=i)
        path = folder / f"part-{i:03d}.{kind}"
        frame.to_parquet(path) if kind == "parquet" else frame.to_json(path, orient="records", lines=True)
    return folder


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_a_folder_of_shards_is_read_whole(tmp_path, kind):
    folder = shards(tmp_path / "train", kind=kind)
    _, splits = prepare(recipe(str(folder)))
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 180
    expected = pd.concat([make_texts(60, seed=i) for i in range(3)])
    assert sorted(pd.concat([s.to_pandas() for s in (splits.train, splits.validation, splits.test)])["text"]) == sorted(expected["text"])


def test_a_glob_reads_the_matching_shards_only(tmp_path):
    folder = shards(tmp_path / "train", n_shards=3)
    _, splits = prepare(recipe(str(folder / "part-00[01].parquet")))
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 120


def test_a_save_to_disk_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    frame = make_texts(120, seed=3)
    DatasetDict({"train": Dataset.from_pandas(frame), "extra": Dataset.from_pandas(frame.head(40))}).save_to_disk(tmp_path / "saved")
    _, splits = prepare(recipe(str(tmp_path / "saved")))
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 120
    _, extra = prepare(recipe(str(tmp_path / "saved"), split="extra"))
    assert len(extra.train) + len(extra.validation) + len(extra.test) == 40
    with pytest.raises(DataError, match=r"data.split: .* has no split 'nope' \(splits: train, extra\)"):
        prepare(recipe(str(tmp_path / "saved"), split="nope"))


def test_a_glob_matching_nothing_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"^data.train: the pattern .*missing-\*\.parquet matches no file"):
        prepare(recipe(str(tmp_path / "missing-*.parquet")))


def test_shards_with_different_columns_name_the_file_and_both_column_lists(tmp_path):
    folder = shards(tmp_path / "train", n_shards=2)
    make_texts(30, seed=9).rename(columns={"label": "stars"}).to_parquet(folder / "part-002.parquet")
    with pytest.raises(DataError) as info:
        prepare(recipe(str(folder)))
    message = str(info.value)
    assert message.startswith("data.train: shard part-002.parquet has columns (text, stars, region) but part-000.parquet has (text, label, region)")


def test_a_mixture_keeps_each_source_share_deterministically(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    make_texts(200, seed=1).assign(text=lambda f: "a " + f["text"]).to_csv(a, index=False)
    make_texts(200, seed=2).assign(text=lambda f: "b " + f["text"]).to_csv(b, index=False)
    mixture = [{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3}]
    resolved, splits = prepare(recipe(mixture))
    whole = pd.concat([s.to_pandas() for s in (splits.train, splits.validation, splits.test)])
    from_a = whole["text"].str.startswith("a ").sum()
    assert from_a == 200 and len(whole) == 286  # a is used whole; b gives 30 % of the mixture
    audit = check_audit(resolved, splits)
    shares = {Path(s["source"]).name: s["share"] for s in audit["sources"]["train"]}
    assert shares == {"a.csv": pytest.approx(0.7, abs=0.01), "b.csv": pytest.approx(0.3, abs=0.01)}
    _, again = prepare(recipe(mixture))
    assert again.train["text"].to_pylist() == splits.train["text"].to_pylist()
    _, other_seed = prepare({**recipe(mixture), "train": {"seed": 5}})
    assert other_seed.train["text"].to_pylist() != splits.train["text"].to_pylist()


def test_a_mixture_of_sources_with_different_columns_is_refused(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    make_texts(50, seed=1).to_csv(a, index=False)
    make_texts(50, seed=1).rename(columns={"text": "body"}).to_csv(b, index=False)
    with pytest.raises(DataError, match=r"^data.text: column 'text' not found in b.csv \(columns: body, label, region\)"):
        prepare(recipe([{"path": str(a)}, {"path": str(b)}]))


def test_a_hub_id_offline_says_the_hub_could_not_be_reached_and_how_to_use_a_local_copy():
    with pytest.raises(DataError) as info:  # helpers.py sets HF_HUB_OFFLINE=1 before anything imports huggingface_hub
        prepare(recipe("hf:some-owner/some-tickets", subset="en"))
    message = str(info.value)
    assert message.startswith("data.train: could not reach the Hugging Face Hub for hf:some-owner/some-tickets")
    assert "save_to_disk" in message and "set data.train to that folder" in message and "\n" not in message


def test_the_second_tokenisation_of_the_same_texts_reads_the_cache():
    from honed.models.wordllama import load_wordllama
    from honed.tasks.text.model import encode

    bundle = load_wordllama(["a", "b"])
    marker = uuid.uuid4().hex  # texts no earlier test session has cached
    texts = [f"ticket {i} about the {marker} router" for i in range(3000)] + [""]
    first = encode(bundle, texts, None, 8)
    assert not first.from_cache and first.truncated == 3000
    from honed.data.tokens import tokenise, tokenizer_key

    again = tokenise(texts, bundle.encode, tokenizer_key(bundle.tokenizer, bundle.family), 8, bundle.pad_id)
    assert again.from_cache and again.batches_tokenised == 0
    assert again.flat.tolist() == first.flat.tolist() and again.lengths.tolist() == first.lengths.tolist()
    # the ids are the tokenizer's, cut to max_length; an empty text keeps at least one token
    direct = bundle.encode([texts[0], ""], 9)
    assert first.flat[:8].tolist() == direct[0][:8] and int(first.lengths[-1]) == max(1, len(direct[1]))
    other = tokenise(texts, bundle.encode, tokenizer_key(bundle.tokenizer, bundle.family), 9, bundle.pad_id)
    assert not other.from_cache and other.batches_tokenised > 0  # another max_length is another fingerprint


# --------------------------------------------------------------------------- text splits stay Arrow tables

@pytest.mark.parametrize("form", ["parquet", "shards", "saved", "csv"])
def test_text_splits_are_arrow_tables_with_the_sources_rows(tmp_path, form):
    import pyarrow as pa

    frame = make_texts(120, seed=5)
    frame["region"] = ["north", None, "south"] * 40
    if form == "parquet":
        frame.index = frame.index + 1000  # a saved pandas index is the frame's index, not a column
        frame.to_parquet(source := tmp_path / "train.parquet")
    elif form == "shards":
        (source := tmp_path / "parts").mkdir()
        frame.iloc[:60].to_parquet(source / "a.parquet")
        frame.iloc[60:].to_parquet(source / "b.parquet")
    elif form == "saved":
        from datasets import Dataset

        Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(source := tmp_path / "saved"))
    else:
        frame.to_csv(source := tmp_path / "train.csv", index=False)
    if form == "parquet":
        from honed.data.load import read_arrow_table

        assert read_arrow_table(source).column_names == ["text", "label", "region"]
    _, splits = prepare(recipe(str(source), groups=["region"]))
    parts = (splits.train, splits.validation, splits.test)
    assert all(isinstance(p, pa.Table) for p in parts)
    assert all(p.column_names == ["text", "label", "region"] for p in parts)
    assert all(pa.types.is_large_string(p.schema.field("text").type) for p in parts)
    whole = pd.concat([p.to_pandas() for p in parts], ignore_index=True)
    expected = {(t, str(l), "(missing)" if pd.isna(r) else r) for t, l, r in zip(frame["text"], frame["label"], frame["region"])}
    assert len(whole) == 120 and set(zip(whole["text"], whole["label"], whole["region"])) == expected


def test_a_json_column_of_numbers_and_strings_is_read_as_text(tmp_path):
    """Arrow cannot type a column holding 1 and "one"; such a column is kept as the values' text."""
    rows = make_texts(60, seed=6)
    labels = ["1" if label == "pos" else "neg" for label in rows["label"]]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(f'{{"text": "{t}", "label": {1 if l == "1" else chr(34) + l + chr(34)}}}\n'
                            for t, l in zip(rows["text"], labels)))
    _, splits = prepare(recipe(str(path)))
    assert splits.labels == ["1", "neg"]
    assert sum(len(p) for p in (splits.train, splits.validation, splits.test)) == 60
