"""The serve extension tables agree (one request schema, one loader, one set of endpoints per
servable task), every request schema accepts a valid body and rejects invalid ones, each loader
checks the run metadata it needs itself, and `honed.serve.schemas` stays light (issue 13)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from honed.errors import RecipeError
from honed.serve.loaders import LOADERS, load_run
from honed.serve.routes import ENDPOINTS
from honed.serve.schemas import MAX_INPUTS, MAX_NEW_TOKENS, MAX_TEXT_CHARS, REQUEST_SCHEMAS

HI = [{"role": "user", "content": "hi"}]

VALID = {
    "text-classification": {"inputs": [{"text": "great product"}, {"text": "broken"}], "model": "run-1"},
    "chat": {"messages": [{"role": "system", "content": "be brief"}, *HI], "max_tokens": 4, "temperature": 0.5},
}

INVALID = {
    "text-classification": {
        "missing field": {},
        "wrong type": {"inputs": [{"text": 3}]},
        "over-long input": {"inputs": [{"text": "x" * (MAX_TEXT_CHARS + 1)}]},
        "too many inputs": {"inputs": [{"text": "x"}] * (MAX_INPUTS + 1)},
        "no inputs": {"inputs": []},
        "unknown field": {"inputs": [{"text": "x"}], "temperature": 1},
        "unknown column": {"inputs": [{"review": "x"}]},
    },
    "chat": {
        "missing field": {"max_tokens": 4},
        "wrong type": {"messages": [{"role": "user", "content": ["hi"]}]},
        "over-long input": {"messages": [{"role": "user", "content": "x" * (MAX_TEXT_CHARS + 1)}]},
        "unknown role": {"messages": [{"role": "robot", "content": "hi"}]},
        "no messages": {"messages": []},
        "too many tokens": {"messages": HI, "max_tokens": MAX_NEW_TOKENS + 1},
        "unknown field": {"messages": HI, "tools": []},
    },
}
VALID["preference"], INVALID["preference"] = VALID["chat"], INVALID["chat"]  # served as a chat model


def test_tables_have_the_same_tasks():
    assert set(REQUEST_SCHEMAS) == set(LOADERS) == set(ENDPOINTS)
    assert set(VALID) == set(INVALID) == set(REQUEST_SCHEMAS)  # a new task brings its payloads here


@pytest.mark.parametrize("task", sorted(REQUEST_SCHEMAS))
def test_schema_accepts_a_valid_request(task):
    REQUEST_SCHEMAS[task].model_validate(VALID[task])
    REQUEST_SCHEMAS[task].model_validate_json(json.dumps(VALID[task]))  # as the server parses it


@pytest.mark.parametrize("task, case", [(task, case) for task in sorted(INVALID) for case in INVALID[task]])
def test_schema_rejects_an_invalid_request(task, case):
    with pytest.raises(ValidationError):
        REQUEST_SCHEMAS[task].model_validate_json(json.dumps(INVALID[task][case]))


def test_schemas_and_the_package_import_without_fastapi_or_torch():
    code = ("import sys, honed.serve, honed.serve.schemas; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def fake_run(tmp_path, meta) -> str:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "honed.json").write_text(json.dumps(meta))
    (tmp_path / "metrics.json").write_text("{}")
    return str(tmp_path)


@pytest.mark.parametrize("labels", [None, [], "neg,pos"])
def test_classifier_loader_needs_a_labels_list(tmp_path, labels):
    meta = {"task": "text-classification", "family": "hf"} | ({} if labels is None else {"labels": labels})
    with pytest.raises(RecipeError, match="has no 'labels' list; the run directory is damaged"):
        load_run(fake_run(tmp_path, meta))


def test_chat_loader_does_not_ask_for_labels(tmp_path):
    """A chat run has no labels: its loader goes on to the model (which this fake run lacks)."""
    with pytest.raises(RecipeError) as info:
        load_run(fake_run(tmp_path, {"task": "chat", "labels": []}))
    assert "labels" not in str(info.value)


def test_an_unservable_task_is_named(tmp_path):
    with pytest.raises(RecipeError, match="task 'forecasting' cannot be served yet; servable tasks: text-classification, chat, preference"):
        load_run(fake_run(tmp_path, {"task": "forecasting", "labels": []}))


def test_metadata_that_is_not_an_object_is_damaged(tmp_path):
    with pytest.raises(RecipeError, match="is not a JSON object; the run directory is damaged"):
        load_run(fake_run(tmp_path, ["labels"]))
