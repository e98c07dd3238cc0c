"""The overfitting guard judges the exported model, the best step's (honed/guards/overfit.py): what
happened after it is said in the summary, and warns only when the best step itself is over the gap."""

from __future__ import annotations

from honed.guards.overfit import overfitting_guard

# the demo's two runs (WordLlama full on the tweets; issue 19): train/validation loss and accuracy per evaluation
RANGE_TEST_RATE = [(107, 0.537, 0.393, 0.844, 0.830), (214, 0.360, 0.325, 0.908, 0.860), (321, 0.222, 0.322, 0.930, 0.853),
                   (428, 0.230, 0.319, 0.956, 0.852), (535, 0.137, 0.340, 0.967, 0.853)]
TABLE_RATE = [(107, 0.600, 0.469, 0.803, 0.785), (428, 0.294, 0.322, 0.916, 0.860), (749, 0.178, 0.314, 0.935, 0.865),
              (1070, 0.175, 0.312, 0.948, 0.860)]


def history(points):
    return [{"step": s, "train_loss": tl, "val_loss": vl, "train_accuracy": ta, "val_accuracy": va} for s, tl, vl, ta, va in points]


def test_the_exported_step_decides_and_what_came_after_it_is_said():
    later = overfitting_guard(history(RANGE_TEST_RATE), 214, "accuracy", 0.10)
    table = overfitting_guard(history(TABLE_RATE), 749, "accuracy", 0.10)
    assert later["details"]["gap"] < table["details"]["gap"], "the range-test run exports the smaller gap"
    assert later["status"] == table["status"] == "ok"
    assert later["details"]["rising_val_loss"] and later["details"]["final_gap"] > 0.10
    assert "After the best step 214 validation loss rose" in later["summary"] and "grew to 0.11 by the end" in later["summary"]
    assert "checkpoint was exported" in later["summary"]


def test_a_best_step_over_the_gap_still_warns_and_a_collapse_fails():
    over = [(10, 0.5, 0.7, 0.95, 0.70), (20, 0.2, 0.9, 0.99, 0.72)]
    guard = overfitting_guard(history(over), 20, "accuracy", 0.10)
    assert guard["status"] == "warn" and "at its best point it scores 0.27 higher" in guard["summary"].lower()
    assert overfitting_guard(history(over), 20, "accuracy", 0.10, test_predictions=[1, 1, 1], n_classes=2)["status"] == "fail"
