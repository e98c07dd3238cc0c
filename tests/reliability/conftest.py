"""Session fixtures for the reliability tests: one data set, one recipe, and one uninterrupted
reference run (a subprocess started when first asked for, so it overlaps with other work)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_texts, write_recipe
from reliability.harness import RECIPE, Honed


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, tiny_bert) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    make_texts(240, seed=1).to_csv(root / "train.csv", index=False)
    write_recipe(root, tiny_bert, root / "train.csv", **RECIPE)
    return root


@pytest.fixture(scope="session")
def recipe(workspace) -> Path:
    return workspace / "recipe.yaml"


class Reference:
    """The uninterrupted run, seed 0, fp32, in its own process; `path()` waits for it."""

    def __init__(self, recipe: Path, out: Path):
        self.out = out
        self.proc = Honed("run", recipe, "--out", out)

    def path(self) -> Path:
        code = self.proc.wait(600)
        assert code == 0, self.proc.stderr[-3000:]
        return self.out


@pytest.fixture(scope="session")
def reference(recipe, workspace) -> Reference:
    ref = Reference(recipe, workspace / "reference")
    yield ref
    if ref.proc.alive():
        ref.proc.kill()
