"""The report's preference section (task: preference): accuracy and reward margin over training,
the chosen and rejected replies' log-probabilities (falling together is likelihood displacement),
the KL from the starting model, and the length check of the baseline guard."""

from __future__ import annotations

from honed.report import charts
from honed.report.charts import PALETTE, is_number
from honed.report.markup import fmt, kv_table, not_measured, pct
from honed.report.rundata import RunData


def _series(run: RunData, keys: list[tuple[str, str, bool]]) -> list[dict]:
    steps = [h.get("step") for h in run.history]
    out = []
    for i, (key, name, dash) in enumerate(keys):
        values = [h.get(key) for h in run.history]
        if any(is_number(v) for v in values):
            out.append({"name": name, "xs": steps, "ys": values, "dash": dash, "color": PALETTE[i % len(PALETTE)]})
    return out


def section_preference(run: RunData) -> str | None:
    """None for every other task: the page leaves the section out."""
    if run.metrics.get("task") != "preference":
        return None
    parts = []
    if run.history:
        charts_html = []
        for title, y_label, keys in (
            ("Preference accuracy", "accuracy", [("val_preference_accuracy", "validation", False), ("train_preference_accuracy", "train", True)]),
            ("Reward margin", "chosen − rejected reward", [("val_reward_margin", "validation", False), ("train_reward_margin", "train", True)]),
            ("Log-probability per reply token", "nats", [("val_chosen_logp", "chosen (validation)", False), ("val_rejected_logp", "rejected (validation)", False)]),
            ("KL from the starting model", "nats, where the replies start", [("val_kl", "validation", False)]),
        ):
            series = _series(run, keys)
            if series:
                charts_html.append(charts.line_chart(series, "step", y_label, title=title, legend=True, width=540))
        parts.append('<div class="charts">' + "\n".join(charts_html) + "</div>" if charts_html else not_measured("no preference metrics in history.jsonl."))
    else:
        parts.append(not_measured("no history.jsonl in the run directory."))
    baseline, forgetting = run.details("baseline"), run.details("forgetting")
    rows = [
        ("tuned model, test preference accuracy", pct(baseline.get("fine_tuned"))),
        ("starting model's own ranking (log-probability)", pct(baseline.get("starting_model_ranking"))),
        ("'prefer the longer reply'", pct(baseline.get("length_baseline"))),
        ("correlation of the reward margin with the length difference", fmt(baseline.get("reward_length_correlation"))),
        ("chosen log-probability per token, before → after", f"{fmt(forgetting.get('chosen_logp_before'))} → {fmt(forgetting.get('chosen_logp_after'))}"),
        ("rejected log-probability per token, before → after", f"{fmt(forgetting.get('rejected_logp_before'))} → {fmt(forgetting.get('rejected_logp_after'))}"),
        ("KL from the starting model (validation)", fmt(forgetting.get("kl"))),
    ]
    parts.append(kv_table(rows))
    return "\n".join(parts)
