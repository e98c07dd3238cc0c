"""Data at scale (issue 17, part 5): text classification on 10 k / 100 k / 1 M generated short
texts with `model: wordllama`, `method: head` (and `full` where it fits), each run in a fresh
process with a fresh tokenisation cache (a cold start, as a user's first run is).

Per row: wall time of `honed.run`, the time from the process start to the first training step
(the loop's on_train_start), the start-up phases (reading, tokenising, feature pass), and the
peak RSS. Growth is judged against the rows: the ratio of each figure to the 10 k row's, beside
the 10× / 100× the rows grew by.

    python benchmarks/data_scale.py                          # 10k and 100k, head and full
    python benchmarks/data_scale.py --plan 1000000:head      # one size and method
    python benchmarks/data_scale.py --warm                   # also a second run reading the tokenisation cache
    python benchmarks/data_scale.py --plan 1000000:head --reading-only   # only read, check and carve the splits

Settings that keep the runs inside a benchmark's budget (the same for every size): batch size
256, one epoch for full, two head epochs, guards.baseline and guards.data_curve off, lr given
(no range test). The other guards (overfitting, forgetting, bias, export) run as in any run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

START = time.time()  # before honed is imported: time to first step counts the imports too

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SECTION = "data_scale.py: start-up and memory against rows (wordllama, generated short texts, issue 17)"
HEADER = ["date", "rows", "method", "wall s", "to first step s", "reading s", "tokenising s", "feature pass s",
          "peak RSS MB", "CPU", "note"]
DEFAULT_PLAN = "10000:head,10000:full,100000:head,100000:full"


def write_data(folder: Path, rows: int) -> Path:
    """`rows` short texts (8–24 words) with a learnable label, as one Parquet file."""
    import pandas as pd

    path = folder / f"train-{rows}.parquet"
    if not path.exists():
        generated = common.generate_rows(rows, seed=rows, min_tokens=8, max_tokens=24)
        pd.DataFrame(generated, columns=["text", "label"]).to_parquet(path)
    return path


def reading_child(assets: dict) -> None:
    """honed.session.prepare alone (the recipe checked, the data read, checked and carved; no model):
    the reading phase's own peak, and what stays resident after it."""
    from honed.session import prepare

    base = common.rss_mb()
    began = time.time()
    _, splits = prepare({"task": "text-classification", "model": "wordllama", "data": {"train": assets["train"], "max_length": 32}})
    common.emit({"wall_s": round(time.time() - began, 1), "rss_before_mb": base, "rss_after_mb": common.rss_mb(),
                 "split_type": type(splits.train).__name__})


def child(args) -> None:
    import honed
    from honed.hooks import Hooks

    assets = json.loads(args.assets)
    if assets.get("reading_only"):
        reading_child(assets)
        return
    phases: dict[str, float] = {}
    first_step: list[float] = []
    hooks = Hooks(on_phase=lambda name, seconds: phases.__setitem__(name, phases.get(name, 0.0) + seconds),
                  on_train_start=lambda stage: first_step.append(time.time() - START) if not first_step else None)
    recipe = {
        "task": "text-classification", "model": "wordllama", "method": assets["method"],
        "data": {"train": assets["train"], "max_length": 32},
        "train": {"epochs": 1, "head_epochs": 2, "batch_size": 256, "lr": 2e-3, "head_lr": 1e-2, "seed": 0},
        "guards": {"baseline": False, "data_curve": False},
    }
    began = time.time()
    result = honed.run(recipe, out=Path(assets["out"]) / "run", show_progress=True, hooks=hooks)
    audit = json.loads((Path(result.run_dir) / "audit.json").read_text())
    common.emit({"wall_s": round(time.time() - began, 1), "first_step_s": round(first_step[0], 1) if first_step else None,
                 "phases": {k: round(v, 1) for k, v in phases.items()}, "test_accuracy": result.metrics["test"]["accuracy"],
                 "from_cache": audit.get("tokenisation", {}).get("train", {}).get("from_cache")})


def flags_cell() -> str:
    flags = common.cpu_flags()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return "[" + " ".join(shown or ["none"]) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", default=DEFAULT_PLAN, help="comma-separated ROWS:METHOD runs, e.g. 1000000:head")
    parser.add_argument("--warm", action="store_true", help="after each cold run, run again on the same tokenisation cache")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take before it is stopped")
    parser.add_argument("--reading-only", action="store_true",
                        help="only read, check and carve the splits (honed.session.prepare): that phase's peak RSS; printed, not recorded")
    common.add_run_options(parser)
    args = parser.parse_args()
    if args.contestant:
        child(args)
        return
    info, load_before = common.announce_machine()
    with tempfile.TemporaryDirectory(prefix="bench-data-scale-") as tmp:
        root = Path(tmp)
        for item in args.plan.split(","):
            rows_text, method = item.split(":")
            rows = int(rows_text)
            t0 = time.time()
            train = write_data(root, rows)
            print(f"{rows} rows generated in {time.time() - t0:.1f} s")
            cache = root / f"cache-{rows}-{method}"
            for attempt in ("cold", "warm") if args.warm else ("cold",):
                os.environ["HF_DATASETS_CACHE"] = str(cache)  # a fresh tokenisation cache per size and method: cold starts
                out = root / f"out-{rows}-{method}-{attempt}"
                assets = json.dumps({"train": str(train), "method": method, "out": str(out), "reading_only": args.reading_only})
                got = common.run_child(__file__, "honed", assets, [], timeout=args.timeout)
                if args.reading_only:
                    print(f"{rows:>8} reading only: {got['wall_s']} s, peak RSS {got['peak_rss_mb']:.0f} MB, resident "
                          f"{got['rss_before_mb']:.0f} MB before and {got['rss_after_mb']:.0f} MB after, splits as {got['split_type']}",
                          flush=True)
                    continue
                p = got["phases"]
                print(f"{rows:>8} {method:<5} {attempt}: wall {got['wall_s']} s, first step {got['first_step_s']} s, "
                      f"phases {p}, peak RSS {got['peak_rss_mb']:.0f} MB, test accuracy {got['test_accuracy']:.3f}, "
                      f"tokens from cache: {got['from_cache']}", flush=True)
                if not args.no_record:
                    note = f"{attempt} tokenisation cache; load {load_before:.1f} before; " + (args.note or "shared 2-core host, noisy")
                    common.append_result(SECTION, HEADER, [
                        common.today(), f"{rows:,}", method, f"{got['wall_s']:.0f}", f"{got['first_step_s']:.0f}",
                        f"{p.get('reading data', 0):.1f}", f"{p.get('tokenising', 0):.1f}", f"{p.get('feature pass', 0):.1f}",
                        f"{got['peak_rss_mb']:.0f}", f"{common.machine_cell(info)} {flags_cell()}", note])


if __name__ == "__main__":
    main()
