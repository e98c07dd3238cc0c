"""Forecasting's model side: windows as tensors, the scaled loss, forecasts, MAE/RMSE/MASE/sMAPE,
the seasonal-naive baseline, pooled encoder features, predictions.csv and `honed predict`.

A split holds each window's past, its actual future and its series' MASE scale; `metrics`
takes the split, so MASE is computed with the scale of every window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from torch import nn

from ...data.batching import shuffled_plan
from ...data.load import read_table
from ...errors import DataError
from ...models.capture import head_inputs
from ...models.load import load_saved
from ...train.loop import Batches
from ...train.precision import autocast
from .data import check_long_frame, make_window, mase_scale, series_arrays, series_freq

PRIMARY = "neg_mase"  # the loop maximises val_<primary>; MASE is lower-is-better, so its negative


@dataclass
class ForecastSplit:
    past: torch.Tensor  # windows × context_length × channels (the target first)
    future: torch.Tensor  # windows × horizon: the actual future values
    scale: torch.Tensor  # windows: the series' in-sample seasonal-naive MAE (MASE's denominator)
    naive: torch.Tensor  # windows × horizon: the seasonal-naive forecast

    def __len__(self) -> int:
        return len(self.past)


def encode(bundle, frame: pd.DataFrame, labels, recipe) -> ForecastSplit:
    horizon = recipe.data.horizon
    if len(frame) == 0:
        channels = 1 + len(recipe.data.covariates)
        return ForecastSplit(torch.zeros(0, recipe.data.context_length, channels), torch.zeros(0, horizon), torch.zeros(0), torch.zeros(0, horizon))
    past = torch.tensor(np.stack(frame["past"].to_list()), dtype=torch.float32)
    future = torch.tensor(np.stack(frame["future"].to_list()), dtype=torch.float32)
    scale = torch.tensor(frame["scale"].to_numpy(dtype=float), dtype=torch.float32)
    naive = torch.tensor(np.stack(frame["naive"].to_list()), dtype=torch.float32)
    return ForecastSplit(past, future, scale, naive)


def subset(split: ForecastSplit, idx: torch.Tensor) -> ForecastSplit:
    return ForecastSplit(split.past[idx], split.future[idx], split.scale[idx], split.naive[idx])


def collate(split: ForecastSplit, indices, pad_id: int = 0) -> dict:
    idx = torch.as_tensor(indices, dtype=torch.long)
    return {"past_values": split.past[idx], "future": split.future[idx], "scale": split.scale[idx]}


def batches(split: ForecastSplit, recipe, seed: int, pad_id: int = 0) -> Batches:
    return Batches(size=len(split), plan=shuffled_plan(len(split), recipe.train.batch_size, seed), collate=lambda idx: collate(split, idx))


def forecast(model: nn.Module, past_values: torch.Tensor) -> torch.Tensor:
    """The target channel's forecast (windows × horizon), in the data's units (the model undoes its own scaling)."""
    return model(past_values=past_values).prediction_outputs[..., 0]


def hold_frozen_norms(model: nn.Module) -> None:
    """Batch norms whose weights are frozen (head, freeze, lora) run in eval mode: in training mode
    they would still update their running statistics, and a frozen layer must not change."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()


def loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """MSE in units of each series' MASE scale, so a large series does not drown the small ones."""
    hold_frozen_norms(model)  # the loop puts the whole model back in training mode after each evaluation
    pred = forecast(model, batch["past_values"]).float()
    return (((pred - batch["future"]) / batch["scale"][:, None]) ** 2).mean()


@torch.no_grad()
def predict(model: nn.Module, split: ForecastSplit, pad_id: int, batch_size: int, precision: str, device) -> torch.Tensor:
    was = model.training
    model.eval()
    chunks = []
    step = max(batch_size, 256)
    for start in range(0, len(split), step):
        with autocast(precision, device):
            chunks.append(forecast(model, split.past[start : start + step].to(device)).float().cpu())
    model.train(was)
    return torch.cat(chunks) if chunks else torch.zeros(0, split.future.shape[1])


@torch.no_grad()
def features(bundle, model: nn.Module, split: ForecastSplit, batch_size: int, precision: str, device) -> torch.Tensor:
    """The encoder's output at the head's input, averaged over patches: windows × (channels · d_model)."""
    d_model = model.config.d_model
    # the head's input is (windows, channels, patches · d_model); pool the patches so the width does not depend on them
    pool = lambda x: x.float().cpu().reshape(len(x), x.shape[1], -1, d_model).mean(2).flatten(1)  # noqa: E731
    with head_inputs(model, bundle.head_name, pool) as captured:
        predict(model, split, 0, batch_size, precision, device)
    return torch.cat(captured) if captured else torch.zeros(0)


def metrics(pred: torch.Tensor, split: ForecastSplit) -> dict:
    """MAE, RMSE, MASE (each window's MAE over its series' in-sample seasonal-naive MAE), sMAPE (%, 0–200)."""
    p, y, s = pred.double().numpy(), split.future.double().numpy(), split.scale.double().numpy()
    err = p - y
    denom = np.abs(p) + np.abs(y)
    smape = np.where(denom > 0, 200.0 * np.abs(err) / np.where(denom > 0, denom, 1.0), 0.0)
    mase = float(np.mean(np.abs(err).mean(1) / s)) if len(y) else float("nan")
    return {"loss": float(np.mean((err / s[:, None]) ** 2)) if len(y) else float("nan"), "mae": float(np.mean(np.abs(err))),
            "rmse": float(np.sqrt(np.mean(err**2))), "mase": mase, "smape": float(np.mean(smape)), PRIMARY: -mase}


def seasonal_naive_metrics(split: ForecastSplit) -> dict:
    """The seasonal-naive forecast (the last season repeated) scored on the same windows."""
    return metrics(split.naive, split)


def write_predictions(path: Path, frame: pd.DataFrame, pred: torch.Tensor, naive: torch.Tensor | None = None) -> None:
    """One row per series and forecasted timestamp: series, time, prediction, actual (and the seasonal-naive forecast)."""
    rows = []
    for i, row in enumerate(frame.itertuples(index=False)):
        for k, t in enumerate(row.times):
            record = {"series": row.series, "time": pd.Timestamp(t).isoformat(), "prediction": float(pred[i, k]), "actual": float(row.future[k])}
            if naive is not None:
                record["seasonal_naive"] = float(naive[i, k])
            rows.append(record)
    pd.DataFrame(rows).to_csv(path, index=False)


def reference_windows(frame: pd.DataFrame, spec, season: int, horizon: int, max_per_series: int = 8) -> pd.DataFrame:
    """Windows from a reference set's series (the source model's world): the latest `max_per_series`
    non-overlapping windows of each, scored with MASE before and after fine-tuning."""
    ctx, rows = spec.context_length, []
    for series, (times, values) in series_arrays(frame, spec.covariates).items():
        if len(values) < ctx + horizon:
            raise DataError(f"reference.data: series '{series}' has {len(values)} points; a reference window needs "
                            f"context_length + horizon = {ctx + horizon}")
        scale = mase_scale(values[:, 0], season)
        starts = list(range(len(values) - horizon, ctx - 1, -horizon))[:max_per_series]
        rows += [{"series": series, **make_window(values, t, ctx, horizon, season, scale, times)} for t in reversed(starts)]
    return pd.DataFrame(rows)


def future_times(times: pd.Series, horizon: int, freq: str | None, series: str) -> list[pd.Timestamp]:
    """The next `horizon` timestamps after a series' history, at its own frequency (inferred, else the run's)."""
    step = series_freq(times) or freq
    if step is None:
        raise DataError(f"INPUT: series '{series}' has no regular time step (pandas.infer_freq found none); "
                        "give at least three evenly spaced timestamps")
    return list(pd.date_range(pd.Timestamp(times.iloc[-1]), periods=horizon + 1, freq=step)[1:])


def predict_future(model_dir: Path, meta: dict, input_path: Path, precision: str, dev) -> pd.DataFrame:
    """`honed predict` for a forecasting run: given history in long format, forecast the next
    `horizon` values of each series, with their timestamps."""
    spec = SimpleNamespace(series=meta["series_column"], time=meta["time_column"], target=meta["target_column"],
                           covariates=meta.get("covariates", []))
    frame = check_long_frame(read_table(input_path, "INPUT"), spec, input_path.name, where="INPUT")
    frame = frame.reset_index(drop=True)
    ctx, horizon = int(meta["context_length"]), int(meta["horizon"])
    pasts, stamps, names = [], [], []
    for series, group in frame.groupby("series", sort=False):
        if len(group) < ctx:
            raise DataError(f"INPUT: series '{series}' in {input_path.name} has {len(group)} points; the model reads the last "
                            f"{ctx} (context_length); give at least {ctx} points of history")
        values = group[["target", *spec.covariates]].to_numpy(dtype=np.float32)[-ctx:]
        pasts.append(values)
        stamps.append(future_times(group["time"], horizon, meta.get("freq"), series))
        names.append(series)
    bundle = load_saved(model_dir)
    split = ForecastSplit(torch.tensor(np.stack(pasts)), torch.zeros(len(pasts), horizon), torch.zeros(len(pasts)), torch.zeros(len(pasts), horizon))
    pred = predict(bundle.model.to(dev), split, 0, 256, precision, dev).numpy()
    rows = [{"series": s, "time": t.isoformat(), "prediction": float(pred[i, k])}
            for i, (s, ts) in enumerate(zip(names, stamps)) for k, t in enumerate(ts)]
    return pd.DataFrame(rows)
