"""A failed run names the next step honed would try, from its own numbers (honed/next_step.py), and
`honed run --retry-on-fail` runs it once beside the first run (honed/retry.py); a passing run does not retry."""

from __future__ import annotations

import json

import pytest
import yaml

import honed
from helpers import cli
from honed import next_step
from honed.recipe import Recipe


def recipe(lr=1e-3, method="full") -> Recipe:
    return Recipe.model_validate({"task": "text-classification", "model": "m", "method": method,
                                  "data": {"train": "t.csv", "text": "text", "label": "label"}, "train": {"lr": lr}})


def guards(collapsed=False, tuned=0.9, majority=0.5, probe=0.6) -> dict:
    return {"overfitting": {"status": "fail" if collapsed else "ok", "summary": "S.", "details": {"collapsed": collapsed}},
            "baseline": {"status": "ok", "summary": "B.", "details": {"fine_tuned": tuned, "majority": majority, "linear_probe": probe}}}


RANGE = {"lrs": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], "losses": [0.7, 0.69, 0.6, 0.4, 0.9], "smoothed": [0.7, 0.69, 0.6, 0.4, 0.7]}
HISTORY_ROSE = [{"train_loss": 0.5}, {"train_loss": 0.9}, {"train_loss": 1.4}]
HISTORY_FLAT = [{"train_loss": 0.69}, {"train_loss": 0.69}, {"train_loss": 0.68}]


def test_a_collapse_after_the_loss_rose_lowers_the_rate_from_the_range_tests_curve():
    step = next_step.suggest(recipe(lr=3e-3), "hf", ("full", "head", "lp-ft"), HISTORY_ROSE, guards(collapsed=True, tuned=0.5), RANGE)
    assert step["failure"] == "collapsed" and step["guard"] == "overfitting"
    assert step["set"] == ["train.lr=0.001"], "the minimum-loss rate 1e-2 ÷ 10"
    assert "minimum-loss rate 0.01 ÷ 10" in step["sentence"] and "1.4 at the end" in step["sentence"]


def test_a_run_whose_loss_never_fell_raises_the_rate():
    step = next_step.suggest(recipe(lr=1e-5), "hf", ("full",), HISTORY_FLAT, guards(tuned=0.5, probe=0.5), RANGE)
    assert step["failure"] == "trivial" and step["set"] == ["train.lr=0.0033"], "the minimum-loss rate 1e-2 ÷ 3"
    without = next_step.suggest(recipe(lr=1e-5, method="lp-ft"), "hf", ("full", "lp-ft"), HISTORY_FLAT, guards(tuned=0.5, probe=0.5), None)
    assert without["set"] == ["train.lr=3e-05"], "no range test (lp-ft keeps the table): three times this run's rate"


def test_a_forecaster_no_better_than_seasonal_naive_gets_a_rate_step():
    naive = {"baseline": {"status": "warn", "summary": "B.", "details": {"fine_tuned": -1.03, "majority": None, "linear_probe": None,
                                                                          "seasonal_naive": {"mase": 0.79, "neg_mase": -0.79}}}}
    step = next_step.suggest(recipe(lr=3e-3), "ts-forecast", ("full", "lora", "lp-ft"), HISTORY_ROSE, naive, RANGE)
    assert step["failure"] == "trivial" and "MASE 1.030 does not beat seasonal naive's 0.790" in step["sentence"]
    assert step["set"] == ["train.lr=0.001"], "the loss rose: the range test's minimum-loss rate 1e-2 ÷ 10"
    explicit = next_step.suggest(recipe(lr=3e-3), "ts-forecast", ("full", "lora", "lp-ft"), HISTORY_ROSE, naive, None)
    assert explicit["set"] == ["train.lr=auto"], "an explicit rate on a forecaster: the range test measures one"


def test_below_the_probe_tries_lp_ft_then_the_head():
    below = guards(tuned=0.55, probe=0.7)
    assert next_step.suggest(recipe(), "hf", ("full", "head", "lp-ft"), HISTORY_FLAT, below, None)["set"] == ["method=lp-ft"]
    assert next_step.suggest(recipe(method="lp-ft"), "hf", ("full", "head", "lp-ft"), HISTORY_FLAT, below, None)["set"] == ["method=head"]
    assert "0.700 against its 0.550" in next_step.suggest(recipe(), "hf", ("full", "lp-ft"), HISTORY_FLAT, below, None)["sentence"]


def test_a_passing_run_has_no_next_step():
    assert next_step.suggest(recipe(), "hf", ("full",), HISTORY_FLAT, guards(), RANGE) is None


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory, tiny_bert):
    """`honed run --retry-on-fail` on the tiny BERT at an absurd explicit rate (it collapses, or scores the majority class)."""
    from helpers import make_texts, write_recipe

    folder = tmp_path_factory.mktemp("collapse")
    make_texts(240, seed=1).to_csv(folder / "train.csv", index=False)
    path = write_recipe(folder, tiny_bert, folder / "train.csv", **{"train.lr": 30.0, "train.epochs": 3, "guards.baseline": False})
    return folder, path


def test_a_collapsed_run_names_its_next_step_and_the_retry_runs_it(collapsed, capsys):
    folder, path = collapsed
    code, out, err = cli(["run", path, "--out", folder / "run", "--retry-on-fail"], capsys)
    assert code == 0, err
    first = json.loads((folder / "run" / "metrics.json").read_text())
    step = first["next_step"]
    assert step["failure"] in ("collapsed", "trivial"), "the fixture fails: one class, or no better than the majority class"
    assert step["set"] == ["train.lr=auto"], "an explicit rate whose loss did not fall: the range test measures one"
    assert "Next step: try train.lr: auto" in first["guards"][step["guard"]]["summary"] and "train.lr 30 " in step["sentence"]
    retry_dir = folder / "run-retry1"
    assert first["retry"]["run_dir"] == str(retry_dir) and first["retry"]["set"] == ["train.lr=auto"]
    saved = yaml.safe_load((retry_dir / "recipe.yaml").read_text())
    assert saved["train"]["lr"] == json.loads((retry_dir / "lr_range.json").read_text())["chosen"] != 30.0
    second = json.loads((retry_dir / "metrics.json").read_text())
    assert second["retry_of"]["run_dir"] == str(folder / "run")
    assert "Retried with train.lr=auto" in (folder / "run" / "report.html").read_text()
    assert "retry with -s train.lr=auto" in out and f"retry: test accuracy {second['test']['accuracy']:.4f}" in " ".join(out.split())


def test_a_passing_run_does_not_retry(recipe_factory, tmp_path):
    result = honed.run(str(recipe_factory(**{"guards.baseline": False})), out=tmp_path / "ok",
                       show_progress=False, retry_on_fail=True)
    assert result["next_step"] is None and result.retry is None
    assert not (tmp_path / "ok-retry1").exists()
