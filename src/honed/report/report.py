"""Build RUN_DIR/report.html: one self-contained file (inline CSS and SVG, no scripts, no
network resources) from whatever the run directory holds.

Only metrics.json is required; history.jsonl, audit.json and recipe.yaml and every guard's
details are optional, and a section whose inputs are missing says "not measured". A section
that cannot be drawn from malformed input shows an error box instead of breaking the report.
Every string taken from the run directory is HTML-escaped before it reaches the page.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Callable

from honed.errors import HonedError, RecipeError
from honed.report import charts
from honed.report.charts import PALETTE, is_number

GUARDS: list[tuple[str, str]] = [
    ("overfitting", "Overfitting"),
    ("forgetting", "Forgetting"),
    ("data", "Data sufficiency"),
    ("bias", "Bias"),
    ("baseline", "Baseline"),
]
STATUSES = ("ok", "warn", "fail", "skipped")
_SEVERITY = {"fail": 3, "warn": 2, "ok": 1, "skipped": 0}
_LEVELS = {"error": 0, "warn": 1, "warning": 1, "info": 2}
_LOWER_IS_BETTER = ("loss", "error", "err", "rmse", "mse", "mae", "mape", "wape", "mase", "smape", "perplexity", "ppl")
_GROUP_DATA_KEYS = ("count", "n", "rows", "share", "label_rate", "positive_rate_in_data")
_MAX_ROWS = 200
_MAX_CLASSES = 40


# ---------------------------------------------------------------------------- formatting


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


def fmt(v: Any) -> str:
    """A value as short plain text (not escaped)."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e6 or a < 1e-4:
            return f"{v:.3g}"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 10:
            return f"{v:.2f}"
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if is_number(v) else fmt(v)


def _short(v: float) -> str:
    return f"{v:g}" if is_number(v) else fmt(v)


def _lower_is_better(metric: str) -> bool:
    m = str(metric).lower()
    if m in ("r2", "accuracy", "f1", "auc") or m.startswith("neg_"):  # sklearn's neg_* scores: higher is better
        return False
    return any(m == k or m.endswith("_" + k) or m.startswith(k + "_") for k in _LOWER_IS_BETTER)


def _num_td(v: Any) -> str:
    return f'<td class="num">{_e(fmt(v))}</td>'


def _delta_td(after: Any, before: Any, higher_better: bool | None) -> str:
    if not (is_number(after) and is_number(before)):
        return '<td class="num muted">—</td>'
    d = after - before
    cls = ""
    if higher_better is not None and abs(d) > 1e-12:
        good = (d > 0) == higher_better
        cls = " delta-good" if good else " delta-bad"
    sign = "+" if d > 0 else ("−" if d < 0 else "±")
    return f'<td class="num{cls}">{sign}{_e(fmt(abs(d)))}</td>'


def _not_measured(what: str) -> str:
    return f'<p class="na">Not measured: {_e(what)}</p>'


def _badge(status: str) -> str:
    s = str(status).lower()
    cls = s if s in STATUSES else "unknown"
    return f'<span class="badge badge-{cls}">{_e(s)}</span>'


def _kv_table(rows: list[tuple[str, str]], cls: str = "kv") -> str:
    """rows: (label text, value HTML)."""
    if not rows:
        return ""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def render_generic(value: Any, depth: int = 0) -> str:
    """Any JSON value as HTML: dicts as key/value tables (a dict or list of flat dicts as one
    table), lists of scalars inline. Used for figures this module has no dedicated view for."""
    if depth > 6:
        return f"<code>{_e(json.dumps(value, default=str)[:500])}</code>"
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">—</span>'
        inner = list(value.values())
        if all(isinstance(x, dict) and x and all(_is_scalar(y) for y in x.values()) for x in inner):
            cols: list[str] = []
            for x in inner:
                cols += [k for k in x if k not in cols]
            head = "<tr><th></th>" + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
            rows = []
            for k, x in list(value.items())[:_MAX_ROWS]:
                rows.append(f"<tr><th>{_e(k)}</th>" + "".join(_cell(x.get(c)) for c in cols) + "</tr>")
            more = _more_note(len(value))
            return f"<table>{head}{''.join(rows)}</table>{more}"
        items = list(value.items())[:_MAX_ROWS]
        return _kv_table([(str(k), render_generic(v, depth + 1)) for k, v in items]) + _more_note(len(value))
    if isinstance(value, (list, tuple)):
        if not value:
            return '<span class="muted">—</span>'
        if all(isinstance(x, dict) and x and all(_is_scalar(y) for y in x.values()) for x in value):
            cols = []
            for x in value:
                cols += [k for k in x if k not in cols]
            head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
            rows = ["<tr>" + "".join(_cell(x.get(c)) for c in cols) + "</tr>" for x in value[:_MAX_ROWS]]
            return f"<table>{head}{''.join(rows)}</table>{_more_note(len(value))}"
        if all(_is_scalar(x) for x in value):
            shown = ", ".join(fmt(x) for x in value[:100])
            return _e(shown) + (f' <span class="muted">… ({len(value)} in all)</span>' if len(value) > 100 else "")
        items = "".join(f"<li>{render_generic(x, depth + 1)}</li>" for x in value[:_MAX_ROWS])
        return f"<ol>{items}</ol>{_more_note(len(value))}"
    return _e(fmt(value))


def _cell(v: Any) -> str:
    if is_number(v) or isinstance(v, float):
        return _num_td(v)
    return f"<td>{_e(fmt(v))}</td>"


def _more_note(n: int) -> str:
    return f'<p class="note">Showing {_MAX_ROWS} of {n:,}.</p>' if n > _MAX_ROWS else ""


# ---------------------------------------------------------------------------- loading


@dataclass
class RunData:
    run_dir: Path
    metrics: dict
    history: list[dict] = field(default_factory=list)
    history_skipped: int = 0
    audit: dict | None = None
    audit_problem: str | None = None
    recipe_text: str | None = None
    recipe: dict = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return str(self.metrics.get("primary_metric") or "accuracy")

    def guard(self, name: str) -> dict:
        g = (self.metrics.get("guards") or {}).get(name)
        return g if isinstance(g, dict) else {}

    def details(self, name: str) -> dict:
        d = self.guard(name).get("details")
        return d if isinstance(d, dict) else {}


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    mpath = run_dir / "metrics.json"
    if not run_dir.is_dir():
        raise RecipeError(
            f"run directory {run_dir} does not exist; pass the RUN_DIR a `honed run` wrote (its `out`)"
        )
    if not mpath.is_file():
        raise RecipeError(
            f"no metrics.json in {run_dir}; pass the RUN_DIR of a finished `honed run`, "
            "or finish the run (`honed run RECIPE --resume`) first"
        )
    try:
        metrics = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HonedError(f"cannot read {mpath}: {exc}; rerun `honed run` to write it again") from exc
    if not isinstance(metrics, dict):
        raise HonedError(f"{mpath} holds a {type(metrics).__name__}, expected a JSON object; rerun `honed run`")
    run = RunData(run_dir=run_dir, metrics=metrics)

    hpath = run_dir / "history.jsonl"
    if hpath.is_file():
        for line in hpath.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                run.history_skipped += 1
                continue
            if isinstance(rec, dict):
                run.history.append(rec)
            else:
                run.history_skipped += 1

    apath = run_dir / "audit.json"
    if apath.is_file():
        try:
            audit = json.loads(apath.read_text(encoding="utf-8", errors="replace"))
            if isinstance(audit, dict):
                run.audit = audit
            else:
                run.audit_problem = f"audit.json holds a {type(audit).__name__}, expected an object"
        except json.JSONDecodeError as exc:
            run.audit_problem = f"audit.json is not valid JSON ({exc})"

    rpath = run_dir / "recipe.yaml"
    if rpath.is_file():
        run.recipe_text = rpath.read_text(encoding="utf-8", errors="replace")
        try:
            import yaml

            parsed = yaml.safe_load(run.recipe_text)
            if isinstance(parsed, dict):
                run.recipe = parsed
        except Exception:  # the recipe is still shown verbatim
            pass
    return run


# ---------------------------------------------------------------------------- sections


def _guard_banner(run: RunData, name: str) -> str:
    g = run.guard(name)
    if not g:
        return ""
    status = str(g.get("status") or "skipped")
    summary = g.get("summary") or ""
    return f'<p class="guard-banner">{_badge(status)}{_e(summary)}</p>'


def _header(run: RunData) -> str:
    m = run.metrics
    info = m.get("run") if isinstance(m.get("run"), dict) else {}
    task = m.get("task") or run.recipe.get("task") or "unknown task"
    model = info.get("model") or run.recipe.get("model")
    method = info.get("method") or run.recipe.get("method")
    title = f"honed report: {task}"
    meta = []
    for label, value in (
        ("model", model),
        ("method", method),
        ("primary metric", m.get("primary_metric")),
        ("run", info.get("run_dir") or str(run.run_dir)),
        ("started", info.get("started")),
        ("finished", info.get("finished")),
    ):
        if value not in (None, ""):
            meta.append(f"<span>{_e(label)} <b>{_e(fmt(value))}</b></span>")
    return f'<h1>{_e(title)}</h1>\n<p class="meta">{"".join(meta)}</p>'


def _section_verdict(run: RunData) -> str:
    guards = run.metrics.get("guards") if isinstance(run.metrics.get("guards"), dict) else {}
    names = [n for n, _ in GUARDS] + [n for n in guards if n not in dict(GUARDS)]
    titles = dict(GUARDS)
    rows = []
    counts: dict[str, int] = {}
    for name in names:
        g = run.guard(name)
        status = str(g.get("status") or "skipped").lower() if g else "skipped"
        summary = g.get("summary") if g else None
        if not g:
            summary_html = '<span class="muted">not measured (no result for this guard in metrics.json)</span>'
        elif summary:
            summary_html = _e(summary)
        else:
            summary_html = '<span class="muted">no summary given</span>'
        counts[status] = counts.get(status, 0) + 1
        rows.append(
            f'<tr class="verdict-row" data-guard="{_e(name)}" data-status="{_e(status)}">'
            f'<td class="guard">{_e(titles.get(name, name))} <code class="muted">{_e(name)}</code></td>'
            f'<td class="status">{_badge(status)}</td><td class="summary">{summary_html}</td></tr>'
        )
    parts = []
    if counts.get("fail"):
        overall = f"{counts['fail']} guard(s) failed: do not ship this model before reading why."
    elif counts.get("warn"):
        overall = f"{counts['warn']} guard(s) warn: read them before shipping."
    elif counts.get("ok"):
        overall = "Every measured guard passed."
    else:
        overall = "No guard was measured."
    skipped = sum(v for k, v in counts.items() if k not in ("ok", "warn", "fail"))
    if skipped and (counts.get("ok") or counts.get("warn") or counts.get("fail")):
        overall += f" {skipped} not measured."
    parts.append(f'<p class="overall">{_e(overall)}</p>')
    parts.append(
        '<table class="verdict"><thead><tr><th>guard</th><th>status</th><th>summary</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return "\n".join(parts)


def _baseline_value(v: Any, metric: str, primary: str) -> Any:
    if isinstance(v, dict):
        return v.get(metric)
    if is_number(v) and metric == primary:
        return v
    return None


def _section_headline(run: RunData) -> str:
    m = run.metrics
    primary = run.primary
    bl = run.details("baseline")
    columns: list[tuple[str, Callable[[str], Any]]] = []
    for label, src in (("fine-tuned · test", m.get("test")), ("fine-tuned · validation", m.get("validation")),
                       ("pre-trained", m.get("pretrained"))):
        if isinstance(src, dict) and src:
            columns.append((label, (lambda s: lambda k: s.get(k))(src)))
    for label, key in (("linear probe", "linear_probe"), ("from scratch", "scratch"), ("majority class", "majority"),
                       ("seasonal naive", "seasonal_naive")):
        v = bl.get(key)
        if v is not None:
            columns.append((label, (lambda v: lambda k: _baseline_value(v, k, primary))(v)))

    metric_names: list[str] = [primary]
    for src in (m.get("test"), m.get("validation"), m.get("pretrained"), *(bl.get(k) for k in ("linear_probe", "scratch", "majority", "seasonal_naive"))):
        if isinstance(src, dict):
            metric_names += [k for k in src if k not in metric_names]
    columns = [c for c in columns if any(c[1](k) is not None for k in metric_names)]
    parts = []
    test = m.get("test") if isinstance(m.get("test"), dict) else {}
    pre = m.get("pretrained") if isinstance(m.get("pretrained"), dict) else {}
    if not columns:
        parts.append(_not_measured("metrics.json has no test, validation, pre-trained or baseline figures."))
    else:
        show_delta = bool(test) and bool(pre)
        head = "<tr><th>metric</th>" + "".join(f'<th class="num">{_e(c[0])}</th>' for c in columns)
        head += '<th class="num">test − pre-trained</th></tr>' if show_delta else "</tr>"
        rows = []
        for k in metric_names:
            vals = [c[1](k) for c in columns]
            if all(v is None for v in vals):
                continue
            cls = ' class="primary"' if k == primary else ""
            row = f"<tr{cls}><td>{_e(k)}{' (primary)' if k == primary else ''}</td>"
            row += "".join(_num_td(v) for v in vals)
            if show_delta:
                row += _delta_td(test.get(k), pre.get(k), not _lower_is_better(k))
            rows.append(row + "</tr>")
        parts.append(f'<table class="headline">{head}{"".join(rows)}</table>')
        bars = []
        for i, (label, get) in enumerate(columns):
            v = get(primary)
            if is_number(v):
                bars.append({"name": label, "value": v, "color": PALETTE[0] if i == 0 else "#9aa7b3"})
        if len(bars) >= 2:
            parts.append(charts.bar_chart(bars, primary, "model", title=f"{primary}: fine-tuned vs reference points"))
    extra = {k: v for k, v in bl.items() if k not in ("scratch", "linear_probe", "majority", "seasonal_naive")}
    if run.guard("baseline"):
        parts.append("<h3>Baseline guard</h3>" + _guard_banner(run, "baseline"))
        if extra:
            parts.append(render_generic(extra))
    timing = m.get("timing")
    parts.append("<h3>Timing and resources</h3>")
    if isinstance(timing, dict) and timing:
        parts.append(render_generic(timing))
    else:
        parts.append(_not_measured("no timing figures in metrics.json."))
    return "\n".join(parts)


def _steps(history: list[dict]) -> list[float]:
    out = []
    for i, h in enumerate(history):
        s = h.get("step")
        out.append(s if is_number(s) else float(i))
    return out


def _section_training(run: RunData) -> str:
    parts = [_guard_banner(run, "overfitting")]
    hist = run.history
    d = run.details("overfitting")
    if not hist:
        parts.append(_not_measured("no history.jsonl in the run directory (no evaluations were logged)."))
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
            parts.append(_not_measured("history.jsonl has no loss or metric values."))
        last = hist[-1]
        parts.append(
            f'<p class="note">{len(hist)} evaluations logged, last at step {_e(fmt(steps[-1]))}'
            + (f", epoch {_e(fmt(last.get('epoch')))}" if last.get("epoch") is not None else "")
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
                rows.append((label, _e(fmt(d[k]))))
        rows += [(k, render_generic(v)) for k, v in d.items() if k not in labels]
        parts.append("<h3>Overfitting figures</h3>" + _kv_table(rows))
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


def _section_learning_curve(run: RunData) -> str:
    parts = [_guard_banner(run, "data")]
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
        parts.append(_not_measured("no learning-curve scores (data.details.fractions / scores) in metrics.json."))
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
        higher = not _lower_is_better(primary)
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
            vlines.append({"x": sf / frac_full * x_full, "label": f"sufficient: {_pct(sf)}", "color": "#2ca02c"})
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
        head = "<tr><th class=\"num\">fraction</th><th class=\"num\">n</th>" f"<th class=\"num\">{_e(primary)}</th></tr>"
        rows = "".join(
            f"<tr>{'<td class=num>' + _e(_pct(p[1])) + '</td>'}{_num_td(p[0])}{_num_td(p[2])}</tr>" for p in pts
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
                rows.append((label, _e(", ".join(f"{kk} = {fmt(vv)}" for kk, vv in v.items()))))
            elif k == "sufficient_fraction":
                rows.append((label, _e(_pct(v))))
            else:
                rows.append((label, _e(fmt(v))))
        skip = set(labels) | {"fractions", "scores"}
        rows += [(k, render_generic(v)) for k, v in d.items() if k not in skip]
        parts.append("<h3>Data-sufficiency figures</h3>" + _kv_table(rows))
    return "\n".join(p for p in parts if p)


def _section_forgetting(run: RunData) -> str:
    parts = [_guard_banner(run, "forgetting")]
    d = run.details("forgetting")
    primary = run.primary
    interp = d.get("interpolation") if isinstance(d.get("interpolation"), list) else []
    points = [p for p in interp if isinstance(p, dict) and is_number(p.get("metric"))]
    chosen = d.get("chosen_alpha")
    if not points:
        parts.append(_not_measured("no interpolation sweep (forgetting.details.interpolation) in metrics.json."))
    else:
        points.sort(key=lambda p: p.get("alpha") if is_number(p.get("alpha")) else 0)
        hi = [i for i, p in enumerate(points) if is_number(chosen) and is_number(p.get("alpha"))
              and abs(p["alpha"] - chosen) < 1e-9]
        labels = [f"α={_short(p.get('alpha'))}" + (" (chosen)" if i in hi else "") for i, p in enumerate(points)]
        floor = next((d[k] for k in ("retention_floor", "min_retention", "floor") if is_number(d.get(k))), None)
        if all(is_number(p.get("retention")) for p in points):
            series = [{"name": "WiSE-FT sweep (θ = (1−α)·θ⁰ + α·θ_ft)", "xs": [p["retention"] for p in points],
                       "ys": [p["metric"] for p in points], "labels": labels, "highlight": hi,
                       "mode": "lines+markers", "marker_size": 5}]
            vl = [{"x": floor, "label": f"retention floor {fmt(floor)}", "color": "#d62728"}] if floor is not None else []
            parts.append(charts.scatter_chart(series, "retention on the reference set (after ÷ before)",
                                              f"task {primary}", vlines=vl, title="Forgetting trade-off",
                                              legend=True))
        else:
            series = [{"name": f"task {primary}", "xs": [p.get("alpha") for p in points],
                       "ys": [p["metric"] for p in points], "labels": labels, "highlight": hi,
                       "mode": "lines+markers", "marker_size": 5}]
            parts.append('<p class="note">Retention was not measured for the sweep; the task metric is shown '
                         "against α.</p>")
            parts.append(charts.scatter_chart(series, "α (0 = pre-trained, 1 = fine-tuned)", f"task {primary}",
                                              title="Weight-interpolation sweep", legend=True))
        head = "<tr><th class=\"num\">α</th><th class=\"num\">task metric</th><th class=\"num\">retention</th></tr>"
        rows = "".join(
            f'<tr{" class=primary" if i in hi else ""}><td class="num">{_e(_short(p.get("alpha")))}</td>'
            f'{_num_td(p.get("metric"))}'
            f'{_num_td(p.get("retention"))}</tr>'
            for i, p in enumerate(points)
        )
        parts.append(f"<table>{head}{rows}</table>")
    if d:
        labels = {
            "reference": "reference set",
            "retention": "retention (after ÷ before)",
            "cka": "linear CKA, pre-trained vs fine-tuned features",
            "perplexity_before": "perplexity before",
            "perplexity_after": "perplexity after",
            "chosen_alpha": "chosen α",
        }
        rows = [(label, render_generic(d[k])) for k, label in labels.items() if k in d]
        if is_number(d.get("cka")):
            rows.insert(3 if len(rows) >= 3 else len(rows), ("representation drift (1 − CKA)", _e(fmt(1 - d["cka"]))))
        rows += [(k, render_generic(v)) for k, v in d.items() if k not in labels and k != "interpolation"]
        parts.append("<h3>Forgetting figures</h3>" + _kv_table(rows))
    return "\n".join(p for p in parts if p)


def _split_before(before: Any) -> tuple[dict, dict]:
    """before → (per-column groups, scalar figures); accepts either the groups mapping itself
    or {"groups": ..., "demographic_parity_difference": ..., ...}."""
    if not isinstance(before, dict):
        return {}, {}
    if isinstance(before.get("groups"), dict):
        return before["groups"], {k: v for k, v in before.items() if k != "groups"}
    groups = {k: v for k, v in before.items() if isinstance(v, dict)}
    scalars = {k: v for k, v in before.items() if not isinstance(v, dict)}
    return groups, scalars


def _group_table(column: str, after: dict, before: dict) -> str:
    values: list[str] = []
    for src in (after, before):
        values += [v for v in src if v not in values]
    stats: list[str] = []
    for src in (after, before):
        for v in src.values():
            if isinstance(v, dict):
                stats += [k for k in v if k not in stats]
    data_keys = [k for k in stats if k in _GROUP_DATA_KEYS]
    perf_keys = [k for k in stats if k not in _GROUP_DATA_KEYS]
    has_before = bool(before)
    h1 = f'<tr><th rowspan="2">{_e(column)}</th>' + "".join(
        f'<th rowspan="2" class="num">{_e(k)}</th>' for k in data_keys
    )
    h2 = "<tr>"
    for k in perf_keys:
        if has_before:
            h1 += f'<th colspan="3" class="num">{_e(k)}</th>'
            h2 += '<th class="num">after</th><th class="num">before</th><th class="num">Δ</th>'
        else:
            h1 += f'<th rowspan="2" class="num">{_e(k)} (after)</th>'
    h1 += "</tr>"
    h2 += "</tr>"
    rows = []
    for value in values[:_MAX_ROWS]:
        a = after.get(value) if isinstance(after.get(value), dict) else {}
        b = before.get(value) if isinstance(before.get(value), dict) else {}
        row = f"<tr><td>{_e(value)}</td>"
        for k in data_keys:
            v = a.get(k, b.get(k))
            row += f'<td class="num">{_e(_pct(v) if k == "share" or k.endswith("_rate") else fmt(v))}</td>'
        for k in perf_keys:
            row += _num_td(a.get(k))
            if has_before:
                hb = None if "rate" in k else not _lower_is_better(k)
                row += _num_td(b.get(k)) + _delta_td(a.get(k), b.get(k), hb)
        rows.append(row + "</tr>")
    return f"<h3>By {_e(column)}</h3><table>{h1}{h2 if has_before and perf_keys else ''}{''.join(rows)}</table>"


def _section_bias(run: RunData) -> str:
    parts = [_guard_banner(run, "bias")]
    d = run.details("bias")
    groups = d.get("groups") if isinstance(d.get("groups"), dict) else {}
    before_groups, before_scalars = _split_before(d.get("before"))
    if not groups and not before_groups:
        parts.append(_not_measured("no per-group figures (bias.details.groups); name group columns in "
                                   "the recipe's data.groups to measure them."))
    else:
        for column in list(groups) + [c for c in before_groups if c not in groups]:
            after = groups.get(column)
            before = before_groups.get(column)
            if after is not None and not isinstance(after, dict):
                parts.append(f"<h3>By {_e(column)}</h3>" + render_generic(after))
                continue
            parts.append(_group_table(str(column), after or {}, before if isinstance(before, dict) else {}))
        if not before_groups:
            parts.append('<p class="note">No pre-trained figures (bias.details.before) to compare with.</p>')
    fair_rows = []
    used = {"groups", "before"}
    for k, v in d.items():
        if k in used or (k.endswith("_before") and k[: -len("_before")] in d):
            continue
        if is_number(v) or (v is None and k.endswith("_difference")):
            bv = before_scalars.get(k, d.get(f"{k}_before"))
            fair_rows.append(f"<tr><td>{_e(k)}</td>{_num_td(v)}{_num_td(bv)}{_delta_td(v, bv, False)}</tr>")
            used.add(k)
            used.add(f"{k}_before")
    if fair_rows:
        parts.append(
            "<h3>Gaps between groups</h3><table><tr><th>figure</th><th class=\"num\">fine-tuned</th>"
            "<th class=\"num\">pre-trained</th><th class=\"num\">Δ (positive: the gap widened)</th></tr>"
            + "".join(fair_rows) + "</table>"
        )
    rest = {k: v for k, v in d.items() if k not in used}
    if rest:
        parts.append("<h3>Other bias figures</h3>" + render_generic(rest))
    return "\n".join(p for p in parts if p)


def _section_confusion(run: RunData) -> str:
    cm = run.metrics.get("confusion_matrix")
    if not isinstance(cm, dict) or not isinstance(cm.get("matrix"), list) or not cm["matrix"]:
        return _not_measured("no confusion matrix in metrics.json (classification tasks only).")
    matrix = [r if isinstance(r, list) else [] for r in cm["matrix"]]
    k = max(len(matrix), max(len(r) for r in matrix))
    labels = list(cm.get("labels") or [])
    labels = [str(x) for x in labels] + [str(i) for i in range(len(labels), k)]
    shown = min(k, _MAX_CLASSES)
    head = '<tr><th class="corner">true ↓ / predicted →</th>' + "".join(
        f"<th>{_e(labels[j])}</th>" for j in range(shown)
    ) + '<th class="num">total</th><th class="num">recall</th></tr>'
    rows = []
    for i in range(shown):
        r = matrix[i] if i < len(matrix) else []
        vals = [r[j] if j < len(r) and is_number(r[j]) else 0 for j in range(k)]
        total = sum(vals)
        row = f"<tr><th>{_e(labels[i])}</th>"
        for j in range(shown):
            v = vals[j]
            frac = v / total if total else 0.0
            alpha = 0.06 + 0.84 * frac if v else 0.0
            color = "#fff" if alpha > 0.55 else "#1d2228"
            diag = ' class="diag"' if i == j else ""
            row += (
                f'<td{diag} style="background: rgba(31,119,180,{alpha:.3f}); color: {color}">'
                f'{_e(fmt(v))}<span class="pct">{_e(_pct(frac)) if total else ""}</span></td>'
            )
        recall = vals[i] / total if total and i < len(vals) else None
        row += f'<td class="num">{_e(fmt(total))}</td><td class="num">{_e(_pct(recall) if recall is not None else "—")}</td>'
        rows.append(row + "</tr>")
    note = (f'<p class="note">Showing the first {shown} of {k} classes.</p>' if k > shown else "")
    caption = ('<p class="note">Rows are true classes, columns predicted classes; shading is the share of '
               "each true class (row-normalised); outlined cells are correct predictions.</p>")
    return f'{caption}<table class="confusion">{head}{"".join(rows)}</table>{note}'


def _section_audit(run: RunData) -> str:
    if run.audit_problem:
        return _not_measured(run.audit_problem)
    audit = run.audit
    if audit is None:
        return _not_measured("no audit.json in the run directory.")
    parts = []
    findings = audit.get("findings")
    if isinstance(findings, list):
        items = [f for f in findings if isinstance(f, dict)]
        items.sort(key=lambda f: _LEVELS.get(str(f.get("level", "info")).lower(), 3))
        counts: dict[str, int] = {}
        for f in items:
            lv = str(f.get("level", "info")).lower()
            counts[lv] = counts.get(lv, 0) + 1
        parts.append("<h3>Findings</h3>")
        if not items:
            parts.append('<p class="note">The audit found nothing to report.</p>')
        else:
            parts.append(f'<p class="note">{_e(", ".join(f"{v} {k}" for k, v in counts.items()))}</p>')
            rows = []
            for f in items[:_MAX_ROWS]:
                lv = str(f.get("level", "info")).lower()
                cls = {"warning": "warn"}.get(lv, lv)
                cls = cls if cls in ("info", "warn", "error") else "unknown"
                rows.append(
                    f'<tr class="finding"><td><span class="badge badge-{cls}">{_e(lv)}</span></td>'
                    f"<td><code>{_e(f.get('code', ''))}</code></td><td>{_e(fmt(f.get('message', '')))}</td></tr>"
                )
            parts.append("<table><tr><th>level</th><th>code</th><th>message</th></tr>" + "".join(rows) + "</table>"
                         + _more_note(len(items)))
    elif findings is not None:
        parts.append("<h3>Findings</h3>" + render_generic(findings))
    splits = audit.get("splits")
    if isinstance(splits, dict) and splits:
        parts.append("<h3>Splits and class counts</h3>")
        names = list(splits)
        labels: list[str] = []
        for s in splits.values():
            cc = s.get("class_counts") if isinstance(s, dict) else None
            if isinstance(cc, dict):
                labels += [str(k) for k in cc if str(k) not in labels]
        head = "<tr><th></th>" + "".join(f'<th class="num">{_e(n)}</th>' for n in names) + "</tr>"
        rows_html = ["<tr class=\"primary\"><td>rows</td>" + "".join(
            _num_td(splits[n].get("rows") if isinstance(splits[n], dict) else None) for n in names) + "</tr>"]
        for lab in labels[:_MAX_ROWS]:
            row = f"<tr><td>{_e(lab)}</td>"
            for n in names:
                s = splits[n] if isinstance(splits[n], dict) else {}
                cc = {str(k): v for k, v in (s.get("class_counts") or {}).items()} if isinstance(s.get("class_counts"), dict) else {}
                v = cc.get(lab)
                total = s.get("rows") if is_number(s.get("rows")) else sum(x for x in cc.values() if is_number(x))
                share = f' <span class="muted">({_pct(v / total)})</span>' if is_number(v) and total else ""
                row += f'<td class="num">{_e(fmt(v))}{share}</td>'
            rows_html.append(row + "</tr>")
        parts.append(f"<table>{head}{''.join(rows_html)}</table>")
        extra = {n: {k: v for k, v in s.items() if k not in ("rows", "class_counts")}
                 for n, s in splits.items() if isinstance(s, dict)}
        extra = {n: v for n, v in extra.items() if v}
        if extra:
            parts.append("<h3>Other split figures</h3>" + render_generic(extra))
    elif splits is not None:
        parts.append("<h3>Splits</h3>" + render_generic(splits))
    for k, v in audit.items():
        if k in ("findings", "splits"):
            continue
        parts.append(f"<h3>{_e(k.replace('_', ' '))}</h3>" + render_generic(v))
    return "\n".join(parts) if parts else _not_measured("audit.json is empty.")


def _section_recipe(run: RunData) -> str:
    if run.recipe_text is None:
        return _not_measured("no recipe.yaml in the run directory.")
    return f'<pre class="recipe">{_e(run.recipe_text)}</pre>'


SECTIONS: list[tuple[str, str, Callable[[RunData], str]]] = [
    ("verdict", "Verdict", _section_verdict),
    ("headline", "Headline figures", _section_headline),
    ("training", "Training curves", _section_training),
    ("learning-curve", "Learning curve", _section_learning_curve),
    ("forgetting", "Forgetting trade-off", _section_forgetting),
    ("groups", "Per-group metrics", _section_bias),
    ("confusion", "Confusion matrix", _section_confusion),
    ("audit", "Data audit", _section_audit),
    ("recipe", "Resolved recipe", _section_recipe),
]


def _safe(fn: Callable[[RunData], str], run: RunData) -> str:
    try:
        return fn(run)
    except Exception as exc:  # one malformed input must not cost the user the whole report
        return (f'<p class="render-error">This section could not be drawn from the run directory: '
                f"{_e(type(exc).__name__)}: {_e(exc)}</p>")


def render_report(run: RunData) -> str:
    """The report for a loaded run directory, as an HTML string."""
    template = Template(resources.files("honed.report").joinpath("template.html").read_text(encoding="utf-8"))
    sections = []
    for sid, title, fn in SECTIONS:
        sections.append(f'<section id="{sid}">\n<h2>{_e(title)}</h2>\n{_safe(fn, run)}\n</section>')
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in SECTIONS)
    try:
        from importlib.metadata import version

        ver = version("honed")
    except Exception:
        ver = "dev"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    task = run.metrics.get("task") or "run"
    return template.substitute(
        generator=_e(f"honed {ver}"),
        page_title=_e(f"honed report: {task} ({run.run_dir.name})"),
        header=_safe(_header, run),
        nav=nav,
        sections="\n".join(sections),
        footer=_e(f"Generated by honed {ver} on {now} from {run.run_dir}. "
                  "This file is self-contained: it needs no network to view."),
    )


def build_report(run_dir: str | Path) -> Path:
    """Read RUN_DIR (metrics.json required; history.jsonl, audit.json, recipe.yaml optional)
    and write RUN_DIR/report.html; returns its path. Raises RecipeError when RUN_DIR or its
    metrics.json does not exist, HonedError when metrics.json is not a readable JSON object."""
    run = load_run(run_dir)
    html = render_report(run)
    out = run.run_dir / "report.html"
    tmp = run.run_dir / f".report.html.{os.getpid()}.tmp"  # written whole, then renamed over
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
