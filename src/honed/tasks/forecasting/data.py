"""Forecasting data: long format (one row per series and time), checked, then cut into
time-ordered windows.

Per series, the test window is the last `horizon` points, the validation window the `horizon`
points before it, and training windows (context + horizon, every `stride` points) use only
the points before the validation window: no training target is ever at or after the first
validation timestamp. The test window's context includes the validation period (it is the
history a forecaster would have at that moment).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ...data.sources import read_frame, source_name
from ...errors import DataError, RecipeError

# pandas frequency prefix → seasonal period, for `data.season: auto`
SEASON_BY_FREQ = {"Q": 4, "BQ": 4, "M": 12, "MS": 12, "ME": 12, "BM": 12, "BMS": 12, "W": 52, "D": 7, "B": 5, "h": 24, "H": 24}
EPS = 1e-8


@dataclass
class ForecastSplits:
    """Windows per split, one row per window, plus the checked long frame they were cut from."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    frame: pd.DataFrame  # the checked long frame, sorted by series then time
    season: int
    freq: dict[str, str | None]  # series → inferred pandas frequency (None when irregular)
    labels: None = None  # the classes, as every task's splits name them: forecasting has none
    notes: list[dict] = field(default_factory=list)


def _lines(index) -> str:
    """File line numbers of frame rows (the header is line 1)."""
    shown = [str(int(i) + 2) for i in list(index)[:5]]
    return ", ".join(shown) + (", ..." if len(index) > 5 else "")


def check_long_frame(frame: pd.DataFrame, spec, name: str, where: str = "data.train", need_target: bool = True) -> pd.DataFrame:
    """Columns present, timestamps parse, target and covariates numeric and present, no duplicate
    or out-of-order timestamps within a series. Returns series, time, target, covariates (in that
    order), the row order kept: an unsorted file is an error, not silently reordered, because a
    file whose rows are out of time order is often a file that was joined or appended wrongly.
    `where` names the input in errors (data.train, reference.data, INPUT)."""
    def k(key: str) -> str:  # "data.target", or "INPUT (data.target)" for another input than data.train
        return key if where == "data.train" else f"{where} ({key})"
    columns = [(spec.series, k("data.series")), (spec.time, k("data.time"))] + ([(spec.target, k("data.target"))] if need_target else [])
    columns += [(c, k("data.covariates")) for c in spec.covariates]
    for col, key in columns:
        if col not in frame.columns:
            raise DataError(f"{key}: column '{col}' not found in {name} (columns: {', '.join(map(str, frame.columns[:30]))})")
    out = pd.DataFrame({"series": frame[spec.series].astype(str).to_numpy()}, index=frame.index)
    if pd.api.types.is_numeric_dtype(frame[spec.time]):  # pandas would read 2001 as nanoseconds after 1970
        raise DataError(f"{k('data.time')}: '{spec.time}' in {name} holds numbers ({frame[spec.time].iloc[0]!r}); "
                        "forecasting needs timestamps such as 2024-01-31 to date its forecasts")
    times = pd.to_datetime(frame[spec.time], errors="coerce")
    bad = times.isna()
    if bad.any():
        example = frame[spec.time][bad].iloc[0]
        raise DataError(f"{k('data.time')}: {int(bad.sum())} value(s) of '{spec.time}' in {name} are missing or not timestamps "
                        f"(first: {example!r}, file lines {_lines(frame.index[bad])}); use dates such as 2024-01-31")
    out["time"] = times.to_numpy()
    value_cols = ([(spec.target, k("data.target"), "target")] if need_target else []) + [(c, k("data.covariates"), c) for c in spec.covariates]
    for col, key, out_name in value_cols:
        raw = frame[col]
        missing = raw.isna() | (raw.astype(str).str.strip() == "")
        if missing.any():
            raise DataError(f"{key}: {int(missing.sum())} row(s) of {name} have no '{col}' value (file lines {_lines(frame.index[missing])}); "
                            "fill them in (e.g. interpolate) or remove those rows")
        values = pd.to_numeric(raw, errors="coerce")
        nonnum = values.isna() | ~np.isfinite(values.astype(float))
        if nonnum.any():
            raise DataError(f"{key}: '{col}' in {name} must be numeric; found {raw[nonnum].iloc[0]!r} (file lines {_lines(frame.index[nonnum])})")
        out[out_name] = values.astype(float).to_numpy()
    dup = out.duplicated(["series", "time"], keep=False)
    if dup.any():
        first = out[dup].iloc[0]
        raise DataError(f"{k('data.time')}: series '{first['series']}' has {int(dup.sum())} rows sharing a timestamp "
                        f"(e.g. {pd.Timestamp(first['time'])}, file lines {_lines(out.index[dup])}) in {name}; keep one row per series and time")
    for series, group in out.groupby("series", sort=False):
        step_back = group["time"].diff() < pd.Timedelta(0)
        if step_back.any():
            row = group.index[step_back.to_numpy()][0]
            raise DataError(f"{k('data.time')}: series '{series}' in {name} goes back in time at file line {int(row) + 2} "
                            f"({pd.Timestamp(group['time'].loc[row])} after a later timestamp); sort the file by {spec.series} then {spec.time}")
    return out


def infer_season(freqs: list[str | None]) -> int:
    """The seasonal period for the most common inferred frequency: 12 monthly, 4 quarterly, 7 daily, 24 hourly, else 1."""
    known = [f for f in freqs if f]
    if not known:
        return 1
    freq = max(set(known), key=known.count)
    base = freq.split("-")[0].lstrip("0123456789")
    return SEASON_BY_FREQ.get(base, 1)


def series_freq(times: pd.Series) -> str | None:
    if len(times) < 3:
        return None
    import warnings

    with warnings.catch_warnings():  # pandas 3 announces infer_freq returning an offset; either way we keep the string
        warnings.simplefilter("ignore")
        freq = pd.infer_freq(pd.DatetimeIndex(times))
    return getattr(freq, "freqstr", freq)


def seasonal_naive(history: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """ŷ_{T+k} = y_{T+k−m·⌈k/m⌉}: repeat the last full season of `history` (needs len(history) ≥ season)."""
    last = history[-season:]
    return np.array([last[k % season] for k in range(horizon)], dtype=float)


def mase_scale(train_part: np.ndarray, season: int) -> float:
    """The in-sample seasonal-naive MAE of a series' training part: MASE's denominator.
    A series with no seasonal change at all gets the scale of its level instead of 0."""
    if len(train_part) > season:
        scale = float(np.mean(np.abs(train_part[season:] - train_part[:-season])))
    else:
        scale = 0.0
    if scale <= EPS:
        scale = float(np.mean(np.abs(train_part))) or 1.0
    return scale


def make_window(values: np.ndarray, target_start: int, context: int, horizon: int, season: int, scale: float, times: np.ndarray) -> dict:
    """One window: `context` points before target_start (every channel) and `horizon` target points from it."""
    past = values[target_start - context : target_start]
    future = values[target_start : target_start + horizon, 0]
    return {"past": past.astype(np.float32), "future": future.astype(np.float32),
            "naive": seasonal_naive(values[:target_start, 0], horizon, season).astype(np.float32),
            "scale": scale, "times": times[target_start : target_start + horizon]}


def series_arrays(frame: pd.DataFrame, covariates: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """series → (times, values (T × channels): the target first, then the covariates)."""
    out = {}
    for series, group in frame.groupby("series", sort=False):
        values = group[["target", *covariates]].to_numpy(dtype=float)
        out[series] = (group["time"].to_numpy(), values)
    return out


def cut_windows(frame: pd.DataFrame, spec, season: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Time-ordered windows per series: training windows end before the validation window,
    which ends before the test window (the last `horizon` points)."""
    ctx, h, stride = spec.context_length, spec.horizon, spec.stride
    train, val, test = [], [], []
    for series, (times, values) in series_arrays(frame, spec.covariates).items():
        n = len(values)
        val_start, test_start = n - 2 * h, n - h
        scale = mase_scale(values[:val_start, 0], season)
        common = {"series": series}
        # the last training window ends exactly at the validation window; earlier ones every `stride` points
        for target_start in range(val_start - h, ctx - 1, -stride):
            train.append({**common, **make_window(values, target_start, ctx, h, season, scale, times)})
        val.append({**common, **make_window(values, val_start, ctx, h, season, scale, times)})
        test.append({**common, **make_window(values, test_start, ctx, h, season, scale, times)})
    train.reverse()  # oldest first, which reads better in audit and does not affect the shuffled batches
    return pd.DataFrame(train), pd.DataFrame(val), pd.DataFrame(test)


def load_forecast_splits(recipe) -> ForecastSplits:
    """Read the long-format file, check it, resolve `season: auto`, cut time-ordered windows."""
    spec = recipe.data
    if spec.validation or spec.test:
        key = "data.validation" if spec.validation else "data.test"
        raise RecipeError(f"{key}: forecasting takes validation and test windows from the end of each series; "
                          "give the whole history in data.train and remove this key")
    if spec.groups:
        raise RecipeError("data.groups: the bias guard compares groups of a classifier's rows; forecasting has none, remove data.groups")
    name = source_name(spec.train)
    frame = check_long_frame(read_frame(spec.train, "data.train", spec), spec, name)
    frame = frame.reset_index(drop=True)
    freqs = {s: series_freq(g["time"]) for s, g in frame.groupby("series", sort=False)}
    notes: list[dict] = []
    irregular = sorted(s for s, f in freqs.items() if f is None)
    if irregular:
        notes.append({"level": "warn", "code": "irregular_time", "message":
                      f"{len(irregular)} series have no regular time step ({', '.join(irregular[:5])}); windows count rows, not time"})
    if spec.season == "auto":
        spec.season = infer_season(list(freqs.values()))
        notes.append({"level": "info", "code": "season", "message": f"season {spec.season} inferred from the time step (data.season: auto)"})
    season = int(spec.season)
    if spec.context_length < season:
        raise RecipeError(f"data.context_length: {spec.context_length} is shorter than one season ({season}); "
                          f"the model and the seasonal-naive baseline need at least a season of history; set context_length ≥ {season}")
    need = spec.context_length + 3 * spec.horizon
    lengths = frame.groupby("series", sort=False).size()
    short = lengths[lengths < need]
    if len(short):
        series, n = short.index[0], int(short.iloc[0])
        raise DataError(f"data.train: series '{series}' in {name} has {n} points; context_length {spec.context_length} + horizon "
                        f"{spec.horizon} for training, plus a horizon each for validation and test, needs {need}"
                        + (f" ({len(short)} series are too short)" if len(short) > 1 else "")
                        + "; drop the short series or lower context_length/horizon")
    train, validation, test = cut_windows(frame, spec, season)
    notes.append({"level": "info", "code": "split", "message":
                  f"time-ordered split per series: the last {spec.horizon} points are the test window, the {spec.horizon} before "
                  f"them the validation window; {len(train)} training windows end before the validation window"})
    return ForecastSplits(train, validation, test, frame, season, freqs, None, notes)


def audit_forecast(splits: ForecastSplits) -> dict:
    """Rows, series, windows and time range per split; the findings from loading."""
    frame = splits.frame
    per_series = frame.groupby("series", sort=False).agg(points=("target", "size"), start=("time", "min"), end=("time", "max"))
    summary = {name: {"rows": int(len(getattr(splits, name))), "windows": int(len(getattr(splits, name)))}
               for name in ("train", "validation", "test")}
    summary["train"]["series"] = int(per_series.shape[0])
    return {"findings": list(splits.notes), "splits": summary, "season": splits.season,
            "series": {str(s): {"points": int(r.points), "start": str(r.start), "end": str(r.end), "freq": splits.freq.get(s)}
                       for s, r in per_series.head(200).iterrows()},
            "first_validation_time": {str(s): str(pd.Timestamp(t[0])) for s, t in zip(splits.validation["series"], splits.validation["times"])}}
