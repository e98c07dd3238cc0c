"""Forecasting: time-ordered windows, the metrics and seasonal naive, PatchTST/PatchTSMixer built
locally, an earlier run as the source model, and the CLI end to end (run, predict, report, check)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import honed
from helpers import cli, make_series
from honed.tasks.forecasting.data import load_forecast_splits, mase_scale, seasonal_naive
from honed.recipe import load_recipe
from honed.tasks.forecasting import model as fc


def spec(folder, file="train.csv", **extra) -> dict:
    base = {"task": "forecasting", "model": {"architecture": "patchtsmixer", "d_model": 16, "layers": 1},
            "data": {"train": str(folder / file), "context_length": 12, "horizon": 4},
            "train": {"epochs": 4, "precision": "fp32", "batch_size": 16}, "guards": {"baseline": False}, "out": str(folder / "run")}
    for key, value in extra.items():
        base[key] = dict(base[key], **value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


@pytest.fixture
def series_csv(tmp_path):
    make_series(["a", "b", "c"]).to_csv(tmp_path / "train.csv", index=False)
    return tmp_path


def test_splits_are_time_ordered(series_csv):
    """No training target at or after the first validation timestamp; test is the last horizon points."""
    recipe = load_recipe(spec(series_csv, **{"data": {"stride": 1}}))
    splits = load_forecast_splits(recipe)
    frame = pd.read_csv(series_csv / "train.csv", parse_dates=["time"])
    assert splits.season == 12 and recipe.data.season == 12  # monthly → 12, resolved and written back
    for series, group in frame.groupby("series"):
        val = splits.validation[splits.validation["series"] == series].iloc[0]
        test = splits.test[splits.test["series"] == series].iloc[0]
        first_val = pd.Timestamp(val["times"][0])
        assert list(pd.to_datetime(test["times"])) == list(group["time"].iloc[-4:])
        assert pd.Timestamp(val["times"][-1]) < pd.Timestamp(test["times"][0])
        train = splits.train[splits.train["series"] == series]
        last_target = max(pd.Timestamp(t) for times in train["times"] for t in times)
        assert last_target < first_val
        assert last_target == group["time"].iloc[-9]  # the last training window ends right before validation
        # each training window's inputs are the context_length points just before its targets
        window = train.iloc[0]
        start = group.index[group["time"] == pd.Timestamp(window["times"][0])][0] - group.index[0]
        assert np.allclose(window["past"][:, 0], group["target"].iloc[start - 12 : start].to_numpy())
    assert len(splits.train) == 3 * (60 - 8 - 12 - 4 + 1)


def test_metrics_and_seasonal_naive_by_hand():
    history = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
    assert seasonal_naive(history, 6, 4).tolist() == [5, 6, 7, 8, 5, 6]
    assert mase_scale(history, 4) == 4.0  # every value is 4 above the one a season earlier
    actual = torch.tensor([[10.0, 20.0]])
    split = fc.ForecastSplit(torch.zeros(1, 8, 1), actual, torch.tensor([2.0]), torch.zeros(1, 2))  # MASE scale 2
    m = fc.metrics(torch.tensor([[12.0, 16.0]]), split)
    assert m["mae"] == pytest.approx(3.0) and m["rmse"] == pytest.approx(np.sqrt(10))
    assert m["mase"] == pytest.approx(1.5) and m["neg_mase"] == pytest.approx(-1.5)
    assert m["smape"] == pytest.approx(np.mean([200 * 2 / 22, 200 * 4 / 36]))


def test_cli_run_predict_report_check(series_csv, capsys):
    import yaml

    path = series_csv / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec(series_csv, guards={"baseline": True})))
    code, out, err = cli(["check", path], capsys)
    assert code == 0 and "recipe ok" in out
    code, out, err = cli(["run", path], capsys)
    assert code == 0, err
    run = series_csv / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "forecasting" and metrics["primary_metric"] == "neg_mase"
    assert {"mae", "rmse", "mase", "smape"} <= set(metrics["test"]) <= set(metrics["seasonal_naive"]) | {"method"}
    baseline = metrics["guards"]["baseline"]
    assert baseline["details"]["seasonal_naive"] == metrics["seasonal_naive"] and baseline["details"]["scratch"]["mase"] > 0
    assert "seasonal" in baseline["summary"] and metrics["guards"]["bias"]["status"] == "skipped"
    assert metrics["guards"]["forgetting"]["details"]["cka"] is not None  # pooled encoder features of 3 validation windows
    preds = pd.read_csv(run / "predictions.csv")
    assert list(preds.columns[:4]) == ["series", "time", "prediction", "actual"] and len(preds) == 3 * 4
    frame = pd.read_csv(series_csv / "train.csv")
    last4 = frame.groupby("series").tail(4)
    assert np.allclose(preds.sort_values(["series", "time"])["actual"], last4.sort_values(["series", "time"])["target"], atol=1e-3)
    # the model reloads through its own library
    from transformers import PatchTSMixerForPrediction

    assert PatchTSMixerForPrediction.from_pretrained(run / "model").config.prediction_length == 4

    history = frame.groupby("series").head(30)  # history up to June 2020 → forecasts for July to October 2020
    history.to_csv(series_csv / "history.csv", index=False)
    code, out, err = cli(["predict", run, series_csv / "history.csv", "--out", series_csv / "future.csv"], capsys)
    assert code == 0, err
    future = pd.read_csv(series_csv / "future.csv")
    assert len(future) == 12 and set(future["series"]) == {"a", "b", "c"}
    assert future[future["series"] == "a"]["time"].str[:10].tolist() == ["2020-07-01", "2020-08-01", "2020-09-01", "2020-10-01"]
    assert future["prediction"].between(0, 300).all()

    history.groupby("series").head(5).to_csv(series_csv / "short.csv", index=False)
    code, out, err = cli(["predict", run, series_csv / "short.csv"], capsys)
    assert code == 3 and "series 'a'" in err and "context_length" in err

    (run / "report.html").unlink()
    code, out, err = cli(["report", run], capsys)
    html = (run / "report.html").read_text()
    assert code == 0 and "seasonal naive" in html and "mase" in html


def test_fine_tune_an_earlier_run_on_a_held_out_series(tmp_path):
    """A source model trained on four series, fine-tuned to a fifth; forgetting measured on the four."""
    frame = make_series(["a", "b", "c", "d", "e"], length=72, seed=1)
    frame[frame["series"] != "e"].to_csv(tmp_path / "source.csv", index=False)
    frame[frame["series"] == "e"].to_csv(tmp_path / "target.csv", index=False)
    source = honed.run(spec(tmp_path, "source.csv", model={"architecture": "patchtst", "d_model": 16, "layers": 1, "heads": 2},
                            out=str(tmp_path / "source")), show_progress=False)
    assert source.metrics["test"]["mase"] > 0
    tuned = honed.run(spec(tmp_path, "target.csv", model=str(tmp_path / "source"), method="lp-ft",
                           reference={"data": str(tmp_path / "source.csv")}, out=str(tmp_path / "tuned")), show_progress=False)
    forgetting = tuned.metrics["guards"]["forgetting"]["details"]
    assert forgetting["reference"] == "source.csv" and forgetting["retention"] > 0 and forgetting["cka"] is not None
    assert forgetting["original_metric_before"] > 0  # the source model's MASE on its own series, before fine-tuning
    assert tuned.metrics["pretrained"]["method"].startswith("the source model")
    assert len(pd.read_csv(tuned.run_dir / "predictions.csv")) == 4

    # another horizon than the source was built for: refused before training, naming both
    with pytest.raises(honed.RecipeError, match=r"data.horizon: 4 in the source, 6 here"):
        honed.run(spec(tmp_path, "target.csv", model=str(tmp_path / "source"), data={"horizon": 6}, out=str(tmp_path / "x")),
                  show_progress=False)
    assert not (tmp_path / "x").exists()


def test_patchtst_checkpoint_folder(tmp_path):
    """A PatchTST checkpoint saved with save_pretrained (safetensors) is a source model like a Hub id."""
    from transformers import PatchTSTConfig, PatchTSTForPrediction

    config = PatchTSTConfig(num_input_channels=2, context_length=12, prediction_length=4, patch_length=4, patch_stride=4,
                            d_model=16, num_attention_heads=2, num_hidden_layers=1, ffn_dim=32)
    PatchTSTForPrediction(config).save_pretrained(tmp_path / "ckpt")
    frame = make_series(["a", "b"], seed=2)
    frame["temperature"] = np.sin(np.arange(len(frame)))  # a covariate: a second input channel
    frame.to_csv(tmp_path / "train.csv", index=False)
    result = honed.run(spec(tmp_path, model=str(tmp_path / "ckpt"), data={"covariates": ["temperature"]}), show_progress=False)
    assert result.metrics["test"]["mase"] > 0
    with pytest.raises(honed.RecipeError, match="channels"):
        honed.run(spec(tmp_path, model=str(tmp_path / "ckpt"), out=str(tmp_path / "y")), show_progress=False)
