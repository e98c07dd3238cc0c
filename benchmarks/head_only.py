"""Head-only training: honed `method: head` against Trainer with the backbone frozen (issue 8, part 2).

Same generated data, DistilBERT-size model (random init) and seed; only the final linear layer
(`classifier`: 768×2 + 2 parameters) trains, for the same number of epochs and samples, with
AdamW, the same learning rate, batch size, linear schedule, warm-up, weight decay and clipping.

Trainer (its best configuration: bf16 + group_by_length) runs the frozen backbone forward on
every batch of every epoch. honed runs the backbone once over the training split (the feature
cache, eval mode, bf16) and trains the head on the cached features. honed's time here is
what head training needs: extracting the training split's features + the head's training loop.
(`honed run` also extracts validation and test features for its evaluation and the linear
probe; that time is printed separately and excluded, as Trainer evaluates nothing here.)

Training is not identical in one respect the method defines: honed's head trains on
standardised features (folded back into the weights afterwards) and without dropout in the
backbone; Trainer's frozen backbone still applies dropout in train mode. The final losses are
printed; they are not comparable numbers for that reason, only the work is.

    python benchmarks/head_only.py                     # ~2 min on 2 cores
    python benchmarks/head_only.py --epochs 10 --samples 2048
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONTESTANTS = {
    "trainer-frozen": "Trainer, backbone frozen (requires_grad False except the classifier), bf16 + group_by_length",
    "trainer-frozen-fp32": "Trainer, backbone frozen, fp32 (its defaults)",
    "honed-head": "honed, method head (feature cache + head on cached features)",
}
DEFAULT = ["trainer-frozen", "honed-head"]


def child(args) -> None:
    assets = common.load_assets(args.assets)
    name = args.contestant
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        if name == "honed-head":
            import honed
            from honed.hooks import Hooks

            calls = []  # (rows, seconds) for every pass computing the head's input features
            hooks = Hooks(on_features=lambda rows, seconds: calls.append((rows, seconds)))
            recipe = {
                "model": assets["model"],
                "data": {"train": assets["train"], "validation": assets["validation"], "test": assets["test"], "max_length": assets["max_length"]},
                "method": "head",
                "train": {"head_epochs": args.epochs, "head_lr": args.lr, "batch_size": args.batch_size, "seed": args.seed, "precision": "auto"},
                "guards": {"baseline": False, "data_curve": False},
                "out": str(Path(tmp) / "run"),
            }
            start = time.perf_counter()
            result = honed.run(recipe, show_progress=False, hooks=hooks)
            wall = time.perf_counter() - start
            head_seconds = result.metrics["timing"]["train_seconds"]
            train_features = calls[0][1]  # setup extracts train, validation, test in that order
            setup_features = sum(s for _, s in calls[:3])
            history = [h for h in common.honed_history(result.run_dir) if h["stage"] == "head"]
            samples = len(assets["train_lengths"]) * args.epochs
            seconds = train_features + head_seconds
            common.emit({"samples": samples, "train_seconds": round(seconds, 3), "samples_per_s": samples / seconds,
                         "feature_seconds": round(train_features, 3), "head_loop_seconds": head_seconds,
                         "all_setup_feature_seconds": round(setup_features, 3), "final_loss": history[-1]["train_loss"],
                         "run_wall_seconds": round(wall, 1), "head_batch_size": max(args.batch_size, 64)})
        else:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            torch.manual_seed(args.seed)
            tokenizer = AutoTokenizer.from_pretrained(assets["model"])
            model = AutoModelForSequenceClassification.from_pretrained(assets["model"])
            for pname, p in model.named_parameters():
                p.requires_grad_(pname.startswith("classifier."))
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows = common.tokenised_dataset(tokenizer, assets["train"], assets["max_length"])
            fp32 = name == "trainer-frozen-fp32"
            res = common.run_trainer(model, tokenizer, rows, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                                     bf16=not fp32, grouped=not fp32, seed=args.seed, out=tmp)
            res["trainable_params"] = trainable
            common.emit(res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="both contestants (honed's head stage uses at least 64)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--contestants", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(CONTESTANTS)}")
    common.add_run_options(p)
    args = p.parse_args()
    if args.contestant:
        return child(args)
    if args.batch_size < 64:
        print("note: honed's head stage trains with batch max(batch_size, 64); Trainer gets the same batch only at --batch-size >= 64")

    names = common.chosen_contestants(p, args.contestants, CONTESTANTS)
    info, load_before = common.announce_machine()
    with tempfile.TemporaryDirectory(prefix="bench-head-") as tmp:
        common.build_assets(Path(tmp), n_train=args.samples, seed=args.seed)
        print(f"data: {args.samples} sequences, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}; trainable: the classifier only")
        runs: dict[str, list[dict]] = {n: [] for n in names}
        extra = ["--samples", str(args.samples), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
                 "--lr", str(args.lr), "--seed", str(args.seed)]
        for r in range(args.repeats):
            for name in names:
                res = common.run_child(__file__, name, tmp, extra)
                runs[name].append(res)
                detail = (f" (features {res['feature_seconds']:.2f} s + head loop {res['head_loop_seconds']:.2f} s; "
                          f"all setup features {res['all_setup_feature_seconds']:.2f} s)") if name == "honed-head" else ""
                print(f"  [{r + 1}/{args.repeats}] {name:20s} {res['samples_per_s']:8.2f} samples/s  {res['train_seconds']:7.2f} s{detail}  "
                      f"loss {res['final_loss']:.4f}  peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    load_after = common.load_average()
    med = {n: statistics.median(x["samples_per_s"] for x in runs[n]) for n in names}
    print()
    for n in names:
        print(f"{n:20s} samples/s {common.spread([x['samples_per_s'] for x in runs[n]]):>30s}   "
              f"peak RSS {max(x['peak_rss_mb'] for x in runs[n]):.0f} MB   final loss {statistics.median(x['final_loss'] for x in runs[n]):.4f}")
    ratios = {n: med["honed-head"] / med[n] for n in names if n.startswith("trainer") and "honed-head" in names}
    for n, r in ratios.items():
        print(f"honed-head / {n}: {r:.1f}× samples/s")
    print(f"load average: {load_before:.2f} before, {load_after:.2f} after")
    if not args.no_record and "honed-head" in names and "trainer-frozen" in names:
        common.append_result(
            "head_only.py: head-only training, samples/s (samples × epochs / seconds)",
            ["date", "machine", "versions", "work", "Trainer frozen (bf16+grouped)", "honed head", "honed/Trainer",
             "honed: features + head loop (s)", "peak RSS MB (Trainer / honed)", "repeats, load", "note"],
            [common.today(), common.machine_cell(info), common.versions_cell(info),
             f"{args.samples}×{args.epochs} ep, bs {args.batch_size}", f"{med['trainer-frozen']:.1f}", f"{med['honed-head']:.1f}",
             f"{ratios['trainer-frozen']:.1f}×",
             f"{statistics.median(x['feature_seconds'] for x in runs['honed-head']):.2f} + {statistics.median(x['head_loop_seconds'] for x in runs['honed-head']):.2f}",
             f"{max(x['peak_rss_mb'] for x in runs['trainer-frozen']):.0f} / {max(x['peak_rss_mb'] for x in runs['honed-head']):.0f}",
             f"{args.repeats}, {load_before:.1f}→{load_after:.1f}", args.note])
        print(f"row appended to {common.RESULTS}")


if __name__ == "__main__":
    main()
