"""The report's learning-rate range test section: the curve `train.lr: auto` read and the rate it
chose (RUN_DIR/lr_range.json, written when the test ran; the section is left out otherwise)."""

from __future__ import annotations

import json
import math

from honed.report import charts
from honed.report.markup import esc, kv_table
from honed.report.rundata import RunData


def section_lr_range(run: RunData) -> str | None:
    """The raw and smoothed loss against log10(learning rate), the chosen rate marked; None without lr_range.json."""
    path = run.run_dir / "lr_range.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    lrs = [float(x) for x in data["lrs"]]
    logs = [math.log10(x) for x in lrs]
    raw = [x if isinstance(x, (int, float)) and math.isfinite(x) else None for x in data["losses"]]
    # a diverging step's loss can be orders of magnitude larger: drawn, it would flatten the curve that matters
    ceiling = 2 * max(data["smoothed"]) if data["smoothed"] else math.inf
    keep = [i for i, x in enumerate(raw) if x is not None and x <= ceiling]
    series = [{"name": "loss at each step", "xs": [logs[i] for i in keep], "ys": [raw[i] for i in keep], "mode": "markers"},
              {"name": "smoothed (the rule reads this)", "xs": logs[:len(data["smoothed"])], "ys": data["smoothed"]}]
    chosen = float(data["chosen"])
    vlines = [{"x": math.log10(chosen), "label": f"chosen {chosen:g}"}]
    if data.get("prior"):
        vlines.append({"x": math.log10(float(data["prior"])), "label": f"table {float(data['prior']):g}", "color": "#999"})
    chart = charts.line_chart(series, "log10(learning rate)", "training loss", vlines=vlines,
                              title="Learning-rate range test", legend=True)
    rows = [("chosen train.lr", esc(f"{chosen:g}")), ("rule", esc(data.get("rule", ""))),
            ("rates tried", esc(f"{lrs[0]:.0e} … {lrs[-1]:.0e} in {len(lrs)} steps" + (" (stopped: diverged)" if data.get("diverged") else ""))),
            ("seconds", esc(data.get("seconds", "")))]
    note = ("<p>A few dozen AdamW steps on the training batches with the learning rate rising exponentially; "
            "the model and the random state were restored before the run trained (docs/auto.md).</p>")
    return note + kv_table(rows) + chart
