"""The export guard: every task's normal export passes (the golden runs), and an export whose
weights were corrupted, or whose tokenizer encodes differently, fails with the figure."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from honed.checks.export import export_guard
from honed.models.load import save_model
from honed.session import prepare, setup

CASES = ["text_full", "text_lora", "image_full", "tabular_classification", "tabular_regression", "forecast_patchtst",
         "chat_lora", "preference_lora"]


@pytest.mark.parametrize("name", CASES)
def test_every_tasks_export_passes(name, golden_run):
    _, metrics, run_dir, _ = golden_run(name)
    guard = metrics["guards"]["export"]
    assert guard["status"] == "ok", guard["summary"]
    assert guard["details"]["inputs_match"] and guard["details"]["rows"] > 0
    assert guard["details"]["max_abs_diff"] <= guard["details"]["tolerance"] * guard["details"]["scale"]
    report = (run_dir / "report.html").read_text()
    assert "Export" in report


@pytest.fixture(scope="module")
def text_session(golden_run):
    recipe, _, _, _ = golden_run("text_full")
    resolved, splits = prepare(recipe)
    return setup(resolved, splits)


def test_corrupted_weights_fail(text_session, tmp_path):
    s = text_session
    save_model(s.bundle, s.bundle.model, tmp_path / "model", {"task": "text-classification", "precision": "fp32"})
    assert export_guard(s, s.bundle.model, tmp_path)["status"] == "ok"
    weights = tmp_path / "model" / "model.safetensors"
    state = load_file(str(weights))
    head = next(k for k in state if k.startswith("classifier.") and k.endswith("weight"))
    state[head] = -state[head]  # a sign error in the saved head: what a broken merge or conversion does
    save_file(state, str(weights), metadata={"format": "pt"})
    guard = export_guard(s, s.bundle.model, tmp_path)
    assert guard["status"] == "fail" and "differ from the trained model's" in guard["summary"]
    assert "different labels" in guard["summary"] and guard["details"]["prediction_agreement"] < 1


def test_a_tokenizer_that_encodes_differently_fails(text_session, tmp_path):
    """A vocabulary saved in another order (a tokenizer rebuilt or retrained on export) maps the same words to other ids."""
    s = text_session
    save_model(s.bundle, s.bundle.model, tmp_path / "model", {"task": "text-classification", "precision": "fp32"})
    path = tmp_path / "model" / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    words = [w for w, i in sorted(vocab.items(), key=lambda kv: kv[1]) if not w.startswith("[") and not w.startswith("##")]
    ids = [vocab[w] for w in words]
    vocab.update(dict(zip(words, reversed(ids))))
    path.write_text(json.dumps(spec))
    guard = export_guard(s, s.bundle.model, tmp_path)
    assert guard["status"] == "fail" and "encodes the validation inputs differently" in guard["summary"]
    assert "flat" in guard["details"]["differing_inputs"]


def test_a_missing_model_fails(text_session, tmp_path):
    guard = export_guard(text_session, text_session.bundle.model, tmp_path)
    assert guard["status"] == "fail" and "does not load back" in guard["summary"]


