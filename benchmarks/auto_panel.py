"""A small version of issue 19's panel: `train.lr: auto` (the learning-rate range test) against a
grid of learning rates, the same epochs and budget per point, on cases small enough for this CPU.

The cases are the golden runs' recipes (tests/golden/runs.py: a randomly initialised tiny BERT on
generated sentences, a randomly initialised tiny ViT on striped images, an MLP from scratch on the
breast-cancer table) with `train.lr` replaced. For each case the panel prints auto's validation
metric and rate, the grid's best and worst, and auto's rank (1 = best of grid + auto).

    .venv/bin/python benchmarks/auto_panel.py [--cases image_full,tabular_classification] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "golden")]

GRID = (3e-5, 3e-4, 3e-3, 3e-2)
CASES = ("text_full", "image_full", "tabular_classification")


def run_case(name: str, lr, folder: Path) -> tuple[float, float | None, float]:
    """(validation primary metric, range-test rate or None, wall seconds) of the case's recipe at `lr`."""
    import honed
    from runs import GOLDEN_RUNS

    recipe = copy.deepcopy(GOLDEN_RUNS[name](folder))
    recipe["train"]["lr"] = lr
    started = time.perf_counter()
    result = honed.run(recipe, out=folder / f"run-{lr}", show_progress=False, overwrite=True)
    chosen_file = result.run_dir / "lr_range.json"
    chosen = json.loads(chosen_file.read_text())["chosen"] if chosen_file.exists() else None
    return result["validation"][result["primary_metric"]], chosen, time.perf_counter() - started


def main(argv=None) -> None:
    """Run every case at auto and at each grid rate; print the table (markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from runs import use_shared_root

    root = Path(args.out or tempfile.mkdtemp(prefix="honed-auto-panel-"))
    use_shared_root(root / "shared")
    print("| case | auto lr | auto val | grid best (lr) | grid worst | auto's rank | auto ÷ best | wall s (auto) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        auto, chosen, seconds = run_case(name, "auto", folder)
        grid = {lr: run_case(name, lr, folder)[0] for lr in GRID}
        best_lr = max(grid, key=grid.get)
        rank = 1 + sum(v > auto for v in grid.values())
        print(f"| {name} | {chosen if chosen is not None else 'table'} | {auto:.3f} | {grid[best_lr]:.3f} ({best_lr:g}) | "
              f"{min(grid.values()):.3f} | {rank} of {len(GRID) + 1} | {auto / max(grid[best_lr], 1e-12):.2f} | {seconds:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
