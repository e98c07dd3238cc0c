"""`train.batch_size: auto` from the memory check and `train.epochs: auto` from the data size
(honed/auto.py, session.memory_estimate; the rules: docs/auto.md): the batch shrinks, with gradient
accumulation up to the effective batch, when the memory check says the larger one does not fit; the
epochs follow the rule; the resolved values and how they were found land in recipe.yaml; explicit
values skip `auto`."""

from __future__ import annotations

import pytest
import torch
import yaml

import honed
from honed.auto import AUTO_BATCH_DEFAULT, FORECAST_STEPS, resolve_auto, resolve_rates
from honed.errors import RecipeError
from honed.memory import HEADROOM, estimate_training_memory
from honed.recipe import Recipe
from honed.session import memory_estimate, memory_plan, prepare
from honed.tasks import TASKS


@pytest.fixture
def loaded(recipe_factory):
    """(recipe with `batch_size: auto` and the table's rates filled in, task, bundle, splits)."""
    recipe, splits = prepare(str(recipe_factory(**{"train.batch_size": "auto"})))
    task = TASKS[recipe.task]
    bundle = task.load_model(recipe, splits)
    resolve_rates(recipe, bundle.family)
    return recipe, task, bundle, splits


def needed_mb(recipe, task, bundle, splits, batch: int) -> float:
    plan = memory_plan(recipe, task, bundle, "fp32", splits).but(batch_size=batch)
    return estimate_training_memory(bundle.model, plan)["total_mb"]


def test_batch_auto_shrinks_to_what_fits_and_accumulates_up_to_the_effective_batch(loaded):
    recipe, task, bundle, splits = loaded
    assert recipe.train.batch_size == AUTO_BATCH_DEFAULT == 16, "a transformer's effective batch"
    at_16, at_4 = (needed_mb(recipe, task, bundle, splits, b) for b in (16, 4))
    assert at_16 > at_4
    have = (at_4 + (needed_mb(recipe, task, bundle, splits, 8) - at_4) / 2) / HEADROOM  # 4 fits, 8 does not
    estimate = memory_estimate(recipe, task, bundle, "fp32", splits, torch.device("cpu"), have, batch_auto=True)
    assert (recipe.train.batch_size, recipe.train.grad_accumulation) == (4, 4), "16 rows per step as 4 × 4"
    assert estimate["auto_batch"] == {"effective": 16, "micro": 4, "accumulation": 4, "needed_at_effective_mb": round(at_16, 1),
                                      "have_mb": round(have, 1)}
    assert estimate["total_mb"] == pytest.approx(at_4 + estimate["data_mb"])  # the run's token ids come on top


def test_batch_auto_keeps_the_effective_batch_when_it_fits(loaded):
    recipe, task, bundle, splits = loaded
    memory_estimate(recipe, task, bundle, "fp32", splits, torch.device("cpu"), 1e6, batch_auto=True)
    assert (recipe.train.batch_size, recipe.train.grad_accumulation) == (16, 1)


def test_batch_auto_refuses_in_one_line_when_not_one_row_fits(loaded):
    recipe, task, bundle, splits = loaded
    too_little = needed_mb(recipe, task, bundle, splits, 1) * 0.5
    with pytest.raises(RecipeError) as err:
        memory_estimate(recipe, task, bundle, "fp32", splits, torch.device("cpu"), too_little, batch_auto=True)
    assert str(err.value).startswith("memory: training needs") and "\n" not in str(err.value)


def test_an_explicit_batch_is_not_shrunk(recipe_factory):
    recipe, splits = prepare(str(recipe_factory(**{"train.batch_size": 16})))
    task = TASKS[recipe.task]
    bundle = task.load_model(recipe, splits)
    resolve_rates(recipe, bundle.family)
    have = needed_mb(recipe, task, bundle, splits, 4) / HEADROOM  # 16 does not fit
    with pytest.raises(RecipeError, match="train.batch_size: 8 and train.grad_accumulation: 2|train.gradient_checkpointing"):
        memory_estimate(recipe, task, bundle, "fp32", splits, torch.device("cpu"), have)
    assert recipe.train.batch_size == 16 and recipe.train.grad_accumulation == 1


def bare(**train) -> Recipe:
    return Recipe.model_validate({"task": "text-classification", "model": "m", "data": {"train": "t.csv", "text": "text", "label": "label"},
                                  "method": "full", "train": {"lr": 1e-4, "batch_size": 16, **train}})


@pytest.mark.parametrize("rows, epochs", [(40, 10), (300, 10), (1999, 10), (2000, 5), (19999, 5), (20000, 3), (500_000, 3)])
def test_epochs_auto_follows_the_data_size_rule(rows, epochs):
    recipe = resolve_auto(bare(), "hf", rows)
    assert recipe.train.epochs == epochs
    assert recipe.train.max_steps == epochs * -(-rows // 16), "every epoch's steps"
    per_epoch = -(-rows // 16)
    assert recipe.train.eval_every == (per_epoch // 2 if per_epoch >= 6 else per_epoch), "twice an epoch (once, when it is short)"


def test_epochs_auto_for_forecasters_counts_steps_and_explicit_epochs_are_kept():
    assert resolve_auto(bare(), "ts-forecast", 160, batches_per_epoch=10).train.epochs == FORECAST_STEPS // 10
    assert resolve_auto(bare(), "ts-forecast", 16, batches_per_epoch=1).train.epochs == 200, "at most 200"
    assert resolve_auto(bare(epochs=4), "hf", 300).train.epochs == 4
    assert resolve_auto(bare(max_steps=30), "hf", 300).train.epochs == 2, "as many epochs as the step bound needs"


def test_the_resolved_values_and_their_reasons_land_in_recipe_yaml(recipe_factory, tmp_path):
    path = recipe_factory(**{"train.batch_size": "auto", "train.epochs": "auto", "train.eval_every": "auto", "train.max_steps": 4,
                             "guards.baseline": False})
    result = honed.run(str(path), out=tmp_path / "run", show_progress=False)
    text = (result.run_dir / "recipe.yaml").read_text()
    saved = yaml.safe_load(text)["train"]
    assert (saved["batch_size"], saved["grad_accumulation"], saved["epochs"]) == (16, 1, 1), "240 rows − splits: one epoch of 4 steps"
    assert isinstance(saved["eval_every"], int) and saved["gradient_checkpointing"] is False
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(line.startswith("# train.batch_size: auto -> 16: the family's effective batch, which fits") for line in header)
    assert any(line.startswith("# train.epochs: auto -> 1 for ") for line in header)
    assert not any(line.startswith("# train.lr") for line in header), "an explicit rate: no range test, no note"
