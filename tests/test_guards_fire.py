"""Every guard must be shown to fire: a case where it says warn/fail and one where it says ok,
through the whole pipeline (the guard math has its own unit tests under tests/guards)."""

from __future__ import annotations

import random

import pandas as pd
import pytest

import honed
from helpers import NEUTRAL, make_texts, topic_texts, write_recipe

FAST = {"train.precision": "fp32", "guards.baseline": False, "train.eval_every": 12}


def run(tmp_path, name, model, train_csv, **changes):
    folder = tmp_path / name
    folder.mkdir()
    recipe = write_recipe(folder, model, train_csv, **{**FAST, **changes})
    return honed.run(str(recipe), show_progress=False).metrics


def csv(tmp_path, name, frame) -> str:
    path = tmp_path / f"{name}.csv"
    frame.to_csv(path, index=False)
    return str(path)


# --------------------------------------------------------------------------- overfitting

def random_word_texts(n: int, seed: int) -> pd.DataFrame:
    """Texts of rare made-up words with coin-flip labels: only memorisation can fit them."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(3)) for _ in range(3000)]
    return pd.DataFrame({"text": [" ".join(rng.choice(vocab) for _ in range(8)) for _ in range(n)],
                         "label": [rng.choice(["pos", "neg"]) for _ in range(n)]})


def test_overfitting_warns_when_a_model_memorises_noise_and_not_on_clean_data(tmp_path):
    noisy = csv(tmp_path, "noisy", random_word_texts(300, seed=5))
    over = run(tmp_path, "over", "wordllama", noisy, **{"train.epochs": 15, "train.lr": 0.02, "train.patience": None, "train.eval_every": 16})
    guard = over["guards"]["overfitting"]
    assert guard["status"] in {"warn", "fail"}, guard
    assert guard["details"]["final_gap"] > 0.2

    clean = csv(tmp_path, "clean", make_texts(300, seed=5, signal=1.0))
    fine = run(tmp_path, "fine", "wordllama", clean, **{"train.epochs": 4, "train.lr": 0.01, "train.patience": 3, "train.eval_every": 8})
    assert fine["guards"]["overfitting"]["status"] == "ok", fine["guards"]["overfitting"]


def test_seed_spread_is_reported(tmp_path, tiny_bert):
    data = csv(tmp_path, "d", make_texts(240, seed=2))
    metrics = run(tmp_path, "seeds", tiny_bert, data, method="head", **{"train.seeds": [0, 1, 2]})
    details = metrics["guards"]["overfitting"]["details"]
    assert set(details["seeds"]) == {"0", "1", "2"} and details["spread"] is not None


# --------------------------------------------------------------------------- forgetting

@pytest.fixture(scope="module")
def source_run(tmp_path_factory, tiny_bert_module):
    """A 'pre-trained' model: honed fine-tunes the tiny BERT on sentiment; that run is the source."""
    folder = tmp_path_factory.mktemp("source")
    data = csv(folder, "sentiment", make_texts(300, seed=11))
    recipe = write_recipe(folder, tiny_bert_module, data, **{**FAST, "train.epochs": 6, "train.lr": 3e-3})
    return honed.run(str(recipe), show_progress=False).run_dir, data


@pytest.fixture(scope="module")
def tiny_bert_module(tmp_path_factory):
    from helpers import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("bert-module"))


def test_forgetting_fails_without_mitigation_and_l2sp_retains_more(tmp_path, source_run):
    source, sentiment = source_run
    topics = csv(tmp_path, "topics", topic_texts(240, seed=3))
    shift = {"reference": {"data": sentiment, "text": "text", "label": "label"}, "train.epochs": 8, "train.lr": 1e-2,
             "guards.forgetting.floor": 0.95}
    plain = run(tmp_path, "plain", source, topics, **shift)
    guarded = run(tmp_path, "l2sp", source, topics, **shift, l2sp={"alpha": 5.0, "beta": 0.0})
    r_plain = plain["guards"]["forgetting"]["details"]["retention"]
    r_l2sp = guarded["guards"]["forgetting"]["details"]["retention"]
    assert plain["guards"]["forgetting"]["status"] in {"warn", "fail"}, plain["guards"]["forgetting"]
    assert r_l2sp > r_plain + 0.05, (r_plain, r_l2sp)
    assert guarded["guards"]["forgetting"]["details"]["cka"] > plain["guards"]["forgetting"]["details"]["cka"]


def test_interpolation_sweeps_alpha_and_keeps_retention_above_the_floor(tmp_path, source_run):
    source, sentiment = source_run
    topics = csv(tmp_path, "topics", topic_texts(240, seed=3))
    metrics = run(tmp_path, "wise", source, topics, interpolate=True, reference={"data": sentiment, "text": "text", "label": "label"},
                  **{"train.epochs": 8, "train.lr": 1e-2, "guards.forgetting.floor": 0.9})
    details = metrics["guards"]["forgetting"]["details"]
    assert [p["alpha"] for p in details["interpolation"]] == [round(0.1 * i, 1) for i in range(11)]
    assert details["interpolation"][0]["retention"] == pytest.approx(1.0, abs=1e-6)  # α = 0 is the source model
    chosen = next(p for p in details["interpolation"] if p["alpha"] == details["chosen_alpha"])
    assert chosen["retention"] >= 0.9 or chosen["retention"] == max(p["retention"] for p in details["interpolation"])


def test_replay_needs_labels_on_the_reference(tmp_path, source_run):
    source, sentiment = source_run
    topics = csv(tmp_path, "topics", topic_texts(120, seed=4))
    folder = tmp_path / "r"
    folder.mkdir()
    recipe = write_recipe(folder, source, topics, replay={"fraction": 0.5}, reference={"data": sentiment, "text": "text"})
    with pytest.raises(honed.RecipeError, match="replay"):
        honed.run(str(recipe), show_progress=False)


def test_replay_retains_more_than_plain_fine_tuning(tmp_path, source_run):
    source, sentiment = source_run
    topics = csv(tmp_path, "topics", topic_texts(240, seed=3))
    reference = {"data": sentiment, "text": "text", "label": "label"}
    common = {"reference": reference, "train.epochs": 8, "train.lr": 1e-2}
    plain = run(tmp_path, "plain", source, topics, **common)
    replayed = run(tmp_path, "replay", source, topics, replay={"fraction": 0.5, "weight": 1.0}, **common)
    assert replayed["guards"]["forgetting"]["details"]["retention"] > plain["guards"]["forgetting"]["details"]["retention"] + 0.05


def test_without_reference_drift_is_measured_on_validation_inputs(tmp_path, tiny_bert):
    data = csv(tmp_path, "d", make_texts(200, seed=8))
    guard = run(tmp_path, "noref", tiny_bert, data)["guards"]["forgetting"]
    assert guard["details"]["cka"] is not None and "validation" in guard["summary"]


# --------------------------------------------------------------------------- data sufficiency

def test_data_guard_runs_the_curve_and_warns_on_thin_classes(tmp_path, tiny_bert):
    data = csv(tmp_path, "d", make_texts(240, seed=9))
    # guards.budget: null — the curve at its five configured fractions (tests/test_guard_budget.py checks the budget's cut)
    metrics = run(tmp_path, "curve", tiny_bert, data, method="head",
                  **{"guards.data_curve": True, "guards.min_per_class": 500, "guards.budget": None})
    guard = metrics["guards"]["data"]
    assert guard["status"] == "warn", guard
    assert set(guard["details"]["small_classes"]) == {"pos", "neg"}, guard["details"]
    details = guard["details"]
    assert details["fractions"] == [0.1, 0.2, 0.4, 0.7, 1.0]
    assert details["n"] == sorted(details["n"]) and len(set(details["n"])) == 5
    assert {"a", "b", "c"} <= set(details["fit"]) and "backtest_error" in details


# --------------------------------------------------------------------------- bias

def grouped_texts(n: int, seed: int, south_signal: float) -> pd.DataFrame:
    north = make_texts(n // 2, seed=seed, signal=1.0).assign(region="north")
    south = make_texts(n // 2, seed=seed + 1, signal=south_signal).assign(region="south")
    return pd.concat([north, south], ignore_index=True)


def test_bias_warns_when_one_group_gets_a_worse_model_and_not_otherwise(tmp_path):
    skewed = csv(tmp_path, "skewed", grouped_texts(400, seed=1, south_signal=0.0))
    fair = csv(tmp_path, "fair", grouped_texts(400, seed=1, south_signal=1.0))
    changes = {"data.groups": ["region"], "train.epochs": 4, "train.lr": 0.01, "guards.min_group_size": 5, "train.eval_every": 10}
    unfair = run(tmp_path, "unfair", "wordllama", skewed, **changes)["guards"]["bias"]
    even = run(tmp_path, "even", "wordllama", fair, **changes)["guards"]["bias"]
    assert unfair["status"] == "warn", unfair
    assert even["status"] == "ok", even
    assert set(unfair["details"]["groups"]["region"]) == {"north", "south"}
    assert unfair["details"]["before"] is not None


# --------------------------------------------------------------------------- baseline

SYNONYMS_TRAIN = (["great", "love", "happy", "good"], ["awful", "hate", "sad", "bad"])
SYNONYMS_TEST = (["excellent", "wonderful", "fantastic", "delighted"], ["terrible", "horrible", "miserable", "dreadful"])


def synonym_texts(n: int, seed: int, cues) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(cues[0] if label == "pos" else cues[1]))
        rows.append({"text": " ".join(words), "label": label})
    return pd.DataFrame(rows)


def test_baseline_shows_what_pretraining_bought(tmp_path):
    """Test words never seen in training: pre-trained embeddings know they are synonyms, scratch cannot."""
    train = csv(tmp_path, "train", synonym_texts(200, 1, SYNONYMS_TRAIN))
    val = csv(tmp_path, "val", synonym_texts(60, 2, SYNONYMS_TRAIN))
    test = csv(tmp_path, "test", synonym_texts(100, 3, SYNONYMS_TEST))
    changes = {"data.validation": val, "data.test": test, "guards.baseline": True, "train.epochs": 5, "train.lr": 0.01}
    metrics = run(tmp_path, "syn", "wordllama", train, method="head", **changes)
    guard = metrics["guards"]["baseline"]
    assert guard["status"] == "ok", guard
    assert guard["details"]["scratch"] < metrics["test"]["accuracy"] - 0.1

    easy = csv(tmp_path, "easy", synonym_texts(300, 1, SYNONYMS_TRAIN))
    same = run(tmp_path, "easy", "wordllama", easy, **{"guards.baseline": True, "train.epochs": 5, "train.lr": 0.01})
    assert same["guards"]["baseline"]["status"] == "warn", same["guards"]["baseline"]


def test_baseline_warns_when_fine_tuning_ends_below_the_linear_probe(tmp_path):
    """A fine-tune with a far too small step leaves the new head near chance, below the probe on the same features."""
    data = csv(tmp_path, "d", make_texts(300, seed=12))
    metrics = run(tmp_path, "stalled", "wordllama", data, method="full",
                  **{"train.lr": 1e-8, "train.epochs": 1, "guards.baseline": False})
    guard = metrics["guards"]["baseline"]
    assert metrics["test"]["accuracy"] < metrics["pretrained"]["accuracy"] - 0.01
    assert guard["status"] == "warn" and "linear probe on the frozen pre-trained features" in guard["summary"], guard
