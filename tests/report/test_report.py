"""The HTML report: built from a fake run directory, self-contained, escaped, and degrading to
"not measured" when inputs are missing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from honed.errors import RecipeError
from honed.report import build_report
from honed.report.charts import format_tick, line_chart, nice_ticks, scatter_chart
from honed.report.verdict import GUARDS

ROOT = Path(__file__).resolve().parents[2]
EVIL = '<script>alert("x")</script>'

RECIPE = f"""\
# fetched from https://example.com/data and a note: {EVIL}
task: text-classification
model: tiny-bert & friends <b>bold</b>
data:
  train: data/train.csv
  text: text
  label: label
  groups: [region]
method: lora
train:
  epochs: 3
  lr: 0.0002
  batch_size: 16
  seed: 0
  precision: auto
out: runs/my-run
"""


def full_metrics() -> dict:
    return {
        "task": "text-classification",
        "primary_metric": "accuracy",
        "lower_is_better": ["loss"],
        "test": {"accuracy": 0.88, "f1_macro": 0.861, "loss": 0.31},
        "validation": {"accuracy": 0.87, "f1_macro": 0.85},
        "pretrained": {"accuracy": 0.56, "f1_macro": 0.41},
        "guards": {
            "overfitting": {
                "status": "ok",
                "summary": "Validation accuracy peaked at step 120; train/validation gap 0.04.",
                "details": {"best_step": 120, "gap": 0.04, "final_gap": 0.07, "seeds": [0.88, 0.87, 0.89],
                            "spread": 0.02, "val_loss_rising": False},
            },
            "forgetting": {
                "status": "warn",
                "summary": f"Retention 0.81 on the reference set {EVIL}",
                "details": {
                    "reference": "data/general.csv", "retention": 0.81, "cka": 0.72,
                    "perplexity_before": None, "perplexity_after": None,
                    "interpolation": [
                        {"alpha": a, "metric": m, "retention": r}
                        for a, m, r in [(0.0, 0.56, 1.0), (0.25, 0.71, 0.98), (0.5, 0.82, 0.95),
                                        (0.75, 0.86, 0.9), (1.0, 0.88, 0.81)]
                    ],
                    "chosen_alpha": 0.75,
                    "retention_floor": 0.9,
                },
            },
            "data": {
                "status": "ok",
                "summary": "More data would add about 0.01 accuracy; 70% of the data was enough.",
                "details": {
                    "fractions": [0.1, 0.2, 0.4, 0.7, 1.0],
                    "scores": [0.70, 0.78, 0.83, 0.865, 0.88],
                    "n": 2000,
                    # err(n) = 2.8·n^-0.45 + 0.05 ≈ 1 − scores above
                    "fit": {"a": 2.8, "b": 0.45, "c": 0.05},
                    "expected_at_2x": 0.897, "expected_at_5x": 0.912,
                    "n_for_target": 4800, "target": 0.9,
                    "sufficient_fraction": 0.7, "backtest_error": 0.006,
                    "examples_per_class": {"billing": 700, "tech": 900, "other": 400},
                },
            },
            "bias": {
                "status": "fail",
                "summary": "Accuracy gap between regions widened from 0.05 to 0.14.",
                "details": {
                    "groups": {"region": {
                        "north": {"count": 600, "accuracy": 0.92, "f1_macro": 0.9, "selection_rate": 0.4},
                        "south": {"count": 300, "accuracy": 0.78, "f1_macro": 0.74, "selection_rate": 0.3},
                        "<east>": {"count": 100, "accuracy": 0.85, "f1_macro": 0.8, "selection_rate": 0.35},
                    }},
                    "demographic_parity_difference": 0.1,
                    "equalized_odds_difference": 0.14,
                    "before": {"region": {
                        "north": {"count": 600, "accuracy": 0.58, "f1_macro": 0.42, "selection_rate": 0.33},
                        "south": {"count": 300, "accuracy": 0.53, "f1_macro": 0.4, "selection_rate": 0.31},
                        "<east>": {"count": 100, "accuracy": 0.55, "f1_macro": 0.41, "selection_rate": 0.32},
                    }},
                },
            },
            "baseline": {
                "status": "ok",
                "summary": "Fine-tuning beats a linear probe by 0.21 and training from scratch by 0.33.",
                "details": {"scratch": 0.55, "linear_probe": 0.67, "majority": 0.4},
            },
        },
        "timing": {"train_seconds": 41.2, "samples_per_second": 150.3, "peak_rss_mb": 900},
        "confusion_matrix": {"labels": ["billing", "tech", "<other>"],
                             "matrix": [[60, 5, 5], [4, 80, 6], [3, 7, 30]]},
        "run": {"run_dir": "runs/my-run", "method": "lora", "model": "tiny-bert",
                "started": "2025-01-01T10:00:00Z", "finished": "2025-01-01T10:01:00Z"},
    }


def history_lines() -> list[dict]:
    out = []
    for i in range(1, 16):
        step = i * 20
        out.append({
            "step": step, "epoch": step / 100, "stage": "head" if step <= 60 else "full",
            "train_loss": 1.2 * 0.85**i, "val_loss": 0.9 * 0.9**i + 0.002 * max(0, i - 6) ** 2,
            "val_accuracy": min(0.88, 0.5 + 0.05 * i), "val_f1_macro": min(0.86, 0.45 + 0.05 * i),
            "train_accuracy": min(0.99, 0.55 + 0.05 * i), "lr": 2e-4 * (1 - i / 16), "samples_per_s": 150.0,
        })
    return out


AUDIT = {
    "findings": [
        {"level": "info", "code": "class-balance", "message": "3 classes, smallest 20%"},
        {"level": "warn", "code": "duplicates", "message": f"12 duplicate rows {EVIL}"},
        {"level": "error", "code": "leakage", "message": "4 test rows also in train"},
    ],
    "splits": {
        "train": {"rows": 2000, "class_counts": {"billing": 700, "tech": 900, "<other>": 400}},
        "validation": {"rows": 250, "class_counts": {"billing": 90, "tech": 110, "<other>": 50}},
        "test": {"rows": 200, "class_counts": {"billing": 70, "tech": 90, "<other>": 40}},
    },
    "missing_values": {"text": 0, "region": 3},
    "brand_new_check": {"nested": {"deeper": [1, 2, 3]}, "flag": True},
}


def write_full_run(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(full_metrics()))
    (run_dir / "history.jsonl").write_text("\n".join(json.dumps(h) for h in history_lines()) + "\n")
    (run_dir / "audit.json").write_text(json.dumps(AUDIT))
    (run_dir / "recipe.yaml").write_text(RECIPE)
    return run_dir


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    return write_full_run(tmp_path / "run")


def network_refs(html: str) -> list[str]:
    pats = [
        r"""(?:src|href|xlink:href|action|poster|srcset)\s*=\s*["']?\s*(?:https?:)?//""",
        r"""url\(\s*["']?\s*(?:https?:)?//""",
        r"@import",
    ]
    return [m.group(0) for p in pats for m in re.finditer(p, html, re.I)]


def test_full_report(full_run: Path):
    out = build_report(full_run)
    assert out == full_run / "report.html"
    html = out.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")

    # verdict table first, one row per guard with its status
    # the fixture's metrics.json predates the export guard: its row says so (skipped) rather than vanishing
    statuses = {"overfitting": "ok", "forgetting": "warn", "data": "ok", "bias": "fail", "baseline": "ok", "export": "skipped"}
    rows = dict(re.findall(r'<tr class="verdict-row" data-guard="([^"]+)" data-status="([^"]+)"', html))
    assert rows == statuses
    for name, status in statuses.items():
        row = re.search(rf'data-guard="{name}".*?</tr>', html, re.S).group(0)
        assert f'class="badge badge-{status}">{status}<' in row
    order = [html.index(f'id="{s}"') for s in
             ("verdict", "headline", "training", "learning-curve", "forgetting", "groups", "confusion", "audit",
              "recipe")]
    assert order == sorted(order)

    # charts: inline SVG with axes, tick labels and axis titles
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    assert len(svgs) >= 5
    for svg in svgs:
        assert 'class="axis-title x-title"' in svg
        assert 'class="tick"' in svg
    for title in ("step", "loss", "validation accuracy", "training examples (n)",
                  "retention on the reference set (after ÷ before)", "task accuracy"):
        assert f">{title}</text>" in html, title
    assert 'class="legend"' in html
    assert "best step 120" in html and "stage: full" in html
    assert "2×: 0.8970" in html and "5×: 0.9120" in html
    assert "α=0.75 (chosen)" in html and 'class="highlight"' in html

    # headline figures and tables
    for text in ("linear probe", "from scratch", "majority class", "0.8800", "0.6700"):
        assert text in html
    assert "demographic_parity_difference" in html and "&lt;east&gt;" in html
    assert 'class="confusion"' in html and "&lt;other&gt;" in html
    assert "leakage" in html and "brand new check" in html and "deeper" in html and "region" in html

    # self-contained and escaped
    assert network_refs(html) == []
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "tiny-bert &amp; friends &lt;b&gt;bold&lt;/b&gt;" in html
    assert "https://example.com/data" in html  # shown as text, never linked
    assert "render-error" not in html.replace('.render-error', "")
    assert "Not measured" not in html


def test_minimal_run_dir(tmp_path: Path):
    metrics = {
        "task": "tabular-regression", "primary_metric": "rmse", "test": {"rmse": 3.2},
        "guards": {n: {"status": "skipped", "summary": "not run", "details": {}} for n, _ in GUARDS},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    html = build_report(tmp_path).read_text(encoding="utf-8")
    rows = dict(re.findall(r'data-guard="([^"]+)" data-status="([^"]+)"', html))
    assert rows == {n: "skipped" for n, _ in GUARDS}
    assert html.count('class="na"') >= 6
    assert "no recipe.yaml" in html and "no audit.json" in html and "no history.jsonl" in html
    assert "render-error" not in html.replace('.render-error', "")
    assert network_refs(html) == []


def test_bare_metrics_and_malformed_inputs(tmp_path: Path):
    (tmp_path / "metrics.json").write_text(json.dumps({
        "guards": {"bias": None, "data": {"status": "warn", "details": {"fractions": "oops", "fit": [1]}},
                   "forgetting": {"status": "odd", "details": {"interpolation": [{"alpha": 0.5, "metric": 0.7}]}}},
        "confusion_matrix": {"matrix": [[1, 2], [3]]},
    }))
    (tmp_path / "history.jsonl").write_text('{"step": 1, "train_loss": 1.0}\nnot json\n[1]\n{"step": 2, "train_loss": NaN}\n')
    (tmp_path / "audit.json").write_text("{broken")
    html = build_report(tmp_path).read_text(encoding="utf-8")
    rows = dict(re.findall(r'data-guard="([^"]+)" data-status="([^"]+)"', html))
    assert rows["bias"] == "skipped" and rows["data"] == "warn" and rows["forgetting"] == "odd"
    assert "2 unreadable line(s)" in html
    assert "audit.json is not valid JSON" in html
    assert "render-error" not in html.replace('.render-error', "")


def test_missing_metrics_is_a_clear_error(tmp_path: Path):
    with pytest.raises(RecipeError, match="metrics.json"):
        build_report(tmp_path)
    with pytest.raises(RecipeError, match="does not exist"):
        build_report(tmp_path / "nope")


def test_learning_curve_fit_on_fractions_and_lower_is_better(tmp_path: Path):
    # the fit was made on fractions, the metric is an error (lower is better): the curve must
    # still pass through the measured points
    fr = [0.1, 0.2, 0.4, 1.0]
    a, b, c = 0.5, 0.5, 1.0
    metrics = {
        "task": "tabular-regression", "primary_metric": "rmse", "lower_is_better": ["loss", "rmse", "mae"],
        "guards": {"data": {"status": "ok", "summary": "fine", "details": {
            "fractions": fr, "scores": [a * f**-b + c for f in fr], "n": 1000, "fit": {"a": a, "b": b, "c": c},
            "expected_at_2x": None, "expected_at_5x": None}}},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    html = build_report(tmp_path).read_text(encoding="utf-8")
    assert "fit: err, err = a·n^(−b) + c" in html
    assert "2×: 1.3536 (fit)" in html  # 0.5·2^-0.5 + 1


def direction_run(tmp_path: Path, **extra) -> str:
    """A report whose headline and per-group tables each hold one delta per metric: rmse and
    widgets both fell after fine-tuning, r2 rose. Returns the HTML."""
    metrics = {
        "task": "tabular-regression", "primary_metric": "r2",
        "test": {"r2": 0.8, "rmse": 1.0, "widgets": 3.0},
        "pretrained": {"r2": 0.5, "rmse": 2.0, "widgets": 5.0},
        "guards": {"bias": {"status": "ok", "summary": "s", "details": {
            "groups": {"region": {"north": {"count": 10, "rmse": 1.0, "widgets": 3.0}}},
            "before": {"region": {"north": {"count": 10, "rmse": 2.0, "widgets": 5.0}}}}}},
        **extra,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    html = build_report(tmp_path).read_text(encoding="utf-8")
    assert "render-error" not in html.replace(".render-error", "")
    return html


def delta_classes(html: str, table: str, row: str) -> list[str]:
    """The delta-good / delta-bad classes of one row's cells, in order, in the first table that
    starts at (or after) the first occurrence of `table` in the page."""
    start = html.index(table)
    body = html[start:html.index("</table>", start)]
    cells = re.search(rf'<tr(?: class="primary")?><td>{re.escape(row)}(?: \(primary\))?</td>(.*?)</tr>', body, re.S).group(1)
    return re.findall(r"delta-(good|bad)", cells)


def test_lower_is_better_is_read_from_metrics_json_not_guessed_from_the_name(tmp_path: Path):
    # rmse listed: its fall is good; widgets (a name nothing could guess) listed: its fall is good
    html = direction_run(tmp_path / "listed", lower_is_better=["rmse", "widgets"])
    assert delta_classes(html, '<table class="headline">', "rmse") == ["good"]
    assert delta_classes(html, '<table class="headline">', "widgets") == ["good"]
    assert delta_classes(html, '<table class="headline">', "r2") == ["good"]  # r2 rose, never listed
    assert delta_classes(html, "<h3>By region</h3>", "north") == ["good", "good"]
    # the same metrics not listed: higher is better, so the same falls are bad, whatever the name
    html = direction_run(tmp_path / "unlisted", lower_is_better=[])
    assert delta_classes(html, '<table class="headline">', "rmse") == ["bad"]
    assert delta_classes(html, '<table class="headline">', "widgets") == ["bad"]
    assert delta_classes(html, "<h3>By region</h3>", "north") == ["bad", "bad"]
    assert delta_classes(html, '<table class="headline">', "r2") == ["good"]


def test_lower_is_better_falls_back_to_the_tasks_declared_set(tmp_path: Path, monkeypatch):
    # the report reads `TASKS[task].lower_is_better` from honed.tasks; a stand-in module keeps this
    # test on the report's side of that contract (and off torch, which the real one imports)
    tasks = ModuleType("honed.tasks")
    tasks.TASKS = {"test-task": SimpleNamespace(lower_is_better=frozenset({"widgets"}))}
    monkeypatch.setitem(sys.modules, "honed.tasks", tasks)
    # a metrics.json written before the key existed: the task's own set decides
    html = direction_run(tmp_path / "declared", task="test-task")
    assert delta_classes(html, '<table class="headline">', "widgets") == ["good"]
    assert delta_classes(html, '<table class="headline">', "rmse") == ["bad"]
    # the run's own list wins over the task's set
    html = direction_run(tmp_path / "own-list", task="test-task", lower_is_better=["rmse"])
    assert delta_classes(html, '<table class="headline">', "widgets") == ["bad"]
    assert delta_classes(html, '<table class="headline">', "rmse") == ["good"]
    # a task honed does not know, or none named: nothing is lower-is-better
    for name, extra in (("unknown", {"task": "no-such-task"}), ("no-task", {"task": None})):
        html = direction_run(tmp_path / name, **extra)
        assert delta_classes(html, '<table class="headline">', "rmse") == ["bad"], name
        assert delta_classes(html, '<table class="headline">', "widgets") == ["bad"], name


def test_nice_ticks():
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    t = nice_ticks(0.53, 0.91)
    assert t[0] <= 0.53 and t[-1] >= 0.91 and 3 <= len(t) <= 8
    steps = {round(y - x, 10) for x, y in zip(t, t[1:])}
    assert len(steps) == 1
    assert nice_ticks(5, 5)[0] < 5 < nice_ticks(5, 5)[-1]
    assert nice_ticks(0, 0) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert format_tick(10000, 2000) == "10k" and format_tick(0.25, 0.05) == "0.25"
    assert format_tick(0.125, 0.025) == "0.125"


def test_chart_helpers_escape_and_handle_gaps():
    svg = line_chart(
        [{"name": "a<b", "xs": [1, 2, 3, 4], "ys": [1.0, None, float("nan"), 2.0]},
         {"name": "single", "xs": [2], "ys": [1.5]}],
        "x & y", "why", vlines=[{"x": 2, "label": "<v>"}], title="T<",
    )
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "a&lt;b" in svg and "x &amp; y" in svg and "&lt;v&gt;" in svg and "T&lt;" in svg
    assert "<v>" not in svg
    empty = scatter_chart([{"name": "none", "xs": [], "ys": []}], "x", "y")
    assert "no data" in empty


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_chromium(full_run: Path, tmp_path: Path):
    report = build_report(full_run)
    png = tmp_path / "shot.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_report_render.py"), str(report), str(png)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert png.is_file() and png.stat().st_size > 10_000
