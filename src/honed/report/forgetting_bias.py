"""The report's sections on what fine-tuning changed beyond the task metric: the forgetting
trade-off (the weight-interpolation sweep and the forgetting figures) and the per-group
metrics and gaps of the bias guard, before vs after."""

from __future__ import annotations

from typing import Any

from honed.report import charts
from honed.report.charts import is_number
from honed.report.markup import (MAX_ROWS, delta_td, esc, fmt, guard_banner, kv_table, not_measured, num_td, pct,
                                 render_generic, short)
from honed.report.rundata import RunData

_GROUP_DATA_KEYS = ("count", "n", "rows", "share", "label_rate", "positive_rate_in_data")


def section_forgetting(run: RunData) -> str:
    parts = [guard_banner(run, "forgetting")]
    d = run.details("forgetting")
    primary = run.primary
    interp = d.get("interpolation") if isinstance(d.get("interpolation"), list) else []
    points = [p for p in interp if isinstance(p, dict) and is_number(p.get("metric"))]
    chosen = d.get("chosen_alpha")
    if not points:
        parts.append(not_measured("no interpolation sweep (forgetting.details.interpolation) in metrics.json."))
    else:
        points.sort(key=lambda p: p.get("alpha") if is_number(p.get("alpha")) else 0)
        hi = [i for i, p in enumerate(points) if is_number(chosen) and is_number(p.get("alpha"))
              and abs(p["alpha"] - chosen) < 1e-9]
        labels = [f"α={short(p.get('alpha'))}" + (" (chosen)" if i in hi else "") for i, p in enumerate(points)]
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
            f'<tr{" class=primary" if i in hi else ""}><td class="num">{esc(short(p.get("alpha")))}</td>'
            f'{num_td(p.get("metric"))}'
            f'{num_td(p.get("retention"))}</tr>'
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
            rows.insert(3 if len(rows) >= 3 else len(rows), ("representation drift (1 − CKA)", esc(fmt(1 - d["cka"]))))
        rows += [(k, render_generic(v)) for k, v in d.items() if k not in labels and k != "interpolation"]
        parts.append("<h3>Forgetting figures</h3>" + kv_table(rows))
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


def _group_table(column: str, after: dict, before: dict, lower_is_better: frozenset[str]) -> str:
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
    h1 = f'<tr><th rowspan="2">{esc(column)}</th>' + "".join(
        f'<th rowspan="2" class="num">{esc(k)}</th>' for k in data_keys
    )
    h2 = "<tr>"
    for k in perf_keys:
        if has_before:
            h1 += f'<th colspan="3" class="num">{esc(k)}</th>'
            h2 += '<th class="num">after</th><th class="num">before</th><th class="num">Δ</th>'
        else:
            h1 += f'<th rowspan="2" class="num">{esc(k)} (after)</th>'
    h1 += "</tr>"
    h2 += "</tr>"
    rows = []
    for value in values[:MAX_ROWS]:
        a = after.get(value) if isinstance(after.get(value), dict) else {}
        b = before.get(value) if isinstance(before.get(value), dict) else {}
        row = f"<tr><td>{esc(value)}</td>"
        for k in data_keys:
            v = a.get(k, b.get(k))
            row += f'<td class="num">{esc(pct(v) if k == "share" or k.endswith("_rate") else fmt(v))}</td>'
        for k in perf_keys:
            row += num_td(a.get(k))
            if has_before:
                hb = None if "rate" in k else k not in lower_is_better
                row += num_td(b.get(k)) + delta_td(a.get(k), b.get(k), hb)
        rows.append(row + "</tr>")
    return f"<h3>By {esc(column)}</h3><table>{h1}{h2 if has_before and perf_keys else ''}{''.join(rows)}</table>"


def section_bias(run: RunData) -> str:
    parts = [guard_banner(run, "bias")]
    d = run.details("bias")
    groups = d.get("groups") if isinstance(d.get("groups"), dict) else {}
    before_groups, before_scalars = _split_before(d.get("before"))
    if not groups and not before_groups:
        parts.append(not_measured("no per-group figures (bias.details.groups); name group columns in "
                                   "the recipe's data.groups to measure them."))
    else:
        for column in list(groups) + [c for c in before_groups if c not in groups]:
            after = groups.get(column)
            before = before_groups.get(column)
            if after is not None and not isinstance(after, dict):
                parts.append(f"<h3>By {esc(column)}</h3>" + render_generic(after))
                continue
            parts.append(_group_table(str(column), after or {}, before if isinstance(before, dict) else {},
                                      run.lower_is_better))
        if not before_groups:
            parts.append('<p class="note">No pre-trained figures (bias.details.before) to compare with.</p>')
    fair_rows = []
    used = {"groups", "before"}
    for k, v in d.items():
        if k in used or (k.endswith("_before") and k[: -len("_before")] in d):
            continue
        if is_number(v) or (v is None and k.endswith("_difference")):
            bv = before_scalars.get(k, d.get(f"{k}_before"))
            fair_rows.append(f"<tr><td>{esc(k)}</td>{num_td(v)}{num_td(bv)}{delta_td(v, bv, False)}</tr>")
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
