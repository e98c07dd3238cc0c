"""task: causal-lm — documents packed end to end with EOS between them and no attention or target across a
boundary (checked token by token), .txt and table sources, the tokenisation cache, perplexity checked
against an independent computation, bad inputs, and the whole path `honed run` → metrics → `honed predict`."""

from __future__ import annotations

import json
import math
import random
import uuid

import pandas as pd
import pytest
import torch

from chat_helpers import build_tiny_llama, build_tokenizer, document, write_documents
from helpers import cli, write_recipe_file
from honed.tasks.causal_lm import model as clm

IGNORE = -100


def causal_recipe(folder, model, train, **changes):
    recipe = {
        "task": "causal-lm",
        "model": str(model),
        "data": {"train": str(train), "max_length": 64},
        "train": {"epochs": 3, "lr": 1e-2, "batch_size": 8, "seed": 0, "precision": "fp32", "threads": 1, "eval_every": 4,
                  "patience": None},
        "guards": {"baseline": False},
        "out": str(folder / "run"),
    }
    return write_recipe_file(folder, recipe, changes)


def run_cli(argv) -> int:
    from honed.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code or 0
    return 0


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """One causal-lm run through the CLI on a folder of .txt documents (texts no earlier session cached)."""
    folder = tmp_path_factory.mktemp("causal-lm")
    docs = write_documents(folder / "docs", 40, seed=0, marker=f"Ticket {uuid.uuid4().hex[:8]}.")
    recipe = causal_recipe(folder, tiny_llama, docs, interpolate=[0.0, 1.0])
    assert run_cli(["run", recipe]) == 0
    return folder, recipe, docs, folder / "run"


# --------------------------------------------------------------------------- packing, token by token

TEXTS = ["My phone is very slow.", "Restart it and install the latest update from the settings page. " * 3, "Thanks.",
         "My router arrived broken. Sorry about that."]


def oracle(tokenizer, texts, max_length):
    """Rows of the packed stream computed the plain way: each document's ids then EOS, end to end, cut every
    max_length tokens; a position id counts from the start of its document or of its row, whichever is later."""
    stream, doc_of = [], []
    for d, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        stream += ids
        doc_of += [d] * len(ids)
    rows = []
    for start in range(0, len(stream), max_length):
        ids, docs = stream[start : start + max_length], doc_of[start : start + max_length]
        pos = [0 if c == 0 or docs[c] != docs[c - 1] else None for c in range(len(ids))]
        for c in range(len(ids)):
            pos[c] = 0 if pos[c] == 0 else pos[c - 1] + 1
        rows.append((ids, docs, pos))
    return stream, rows


def test_packing_boundaries_token_by_token(tokenizer):
    split = clm.encode_texts(tokenizer, "causal-lm", TEXTS, 16, packing=True)
    stream, rows = oracle(tokenizer, TEXTS, 16)
    assert split.flat.tolist() == stream and len(split) == len(rows)
    eos = tokenizer.eos_token_id
    ends = split.doc_offsets[1:].tolist()
    assert [stream[e - 1] for e in ends] == [eos] * len(TEXTS) and stream.count(eos) == len(TEXTS), "one EOS, at the end of each document"
    batch = clm.collate(split, list(range(len(split))), tokenizer.pad_token_id)
    for r, (ids, docs, pos) in enumerate(rows):
        n = len(ids)
        assert batch["input_ids"][r, :n].tolist() == ids
        assert batch["position_ids"][r, :n].tolist() == pos, f"row {r}: positions restart at each document and row start"
        want = [IGNORE if p == 0 else t for t, p in zip(ids, pos)]
        assert batch["targets"][r, :n].tolist() == want
        assert (batch["targets"][r, n:] == IGNORE).all(), "padding is never a target"
        for c in range(1, n):  # a scored token is predicted from the token before it, which is in the same document
            if want[c] != IGNORE:
                assert docs[c - 1] == docs[c]
    assert any(len(set(docs)) > 1 for _, docs, _ in rows), "the case has a row holding two documents"
    assert any(rows[r][1][0] == rows[r - 1][1][-1] for r in range(1, len(rows))), "and a document going on into the next row"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_documents_do_not_see_each_other(tokenizer, tiny_llama, attention):
    """Each document's logits in a packed row equal its logits alone; the loss is the token-weighted loss of the parts."""
    from transformers import AutoModelForCausalLM

    texts = TEXTS[:1] + TEXTS[2:]  # short ones: the whole stream fits one row
    split = clm.encode_texts(tokenizer, "causal-lm", texts, 64, packing=True)
    alone = clm.encode_texts(tokenizer, "causal-lm", texts, 64, packing=False)
    assert len(split) == 1 and len(alone) == len(texts)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attention).eval()
    packed = clm.collate(split, [0], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=None, use_cache=False).logits[0]
        for d in range(len(texts)):
            a, b = int(split.doc_offsets[d]), int(split.doc_offsets[d + 1])
            own = model(input_ids=split.flat[a:b][None]).logits[0]
            assert torch.allclose(logits[a:b], own, atol=1e-5), f"document {d} sees across the boundary ({attention})"
        whole = clm.collate(alone, list(range(len(texts))), tokenizer.pad_token_id)
        assert torch.allclose(clm.loss(model, packed), clm.loss(model, whole), atol=1e-5)


def test_unpacked_rows_and_the_training_plan(tokenizer):
    docs = [document(random.Random(i)) for i in range(12)]
    alone = clm.encode_texts(tokenizer, "causal-lm", docs, 32, packing=False)
    lengths = (alone.doc_offsets[1:] - alone.doc_offsets[:-1]).tolist()
    assert len(alone) == sum(math.ceil(n / 32) for n in lengths), "each document alone, in rows of max_length"
    packed = clm.encode_texts(tokenizer, "causal-lm", docs, 32, packing=True)
    assert len(packed) == math.ceil(sum(lengths) / 32) and (packed.row_lengths()[:-1] == 32).all(), "packed rows are full"
    plan = clm.batches(packed, 4, 0, tokenizer.pad_token_id).plan(0)
    assert sorted(i for b in plan for i in b) == list(range(len(packed))) and all(len(b) <= 4 for b in plan)
    assert plan != clm.batches(packed, 4, 0, tokenizer.pad_token_id).plan(1), "another order each epoch"
    weight = clm.batches(packed, 4, 0, tokenizer.pad_token_id).weight
    batch = clm.collate(packed, plan[0], tokenizer.pad_token_id)
    assert weight(plan[0]) == float((batch["targets"][:, 1:] != IGNORE).sum()), "a batch weighs its scored tokens"


def test_second_tokenisation_reads_the_cache(tokenizer):
    docs = [document(random.Random(i), marker=uuid.uuid4().hex[:8]) for i in range(30)]
    first = clm.encode_texts(tokenizer, "causal-lm", docs, 64, packing=True)
    assert not first.from_cache and first.batches_tokenised > 0
    again = clm.encode_texts(tokenizer, "causal-lm", docs, 48, packing=False)  # another max_length: the same token ids
    assert again.from_cache and again.batches_tokenised == 0
    assert torch.equal(again.flat, first.flat) and torch.equal(again.doc_offsets, first.doc_offsets)


# --------------------------------------------------------------------------- the run, end to end

def independent_perplexity(model_dir, texts, max_length):
    """exp(mean NLL) of the packed test rows, each document piece of a row run alone through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    _, rows = oracle(tok, texts, max_length)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, docs, _ in rows:
            start = 0
            for c in range(1, len(ids) + 1):
                if c == len(ids) or docs[c] != docs[c - 1]:
                    piece = torch.tensor(ids[start:c])
                    if len(piece) > 1:
                        logits = model(input_ids=piece[None]).logits[0, :-1]
                        total += float(torch.nn.functional.cross_entropy(logits, piece[1:], reduction="sum"))
                        count += len(piece) - 1
                    start = c
    return math.exp(total / count), count


def test_run_end_to_end(trained, tiny_llama, capsys):
    folder, recipe, docs, run_dir = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm" and metrics["primary_metric"] == "neg_perplexity" and metrics["run"]["method"] == "lora"
    test = metrics["test"]
    assert test["perplexity"] == pytest.approx(math.exp(test["loss"]), rel=1e-9) and test["neg_perplexity"] == -test["perplexity"]
    assert test["perplexity"] < metrics["pretrained"]["perplexity"], "training on the documents lowers their perplexity"

    # perplexity = exp(mean NLL), computed independently of honed's packing, masks and loss
    from honed.session import prepare

    _, splits = prepare(str(recipe))
    expected, tokens = independent_perplexity(run_dir / "model", splits.test["text"].tolist(), 64)
    assert tokens == test["tokens"]
    assert test["perplexity"] == pytest.approx(expected, rel=1e-4)

    guards = metrics["guards"]
    forgetting = guards["forgetting"]["details"]
    assert forgetting["reference"].startswith("general English shipped with honed") and forgetting["retention_source"] == "perplexity"
    assert forgetting["perplexity_before"] > 0 and forgetting["perplexity_after"] > 0 and 0 <= forgetting["cka"] <= 1
    assert forgetting["retention"] == pytest.approx(forgetting["perplexity_before"] / forgetting["perplexity_after"])
    sweep = {row["alpha"]: row for row in forgetting["interpolation"]}
    assert set(sweep) == {0.0, 1.0} and sweep[0.0]["retention"] == pytest.approx(1.0), "α = 0 is the pre-trained model"
    assert guards["bias"]["status"] == "skipped" and guards["export"]["status"] == "ok"
    assert guards["export"]["details"]["inputs_match"] and "greedy_agreement" not in guards["export"]["details"]
    assert guards["baseline"]["details"]["pretrained"] == metrics["pretrained"]["perplexity"]
    assert len(metrics["generations"]) == 3 and all({"prompt", "before", "after"} <= set(g) for g in metrics["generations"])
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history and all("val_perplexity" in h for h in history)

    audit = json.loads((run_dir / "audit.json").read_text())
    assert audit["task"] == "causal-lm" and audit["packing"] is True
    assert sum(audit["splits"][s]["rows"] for s in ("train", "validation", "test")) == 40
    assert audit["splits"]["train"]["fill"] > 0.95, "packed rows are full but for the last"
    assert not any(v["from_cache"] for v in audit["tokenisation"].values()), "new texts: the first run tokenises"
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert list(predictions.columns) == ["source", "text", "tokens", "loss", "perplexity"] and len(predictions) == len(splits.test)
    assert predictions["source"].str.endswith(".txt").all() and predictions["tokens"].sum() == test["tokens"]

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "model")  # the merged model, loadable by its own library

    code, out, err = cli(["predict", run_dir, docs, "--out", folder / "scored.csv"], capsys)
    assert code == 0, err
    scored = pd.read_csv(folder / "scored.csv")
    assert len(scored) == 40 and (scored["prediction"] > 1).all() and (scored["prediction"] == scored["perplexity"]).all()


def test_second_run_reads_the_tokenisation_cache(trained, tiny_llama, tmp_path):
    """Another run on the same documents (another method, no packing): nothing is tokenised again."""
    _, _, docs, _ = trained
    second = causal_recipe(tmp_path, tiny_llama, docs)
    code = run_cli(["run", second, "-s", "method=freeze", "-s", "data.packing=false", "-s", "train.max_steps=2"])
    assert code == 0
    audit = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert all(v["from_cache"] for v in audit["tokenisation"].values()), audit["tokenisation"]
    assert audit["packing"] is False and audit["splits"]["train"]["fill"] < 0.95


def test_a_table_source_and_a_reference_file(tmp_path, tiny_llama, capsys):
    rng = random.Random(4)
    pd.DataFrame({"id": range(30), "body": [document(rng) for _ in range(30)]}).to_parquet(tmp_path / "notes.parquet")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.txt").write_text("The river runs through the old town and past the market.")
    (tmp_path / "keep" / "b.txt").write_text("Bread is baked early in the morning before the shops open.")
    recipe = causal_recipe(tmp_path, tiny_llama, tmp_path / "notes.parquet", **{
        "data.text": "body", "method": "full", "train.max_steps": 2, "reference": {"data": str(tmp_path / "keep")},
        "guards.data_curve": True, "guards.curve_fractions": [0.3, 0.6, 1.0], "guards.budget": None})
    code, out, err = cli(["run", recipe], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    curve = metrics["guards"]["data"]["details"]
    assert curve["fractions"] == [0.3, 0.6, 1.0] and len(curve["scores"]) == 3, "the learning curve runs over packed rows"
    assert metrics["guards"]["forgetting"]["details"]["reference"] == "keep"
    assert metrics["guards"]["forgetting"]["details"]["reference_documents"] == 2


# --------------------------------------------------------------------------- bad inputs: one line, before training

def bad(tmp_path, tiny_llama, capsys, train, **changes):
    code, out, err = cli(["run", causal_recipe(tmp_path, tiny_llama, train, **changes)], capsys)
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "model").exists()
    return code, err


def test_no_text_column_names_the_columns(tmp_path, tiny_llama, capsys):
    pd.DataFrame({"body": ["a b c"] * 10, "id": range(10)}).to_csv(tmp_path / "train.csv", index=False)
    code, err = bad(tmp_path, tiny_llama, capsys, tmp_path / "train.csv")
    assert code == 3 and "data.text: column 'text' not found in train.csv (columns: body, id)" in err


def test_an_empty_glob_and_an_empty_folder(tmp_path, tiny_llama, capsys):
    (tmp_path / "docs").mkdir()
    code, err = bad(tmp_path, tiny_llama, capsys, f"{tmp_path}/docs/*.txt")
    assert code == 3 and "matches no file" in err and "docs/*.txt" in err
    code, err = bad(tmp_path, tiny_llama, capsys, tmp_path / "docs")
    assert code == 3 and "no .txt documents" in err


def test_all_documents_empty(tmp_path, tiny_llama, capsys):
    for i in range(5):
        (tmp_path / f"d{i}.txt").write_text("  \n\n" if i % 2 else "")
    code, err = bad(tmp_path, tiny_llama, capsys, f"{tmp_path}/d*.txt")
    assert code == 3 and "every document" in err and "is empty (5 of them)" in err


def test_check_validates_and_counts_empty_documents(tmp_path, tiny_llama, capsys):
    from honed.session import prepare

    write_documents(tmp_path / "docs", 12, seed=1)
    (tmp_path / "docs" / "blank.txt").write_text("   ")
    recipe = causal_recipe(tmp_path, tiny_llama, tmp_path / "docs")
    code, out, err = cli(["check", recipe], capsys)
    assert code == 0, err
    assert "recipe ok: task causal-lm" in out and "1 empty document(s) of docs were left out (blank.txt)" in " ".join(out.split())
    _, splits = prepare(str(recipe))
    assert sum(len(s) for s in (splits.train, splits.validation, splits.test)) == 12
    note = next(n for n in splits.notes if n["code"] == "empty_documents")
    assert note["level"] == "warn"


def test_mixed_folder_bad_utf8_and_too_few_documents(tmp_path, tiny_llama, capsys):
    mixed = tmp_path / "mixed"
    write_documents(mixed, 3, seed=1)
    pd.DataFrame({"text": ["x"]}).to_csv(mixed / "t.csv", index=False)
    code, err = bad(tmp_path, tiny_llama, capsys, mixed)
    assert code == 3 and "both .txt documents" in err
    latin = tmp_path / "latin"
    write_documents(latin, 8, seed=1)
    (latin / "doc000.txt").write_bytes("caf\xe9".encode("latin-1"))
    code, err = bad(tmp_path, tiny_llama, capsys, latin)
    assert code == 3 and "doc000.txt is not UTF-8" in err
    one = tmp_path / "one.txt"
    one.write_text(document(random.Random(0)))
    code, err = bad(tmp_path, tiny_llama, capsys, one)
    assert code == 3 and "one.txt has 1 documents" in err and "data.validation" in err


@pytest.mark.parametrize("changes, words", [
    ({"method": "head"}, ["method: causal-lm fine-tunes with lora, qlora, full or freeze"]),
    ({"reference": {"data": "ref.csv", "label": "label"}}, ["reference.label"]),
    ({"data.groups": ["region"]}, ["data.groups"]),
    ({"data.max_length": 512}, ["data.max_length: 512", "at most 256"]),
])
def test_recipes_it_cannot_run(tmp_path, tiny_llama, capsys, changes, words):
    write_documents(tmp_path / "docs", 10, seed=2)
    code, err = bad(tmp_path, tiny_llama, capsys, tmp_path / "docs", **changes)
    assert code == 2
    for w in words:
        assert w in err


def test_a_causal_lm_run_is_where_chat_fine_tuning_starts(trained, tmp_path):
    """`model: RUN_DIR` of a causal-lm run loads for task chat (its tokenizer kept the chat template it came with)."""
    from chat_helpers import write_chat_recipe, write_conversations
    from honed.models.causal_lm import load_causal_lm
    from honed.recipe import load_recipe

    run_dir = trained[3]
    recipe = load_recipe(str(write_chat_recipe(tmp_path, run_dir, write_conversations(tmp_path / "c.jsonl", 20, 0))))
    bundle = load_causal_lm(recipe.model, recipe)
    assert bundle.family == "causal-lm" and bundle.tokenizer.chat_template
    meta = json.loads((run_dir / "model" / "honed.json").read_text())
    assert meta["task"] == "causal-lm" and meta["text_column"] == "text"


def test_a_tokenizer_without_eos_is_refused(tmp_path, tiny_llama, capsys):
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "no-eos"
    shutil.copytree(tiny_llama, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = None
    tok.save_pretrained(folder)
    write_documents(tmp_path / "docs", 10, seed=2)
    code, err = bad(tmp_path, folder, capsys, tmp_path / "docs")
    assert code == 2 and "has no EOS token" in err and "ends every document with it" in err
