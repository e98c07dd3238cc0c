"""Mixtures weighed by tokens (`data.mix_by: tokens`): each source makes up its weight's share of the
mixture's tokens, counted with the run's tokenizer (only the tokenizer is loaded: no training)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chat_helpers import GENERAL, build_tiny_llama, document  # noqa: E402
from helpers import make_texts  # noqa: E402
from honed.errors import RecipeError  # noqa: E402
from honed.session import check_audit, prepare  # noqa: E402

import random  # noqa: E402


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("mix-llama") / "llama")


@pytest.fixture(scope="session")
def lengths(tmp_path_factory) -> tuple[Path, Path]:
    """Long documents (8 to 48 support notes each) and short ones (one sentence each), as CSV files."""
    folder = tmp_path_factory.mktemp("mix-docs")
    rng = random.Random(3)
    long = [" ".join(document(rng) for _ in range(8)) for _ in range(120)]
    short = [GENERAL[i % len(GENERAL)] + f" Note {i}." for i in range(600)]
    pd.DataFrame({"text": ["long " + t for t in long]}).to_csv(folder / "long.csv", index=False)
    pd.DataFrame({"text": ["short " + t for t in short]}).to_csv(folder / "short.csv", index=False)
    return folder / "long.csv", folder / "short.csv"


def lm_recipe(llama, lengths, mix_by: str, seed: int = 0) -> dict:
    long, short = lengths
    return {"task": "causal-lm", "model": str(llama),
            "data": {"train": [{"path": str(long), "weight": 0.5}, {"path": str(short), "weight": 0.5}], "mix_by": mix_by},
            "train": {"seed": seed}}


def whole(splits) -> pd.DataFrame:
    return pd.concat([splits.train, splits.validation, splits.test])


def test_by_tokens_each_source_makes_up_its_share_of_the_tokens(llama, lengths):
    resolved, by_tokens = prepare(lm_recipe(llama, lengths, "tokens"))
    _, by_examples = prepare(lm_recipe(llama, lengths, "examples"))
    long_rows = {name: int(whole(s)["text"].str.startswith("long ").sum()) for name, s in (("tokens", by_tokens), ("examples", by_examples))}
    # by examples: half the rows from each source (long used whole); by tokens the long source's
    # documents are far longer, so it gives far fewer rows for the same half of the tokens
    assert long_rows["examples"] == 120
    assert long_rows["tokens"] < 40
    sources = {Path(s["source"]).name: s for s in check_audit(resolved, by_tokens)["sources"]["train"]}
    assert sources["short.csv"]["rows"] == 600  # the source that runs out first is used whole
    for s in sources.values():
        assert s["token_share"] == pytest.approx(0.5, abs=0.02)
        assert s["tokens"] <= s["tokens_available"] and s["rows"] <= s["rows_available"]
    assert sources["long.csv"]["rows"] == long_rows["tokens"]
    # the counts are the tokenizer's own: the long rows kept hold the tokens the audit says
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama))
    kept = whole(by_tokens)["text"]
    kept_long = kept[kept.str.startswith("long ")].tolist()
    assert sum(len(ids) + 1 for ids in tok(kept_long)["input_ids"]) == sources["long.csv"]["tokens"]


def test_by_tokens_is_deterministic_per_seed(llama, lengths):
    _, first = prepare(lm_recipe(llama, lengths, "tokens"))
    _, again = prepare(lm_recipe(llama, lengths, "tokens"))
    _, other = prepare(lm_recipe(llama, lengths, "tokens", seed=5))
    assert first.train["text"].tolist() == again.train["text"].tolist()
    assert sorted(whole(other)["text"]) != sorted(whole(first)["text"])


def test_a_chat_mixture_by_tokens(llama, tmp_path):
    def conversations(path: Path, n: int, words: int) -> Path:
        rows = [{"messages": [{"role": "user", "content": f"Question {i}."},
                              {"role": "assistant", "content": " ".join(["Restart it and install the latest update."] * words)}]}
                for i in range(n)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    long, short = conversations(tmp_path / "long.jsonl", 60, 6), conversations(tmp_path / "short.jsonl", 200, 1)
    recipe = {"task": "chat", "model": str(llama), "data": {"mix_by": "tokens", "train": [
        {"path": str(long), "weight": 0.25}, {"path": str(short), "weight": 0.75}]}}
    resolved, splits = prepare(recipe)
    sources = {Path(s["source"]).name: s for s in check_audit(resolved, splits)["sources"]["train"]}
    assert sources["long.jsonl"]["token_share"] == pytest.approx(0.25, abs=0.02)
    assert sources["short.jsonl"]["token_share"] == pytest.approx(0.75, abs=0.02)
    assert sources["long.jsonl"]["rows"] < 60 and sources["short.jsonl"]["rows"] == 200


@pytest.mark.parametrize("task", ["tabular-classification", "preference"])
def test_mix_by_tokens_is_refused_where_a_task_does_not_count_tokens(tmp_path, task):
    """(text-classification counts tokens too: tests/test_text_mix_by_tokens.py, with the other tasks that refuse.)"""
    a = tmp_path / "a.csv"
    make_texts(40, seed=1).to_csv(a, index=False)
    data = {"train": [{"path": str(a), "weight": 1.0}], "mix_by": "tokens"}
    if task == "tabular-classification":
        data["features"] = ["region"]
    recipe = {"task": task, "model": "some/causal-lm" if task == "preference" else {"architecture": "mlp"}, "data": data}
    with pytest.raises(RecipeError, match=rf"^data.mix_by: tokens .* task {task} does not mix by .*remove data.mix_by or set it to examples$"):
        prepare(recipe)
