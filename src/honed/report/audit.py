"""The report's input sections: the data audit (findings, splits and class counts, anything
else audit.json holds) and the resolved recipe, verbatim."""

from __future__ import annotations

from honed.report.charts import is_number
from honed.report.markup import MAX_ROWS, esc, fmt, more_note, not_measured, num_td, pct, render_generic
from honed.report.rundata import RunData

_LEVELS = {"error": 0, "warn": 1, "warning": 1, "info": 2}


def section_audit(run: RunData) -> str:
    if run.audit_problem:
        return not_measured(run.audit_problem)
    audit = run.audit
    if audit is None:
        return not_measured("no audit.json in the run directory.")
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
            parts.append(f'<p class="note">{esc(", ".join(f"{v} {k}" for k, v in counts.items()))}</p>')
            rows = []
            for f in items[:MAX_ROWS]:
                lv = str(f.get("level", "info")).lower()
                cls = {"warning": "warn"}.get(lv, lv)
                cls = cls if cls in ("info", "warn", "error") else "unknown"
                rows.append(
                    f'<tr class="finding"><td><span class="badge badge-{cls}">{esc(lv)}</span></td>'
                    f"<td><code>{esc(f.get('code', ''))}</code></td><td>{esc(fmt(f.get('message', '')))}</td></tr>"
                )
            parts.append("<table><tr><th>level</th><th>code</th><th>message</th></tr>" + "".join(rows) + "</table>"
                         + more_note(len(items)))
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
        head = "<tr><th></th>" + "".join(f'<th class="num">{esc(n)}</th>' for n in names) + "</tr>"
        rows_html = ["<tr class=\"primary\"><td>rows</td>" + "".join(
            num_td(splits[n].get("rows") if isinstance(splits[n], dict) else None) for n in names) + "</tr>"]
        for lab in labels[:MAX_ROWS]:
            row = f"<tr><td>{esc(lab)}</td>"
            for n in names:
                s = splits[n] if isinstance(splits[n], dict) else {}
                cc = {str(k): v for k, v in (s.get("class_counts") or {}).items()} if isinstance(s.get("class_counts"), dict) else {}
                v = cc.get(lab)
                total = s.get("rows") if is_number(s.get("rows")) else sum(x for x in cc.values() if is_number(x))
                share = f' <span class="muted">({pct(v / total)})</span>' if is_number(v) and total else ""
                row += f'<td class="num">{esc(fmt(v))}{share}</td>'
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
        parts.append(f"<h3>{esc(k.replace('_', ' '))}</h3>" + render_generic(v))
    return "\n".join(parts) if parts else not_measured("audit.json is empty.")


def section_recipe(run: RunData) -> str:
    if run.recipe_text is None:
        return not_measured("no recipe.yaml in the run directory.")
    return f'<pre class="recipe">{esc(run.recipe_text)}</pre>'
