"""Test helpers: a tiny BERT (2 layers, width 32) with a WordPiece tokenizer trained on the
fixture text, saved locally with save_pretrained; and generated text-classification data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pandas as pd
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["great", "love", "excellent", "happy", "wonderful", "fast", "helpful", "perfect"]
NEGATIVE = ["broken", "hate", "awful", "slow", "refund", "angry", "useless", "terrible"]
NEUTRAL = ["the", "order", "arrived", "today", "my", "phone", "support", "team", "was", "and", "it", "a", "service", "box"]


def make_texts(n: int, seed: int, signal: float = 1.0) -> pd.DataFrame:
    """Sentences whose label is carried by sentiment words (with probability `signal`)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 12))]
        cue_source = (POSITIVE if label == "pos" else NEGATIVE) if rng.random() < signal else rng.choice([POSITIVE, NEGATIVE])
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(cue_source))
        rows.append({"text": " ".join(words), "label": label, "region": rng.choice(["north", "south"])})
    return pd.DataFrame(rows)


def build_tiny_bert(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    corpus = make_texts(400, seed=123)["text"].tolist()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tokenizer = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    return save_seeded_checkpoint(BertForSequenceClassification, config, tokenizer, folder)


def save_seeded_checkpoint(model_class, config, tokenizer, folder: Path) -> Path:
    """A randomly initialised model (seed 0) and its tokenizer, saved as a checkpoint folder."""
    import torch

    torch.manual_seed(0)
    model = model_class(config)
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_recipe(folder: Path, model, train_csv: Path, **changes) -> Path:
    """A recipe fast enough for tests; `changes` are dotted keys, e.g. {"train.epochs": 2}."""
    recipe = {
        "task": "text-classification",
        "model": str(model),
        "data": {"train": str(train_csv), "text": "text", "label": "label", "max_length": 32},
        "method": "full",
        "train": {"epochs": 6, "lr": 3e-3, "batch_size": 16, "seed": 0, "precision": "fp32", "eval_every": 5, "patience": None},
        "out": str(folder / "run"),
    }
    return write_recipe_file(folder, recipe, changes)


def write_recipe_file(folder: Path, recipe: dict, changes: dict) -> Path:
    """Apply dotted-key changes ({"train.epochs": 2}; None writes null) and save folder/recipe.yaml."""
    for key, value in changes.items():
        node = recipe
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cli(argv, capsys) -> tuple[int, str, str]:
    """Run the real CLI entry point in-process: (exit code, stdout, stderr)."""
    from honed.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err
