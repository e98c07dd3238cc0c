"""The report's summary tables: the page header, the verdict table (one row per guard), the
headline figures (fine-tuned vs pre-trained and baselines) and the confusion matrix."""

from __future__ import annotations

from typing import Any, Callable

from honed.report import charts
from honed.report.charts import PALETTE, is_number
from honed.report.markup import badge, delta_td, esc, fmt, guard_banner, not_measured, num_td, pct, render_generic
from honed.report.rundata import RunData

GUARDS: list[tuple[str, str]] = [
    ("overfitting", "Overfitting"),
    ("forgetting", "Forgetting"),
    ("data", "Data sufficiency"),
    ("bias", "Bias"),
    ("baseline", "Baseline"),
    ("export", "Export"),
]
_MAX_CLASSES = 40


def header(run: RunData) -> str:
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
            meta.append(f"<span>{esc(label)} <b>{esc(fmt(value))}</b></span>")
    return f'<h1>{esc(title)}</h1>\n<p class="meta">{"".join(meta)}</p>'


def section_verdict(run: RunData) -> str:
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
            summary_html = esc(summary)
        else:
            summary_html = '<span class="muted">no summary given</span>'
        counts[status] = counts.get(status, 0) + 1
        rows.append(
            f'<tr class="verdict-row" data-guard="{esc(name)}" data-status="{esc(status)}">'
            f'<td class="guard">{esc(titles.get(name, name))} <code class="muted">{esc(name)}</code></td>'
            f'<td class="status">{badge(status)}</td><td class="summary">{summary_html}</td></tr>'
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
    parts.append(f'<p class="overall">{esc(overall)}</p>')
    parts.extend(next_step_lines(run.metrics))
    parts.append(
        '<table class="verdict"><thead><tr><th>guard</th><th>status</th><th>summary</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return "\n".join(parts)


def next_step_lines(metrics: dict) -> list[str]:
    """The next step a failed run names (honed/next_step.py), and the retry that ran it or the run this one retried."""
    out = []
    step, retry, retry_of = metrics.get("next_step"), metrics.get("retry"), metrics.get("retry_of")
    if isinstance(step, dict) and step.get("sentence"):
        out.append(f'<p class="next-step">{esc(step["sentence"])}</p>')
    if isinstance(retry, dict):
        statuses = ", ".join(f"{k} {v}" for k, v in (retry.get("guards") or {}).items())
        out.append(f'<p class="retry">Retried with {esc(" ".join(retry.get("set") or []))}: <code>{esc(retry.get("run_dir"))}</code> '
                   f'(validation {esc(fmt(retry.get("validation")))}, test {esc(fmt(retry.get("test")))}; {esc(statuses)}).</p>')
    if isinstance(retry_of, dict):
        out.append(f'<p class="retry">This run retries <code>{esc(retry_of.get("run_dir"))}</code> with '
                   f'{esc(" ".join(retry_of.get("set") or []))} (it had {esc(retry_of.get("failure"))}).</p>')
    return out


def _baseline_value(v: Any, metric: str, primary: str) -> Any:
    if isinstance(v, dict):
        return v.get(metric)
    if is_number(v) and metric == primary:
        return v
    return None


def section_headline(run: RunData) -> str:
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
        parts.append(not_measured("metrics.json has no test, validation, pre-trained or baseline figures."))
    else:
        show_delta = bool(test) and bool(pre)
        head = "<tr><th>metric</th>" + "".join(f'<th class="num">{esc(c[0])}</th>' for c in columns)
        head += '<th class="num">test − pre-trained</th></tr>' if show_delta else "</tr>"
        rows = []
        for k in metric_names:
            vals = [c[1](k) for c in columns]
            if all(v is None for v in vals):
                continue
            cls = ' class="primary"' if k == primary else ""
            row = f"<tr{cls}><td>{esc(k)}{' (primary)' if k == primary else ''}</td>"
            row += "".join(num_td(v) for v in vals)
            if show_delta:
                row += delta_td(test.get(k), pre.get(k), k not in run.lower_is_better)
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
        parts.append("<h3>Baseline guard</h3>" + guard_banner(run, "baseline"))
        if extra:
            parts.append(render_generic(extra))
    timing = m.get("timing")
    parts.append("<h3>Timing and resources</h3>")
    if isinstance(timing, dict) and timing:
        parts.append(render_generic(timing))
    else:
        parts.append(not_measured("no timing figures in metrics.json."))
    return "\n".join(parts)


def section_confusion(run: RunData) -> str:
    cm = run.metrics.get("confusion_matrix")
    if not isinstance(cm, dict) or not isinstance(cm.get("matrix"), list) or not cm["matrix"]:
        return not_measured("no confusion matrix in metrics.json (classification tasks only).")
    matrix = [r if isinstance(r, list) else [] for r in cm["matrix"]]
    k = max(len(matrix), max(len(r) for r in matrix))
    labels = list(cm.get("labels") or [])
    labels = [str(x) for x in labels] + [str(i) for i in range(len(labels), k)]
    shown = min(k, _MAX_CLASSES)
    head = '<tr><th class="corner">true ↓ / predicted →</th>' + "".join(
        f"<th>{esc(labels[j])}</th>" for j in range(shown)
    ) + '<th class="num">total</th><th class="num">recall</th></tr>'
    rows = []
    for i in range(shown):
        r = matrix[i] if i < len(matrix) else []
        vals = [r[j] if j < len(r) and is_number(r[j]) else 0 for j in range(k)]
        total = sum(vals)
        row = f"<tr><th>{esc(labels[i])}</th>"
        for j in range(shown):
            v = vals[j]
            frac = v / total if total else 0.0
            alpha = 0.06 + 0.84 * frac if v else 0.0
            color = "#fff" if alpha > 0.55 else "#1d2228"
            diag = ' class="diag"' if i == j else ""
            row += (
                f'<td{diag} style="background: rgba(31,119,180,{alpha:.3f}); color: {color}">'
                f'{esc(fmt(v))}<span class="pct">{esc(pct(frac)) if total else ""}</span></td>'
            )
        recall = vals[i] / total if total and i < len(vals) else None
        row += f'<td class="num">{esc(fmt(total))}</td><td class="num">{esc(pct(recall) if recall is not None else "—")}</td>'
        rows.append(row + "</tr>")
    note = (f'<p class="note">Showing the first {shown} of {k} classes.</p>' if k > shown else "")
    caption = ('<p class="note">Rows are true classes, columns predicted classes; shading is the share of '
               "each true class (row-normalised); outlined cells are correct predictions.</p>")
    return f'{caption}<table class="confusion">{head}{"".join(rows)}</table>{note}'
