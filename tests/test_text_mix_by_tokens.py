"""Text classification mixtures weighed by tokens (`data.mix_by: tokens`): each source makes up its weight's
share of the tokens the classifier reads (each text cut to data.max_length), counted with the run's tokenizer
through the same tokenisation cache the splits are then encoded through (only the tokenizer is loaded to count)."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from tokenizers import Tokenizer

from helpers import NEGATIVE, NEUTRAL, POSITIVE, cli, make_texts, write_recipe_file
from honed.errors import RecipeError
from honed.models.bundle import TextEncoder
from honed.models.load import load_pretrained, load_text_encoder
from honed.models.wordllama import wordllama_files
from honed.session import check_audit, prepare
from honed.tasks.text import model

MAX_LENGTH = 64


def sentences(n: int, words: tuple[int, int], seed: int, marker: str = "") -> pd.DataFrame:
    """n labelled texts of words[0] to words[1] words, the label carried by a sentiment word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        text = [rng.choice(NEUTRAL) for _ in range(rng.randint(*words))]
        text.insert(rng.randrange(len(text) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append({"text": f"{marker}{i} " * bool(marker) + " ".join(text), "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def lengths(tmp_path_factory) -> tuple[Path, Path]:
    """Long texts (25 to 40 words, under MAX_LENGTH tokens) and short ones (2 to 3 words), as CSV files."""
    folder = tmp_path_factory.mktemp("text-mix")
    sentences(150, (25, 40), seed=1).to_csv(folder / "long.csv", index=False)
    sentences(600, (1, 2), seed=2).to_csv(folder / "short.csv", index=False)
    return folder / "long.csv", folder / "short.csv"


def text_recipe(lengths, mix_by: str, seed: int = 0) -> dict:
    long, short = lengths
    return {"task": "text-classification", "model": "wordllama", "method": "head",
            "data": {"train": [{"path": str(long), "weight": 0.5}, {"path": str(short), "weight": 0.5}], "mix_by": mix_by,
                     "max_length": MAX_LENGTH},
            "train": {"seed": seed, "head_epochs": 1, "lr": 1e-3, "head_lr": 1e-2, "batch_size": 32}, "guards": {"baseline": False}}


def by_source(audit: dict) -> dict:
    return {Path(s["source"]).name: s for s in audit["sources"]["train"]}


def wordllama_tokens(texts: list[str]) -> int:
    """The wordllama tokenizer's own count (not honed's encoders, not its cache), each text cut to MAX_LENGTH."""
    tok = Tokenizer.from_file(str(wordllama_files()[1]))
    tok.enable_truncation(MAX_LENGTH)
    return sum(len(e.ids) for e in tok.encode_batch(texts))


def test_by_tokens_each_source_makes_up_its_share_of_the_tokens(lengths):
    resolved, by_tokens = prepare(text_recipe(lengths, "tokens"))
    examples_recipe, by_examples = prepare(text_recipe(lengths, "examples"))
    sources = by_source(check_audit(resolved, by_tokens))
    assert sources["short.csv"]["rows"] == 600, "the source whose tokens run out first is used whole"
    for s in sources.values():
        # the long source stops at the row whose tokens come closest: within half a long row (<= 32 tokens) of its share
        assert s["token_share"] == pytest.approx(0.5, abs=32 / (2 * sources["short.csv"]["tokens"]))
        assert s["tokens"] <= s["tokens_available"] and s["rows"] <= s["rows_available"]
    assert sources["long.csv"]["rows"] < 100

    # by examples: as many rows from each, so the long source holds most of the tokens
    examples = by_source(check_audit(examples_recipe, by_examples))
    assert examples["long.csv"]["rows"] == examples["short.csv"]["rows"] == 150 and "tokens" not in examples["long.csv"]
    whole = pd.concat([s.to_pandas() for s in (by_examples.train, by_examples.validation, by_examples.test)])
    long_texts = set(pd.read_csv(lengths[0])["text"])
    kept_long = whole["text"][whole["text"].isin(long_texts)].tolist()
    share = wordllama_tokens(kept_long) / wordllama_tokens(whole["text"].tolist())
    assert share > 0.8, f"by examples the long source holds {share:.0%} of the tokens"

    # the counts are the tokenizer's own: the long rows kept by tokens hold the tokens the audit says
    kept = pd.concat([s.to_pandas() for s in (by_tokens.train, by_tokens.validation, by_tokens.test)])["text"]
    assert wordllama_tokens(kept[kept.isin(long_texts)].tolist()) == sources["long.csv"]["tokens"]
    assert wordllama_tokens(pd.read_csv(lengths[1])["text"].tolist()) == sources["short.csv"]["tokens_available"]


def test_by_tokens_is_deterministic_per_seed(lengths):
    _, first = prepare(text_recipe(lengths, "tokens"))
    _, again = prepare(text_recipe(lengths, "tokens"))
    _, other = prepare(text_recipe(lengths, "tokens", seed=5))
    assert first.train["text"].to_pylist() == again.train["text"].to_pylist()
    assert sorted(first.train["text"].to_pylist()) != sorted(other.train["text"].to_pylist())


class Counting:
    """Wraps an encoder's two tokenising functions and counts the calls that tokenise."""

    def __init__(self, encoder: TextEncoder):
        self.calls = 0

        def counted(fn):
            if fn is None:
                return None

            def call(*args, **kwargs):
                self.calls += 1
                return fn(*args, **kwargs)

            return call

        self.encoder = TextEncoder(encoder.family, encoder.tokenizer, counted(encoder.encode), encoder.pad_id,
                                   counted(encoder.encode_flat))


@pytest.mark.parametrize("source", ["wordllama", "tiny-bert"])
def test_counts_come_from_the_cache_the_splits_are_encoded_through(source, request):
    model_source = "wordllama" if source == "wordllama" else str(request.getfixturevalue("tiny_bert"))
    frame = sentences(40, (3, 30), seed=3, marker=uuid.uuid4().hex[:12])  # texts no cache has seen
    counting = Counting(load_text_encoder(model_source))
    count = model.text_token_counter(counting.encoder, MAX_LENGTH)
    counts = count(pa.Table.from_pandas(frame, preserve_index=False))  # the text task's splits are Arrow tables
    assert counting.calls > 0 and len(counts) == 40 and counts.max() > 10
    counting.calls = 0
    assert count(pa.Table.from_pandas(frame, preserve_index=False)).tolist() == counts.tolist() and counting.calls == 0, "a second count tokenises nothing"

    # the model's bundle keys the cache as the tokenizer alone did: encoding the same texts reads the counted entry
    bundle = load_pretrained(model_source, ["neg", "pos"])
    encoded = model.encode(bundle, frame["text"].array, frame["label"].tolist(), MAX_LENGTH)
    assert encoded.from_cache and encoded.lengths.tolist() == counts.tolist()


def test_a_run_reports_each_sources_token_share_in_audit_json(lengths, tmp_path):
    import honed

    result = honed.run(text_recipe(lengths, "tokens"), out=str(tmp_path / "run"), show_progress=False)
    audit = json.loads((result.run_dir / "audit.json").read_text())
    sources = by_source(audit)
    assert set(sources) == {"long.csv", "short.csv"}
    assert all(s["token_share"] == pytest.approx(0.5, abs=0.01) for s in sources.values())
    note = next(f for f in audit["findings"] if f.get("code") == "sources")
    assert "of the tokens" in note["message"]


@pytest.mark.parametrize("task", ["tabular-classification", "forecasting", "image-classification"])
def test_tasks_that_do_not_count_tokens_still_refuse_in_one_line(tmp_path, capsys, task):
    a = tmp_path / "a.csv"
    make_texts(40, seed=1).to_csv(a, index=False)
    data = {"train": [{"path": str(a), "weight": 1.0}], "mix_by": "tokens"}
    model_spec = {"tabular-classification": {"architecture": "mlp"}, "forecasting": {"architecture": "patchtst"},
                  "image-classification": "google/vit-base-patch16-224"}[task]
    if task == "tabular-classification":
        data["features"] = ["region"]
    recipe = {"task": task, "model": model_spec, "data": data}
    with pytest.raises(RecipeError, match=rf"^data.mix_by: tokens .* task {task} does not mix by .*remove data.mix_by or set it to examples$"):
        prepare(recipe)
    code, out, err = cli(["check", write_recipe_file(tmp_path, recipe, {})], capsys)
    assert code != 0 and err.startswith("error: data.mix_by: tokens") and len(err.strip().splitlines()) == 1, err
