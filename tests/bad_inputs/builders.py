"""Builders for the bad-input corpus: small functions that write bad files into a test's folder.

A builder takes a `Ctx` (the test's folder and the tiny model) and writes what its case needs:
usually `recipe.yaml` plus one bad thing (a data file, a model folder, a run directory, a
predict input). Builders compose with `steps(...)`. Argument lists refer to the files through
`{tmp}`, `{recipe}` and `{run}` placeholders (see test_bad_inputs.py).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from conftest import make_texts, write_recipe

FILES = Path(__file__).parent / "files"  # small literal files that read better committed than generated


@dataclass
class Ctx:
    tmp: Path
    model: Path  # the tiny BERT checkpoint (a session fixture: copied, never modified)
    run: Path | None = None  # a finished run directory, for predict cases

    @property
    def recipe_path(self) -> Path:
        return self.tmp / "recipe.yaml"

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")
        return path

    def good_csv(self, name: str = "train.csv", n: int = 240, seed: int = 1) -> Path:
        path = self.tmp / name
        make_texts(n, seed=seed).to_csv(path, index=False)
        return path

    def recipe(self, **changes) -> Path:
        """The fast test recipe (1 epoch, no baseline) over good data, with dotted `changes`."""
        train = self.tmp / "train.csv"
        if not train.exists() and "data.train" not in changes:
            self.good_csv()
        changes.setdefault("train.epochs", 1)
        changes.setdefault("guards.baseline", False)  # the few cases that do train stay fast
        model = changes.pop("model", self.model)
        return write_recipe(self.tmp, model, train, **changes)


Builder = Callable[[Ctx], None]


def steps(*builders: Builder) -> Builder:
    def build(ctx: Ctx) -> None:
        for b in builders:
            b(ctx)

    return build


def nothing(ctx: Ctx) -> None:
    """For cases whose bad input is a path that does not exist."""


def write(name: str, content: str | bytes) -> Builder:
    return lambda ctx: ctx.write(name, content) and None


def mkdir(name: str) -> Builder:
    return lambda ctx: (ctx.tmp / name).mkdir(parents=True)


def good_csv(name: str) -> Builder:
    return lambda ctx: ctx.good_csv(name) and None


def committed(name: str, dest: str | None = None) -> Builder:
    """Copy files/<name> into the test's folder."""
    return lambda ctx: shutil.copy(FILES / name, ctx.tmp / (dest or name)) and None


# --------------------------------------------------------------------------- recipes and data

def recipe_with(**changes) -> Builder:
    """A recipe over good data with some keys changed (dotted names)."""
    return lambda ctx: ctx.recipe(**changes) and None


def recipe_text(text: str | bytes) -> Builder:
    """recipe.yaml with exactly this content."""
    return write("recipe.yaml", text)


def data_file(name: str, content: str | bytes | Callable[[], str | bytes], role: str = "train") -> Builder:
    """A recipe whose data.<role> is a file with this content (training data is good unless role is train)."""

    def build(ctx: Ctx) -> None:
        path = ctx.write(name, content() if callable(content) else content)
        ctx.recipe(**{f"data.{role}": str(path)})

    return build


def committed_data(name: str) -> Builder:
    """files/<name> as data.train."""
    return steps(committed(name), lambda ctx: ctx.recipe(**{"data.train": str(ctx.tmp / name)}) and None)


def rows(header: str, lines: list[str], newline: str = "\n") -> str:
    return header + newline + newline.join(lines) + newline


def good_rows(n: int = 60) -> list[str]:
    """`text,label` lines of learnable data."""
    frame = make_texts(n, seed=7)
    return [f"{t},{label}" for t, label in zip(frame["text"], frame["label"])]


def many_classes(n: int = 100_000) -> str:
    return "text,label\n" + "".join(f"text number {i},class{i}\n" for i in range(n))


def mixed_line_endings() -> bytes:
    endings = ["\r\n", "\n", "\r"]
    body = "text,label\r\n" + "".join(line + endings[i % 3] for i, line in enumerate(good_rows(60)))
    return body.encode("utf-8")


def huge_text_data(ctx: Ctx) -> None:
    """Good data in which one row's text is 10 MB."""
    frame = make_texts(240, seed=1)
    frame.loc[0, "text"] = "great " * (10 * 1024 * 1024 // 6)
    frame.to_csv(ctx.tmp / "train.csv", index=False)
    ctx.recipe()


def symlink_loop(ctx: Ctx) -> None:
    a, b = ctx.tmp / "loop_a.csv", ctx.tmp / "loop_b.csv"
    os.symlink(b, a)
    os.symlink(a, b)
    ctx.recipe(**{"data.train": str(a)})


# --------------------------------------------------------------------------- model folders

def model_dir(change: Callable[[Path], None]) -> Builder:
    """A copy of the tiny model, damaged by `change`, named by the recipe's `model`."""

    def build(ctx: Ctx) -> None:
        dest = ctx.tmp / "model"
        shutil.copytree(ctx.model, dest)
        change(dest)
        ctx.recipe(model=str(dest))

    return build


def edit_config(**fields) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config))

    return change


def remove(*names: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return change


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def pickle_only(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def vision_model(ctx: Ctx) -> None:
    """A real checkpoint of a model that is not a text classifier (a tiny ViT), with a tokenizer beside it."""
    from transformers import ViTConfig, ViTModel

    dest = ctx.tmp / "vit"
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=16)
    ViTModel(config).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ctx.model / name, dest / name)
    ctx.recipe(model=str(dest))


# --------------------------------------------------------------------------- folders a command must leave alone

def run_dir(name: str = "run") -> Builder:
    """Something that looks like a finished honed run."""

    def build(ctx: Ctx) -> None:
        folder = ctx.tmp / name
        (folder / "model").mkdir(parents=True)
        (folder / "recipe.yaml").write_text("task: text-classification\nmodel: some-earlier-model\n")
        (folder / "metrics.json").write_text(json.dumps({"task": "text-classification", "test": {"accuracy": 0.9}}))
        (folder / "history.jsonl").write_text('{"step": 1}\n')
        (folder / "model" / "honed.json").write_text(json.dumps({"family": "hf", "labels": ["neg", "pos"]}))

    return build


def user_dir(name: str) -> Builder:
    """A folder of the user's own files (not a run)."""

    def build(ctx: Ctx) -> None:
        folder = ctx.tmp / name
        folder.mkdir(parents=True)
        (folder / "thesis.tex").write_text("\\documentclass{article}\n")
        (folder / "notes.txt").write_text("do not delete\n")

    return build
