"""The guards' budget (checks/budget.py) and their timing: every guard's seconds in metrics.json
`timing.guards`, the CLI's last line with the wall time, and the learning curve and the scratch
baseline kept within `guards.budget` of the fine-tune's steps, saying so in their details; a curve the
budget would leave with fewer than MIN_CURVE_POINTS points skipped (not "ok"); and the seed spread on
more than `guards.seed_rows` training rows retrained on one sample, saying so."""

from __future__ import annotations

import json

import pytest

from helpers import cli
from honed.checks.budget import MIN_CURVE_POINTS, MIN_CURVE_ROWS, GuardBudget, curve_fractions, min_curve_points

GUARDS = ("overfitting", "forgetting", "data", "bias", "baseline", "export")


def test_the_budget_counts_steps_and_shares_them():
    budget = GuardBudget(0.3, 40)
    assert budget.total == 12
    assert budget.allot("data", others_to_come=True) == 8  # the curve leaves a third to the baseline
    budget.spend(7)
    assert budget.remaining() == 5 and budget.allot("baseline", others_to_come=False) == 5
    budget.spend(9)
    assert budget.remaining() == 0
    unlimited = GuardBudget(None, 40)
    assert unlimited.total is None and unlimited.remaining() is None and unlimited.allot("data", True) is None


def test_curve_fractions_shrink_to_the_allowance_and_stay_nested():
    requested = [0.1, 0.2, 0.4, 0.7, 1.0]
    same, note = curve_fractions(requested, 1000, 200, 100)  # 1.4 × 100 = 140 steps fit in 200
    assert same == requested and note is None
    scaled, note = curve_fractions(requested, 1000, 28, 100)  # 140 steps asked, 28 allowed: × 0.2
    assert note["scaled_by"] == pytest.approx(0.2)
    assert scaled == [0.02, 0.04, 0.08, 0.14, 1.0]
    assert sum(f for f in scaled if f < 1) * 100 <= 28 + 1e-9
    floored, _ = curve_fractions(requested, 100, 30, 100)  # never below MIN_CURVE_ROWS rows; then the largest goes
    assert floored == [MIN_CURVE_ROWS / 100, 0.0857, 1.0]
    assert curve_fractions(requested, 100, 1, 100)[0] == [1.0]  # not one fraction fits
    assert curve_fractions(requested, 1000, None, 100) == (requested, None)


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, tiny_bert):
    """One small text run with the learning curve and the scratch baseline within a budget of 0.6 (16 steps:
    the default 0.3 would leave too few for two curve fractions, which test_budget_too_small covers), via the CLI."""
    from helpers import make_texts, write_recipe

    folder = tmp_path_factory.mktemp("budget")
    train = folder / "train.csv"
    make_texts(160, seed=1).to_csv(train, index=False)
    recipe = write_recipe(folder, tiny_bert, train, **{"train.epochs": 2, "guards.data_curve": True, "guards.baseline": True,
                                                          "guards.budget": 0.6})
    return folder, recipe


def test_every_guard_is_timed_and_the_extra_training_stays_in_budget(budget_run, capsys):
    folder, recipe = budget_run
    code, out, err = cli(["run", recipe], capsys)
    assert code == 0, err
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    timing = metrics["timing"]
    assert set(GUARDS) <= {k.removesuffix("_seconds") for k in timing["guards"]}
    assert all(timing["guards"][f"{g}_seconds"] >= 0 for g in GUARDS)
    assert timing["guards"]["total_seconds"] == pytest.approx(sum(timing["guards"][f"{g}_seconds"] for g in GUARDS), abs=0.05)
    assert timing["wall_seconds"] >= timing["train_seconds"] + timing["guards"]["total_seconds"] - 0.5
    budget = timing["guards"]["budget"]
    steps = metrics["run"]["steps"]
    assert budget["share"] == 0.6 and budget["fine_tune_steps"] == steps and budget["steps_allowed"] == int(0.6 * steps)
    assert 0 < budget["steps_used"] <= budget["steps_allowed"]
    data, baseline = metrics["guards"]["data"], metrics["guards"]["baseline"]
    assert data["details"]["budget"]["scaled_by"] < 1  # 1.4× the data would not fit in 0.6×
    assert all(f < 0.7 for f in data["details"]["fractions"] if f < 1)
    assert "guards.budget" in data["summary"]
    assert baseline["details"]["scratch"] is not None
    assert baseline["details"]["budget"]["steps"] <= budget["steps_allowed"] and "guards.budget" in baseline["summary"]
    last = out.strip().splitlines()[-1]
    assert last.startswith("took ") and f"training {timing['train_seconds']:.1f} s" in last and "guards" in last


def test_no_budget_trains_the_guards_in_full(tmp_path, tiny_bert):
    import honed
    from helpers import make_texts, write_recipe

    train = tmp_path / "train.csv"
    make_texts(160, seed=1).to_csv(train, index=False)
    recipe = write_recipe(tmp_path, tiny_bert, train, **{"train.epochs": 2, "guards.baseline": True, "guards.budget": None})
    metrics = honed.run(str(recipe), show_progress=False).metrics
    assert "budget" not in metrics["guards"]["baseline"]["details"]
    assert metrics["timing"]["guards"]["budget"]["steps_used"] == metrics["run"]["steps"]  # a whole second fine-tune


def test_budget_too_small_skips_the_curve_and_says_why(tmp_path, tiny_bert):
    import honed
    from helpers import make_texts, write_recipe

    train = tmp_path / "train.csv"
    make_texts(160, seed=1).to_csv(train, index=False)
    recipe = write_recipe(tmp_path, tiny_bert, train, **{"train.epochs": 2, "guards.data_curve": True, "guards.baseline": False,
                                                            "guards.budget": 0.1})
    metrics = honed.run(str(recipe), show_progress=False).metrics
    data = metrics["guards"]["data"]
    assert "fractions" not in data["details"] and data["details"]["budget"]["steps_allowed"] == int(0.1 * metrics["run"]["steps"])
    assert "learning curve was not run: guards.budget allows" in data["summary"]
    assert metrics["timing"]["guards"]["budget"]["steps_used"] == 0


def test_the_floor_counts_the_points_a_cut_curve_keeps():
    requested = [0.1, 0.2, 0.4, 0.7, 1.0]
    assert MIN_CURVE_POINTS == 4 and min_curve_points(requested) == 4
    assert min_curve_points([0.3, 0.6, 1.0]) == 3  # a recipe that asks for three points gets three
    few, _ = curve_fractions(requested, 128, 4, 16)  # 16 fine-tune steps × the default 0.3: 4 steps
    assert len(set(few)) == 3 < min_curve_points(requested)  # what a small run's default budget left before the floor
    enough, _ = curve_fractions(requested, 128, 6, 16)
    assert len(set(enough)) >= MIN_CURVE_POINTS


def test_a_curve_cut_below_four_points_is_skipped_not_ok(tmp_path, tiny_bert):
    """The default budget (0.3) on a small run (128 training rows, 16 steps) leaves the curve three points,
    which its three parameters fit exactly: the guard says skipped, for lack of budget, instead of fitting them."""
    import honed
    from helpers import make_texts, write_recipe

    train = tmp_path / "train.csv"
    make_texts(160, seed=1).to_csv(train, index=False)
    recipe = write_recipe(tmp_path, tiny_bert, train, **{"train.epochs": 2, "guards.data_curve": True, "guards.baseline": False})
    metrics = honed.run(str(recipe), show_progress=False).metrics
    data = metrics["guards"]["data"]
    assert metrics["run"]["steps"] == 16 and data["details"]["budget"]["steps_allowed"] == 4
    assert data["status"] == "skipped", data
    assert data["details"]["budget"]["points"] == 3 and "fit" not in data["details"] and "fractions" not in data["details"]
    assert "learning curve was not run" in data["summary"] and "3 of the 4 points a curve needs" in data["summary"]
    assert metrics["timing"]["guards"]["budget"]["steps_used"] == 0  # nothing was trained for a curve that proves nothing


def test_the_seed_spread_on_more_rows_than_seed_rows_trains_every_seed_on_one_sample(tmp_path, tiny_bert):
    import honed
    from helpers import make_texts, write_recipe

    train = tmp_path / "train.csv"
    make_texts(200, seed=3).to_csv(train, index=False)  # 160 training rows
    recipe = write_recipe(tmp_path, tiny_bert, train, method="head", **{"train.epochs": 2, "train.seeds": [0, 1],
                                                                         "guards.seed_rows": 60})
    metrics = honed.run(str(recipe), show_progress=False).metrics
    guard = metrics["guards"]["overfitting"]
    note = guard["details"]["budget"]
    assert note["of"] == 160 and 60 <= note["rows"] <= 62 and note["fraction"] == pytest.approx(note["rows"] / 160, abs=1e-4)
    assert "guards.seed_rows" in guard["summary"] and "the run's own included" in guard["summary"]
    assert set(map(str, guard["details"]["seeds"])) == {"0", "1"} and guard["details"]["spread"] is not None
