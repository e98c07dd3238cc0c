"""Shared fixtures of the UI tests: a --files folder (scikit-learn's breast-cancer table and a
recipe: the tabular MLP, the fastest honed run) and a --runs folder holding two finished runs that
differ in two recipe keys, made once per session with the public `honed.run`, and one `honed tune`
study of two trials (the API tests only)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

FEATURES = ["mean_radius", "mean_texture", "mean_perimeter", "mean_area", "mean_smoothness", "worst_radius", "worst_texture"]


def tabular_recipe(data: Path, **train) -> dict:
    """The tabular MLP on the breast-cancer table, pinned as the goldens pin it (fp32, one thread, seed 0)."""
    return {"task": "tabular-classification", "model": {"architecture": "mlp", "hidden": 32},
            "data": {"train": str(data), "features": FEATURES, "label": "target"},
            "train": {"precision": "fp32", "threads": 1, "seed": 0, "patience": None, "epochs": 6, "lr": 3e-3,
                      "batch_size": 64, "eval_every": 4, **train},
            "guards": {"baseline": False}}


@pytest.fixture(scope="session")
def ui_files(tmp_path_factory) -> Path:
    """--files: all.csv (569 rows) and recipe.yaml (the tabular MLP)."""
    from sklearn.datasets import load_breast_cancer

    folder = tmp_path_factory.mktemp("ui-files")
    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    frame[FEATURES + ["target"]].to_csv(folder / "all.csv", index=False)
    recipe = tabular_recipe(Path("all.csv"))
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory, ui_files) -> Path:
    """A folder with two finished runs, `mlp-a` and `mlp-b` (hidden 32 vs 16, lr 3e-3 vs 1e-2)."""
    import honed

    root = tmp_path_factory.mktemp("ui-runs-finished")
    honed.run(tabular_recipe(ui_files / "all.csv"), out=root / "mlp-a", show_progress=False)
    other = tabular_recipe(ui_files / "all.csv", lr=1e-2)
    other["model"]["hidden"] = 16
    honed.run(other, out=root / "mlp-b", show_progress=False)
    return root


@pytest.fixture(scope="session")
def tune_study(tmp_path_factory, ui_files) -> Path:
    """A `honed tune` study of two trials of the tabular recipe (no final run of the best)."""
    from honed.tune import tune

    folder = tmp_path_factory.mktemp("ui-study")
    study = tabular_recipe(ui_files / "all.csv", epochs=2)
    study["tune"] = {"space": {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True}}}
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    tune(str(folder / "study.yaml"), trials=2, out=folder / "study-tune", show_progress=False, final_run=False)
    return folder / "study-tune"


@pytest.fixture
def runs_root(tmp_path, finished_runs, tune_study) -> Path:
    """A fresh copy of the finished runs and the study for one test (a test may add or stop runs in it)."""
    root = tmp_path / "runs"
    shutil.copytree(finished_runs, root, symlinks=True)
    shutil.copytree(tune_study, root / "study-tune", symlinks=True)
    return root
