"""Shared fixtures; the builders live in helpers.py so tests can import them."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import build_tiny_bert, make_texts, write_recipe


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def text_csv(tmp_path) -> Path:
    path = tmp_path / "train.csv"
    make_texts(240, seed=1).to_csv(path, index=False)
    return path


@pytest.fixture
def recipe_factory(tmp_path, tiny_bert, text_csv):
    def make(**changes) -> Path:
        return write_recipe(tmp_path, tiny_bert, text_csv, **changes)

    return make


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory):
    """Each golden run (tests/golden/runs.py), run once per session and shared by the golden and the
    task-contract tests: name -> (recipe, metrics, run_dir, folder the run was made in)."""
    import honed
    from golden import runs

    runs.use_shared_root(tmp_path_factory.mktemp("golden-shared"))
    done = {}

    def get(name: str):
        if name not in done:
            folder = tmp_path_factory.mktemp(name)
            recipe = runs.GOLDEN_RUNS[name](folder)
            result = honed.run(recipe, out=folder / "run", show_progress=False)
            done[name] = (recipe, result.metrics, Path(result.run_dir), folder)
        return done[name]

    return get
