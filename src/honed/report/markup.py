"""Small HTML helpers shared by the report's sections: escaping, number formatting, table
cells, badges, "not measured" notes, and a generic view of any JSON value. Every string that
reaches the page goes through `esc` (directly or via one of these helpers)."""

from __future__ import annotations

import json
import math
from html import escape
from typing import TYPE_CHECKING, Any

from honed.report.charts import is_number

if TYPE_CHECKING:  # for the annotation only; rundata needs nothing from here
    from honed.report.rundata import RunData

STATUSES = ("ok", "warn", "fail", "skipped")
MAX_ROWS = 200


def esc(text: Any) -> str:
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


def pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if is_number(v) else fmt(v)


def short(v: float) -> str:
    return f"{v:g}" if is_number(v) else fmt(v)

def num_td(v: Any) -> str:
    return f'<td class="num">{esc(fmt(v))}</td>'


def delta_td(after: Any, before: Any, higher_better: bool | None) -> str:
    if not (is_number(after) and is_number(before)):
        return '<td class="num muted">—</td>'
    d = after - before
    cls = ""
    if higher_better is not None and abs(d) > 1e-12:
        good = (d > 0) == higher_better
        cls = " delta-good" if good else " delta-bad"
    sign = "+" if d > 0 else ("−" if d < 0 else "±")
    return f'<td class="num{cls}">{sign}{esc(fmt(abs(d)))}</td>'


def not_measured(what: str) -> str:
    return f'<p class="na">Not measured: {esc(what)}</p>'


def badge(status: str) -> str:
    s = str(status).lower()
    cls = s if s in STATUSES else "unknown"
    return f'<span class="badge badge-{cls}">{esc(s)}</span>'


def kv_table(rows: list[tuple[str, str]], cls: str = "kv") -> str:
    """rows: (label text, value HTML)."""
    if not rows:
        return ""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def render_generic(value: Any, depth: int = 0) -> str:
    """Any JSON value as HTML: dicts as key/value tables (a dict or list of flat dicts as one
    table), lists of scalars inline. Used for figures this module has no dedicated view for."""
    if depth > 6:
        return f"<code>{esc(json.dumps(value, default=str)[:500])}</code>"
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">—</span>'
        inner = list(value.values())
        if all(isinstance(x, dict) and x and all(_is_scalar(y) for y in x.values()) for x in inner):
            cols: list[str] = []
            for x in inner:
                cols += [k for k in x if k not in cols]
            head = "<tr><th></th>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
            rows = []
            for k, x in list(value.items())[:MAX_ROWS]:
                rows.append(f"<tr><th>{esc(k)}</th>" + "".join(_cell(x.get(c)) for c in cols) + "</tr>")
            more = more_note(len(value))
            return f"<table>{head}{''.join(rows)}</table>{more}"
        items = list(value.items())[:MAX_ROWS]
        return kv_table([(str(k), render_generic(v, depth + 1)) for k, v in items]) + more_note(len(value))
    if isinstance(value, (list, tuple)):
        if not value:
            return '<span class="muted">—</span>'
        if all(isinstance(x, dict) and x and all(_is_scalar(y) for y in x.values()) for x in value):
            cols = []
            for x in value:
                cols += [k for k in x if k not in cols]
            head = "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
            rows = ["<tr>" + "".join(_cell(x.get(c)) for c in cols) + "</tr>" for x in value[:MAX_ROWS]]
            return f"<table>{head}{''.join(rows)}</table>{more_note(len(value))}"
        if all(_is_scalar(x) for x in value):
            shown = ", ".join(fmt(x) for x in value[:100])
            return esc(shown) + (f' <span class="muted">… ({len(value)} in all)</span>' if len(value) > 100 else "")
        items = "".join(f"<li>{render_generic(x, depth + 1)}</li>" for x in value[:MAX_ROWS])
        return f"<ol>{items}</ol>{more_note(len(value))}"
    return esc(fmt(value))


def _cell(v: Any) -> str:
    if is_number(v) or isinstance(v, float):
        return num_td(v)
    return f"<td>{esc(fmt(v))}</td>"


def more_note(n: int) -> str:
    return f'<p class="note">Showing {MAX_ROWS} of {n:,}.</p>' if n > MAX_ROWS else ""


def guard_banner(run: RunData, name: str) -> str:
    """The guard's status badge and one-sentence summary, or "" when the run has no result for it."""
    g = run.guard(name)
    if not g:
        return ""
    status = str(g.get("status") or "skipped")
    summary = g.get("summary") or ""
    return f'<p class="guard-banner">{badge(status)}{esc(summary)}</p>'
