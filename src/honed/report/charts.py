"""Inline SVG charts for the report: axes, "nice" ticks, axis titles, legends. No JavaScript,
no external resources; every string that reaches the SVG is HTML-escaped here.

A series is a dict::

    {"name": str, "xs": [...], "ys": [...],
     "mode": "lines" | "markers" | "lines+markers",   # default depends on the chart
     "dash": bool, "color": "#rrggbb", "hollow": bool, "marker_size": float,
     "labels": [str | None, ...],        # text next to each point
     "highlight": [index, ...]}          # points drawn larger, with a dark ring

Points whose x or y is missing or not finite are skipped (a line is broken there).
"""

from __future__ import annotations

import math
from html import escape
from typing import Any, Iterable, Sequence

PALETTE = (
    "#1f77b4",  # blue
    "#e6761a",  # orange
    "#2ca02c",  # green
    "#d62728",  # red
    "#9467bd",  # purple
    "#8c564b",  # brown
    "#e377c2",  # pink
    "#7f7f7f",  # grey
    "#17becf",  # cyan
    "#bcbd22",  # olive
)

_CHAR_W = 6.6  # rough width of one character at font-size 12, for layout
_AXIS_COLOR = "#444"
_GRID_COLOR = "#e6e6e6"


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


def is_number(v: Any) -> bool:
    """A finite int/float (bools are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------- ticks


def nice_number(x: float, round_: bool) -> float:
    """The "nice" number (1, 2, 5 × 10^k) nearest to x (round_) or at least x (not round_)."""
    if x <= 0 or not math.isfinite(x):
        return 1.0
    exp = math.floor(math.log10(x))
    f = x / 10**exp
    if round_:
        nf = 1 if f < 1.5 else 2 if f < 3 else 5 if f < 7 else 10
    else:
        nf = 1 if f <= 1 else 2 if f <= 2 else 5 if f <= 5 else 10
    return nf * 10.0**exp


def nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Evenly spaced round tick values covering [lo, hi]; the first and last tick are the
    axis limits. A zero-width range is widened so an axis always has at least two ticks."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if lo > hi:
        lo, hi = hi, lo
    if hi - lo < 1e-12 * max(1.0, abs(lo), abs(hi)):
        pad = abs(lo) * 0.1 if lo != 0 else 1.0
        lo, hi = lo - pad, hi + pad
    span = nice_number(hi - lo, False)
    step = nice_number(span / max(1, max_ticks - 1), True)
    start = math.floor(lo / step + 1e-9)
    end = math.ceil(hi / step - 1e-9)
    ticks = [round(i * step, 12) for i in range(start, end + 1)]
    if len(ticks) < 2:
        ticks = [start * step, (start + 1) * step]
    return ticks


def format_tick(v: float, step: float) -> str:
    """Tick label with as many decimals as the tick step needs; k/M suffixes for big values."""
    if abs(v) < step * 1e-6:
        v = 0.0
    if step < 1e-3 and abs(v) < 1e-2:  # tiny values (learning rates): 1.5e-4, not 0.00015
        if v == 0:
            return "0"
        exp = math.floor(math.log10(abs(v)) + 1e-9)
        return f"{v / 10**exp:.{_decimals(step / 10**exp)}f}e{exp}"
    if step >= 1 and abs(v) >= 1e4:
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:.{_decimals(step / div)}f}{suffix}"
    return f"{v:,.{_decimals(step)}f}"


def _decimals(step: float) -> int:
    if step <= 0 or not math.isfinite(step):
        return 2
    d = -math.floor(math.log10(step) + 1e-9)
    # a step of 0.25 or 2.5 needs one more decimal than its magnitude suggests
    if abs(step / 10.0 ** (-d) - round(step / 10.0 ** (-d))) > 1e-6:
        d += 1
    return max(0, min(8, d))


# ---------------------------------------------------------------------------- scales


class _Scale:
    def __init__(self, ticks: Sequence[float], out_lo: float, out_hi: float):
        self.ticks = list(ticks)
        self.lo, self.hi = self.ticks[0], self.ticks[-1]
        self.out_lo, self.out_hi = out_lo, out_hi
        self.step = self.ticks[1] - self.ticks[0] if len(self.ticks) > 1 else 1.0

    def __call__(self, v: float) -> float:
        return self.out_lo + (v - self.lo) / (self.hi - self.lo) * (self.out_hi - self.out_lo)

    def label(self, v: float) -> str:
        return format_tick(v, self.step)


def _f(v: float) -> str:
    return f"{v:.1f}"


# ---------------------------------------------------------------------------- pieces


def _svg_open(width: int, height: int, title: str | None) -> list[str]:
    label = _e(title or "chart")
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{label}" font-size="12">',
        f"<title>{label}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    if title:
        parts.append(
            f'<text class="chart-title" x="{width / 2:.1f}" y="20" text-anchor="middle" '
            f'font-size="14" font-weight="600" fill="#222">{_e(title)}</text>'
        )
    return parts


def _legend_rows(names: list[str], avail: float) -> list[list[int]]:
    rows: list[list[int]] = [[]]
    used = 0.0
    for i, name in enumerate(names):
        w = 30 + _CHAR_W * len(name) + 16
        if rows[-1] and used + w > avail:
            rows.append([])
            used = 0.0
        rows[-1].append(i)
        used += w
    return rows if rows[0] else []


def _legend(series: list[dict], rows: list[list[int]], left: float, top: float) -> list[str]:
    parts = ['<g class="legend">']
    for r, row in enumerate(rows):
        x = left
        y = top + r * 18
        for i in row:
            s = series[i]
            color = s["color"]
            if "lines" in s["mode"]:
                dash = ' stroke-dasharray="6 4"' if s.get("dash") else ""
                parts.append(
                    f'<line x1="{_f(x)}" y1="{_f(y)}" x2="{_f(x + 22)}" y2="{_f(y)}" '
                    f'stroke="{color}" stroke-width="2.5"{dash}/>'
                )
            if "markers" in s["mode"]:
                fill = "#ffffff" if s.get("hollow") else color
                parts.append(
                    f'<circle cx="{_f(x + 11)}" cy="{_f(y)}" r="4" fill="{fill}" '
                    f'stroke="{color}" stroke-width="1.5"/>'
                )
            parts.append(f'<text x="{_f(x + 28)}" y="{_f(y + 4)}" fill="#222">{_e(s["name"])}</text>')
            x += 30 + _CHAR_W * len(s["name"]) + 16
    parts.append("</g>")
    return parts


def _axes(
    xs: _Scale, ys: _Scale, left: float, right: float, top: float, bottom: float,
    x_label: str, y_label: str, width: int, height: int,
) -> list[str]:
    parts = ['<g class="grid">']
    for t in ys.ticks:
        y = ys(t)
        parts.append(
            f'<line x1="{_f(left)}" y1="{_f(y)}" x2="{_f(right)}" y2="{_f(y)}" stroke="{_GRID_COLOR}"/>'
        )
    for t in xs.ticks:
        x = xs(t)
        parts.append(
            f'<line x1="{_f(x)}" y1="{_f(top)}" x2="{_f(x)}" y2="{_f(bottom)}" stroke="{_GRID_COLOR}"/>'
        )
    parts.append("</g>")
    parts.append('<g class="axes">')
    parts.append(
        f'<line class="x-axis" x1="{_f(left)}" y1="{_f(bottom)}" x2="{_f(right)}" y2="{_f(bottom)}" '
        f'stroke="{_AXIS_COLOR}" stroke-width="1.2"/>'
    )
    parts.append(
        f'<line class="y-axis" x1="{_f(left)}" y1="{_f(top)}" x2="{_f(left)}" y2="{_f(bottom)}" '
        f'stroke="{_AXIS_COLOR}" stroke-width="1.2"/>'
    )
    for t in xs.ticks:
        x = xs(t)
        parts.append(
            f'<line x1="{_f(x)}" y1="{_f(bottom)}" x2="{_f(x)}" y2="{_f(bottom + 5)}" stroke="{_AXIS_COLOR}"/>'
        )
        parts.append(
            f'<text class="tick" x="{_f(x)}" y="{_f(bottom + 18)}" text-anchor="middle" '
            f'fill="#333">{_e(xs.label(t))}</text>'
        )
    for t in ys.ticks:
        y = ys(t)
        parts.append(
            f'<line x1="{_f(left - 5)}" y1="{_f(y)}" x2="{_f(left)}" y2="{_f(y)}" stroke="{_AXIS_COLOR}"/>'
        )
        parts.append(
            f'<text class="tick" x="{_f(left - 8)}" y="{_f(y + 4)}" text-anchor="end" '
            f'fill="#333">{_e(ys.label(t))}</text>'
        )
    parts.append(
        f'<text class="axis-title x-title" x="{_f((left + right) / 2)}" y="{_f(height - 10)}" '
        f'text-anchor="middle" font-size="13" fill="#222">{_e(x_label)}</text>'
    )
    cy = (top + bottom) / 2
    parts.append(
        f'<text class="axis-title y-title" x="16" y="{_f(cy)}" transform="rotate(-90 16 {_f(cy)})" '
        f'text-anchor="middle" font-size="13" fill="#222">{_e(y_label)}</text>'
    )
    parts.append("</g>")
    return parts


def _norm_series(series: Iterable[dict], default_mode: str) -> list[dict]:
    out = []
    for i, s in enumerate(series):
        xs = list(s.get("xs") or [])
        ys = list(s.get("ys") or [])
        n = min(len(xs), len(ys))
        pts = [(xs[j], ys[j]) if is_number(xs[j]) and is_number(ys[j]) else None for j in range(n)]
        mode = s.get("mode") or default_mode
        if mode == "lines" and sum(p is not None for p in pts) <= 2:
            mode = "lines+markers"  # a line through one or two points is invisible or unreadable
        labels = list(s.get("labels") or [])
        out.append(
            {
                **s,
                "name": str(s.get("name", f"series {i + 1}")),
                "pts": pts,
                "mode": mode,
                "color": s.get("color") or PALETTE[i % len(PALETTE)],
                "labels": labels + [None] * (n - len(labels)),
                "highlight": set(s.get("highlight") or []),
            }
        )
    return out


def _refline_value(v: Any, key: str) -> tuple[float | None, str]:
    if isinstance(v, dict):
        val = v.get(key)
        return (val if is_number(val) else None), str(v.get("label") or "")
    return (v if is_number(v) else None), ""


def _empty(width: int, height: int, title: str | None, message: str) -> str:
    parts = _svg_open(width, height, title)
    parts.append(
        f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" fill="#777">{_e(message)}</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------- charts


def xy_chart(
    series: list[dict],
    x_label: str,
    y_label: str,
    *,
    title: str | None = None,
    vlines: Sequence[Any] = (),
    hlines: Sequence[Any] = (),
    width: int = 720,
    height: int = 340,
    default_mode: str = "lines",
    legend: bool | None = None,
) -> str:
    """The shared x/y chart: lines and/or markers, reference lines, legend."""
    ser = _norm_series(series, default_mode)
    vl = [(*_refline_value(v, "x"), (v.get("color") if isinstance(v, dict) else None)) for v in vlines]
    hl = [(*_refline_value(h, "y"), (h.get("color") if isinstance(h, dict) else None)) for h in hlines]
    vl = [v for v in vl if v[0] is not None]
    hl = [h for h in hl if h[0] is not None]
    all_x = [p[0] for s in ser for p in s["pts"] if p] + [v[0] for v in vl]
    all_y = [p[1] for s in ser for p in s["pts"] if p] + [h[0] for h in hl]
    if not any(p for s in ser for p in s["pts"]):
        return _empty(width, height, title, "no data")

    show_legend = legend if legend is not None else len(ser) > 1
    left, right = 74.0, width - 24.0
    top = 34.0 if title else 14.0
    rows = _legend_rows([s["name"] for s in ser], right - left) if show_legend else []
    legend_top = top + 4
    top += len(rows) * 18 + (8 if rows else 0)
    # labelled vertical lines get one row each in a band above the plot, so no label can
    # collide with the data or with another label
    n_vlabels = sum(1 for v in vl if v[1])
    band_top = top
    top += 14 * n_vlabels + (4 if n_vlabels else 0)
    bottom = height - 50.0

    xs = _Scale(nice_ticks(min(all_x), max(all_x), max_ticks=8), left, right)
    ys = _Scale(nice_ticks(min(all_y), max(all_y), max_ticks=6), bottom, top)

    parts = _svg_open(width, height, title)
    parts += _axes(xs, ys, left, right, top, bottom, x_label, y_label, width, height)

    row = 0
    for x, label, color in vl:
        px = xs(x)
        c = color or "#555"
        y1 = top
        if label:
            ty = band_top + 11 + 14 * row
            row += 1
            y1 = ty + 3
            anchor, tx = ("end", px - 4) if px > right - _CHAR_W * len(label) - 8 else ("start", px + 4)
            parts.append(
                f'<text class="ref-label" x="{_f(tx)}" y="{_f(ty)}" text-anchor="{anchor}" '
                f'font-size="11" fill="{_e(c)}">{_e(label)}</text>'
            )
        parts.append(
            f'<line class="vline" x1="{_f(px)}" y1="{_f(y1)}" x2="{_f(px)}" y2="{_f(bottom)}" '
            f'stroke="{_e(c)}" stroke-width="1.5" stroke-dasharray="4 3"/>'
        )
    for y, label, color in hl:
        py = ys(y)
        c = color or "#555"
        parts.append(
            f'<line class="hline" x1="{_f(left)}" y1="{_f(py)}" x2="{_f(right)}" y2="{_f(py)}" '
            f'stroke="{_e(c)}" stroke-width="1.5" stroke-dasharray="4 3"/>'
        )
        if label:
            parts.append(
                f'<text class="ref-label" x="{_f(left + 4)}" y="{_f(py - 4)}" text-anchor="start" '
                f'font-size="11" fill="{_e(c)}">{_e(label)}</text>'
            )

    for s in ser:
        color = s["color"]
        parts.append(f'<g class="series" data-name="{_e(s["name"])}">')
        if "lines" in s["mode"]:
            dash = ' stroke-dasharray="6 4"' if s.get("dash") else ""
            segment: list[str] = []
            for p in s["pts"] + [None]:
                if p is None:
                    if len(segment) >= 2:
                        parts.append(
                            f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                            f'stroke-linejoin="round"{dash} points="{" ".join(segment)}"/>'
                        )
                    segment = []
                else:
                    segment.append(f"{_f(xs(p[0]))},{_f(ys(p[1]))}")
        for j, p in enumerate(s["pts"]):
            if p is None:
                continue
            px, py = xs(p[0]), ys(p[1])
            tip = f'{s["name"]}: x={format_tick(p[0], xs.step / 100)}, y={format_tick(p[1], ys.step / 100)}'
            if j in s["highlight"]:
                parts.append(
                    f'<circle class="highlight" cx="{_f(px)}" cy="{_f(py)}" r="8" fill="{color}" '
                    f'stroke="#111" stroke-width="2.5"><title>{_e(tip)}</title></circle>'
                )
            elif "markers" in s["mode"]:
                r = s.get("marker_size") or 4
                fill = "#ffffff" if s.get("hollow") else color
                parts.append(
                    f'<circle cx="{_f(px)}" cy="{_f(py)}" r="{r}" fill="{fill}" stroke="{color}" '
                    f'stroke-width="1.8"><title>{_e(tip)}</title></circle>'
                )
            label = s["labels"][j]
            if label:
                bold = ' font-weight="700"' if j in s["highlight"] else ""
                off = 11 if j in s["highlight"] else 7
                if px > right - _CHAR_W * len(str(label)) - 12:
                    anchor, tx = "end", px - off
                else:
                    anchor, tx = "start", px + off
                ty = py - off if py - off > top + 10 else py + off + 10
                parts.append(
                    f'<text class="point-label" x="{_f(tx)}" y="{_f(ty)}" text-anchor="{anchor}" '
                    f'font-size="11" fill="#222"{bold}>{_e(label)}</text>'
                )
        parts.append("</g>")

    if rows:
        parts += _legend(ser, rows, left, legend_top + 6)
    parts.append("</svg>")
    return "\n".join(parts)


def line_chart(
    series: list[dict],
    x_label: str,
    y_label: str,
    vlines: Sequence[Any] = (),
    title: str | None = None,
    **kw: Any,
) -> str:
    """Lines (markers too when a series has few points). vlines: numbers or {x, label, color}."""
    return xy_chart(series, x_label, y_label, title=title, vlines=vlines, default_mode="lines", **kw)


def scatter_chart(
    series: list[dict],
    x_label: str,
    y_label: str,
    vlines: Sequence[Any] = (),
    title: str | None = None,
    **kw: Any,
) -> str:
    """Markers, optionally labelled per point; a series may set mode="lines+markers"."""
    return xy_chart(series, x_label, y_label, title=title, vlines=vlines, default_mode="markers", **kw)


def bar_chart(
    bars: list[dict],
    value_label: str,
    category_label: str = "",
    *,
    title: str | None = None,
    width: int = 720,
) -> str:
    """Horizontal bars: bars = [{name, value, color?}]; the value axis is horizontal."""
    bars = [b for b in bars if is_number(b.get("value"))]
    if not bars:
        return _empty(width, 120, title, "no data")
    names = [str(b.get("name", "")) for b in bars]
    left = min(260.0, max(90.0, 34 + _CHAR_W * max(len(n) for n in names)))
    right = width - 60.0
    top = 34.0 if title else 14.0
    row_h = 30.0
    bottom = top + row_h * len(bars) + 6
    height = int(bottom + 50)
    values = [float(b["value"]) for b in bars]
    xs = _Scale(nice_ticks(min(0.0, *values), max(0.0, *values), max_ticks=7), left, right)

    parts = _svg_open(width, height, title)
    parts.append('<g class="grid">')
    for t in xs.ticks:
        parts.append(
            f'<line x1="{_f(xs(t))}" y1="{_f(top)}" x2="{_f(xs(t))}" y2="{_f(bottom)}" stroke="{_GRID_COLOR}"/>'
        )
    parts.append("</g>")
    zero = xs(0.0)
    for i, (b, name, v) in enumerate(zip(bars, names, values)):
        y = top + 6 + i * row_h
        x0, x1 = sorted((zero, xs(v)))
        color = b.get("color") or PALETTE[0]
        parts.append(
            f'<rect class="bar" x="{_f(x0)}" y="{_f(y)}" width="{_f(max(1.0, x1 - x0))}" '
            f'height="{_f(row_h - 10)}" fill="{_e(color)}"><title>{_e(name)}: {_e(format_tick(v, xs.step / 100))}</title></rect>'
        )
        parts.append(
            f'<text class="tick" x="{_f(left - 8)}" y="{_f(y + (row_h - 10) / 2 + 4)}" text-anchor="end" '
            f'fill="#222">{_e(name)}</text>'
        )
        vx = (x1 + 5) if v >= 0 else (x0 - 5)
        anchor = "start" if v >= 0 else "end"
        parts.append(
            f'<text class="bar-value" x="{_f(vx)}" y="{_f(y + (row_h - 10) / 2 + 4)}" text-anchor="{anchor}" '
            f'font-size="11" fill="#222">{_e(b.get("text") or format_tick(v, xs.step / 100))}</text>'
        )
    parts.append('<g class="axes">')
    parts.append(
        f'<line class="x-axis" x1="{_f(left)}" y1="{_f(bottom)}" x2="{_f(right)}" y2="{_f(bottom)}" '
        f'stroke="{_AXIS_COLOR}" stroke-width="1.2"/>'
    )
    parts.append(
        f'<line class="y-axis" x1="{_f(zero)}" y1="{_f(top)}" x2="{_f(zero)}" y2="{_f(bottom)}" '
        f'stroke="{_AXIS_COLOR}" stroke-width="1.2"/>'
    )
    for t in xs.ticks:
        parts.append(
            f'<line x1="{_f(xs(t))}" y1="{_f(bottom)}" x2="{_f(xs(t))}" y2="{_f(bottom + 5)}" stroke="{_AXIS_COLOR}"/>'
        )
        parts.append(
            f'<text class="tick" x="{_f(xs(t))}" y="{_f(bottom + 18)}" text-anchor="middle" '
            f'fill="#333">{_e(xs.label(t))}</text>'
        )
    parts.append(
        f'<text class="axis-title x-title" x="{_f((left + right) / 2)}" y="{_f(height - 10)}" '
        f'text-anchor="middle" font-size="13" fill="#222">{_e(value_label)}</text>'
    )
    if category_label:
        cy = (top + bottom) / 2
        parts.append(
            f'<text class="axis-title y-title" x="14" y="{_f(cy)}" transform="rotate(-90 14 {_f(cy)})" '
            f'text-anchor="middle" font-size="13" fill="#222">{_e(category_label)}</text>'
        )
    parts.append("</g></svg>")
    return "\n".join(parts)
