"""What the pages show beyond the runs table: the live training charts, the comparison of 2–6
runs (verdicts, metrics, overlaid validation curves, the recipe keys that differ) and `honed
tune` studies. Charts are the report's own inline SVG (report/charts.py); a run's verdict table
is the report's own section (report/verdict.py)."""

from __future__ import annotations

from pathlib import Path

from ..report.charts import PALETTE, line_chart
from ..report.markup import esc
from ..report.rundata import RunData, load_run
from ..report.verdict import section_verdict
from .runs import GUARDS, RunsRoot, UnknownRun, read_history, read_json, recipe_of

MAX_COMPARED = 6
SYMBOLS = {"ok": "✓", "warn": "!", "fail": "✗", "skipped": "–", "error": "✗"}


def badge_html(guard: str, status: str) -> str:
    """A guard badge that reads without colour: a symbol and the status in words."""
    s = str(status).lower()
    cls = s if s in SYMBOLS else "unknown"
    return (f'<span class="badge badge-{cls}" title="{esc(guard)}: {esc(s)}" data-guard="{esc(guard)}" data-status="{esc(s)}">'
            f'<span aria-hidden="true">{SYMBOLS.get(s, "?")}</span> {esc(s)}</span>')


def steps_of(history: list[dict]) -> list[float]:
    return [h.get("step", i) for i, h in enumerate(history)]


def live_charts(history: list[dict], primary: str | None) -> str:
    """Loss and validation-metric charts of the history so far (inline SVG)."""
    if not history:
        return '<p class="muted">No evaluation yet: the curves appear after the first one.</p>'
    steps = steps_of(history)
    loss = [{"name": name, "xs": steps, "ys": [h.get(key) for h in history], "dash": dash, "color": color}
            for key, name, dash, color in (("train_loss", "train loss", True, PALETTE[1]), ("val_loss", "validation loss", False, PALETTE[0]))
            if any(isinstance(h.get(key), (int, float)) for h in history)]
    key = f"val_{primary}" if primary and any(f"val_{primary}" in h for h in history) else next(
        (k for h in history for k in h if k.startswith("val_") and k != "val_loss"), None)
    parts = []
    if loss:
        parts.append(line_chart(loss, "step", "loss", title="Loss", legend=True, width=540, height=300))
    if key:
        parts.append(line_chart([{"name": key.replace("val_", "validation "), "xs": steps, "ys": [h.get(key) for h in history]}],
                                "step", key.replace("val_", "validation "), title="Validation metric", width=540, height=300))
    return '<div class="charts">' + "".join(parts) + "</div>"


# --------------------------------------------------------------------------- compare

def flatten(value, prefix: str = "") -> dict[str, object]:
    """{"train.lr": 1e-4, ...}: nested recipe keys as dotted names."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def differing_keys(recipes: list[dict]) -> list[tuple[str, list[object]]]:
    """The recipe keys whose values are not the same in every run (`out` always differs, so left out)."""
    flat = [flatten(r) for r in recipes]
    keys = sorted({k for f in flat for k in f} - {"out"})
    missing = object()
    rows = []
    for key in keys:
        values = [f.get(key, missing) for f in flat]
        if any(v != values[0] for v in values[1:]):
            rows.append((key, [None if v is missing else v for v in values]))
    return rows


def compared_runs(roots: RunsRoot, names: list[str]) -> list[tuple[str, Path]]:
    """The runs named (2 to 6, each once), resolved safely; ValueError otherwise."""
    unique = list(dict.fromkeys(n for n in names if n))
    if not 2 <= len(unique) <= MAX_COMPARED:
        raise ValueError(f"compare: choose 2 to {MAX_COMPARED} runs (got {len(unique)})")
    out = []
    for name in unique:
        try:
            out.append((name, roots.path(name)))
        except UnknownRun:
            raise ValueError("compare: one of the runs does not exist under --runs") from None
    return out


def compare(roots: RunsRoot, names: list[str]) -> dict:
    """Everything the compare page shows, for the runs `names`."""
    runs = compared_runs(roots, names)
    loaded: list[tuple[str, RunData | None]] = []
    for name, path in runs:
        loaded.append((name, load_run(path) if (path / "metrics.json").is_file() else None))
    primary = next((r.primary for _, r in loaded if r is not None), None)
    metric_names: list[str] = []
    for _, run in loaded:
        for split in ("test", "validation"):
            for key in (run.metrics.get(split) or {}) if run else ():
                if f"{split} {key}" not in metric_names:
                    metric_names.append(f"{split} {key}")
    metric_rows = []
    for label in metric_names:
        split, key = label.split(" ", 1)
        metric_rows.append((label, [((run.metrics.get(split) or {}).get(key) if run else None) for _, run in loaded]))
    guards = [(g, [(run.guard(g).get("status") or "—") if run else "—" for _, run in loaded]) for g in GUARDS]
    retention = [(("forgetting: retention"), [run.details("forgetting").get("retention") if run else None for _, run in loaded]),
                 (("forgetting: cka"), [run.details("forgetting").get("cka") if run else None for _, run in loaded]),
                 (("train seconds"), [(run.metrics.get("timing") or {}).get("train_seconds") if run else None for _, run in loaded])]
    series = []
    for i, (name, path) in enumerate(runs):
        history = read_history(path)
        key = f"val_{primary}" if primary else None
        if history and key:
            series.append({"name": name, "xs": steps_of(history), "ys": [h.get(key) for h in history],
                           "color": PALETTE[i % len(PALETTE)], "dash": i % 2 == 1})
    curves = (line_chart(series, "step", f"validation {primary}", title="Validation curves", legend=True, width=720, height=340)
              if series else '<p class="muted">No history.jsonl in these runs.</p>')
    learning = learning_curves(loaded)
    verdicts = [(name, section_verdict(run) if run else '<p class="muted">not finished: no verdict yet</p>') for name, run in loaded]
    return {"names": [n for n, _ in runs], "metric_rows": metric_rows, "guards": guards, "figures": retention,
            "curves": curves, "learning": learning, "verdicts": verdicts,
            "differences": differing_keys([recipe_of(path) for _, path in runs]), "primary": primary}


def learning_curves(loaded: list[tuple[str, RunData | None]]) -> str:
    """The data guard's learning curves (validation score per training fraction), overlaid; '' when no run has one."""
    series = []
    for i, (name, run) in enumerate(loaded):
        d = run.details("data") if run else {}
        if d.get("fractions") and d.get("scores"):
            series.append({"name": name, "xs": d["fractions"], "ys": d["scores"], "mode": "lines+markers",
                           "color": PALETTE[i % len(PALETTE)]})
    if not series:
        return ""
    return line_chart(series, "fraction of the training data", "validation score", title="Learning curves", legend=True,
                      width=720, height=320)


# --------------------------------------------------------------------------- honed tune

def studies(roots: RunsRoot) -> list[str]:
    """Folders under --runs (two levels) that hold a tune.json."""
    if not roots.root.is_dir():
        return []
    found = []
    for pattern in ("*/tune.json", "*/*/tune.json"):
        for path in sorted(roots.root.glob(pattern)):
            if not path.is_symlink() and path.resolve().is_relative_to(roots.root):
                found.append(path.parent.relative_to(roots.root).as_posix())
    return found


def study(roots: RunsRoot, name: str) -> dict:
    """A study's trials (number, state, value, params), the best marked; ValueError when not a study."""
    if name not in studies(roots):
        raise ValueError("tune: no such study under --runs")
    summary = read_json(roots.root / name / "tune.json") or {}
    best = (summary.get("best") or {}).get("number")
    trials = []
    for t in summary.get("trials") or []:
        if isinstance(t, dict):
            trials.append({"number": t.get("number"), "state": t.get("state"), "value": t.get("value"),
                           "params": t.get("params") or {}, "best": t.get("number") == best})
    params = sorted({k for t in trials for k in t["params"]})
    return {"name": name, "trials": trials, "params": params, "best": summary.get("best") or {},
            "counts": summary.get("counts") or {}, "direction": summary.get("direction")}
