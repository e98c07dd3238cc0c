"""Issue 19's panel: honed's `auto` settings (the learning-rate range test, `epochs: auto`,
`batch_size: auto`, early stopping) against a grid of learning rates × epochs at the same budget,
on cases small enough for minutes each on this CPU.

Seven cases. Five are the golden runs' recipes (tests/golden/runs.py): a randomly initialised tiny
BERT on generated sentences, a randomly initialised tiny ViT on striped images, an MLP from scratch
on the breast-cancer table, a small PatchTST forecaster on generated monthly series, and the tiny
Llama chat model with LoRA. Two are built here: issue 19's own case, a small ResNet with random
weights on scikit-learn's digits (8×8 upscaled to 32×32, 1,797 images), and WordLlama (real
pre-trained embeddings) on 1,500 of the demo's tweets.

For each case `auto` runs first (train.lr, epochs, batch_size and eval_every all `auto`, patience 3);
the grid then runs every train.lr in GRID at epochs {A/2, A}, A being the epochs auto resolved to, at
auto's batch size, with the same patience: the grid's largest budget is auto's. The table gives
auto's validation metric, the grid's best and worst, auto's rank among the grid and itself, and
auto ÷ best (the issue's target: at least 0.95, or for errors such as MASE at most 1.05), and whether auto's model collapsed to one class.

    .venv/bin/python benchmarks/auto_panel.py [--cases digits_resnet,chat_lora] [--seeds 3] [--out DIR]

With --seeds N every point (auto and each grid point) is the mean validation metric over train.seed 0 … N-1:
on a small validation set the best of eight single-seed grid points is partly the luckiest seed's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "golden")]

GRID = (3e-5, 3e-4, 3e-3, 3e-2)
AUTO = {"lr": "auto", "epochs": "auto", "batch_size": "auto", "eval_every": "auto"}
GOLDEN = ("text_full", "image_full", "tabular_classification", "forecast_patchtst", "chat_lora")
BUILT = ("digits_resnet", "wordllama_tweets")
CASES = GOLDEN + BUILT
TWEETS = 1500


def build_tiny_resnet(folder: Path) -> Path:
    """A small ResNet (two stages of 16 and 32 channels) with random weights (seed 0), 32×32 input."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                          num_labels=10)
    ResNetForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def digits_folder(folder: Path) -> Path:
    """scikit-learn's 1,797 digits as 32×32 grey PNGs, one folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        target = folder / str(label)
        target.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).astype("uint8")
        Image.fromarray(pixels, mode="L").resize((32, 32), Image.BILINEAR).convert("RGB").save(target / f"{i}.png")
    return folder


def built_recipe(name: str, folder: Path) -> dict:
    """The two cases that are not golden runs."""
    pinned = {"precision": "fp32", "threads": 1, "seed": 0}
    if name == "digits_resnet":
        model = folder / "resnet"
        images = folder / "digits"
        if not model.exists():
            build_tiny_resnet(model)
        if not images.exists():
            digits_folder(images)
        # digits are not mirror-symmetric: no flips; the rest of the augmentation as the task's default
        return {"task": "image-classification", "model": str(model), "data": {"train": str(images)}, "method": "full",
                "augment": {"flip": False}, "train": pinned, "guards": {"baseline": False}}
    from honed.demo import demo_data

    data = folder / "tweets.csv"
    if not data.exists():
        import pandas as pd

        frame = pd.read_csv(demo_data(folder / "demo"))
        frame.sample(n=TWEETS, random_state=0).to_csv(data, index=False)
    return {"task": "text-classification", "model": "wordllama", "method": "full",
            "data": {"train": str(data), "text": "text", "label": "device", "max_length": 64},
            "train": pinned, "guards": {"baseline": False}}


def case_recipe(name: str, folder: Path) -> dict:
    """The case's recipe, with the golden runs' pins that a panel must not keep (patience off, the baseline) removed."""
    if name in BUILT:
        return built_recipe(name, folder)
    from runs import GOLDEN_RUNS

    recipe = copy.deepcopy(GOLDEN_RUNS[name](folder))
    for key in ("patience", "eval_every", "epochs", "lr", "batch_size"):
        recipe["train"].pop(key, None)
    recipe.setdefault("guards", {})["baseline"] = False
    recipe.pop("interpolate", None)
    return recipe


def run_case(recipe: dict, train: dict, out: Path) -> dict:
    """One run: validation metric, its direction, the resolved train settings, collapse, wall seconds."""
    import honed

    recipe = copy.deepcopy(recipe)
    recipe["train"] = {**recipe["train"], **train}
    started = time.perf_counter()
    result = honed.run(recipe, out=out, show_progress=False, overwrite=True)
    resolved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())["train"]
    primary = result["primary_metric"]
    value, lower, metric = result["validation"][primary], primary in result.metrics.get("lower_is_better", []), primary
    if primary.startswith("neg_"):  # forecasting ranks by neg_mase: the panel shows the error itself (MASE, lower is better)
        value, lower, metric = -value, True, primary[len("neg_"):]
    return {"value": value, "lower": lower, "metric": metric, "lr": resolved["lr"], "epochs": resolved["epochs"], "batch_size": resolved["batch_size"],
            "grad_accumulation": resolved["grad_accumulation"],
            "collapsed": bool(result["guards"]["overfitting"]["details"].get("collapsed")),
            "steps": result["run"]["steps"], "seconds": time.perf_counter() - started}


def run_seeds(recipe: dict, train: dict, out: Path, seeds: int) -> dict:
    """run_case at train.seed 0 … seeds-1: the first run's figures, with `value` the mean over the seeds and `values` each."""
    runs = [run_case(recipe, {**train, "seed": seed}, out if seed == 0 else out.with_name(f"{out.name}-seed{seed}"))
            for seed in range(seeds)]
    values = [r["value"] for r in runs]
    return {**runs[0], "value": sum(values) / len(values), "values": values, "seconds": runs[0]["seconds"]}


def panel_row(name: str, root: Path, seeds: int = 1) -> tuple[str, dict]:
    """Auto, then the grid at auto's budget; the markdown row and the figures (each point the mean over `seeds` seeds)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    recipe = case_recipe(name, folder)
    auto = run_seeds(recipe, AUTO, folder / "auto", seeds)
    epochs = sorted({max(1, auto["epochs"] // 2), auto["epochs"]})
    grid = {}
    for lr in GRID:
        for ep in epochs:
            point = {"lr": lr, "epochs": ep, "batch_size": auto["batch_size"], "grad_accumulation": auto["grad_accumulation"],
                     "eval_every": "auto"}
            grid[(lr, ep)] = run_seeds(recipe, point, folder / f"lr{lr:g}-ep{ep}", seeds)["value"]
    lower = auto["lower"]
    better = (lambda a, b: a < b) if lower else (lambda a, b: a > b)
    best_key = min(grid, key=grid.get) if lower else max(grid, key=grid.get)
    best, worst = grid[best_key], (max(grid.values()) if lower else min(grid.values()))
    rank = 1 + sum(better(v, auto["value"]) for v in grid.values())
    # the target: at least 0.95 for a metric, at most 1.05 for an error
    ratio = auto["value"] / best if best else float("nan")
    row = (f"| {name} | {auto['metric']}{' (lower is better)' if lower else ''} | {auto['lr']:g} | {auto['epochs']} ({auto['steps']} steps) | "
           f"{auto['batch_size']}×{auto['grad_accumulation']} | {auto['value']:.3f} | {best:.3f} (lr {best_key[0]:g}, {best_key[1]} ep) | "
           f"{worst:.3f} | {rank} of {len(grid) + 1} | {ratio:.3f} | {'yes' if auto['collapsed'] else 'no'} | {auto['seconds']:.0f} |")
    return row, {"auto": auto, "grid": {f"{k[0]:g}x{k[1]}": v for k, v in grid.items()}, "ratio": ratio, "rank": rank}


def main(argv=None) -> None:
    """Run every named case at auto and at each grid point; print the table (markdown) and write panel.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--out", default=None, help="folder for the runs and panel.json (default: a temporary folder)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run auto and every grid point at train.seed 0 … N-1 and compare the means (default 1: seed 0 alone)")
    args = parser.parse_args(argv)
    from runs import use_shared_root

    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)} (choose from {', '.join(CASES)})")
    root = Path(args.out or tempfile.mkdtemp(prefix="honed-auto-panel-"))
    use_shared_root(root / "shared")
    print("| case | metric | auto lr | auto epochs | auto batch | auto val | grid best | grid worst | auto's rank | "
          "auto ÷ best (target: ≥ 0.95; errors ≤ 1.05) | collapsed | wall s (auto) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    figures = {}
    for name in names:
        row, figures[name] = panel_row(name, root, args.seeds)
        print(row, flush=True)
        (root / "panel.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
