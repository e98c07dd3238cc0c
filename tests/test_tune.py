"""honed tune: the search writes best.yaml, tune.json and one run directory per trial; several
worker processes on one SQLite study lose no trial and run none twice; bad arguments exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from helpers import cli
from honed.errors import RecipeError
from honed.recipe import load_recipe
from honed.tune import ALPHA_RATIO, Param, default_space, format_value, parse_space, to_overrides

FAST = {
    "method": "head",
    "train.head_epochs": 3,
    "train.threads": 1,  # two workers share the cores in the multi-process test
    "guards.baseline": False,  # the final run of the best recipe keeps the recipe's guards: keep it cheap
    "tune.space": {"train.head_epochs": {"low": 2, "high": 4}},
}


def test_tune_writes_best_recipe_that_honed_run_accepts(recipe_factory, tmp_path, capsys):
    recipe = recipe_factory(**FAST)
    out = tmp_path / "tune"
    code, stdout, err = cli(["tune", recipe, "--trials", 3, "--out", out], capsys)
    assert code == 0, err
    assert "honed tune" in stdout and "best trial" in stdout

    summary = json.loads((out / "tune.json").read_text())
    assert len(summary["trials"]) == 3
    assert summary["trials"][0]["defaults"] and summary["trials"][0]["params"]["train.head_lr"] == 1e-2  # auto, resolved
    complete = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert complete and all(summary["best"]["value"] >= t["value"] for t in complete)
    assert set(summary["space"]) == {"train.head_lr", "train.head_epochs", "train.weight_decay"}
    assert summary["space"]["train.head_epochs"] == {"low": 2, "high": 4, "log": False, "type": "int"}  # from tune.space
    assert all(2 <= t["params"]["train.head_epochs"] <= 4 for t in summary["trials"])
    assert "importances" in summary and (summary["importances"] is not None or summary["importances_note"])
    for t in summary["trials"]:
        assert Path(t["run_dir"]) == out / f"trial-{t['number']:04d}" and (Path(t["run_dir"]) / "history.jsonl").exists()
        trial_recipe = yaml.safe_load((Path(t["run_dir"]) / "recipe.yaml").read_text())
        assert trial_recipe["guards"]["data_curve"] is False and trial_recipe["train"]["seeds"] is None
        assert trial_recipe["train"]["head_lr"] == t["params"]["train.head_lr"]
    assert not any((out / f"trial-{i:04d}" / "checkpoints").exists() for i in range(3)), "trial checkpoints are removed"

    # the objective is the validation metric; the best recipe is re-run once, and only that run's test score is read
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["head_lr"] == summary["best"]["params"]["train.head_lr"]
    assert best["train"]["lr"] != "auto" and best["train"]["batch_size"] != "auto"
    assert best["guards"]["baseline"] is False  # the recipe's own guards, not the trials' switched-off ones
    best_metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert summary["best"]["test"] == best_metrics["test"]
    assert best_metrics["validation"]["accuracy"] == pytest.approx(summary["best"]["value"], abs=1e-6)

    code, stdout, err = cli(["run", out / "best.yaml", "--out", tmp_path / "again"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["validation"]["accuracy"] == pytest.approx(best_metrics["validation"]["accuracy"], abs=1e-6)


def test_two_workers_on_one_sqlite_study_lose_no_trial_and_run_none_twice(recipe_factory, tmp_path):
    recipe = recipe_factory(**FAST)
    out, db = tmp_path / "tune", tmp_path / "shared.db"
    url = f"sqlite:///{db}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "honed", "tune", str(recipe), "--storage", url, "--study", "s",
               "--trials", "3", "--out", str(out)]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [w.communicate(timeout=300) for w in workers]
    for worker, (stdout, stderr) in zip(workers, results):
        assert worker.returncode == 0, stderr

    study = optuna.load_study(study_name="s", storage=url)
    trials = study.get_trials()
    assert len(trials) == 6
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials), \
        [(t.number, t.state, t.user_attrs.get("error")) for t in trials]
    # each trial ran once, in its own directory: a second run into the same folder would have been refused (and failed)
    dirs = sorted(p.name for p in out.glob("trial-*"))
    assert dirs == [f"trial-{i:04d}" for i in range(6)]
    assert len({t.user_attrs["run_dir"] for t in trials}) == 6
    for t in trials:
        saved = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "recipe.yaml").read_text())
        assert saved["train"]["head_lr"] == t.params["train.head_lr"]
    assert sum(bool(t.user_attrs.get("defaults")) for t in trials) >= 1
    summary = json.loads((out / "tune.json").read_text())
    assert summary["best"]["number"] == study.best_trial.number
    assert (out / "best" / "metrics.json").exists() and (out / "best.yaml").exists()


def test_bad_arguments_exit_2_before_any_training(recipe_factory, tmp_path, capsys):
    recipe = recipe_factory(**FAST)
    out = tmp_path / "tune"
    code, _, err = cli(["tune", recipe, "--trials", 1, "--out", out, "--storage", "nosuchdb://nowhere"], capsys)
    assert code == 2 and "error: --storage" in err and "nosuchdb" in err
    assert not out.exists(), "a bad storage URL fails before anything is written"
    assert not list(out.glob("trial-*"))
    code, _, err = cli(["tune", recipe, "--trials", 1, "--out", out, "--storage", f"sqlite:///{tmp_path}/missing/dir/x.db"], capsys)
    assert code == 2 and "error: --storage" in err
    code, _, err = cli(["tune", recipe, "--out", out], capsys)
    assert code == 2 and "--trials" in err
    code, _, err = cli(["tune", recipe, "--trials", 1, "--out", out, "--pruner", "hyperband"], capsys)
    assert code == 2 and "--pruner" in err and "successive-halving" in err
    bad_key = recipe_factory(**{**FAST, "tune.space": {"train.lrr": {"low": 1e-5, "high": 1e-4, "log": True}}})
    code, _, err = cli(["tune", bad_key, "--trials", 1, "--out", out], capsys)
    assert code == 2 and "tune.space" in err and "lrr" in err
    bad_range = recipe_factory(**{**FAST, "tune.space": {"train.head_lr": {"low": 0, "high": 1e-1, "log": True}}})
    code, _, err = cli(["tune", bad_range, "--trials", 1, "--out", out], capsys)
    assert code == 2 and "tune.space.train.head_lr" in err and "log" in err
    assert not list(out.glob("trial-*"))


# --------------------------------------------------------------------------- the search space (no training)

def _resolved(recipe, family="hf", n_train=200):
    from honed.auto import resolve_auto

    return resolve_auto(recipe.model_copy(deep=True), family, n_train)


@pytest.mark.parametrize("method, lr_key, expected", [
    ("full", "train.lr", (1e-5, 1e-4)), ("lora", "train.lr", (5e-5, 1e-3)), ("head", "train.head_lr", (1e-3, 1e-1)),
])
def test_default_space_per_method(recipe_factory, method, lr_key, expected):
    recipe = load_recipe(recipe_factory(method=method, **{"train.lr": "auto", "train.epochs": "auto"}))
    space = default_space(recipe, _resolved(recipe), "hf", depth=2)
    assert (space[lr_key].low, space[lr_key].high, space[lr_key].log) == (*expected, True)
    if method == "lora":
        assert space["lora.r"].choices == [4, 8, 16] and space[ALPHA_RATIO].choices == [1, 2, 4] and "lora.dropout" in space
    if method != "head":
        assert space["train.batch_size"].choices == [8, 16, 32]
        assert space["train.epochs"].low <= 10 <= space["train.epochs"].high  # auto: 10 epochs below 2,000 rows


def test_space_for_wordllama_freeze_l2sp_and_replay(recipe_factory, tmp_path):
    from honed.auto import AUTO_LR

    recipe = load_recipe(recipe_factory(method="full", **{"train.lr": "auto", "l2sp": {"alpha": 0.01}}))
    space = default_space(recipe, _resolved(recipe, "wordllama"), "wordllama", depth=0)
    auto = AUTO_LR[("wordllama", "full")]
    assert space["train.lr"].low < auto < space["train.lr"].high and "l2sp.alpha" in space
    path = recipe_factory(method="freeze", **{"train.lr": "auto"})
    recipe = load_recipe(path)
    assert default_space(recipe, _resolved(recipe), "hf", depth=2)["freeze.layers"].high == 2
    recipe = load_recipe(path, ["replay.fraction=0.25"])
    assert "replay.fraction" in default_space(recipe, _resolved(recipe), "hf", depth=2)


def test_tune_space_overrides_and_overrides_strings(recipe_factory):
    recipe = load_recipe(recipe_factory(method="lora"))
    defaults = default_space(recipe, _resolved(recipe), "hf", depth=2)
    space = parse_space({"train.lr": {"low": 1e-4, "high": 3e-4, "log": True}, "train.batch_size": {"choices": [16]},
                         "lora.dropout": None, "data.max_length": {"low": 16, "high": 32, "step": 16}}, defaults)
    assert space["train.lr"] == Param("train.lr", "float", 1e-4, 3e-4, log=True)
    assert space["train.batch_size"].choices == [16] and "lora.dropout" not in space
    assert space["data.max_length"].kind == "int"
    with pytest.raises(RecipeError, match="tune.space.train.lr: low and high"):
        parse_space({"train.lr": {"low": 1e-3, "high": 1e-4}}, defaults)
    with pytest.raises(RecipeError, match="unknown key"):
        parse_space({"train.lr": {"min": 1e-3}}, defaults)
    sets = to_overrides({"train.lr": 1e-05, "lora.r": 16, ALPHA_RATIO: 2, "train.batch_size": 8}, recipe)
    assert sets == ["train.lr=1.0e-05", "lora.r=16", "train.batch_size=8", "lora.alpha=32"]
    resolved = load_recipe(recipe, sets)
    assert resolved.train.lr == 1e-05 and resolved.lora.alpha == 32
    assert format_value(0.5) == "0.5" and format_value(True) == "true" and format_value("half") == '"half"'


def test_space_for_a_tabular_mlp():
    recipe = load_recipe({"task": "tabular-classification", "model": {"architecture": "mlp"},
                          "data": {"train": "rows.csv", "features": ["a", "b"]}, "method": "full"})
    space = default_space(recipe, _resolved(recipe, "mlp", 500), "mlp", depth=None)
    assert (space["train.lr"].low, space["train.lr"].high) == pytest.approx((2e-4, 5e-3))  # AUTO_LR 1e-3 ÷5 … ×5
    assert space["train.batch_size"].choices == [32, 64, 128] and "freeze.layers" not in space
