"""Tabular classification and regression on real data that ships with scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer

import honed
from honed.cli import main


@pytest.fixture(scope="module")
def cancer(tmp_path_factory):
    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    frame["hospital"] = np.where(np.arange(len(frame)) % 3 == 0, "north", "south")
    folder = tmp_path_factory.mktemp("cancer")
    frame.to_csv(folder / "all.csv", index=False)
    return folder, [c for c in frame.columns if c not in ("target", "hospital")]


def recipe(folder, features, **extra):
    base = {"task": "tabular-classification", "model": {"architecture": "mlp", "hidden": 32},
            "data": {"train": str(folder / "all.csv"), "features": features, "label": "target"},
            "train": {"epochs": 40, "lr": 3e-3, "precision": "fp32"}, "guards": {"baseline": False}}
    for key, value in extra.items():
        base[key] = value
    return base


def test_scratch_mlp_then_fine_tune_the_run(cancer, tmp_path):
    folder, features = cancer
    source = honed.run(recipe(folder, features, out=str(tmp_path / "source")), show_progress=False)
    assert source.metrics["test"]["accuracy"] > 0.9 and "roc_auc" in source.metrics["test"]
    tuned = honed.run(recipe(folder, features, model=str(tmp_path / "source"), method="lp-ft", out=str(tmp_path / "tuned")),
                      show_progress=False)
    assert tuned.metrics["test"]["accuracy"] > 0.9
    assert tuned.metrics["guards"]["forgetting"]["details"]["cka"] is not None
    preds = honed.predict(tuned.run_dir, folder / "all.csv")
    assert (preds["prediction"] == preds["target"].astype(str)).mean() > 0.9


def test_regression_reports_rmse_mae_r2(cancer, tmp_path):
    folder, features = cancer
    spec = recipe(folder, features[1:], task="tabular-regression", out=str(tmp_path / "reg"))
    spec["data"] = dict(spec["data"], label="mean_radius")
    metrics = honed.run(spec, show_progress=False).metrics
    assert metrics["primary_metric"] == "r2" and metrics["test"]["r2"] > 0.8
    assert {"rmse", "mae"} <= set(metrics["test"]) and metrics["majority"]["r2"] < 0.1


def test_schema_mismatch_names_the_columns(cancer, tmp_path, capsys):
    folder, features = cancer
    honed.run(recipe(folder, features, out=str(tmp_path / "source")), show_progress=False)
    import yaml

    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(recipe(folder, features[:-1] + ["hospital"], model=str(tmp_path / "source"), out=str(tmp_path / "x"))))
    with pytest.raises(SystemExit) as exc:
        main(["run", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and features[-1] in err and "hospital" in err


def test_missing_and_infinite_values_are_imputed_and_reported(cancer, tmp_path, capsys):
    folder, features = cancer
    frame = pd.read_csv(folder / "all.csv")
    frame.loc[:40, "mean_area"] = np.nan
    frame.loc[41:45, "mean_texture"] = np.inf
    frame.to_csv(tmp_path / "holes.csv", index=False)
    spec = recipe(tmp_path, features, out=str(tmp_path / "holes"))
    spec["data"] = dict(spec["data"], train=str(tmp_path / "holes.csv"))
    result = honed.run(spec, show_progress=False)
    audit = json.loads((result.run_dir / "audit.json").read_text())
    codes = {f["code"] for f in audit["findings"]}
    assert "missing_values" in codes and "infinite_values" in codes
    frame.drop(columns=["mean_area"]).to_csv(tmp_path / "no_area.csv", index=False)
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(result.run_dir), str(tmp_path / "no_area.csv")])
    assert exc.value.code == 3 and "mean_area" in capsys.readouterr().err


def test_bias_guard_on_a_group_column(cancer, tmp_path):
    folder, features = cancer
    spec = recipe(folder, features, out=str(tmp_path / "groups"))
    spec["data"] = dict(spec["data"], groups=["hospital"])
    guard = honed.run(spec, show_progress=False).metrics["guards"]["bias"]
    assert guard["status"] in {"ok", "warn"} and set(guard["details"]["groups"]["hospital"]) == {"north", "south"}
