"""Test helpers: a tiny BERT (2 layers, width 32) with a WordPiece tokenizer trained on the
fixture text, saved locally with save_pretrained; and generated text-classification data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
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
    """A tiny BERT (2 layers, width 32) with a fixed WordPiece vocabulary, saved with save_pretrained.

    The vocabulary is written out, not trained: the WordPiece trainer of `tokenizers` gives another
    vocabulary in every process (it iterates Rust hash maps with a per-process random state), so
    the golden runs (tests/golden) would see other token ids each time. Here the vocabulary is the
    special tokens, every word of the generated sentences, and the letters with their ##
    continuations, in a fixed order."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    # "a" is a word and a letter: listed once, so the ids run 0..n-1 without a gap
    tokens = list(dict.fromkeys(special + sorted(set(POSITIVE + NEGATIVE + NEUTRAL)) + letters + ["##" + c for c in letters]))
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
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
        "train": {"epochs": 6, "lr": 3e-3, "batch_size": 16, "seed": 0, "precision": "fp32", "eval_every": 5, "patience": None,
                  "threads": 1},  # one thread: the same sums on a busy machine as on a quiet one
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


def build_tiny_vit(folder: Path) -> Path:
    """A ViT of width 32, 2 layers, 32×32 images, seeded."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=2)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def stripes(folder: Path, n_per_class: int, seed: int) -> Path:
    """Image folders of two classes: horizontal vs vertical stripes, with noise."""
    from PIL import Image

    rng = random.Random(seed)
    for label in ("horizontal", "vertical"):
        (folder / label).mkdir(parents=True)
        for i in range(n_per_class):
            img = Image.new("RGB", (32, 32))
            period = rng.choice([4, 6, 8])
            for y in range(32):
                for x in range(32):
                    on = ((y if label == "horizontal" else x) // (period // 2)) % 2
                    v = 200 * on + rng.randint(0, 55)
                    img.putpixel((x, y), (v, v, v))
            img.save(folder / label / f"{i}.png")
    return folder


def make_series(names, length: int = 60, seed: int = 0, start: str = "2018-01-01") -> pd.DataFrame:
    """Monthly series, level + trend + yearly cycle + noise."""
    rng = np.random.default_rng(seed)
    times = pd.date_range(start, periods=length, freq="MS")
    rows = []
    for i, name in enumerate(names):
        t = np.arange(length)
        y = rng.uniform(50, 150) + 0.3 * t + rng.uniform(5, 20) * np.sin(2 * np.pi * t / 12 + i) + rng.normal(0, 1.0, length)
        rows += [{"series": name, "time": d.strftime("%Y-%m-%d"), "target": round(float(v), 3)} for d, v in zip(times, y)]
    return pd.DataFrame(rows)


def topic_texts(n: int, seed: int, region: bool = False) -> pd.DataFrame:
    """A second task on the same vocabulary: is the text about a phone or a box? (region: a group column too)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = "phone" if i % 2 == 0 else "box"
        words = [rng.choice(NEUTRAL + POSITIVE + NEGATIVE) for _ in range(rng.randint(4, 10))]
        words = [w for w in words if w not in ("phone", "box")]
        words.insert(rng.randrange(len(words) + 1), topic)
        row = {"text": " ".join(words), "label": topic}
        if region:  # drawn after the words, so the texts are the same with or without it
            row["region"] = rng.choice(["north", "south"])
        rows.append(row)
    return pd.DataFrame(rows)
