"""The report's training sections: the loss / metric / learning-rate curves from history.jsonl
with the overfitting figures, and the learning curve (data sufficiency) with its fitted
err(n) = a·n^(−b) + c."""

from __future__ import annotations

import math
from typing import Any, Callable

from honed.report import charts
from honed.report.charts import PALETTE, is_number
from honed.report.markup import esc, fmt, guard_banner, kv_table, not_measured, num_td, pct, render_generic
from honed.report.rundata import RunData


def _steps(history: list[dict]) -> list[float]:
    out = []
    for i, h in enumerate(history):
        s = h.get("step")
        out.append(s if is_number(s) else float(i))
    return out


def section_training(run: RunData) -> str:
    parts = [guard_banner(run, "overfitting")]
    hist = run.history
    d = run.details("overfitting")
    if not hist:
        parts.append(not_measured("no history.jsonl in the run directory (no evaluations were logged)."))
    else:
        steps = _steps(hist)
        primary = run.primary
        vlines: list[dict] = []
        best = d.get("best_step")
        if is_number(best):
            vlines.append({"x": best, "label": f"best step {fmt(best)}", "color": "#d62728"})
        prev_stage = hist[0].get("stage")
        for s, h in zip(steps, hist):
            st = h.get("stage")
            if st is not None and st != prev_stage:
                vlines.append({"x": s, "label": f"stage: {st}", "color": "#555"})
            prev_stage = st if st is not None else prev_stage

        def col(key: str) -> list[Any]:
            return [h.get(key) for h in hist]

        loss_series = []
        for key, name, dash, color in (("train_loss", "train loss", True, PALETTE[1]),
                                       ("val_loss", "validation loss", False, PALETTE[0])):
            if any(is_number(v) for v in col(key)):
                loss_series.append({"name": name, "xs": steps, "ys": col(key), "dash": dash, "color": color})
        box = []
        if loss_series:
            box.append(charts.line_chart(loss_series, "step", "loss", vlines=vlines, title="Loss", legend=True,
                                         width=540))
        metric_keys: list[str] = []
        for h in hist:
            for k in h:
                if k.startswith("val_") and k != "val_loss" and k not in metric_keys:
                    metric_keys.append(k)
        metric_keys.sort(key=lambda k: (k != f"val_{primary}", k))
        metric_series = []
        for k in metric_keys:
            if not any(is_number(v) for v in col(k)):
                continue
            name = k[len("val_"):]
            color = PALETTE[len({s["color"] for s in metric_series}) % len(PALETTE)]
            metric_series.append({"name": f"validation {name}", "xs": steps, "ys": col(k), "color": color})
            tk = f"train_{name}"
            if any(is_number(v) for v in col(tk)):
                metric_series.append({"name": f"train {name}", "xs": steps, "ys": col(tk), "dash": True,
                                      "color": color})
        if metric_series:
            ylab = f"validation {primary}" if len(metric_keys) == 1 else "metric"
            box.append(
                charts.line_chart(metric_series, "step", ylab, vlines=vlines, title="Validation metric", legend=True,
                                  width=540)
            )
        if any(is_number(v) for v in col("lr")):
            box.append(
                charts.line_chart([{"name": "learning rate", "xs": steps, "ys": col("lr")}], "step",
                                  "learning rate", vlines=[v for v in vlines if v["label"].startswith("stage")],
                                  title="Learning-rate schedule", width=540, height=260)
            )
        if box:
            parts.append('<div class="charts">' + "\n".join(box) + "</div>")
        else:
            parts.append(not_measured("history.jsonl has no loss or metric values."))
        last = hist[-1]
        parts.append(
            f'<p class="note">{len(hist)} evaluations logged, last at step {esc(fmt(steps[-1]))}'
            + (f", epoch {esc(fmt(last.get('epoch')))}" if last.get("epoch") is not None else "")
            + (f"; {run.history_skipped} unreadable line(s) in history.jsonl skipped" if run.history_skipped else "")
            + ".</p>"
        )
    if d:
        rows = []
        labels = {
            "best_step": "best step",
            "gap": "train − validation gap at best step",
            "final_gap": "train − validation gap at the end",
            "seeds": "test metric per seed",
            "spread": "spread across seeds",
        }
        for k, label in labels.items():
            if k in d:
                rows.append((label, esc(fmt(d[k]))))
        rows += [(k, render_generic(v)) for k, v in d.items() if k not in labels]
        parts.append("<h3>Overfitting figures</h3>" + kv_table(rows))
    return "\n".join(p for p in parts if p)


def _fit_candidates(fit: dict, pts: list[tuple[float, float, float]], higher_better: bool):
    """Which x scale (n or fraction) and which conversion (metric = 1 − err, or err itself)
    reproduce the measured scores best. pts: (n, fraction, score)."""
    a, b, c = fit["a"], fit["b"], fit["c"]

    def err(x: float) -> float | None:
        try:
            v = a * x ** (-b) + c
        except (OverflowError, ZeroDivisionError, ValueError):
            return None
        return v if isinstance(v, float) and math.isfinite(v) else None

    preferred = [("n", not higher_better), ("fraction", not higher_better), ("n", higher_better), ("fraction", higher_better)]
    best = None
    for scale, identity in preferred:
        resid = 0.0
        ok = True
        for n, frac, score in pts:
            x = n if scale == "n" else frac
            if not is_number(x) or x <= 0:
                ok = False
                break
            e = err(x)
            if e is None:
                ok = False
                break
            resid += ((e if identity else 1 - e) - score) ** 2
        if ok and (best is None or resid < best[0] - 1e-12):
            best = (resid, scale, identity)
    if best is None:
        return None
    _, scale, identity = best
    return scale, identity, err


def section_learning_curve(run: RunData) -> str:
    parts = [guard_banner(run, "data")]
    d = run.details("data")
    primary = run.primary
    fractions = d.get("fractions") if isinstance(d.get("fractions"), list) else []
    scores = d.get("scores") if isinstance(d.get("scores"), list) else []
    n = d.get("n")
    pts: list[tuple[float, float, float]] = []  # (n, fraction, score)
    if isinstance(n, list):
        for i, s in enumerate(scores):
            ni = n[i] if i < len(n) else None
            fi = fractions[i] if i < len(fractions) else None
            if is_number(s) and is_number(ni):
                pts.append((float(ni), fi if is_number(fi) else None, float(s)))
    else:
        for i, s in enumerate(scores):
            fi = fractions[i] if i < len(fractions) else None
            if is_number(s) and is_number(fi):
                x = fi * n if is_number(n) else None
                if x is not None and abs(x - round(x)) < 1e-6:
                    x = int(round(x))
                pts.append((x, float(fi), float(s)))
    if not pts:
        parts.append(not_measured("no learning-curve scores (data.details.fractions / scores) in metrics.json."))
    else:
        use_n = all(p[0] is not None for p in pts)
        xs = [p[0] if use_n else p[1] for p in pts]
        x_full = max(xs)
        frac_full = max((p[1] for p in pts if p[1] is not None), default=None)
        if use_n and frac_full is None:
            pts = [(p[0], p[0] / x_full, p[2]) for p in pts]
            frac_full = 1.0
        x_label = "training examples (n)" if use_n else "fraction of the training data"
        series = [{"name": f"measured {primary}", "xs": xs, "ys": [p[2] for p in pts], "mode": "lines+markers",
                   "marker_size": 5}]
        vlines: list[dict] = []
        hlines: list[dict] = []
        fit = d.get("fit")
        higher = primary not in run.lower_is_better
        conv = None
        if isinstance(fit, dict) and all(is_number(fit.get(k)) for k in "abc"):
            conv = _fit_candidates(fit, pts, higher)
        curve_at: Callable[[float], float | None] | None = None
        if conv:
            scale, identity, err = conv
            # plotted x (n, or a fraction when n is unknown) → the argument the fit was made on
            k = frac_full / x_full if (scale == "fraction" and use_n) else 1.0
            lo, hi = min(xs), 5 * x_full
            grid = [lo * (hi / lo) ** (i / 80) for i in range(81)] if lo > 0 else []

            def curve_at(x: float) -> float | None:
                e = err(x * k)
                if e is None:
                    return None
                return e if identity else 1 - e

            ys = [curve_at(x) for x in grid]
            how = "err" if identity else "1 − err"
            series.append({"name": f"fit: {how}, err = a·n^(−b) + c", "xs": grid, "ys": ys, "dash": True,
                           "color": "#7f7f7f", "mode": "lines"})
        ext_x, ext_y, ext_lab = [], [], []
        for mult, key in ((2, "expected_at_2x"), (5, "expected_at_5x")):
            v = d.get(key)
            src = ""
            if not is_number(v) and curve_at is not None:
                v, src = curve_at(mult * x_full), " (fit)"
            if is_number(v):
                ext_x.append(mult * x_full)
                ext_y.append(v)
                ext_lab.append(f"{mult}×: {fmt(v)}{src}")
        if ext_x:
            series.append({"name": "expected at 2× / 5× data", "xs": ext_x, "ys": ext_y, "labels": ext_lab,
                           "mode": "markers", "color": "#d62728", "hollow": True, "marker_size": 6})
        sf = d.get("sufficient_fraction")
        if is_number(sf) and frac_full:
            vlines.append({"x": sf / frac_full * x_full, "label": f"sufficient: {pct(sf)}", "color": "#2ca02c"})
        target = d.get("target")
        if is_number(target):
            hlines.append({"y": target, "label": f"target {fmt(target)}", "color": "#9467bd"})
        nt = d.get("n_for_target")
        if is_number(nt) and use_n and nt <= 5 * x_full:
            vlines.append({"x": nt, "label": f"n for target ≈ {fmt(nt)}", "color": "#9467bd"})
        parts.append(charts.line_chart(series, x_label, f"validation {primary}", vlines=vlines, hlines=hlines,
                                       title="Learning curve", legend=True))
        if conv is None and fit is not None:
            parts.append('<p class="note">The fitted curve could not be drawn (fit needs numeric a, b, c).</p>')
        head = "<tr><th class=\"num\">fraction</th><th class=\"num\">n</th>" f"<th class=\"num\">{esc(primary)}</th></tr>"
        rows = "".join(
            f"<tr>{'<td class=num>' + esc(pct(p[1])) + '</td>'}{num_td(p[0])}{num_td(p[2])}</tr>" for p in pts
        )
        parts.append(f"<table>{head}{rows}</table>")
    if d:
        labels = {
            "fit": "fit err(n) = a·n^(−b) + c",
            "expected_at_2x": f"expected {primary} at 2× data",
            "expected_at_5x": f"expected {primary} at 5× data",
            "n_for_target": "n needed for the target",
            "sufficient_fraction": "smallest sufficient fraction",
            "backtest_error": "backtest error (fit small fractions, predict the largest)",
        }
        rows = []
        for k, label in labels.items():
            if k not in d:
                continue
            v = d[k]
            if k == "fit" and isinstance(v, dict):
                rows.append((label, esc(", ".join(f"{kk} = {fmt(vv)}" for kk, vv in v.items()))))
            elif k == "sufficient_fraction":
                rows.append((label, esc(pct(v))))
            else:
                rows.append((label, esc(fmt(v))))
        skip = set(labels) | {"fractions", "scores"}
        rows += [(k, render_generic(v)) for k, v in d.items() if k not in skip]
        parts.append("<h3>Data-sufficiency figures</h3>" + kv_table(rows))
    return "\n".join(p for p in parts if p)
