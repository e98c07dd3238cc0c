"""Full fine-tuning throughput: honed against Hugging Face Trainer on the same work (issue 8, part 1).

Same generated data, same DistilBERT-size model (random init, DistilBertConfig() defaults),
same seed, batch size, epochs, learning rate, AdamW (fused) with weight decay 0.01 off biases
and norms, linear schedule with the same warm-up steps, gradient clipping 1.0; no evaluation
or checkpointing inside the timed part for anyone (honed's evaluation and checkpoint at the
last step fall outside its `train_seconds`; Trainer runs with eval/save/logging off and its
own `train_runtime` is used). Each contestant runs in a fresh subprocess, so its peak RSS is
its own.

    python benchmarks/throughput.py                      # ~4 min on 2 cores
    python benchmarks/throughput.py --repeats 3          # the spread
    python benchmarks/throughput.py --samples 2048 --epochs 2 --contestants honed,trainer-bf16-grouped
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
    "trainer-fp32": "Trainer, fp32 (its defaults)",
    "trainer-bf16": "Trainer, bf16=True",
    "trainer-bf16-grouped": "Trainer, bf16=True + group_by_length",
    "honed": "honed, method full (defaults: bf16 autocast on this CPU, length-grouped)",
    "honed-pinned": "honed, method full, defaults but threads pinned to the core count (as Trainer): the engine alone",
    "honed-fp32": "honed, method full, precision fp32",
}
DEFAULT = ["trainer-fp32", "trainer-bf16-grouped", "honed", "honed-pinned"]
BEST_TRAINER = "trainer-bf16-grouped"


def honed_recipe(assets: dict, args, precision: str, out: str) -> dict:
    return {
        "model": assets["model"],
        "data": {"train": assets["train"], "validation": assets["validation"], "test": assets["test"], "max_length": assets["max_length"]},
        "method": "full",
        "train": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "precision": precision, "seed": args.seed,
                  "eval_every": 10**9, "patience": None},  # one evaluation, after the last step (outside train_seconds)
        "guards": {"baseline": False, "data_curve": False},
        "out": out,
    }


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def profile_child(args, assets: dict) -> None:
    """torch.profiler over honed's training loop (bf16, the benchmark's batches): where a step's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import honed.train.loop as loop
    from honed.data.batching import batch_plan
    from honed.models.load import load_hf
    from honed.tasks.text import model as text_model
    from honed.train.precision import resolve_precision, set_threads

    import pandas as pd

    set_threads("auto")
    torch.manual_seed(args.seed)
    bundle = load_hf(assets["model"], common.LABELS)
    frame = pd.read_csv(assets["train"])
    split = text_model.encode(bundle, frame["text"].tolist(), frame["label"].tolist(), assets["max_length"])
    plan = batch_plan(split.lengths, args.batch_size, args.seed, 0, True)
    precision = resolve_precision("auto")

    def run(batches_: list[list[int]]):
        batches = loop.Batches(size=sum(map(len, batches_)), plan=lambda epoch: batches_, collate=lambda idx: text_model.collate(split, idx, bundle.pad_id))
        cfg = loop.LoopConfig(stage="profile", epochs=1, lr=args.lr, eval_every=10**9, patience=None, precision=precision)
        return loop.train(bundle.model, batches, text_model.classification_loss, lambda m: {"val_accuracy": 0.0}, cfg)

    run(plan[:2])  # warm-up
    steps = plan[2 : 2 + args.profile_steps]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        outcome = run(steps)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    common.emit({"table": table, "matmul_share": matmul / total, "steps": len(steps), "threads": torch.get_num_threads(),
                 "samples_per_s": outcome.samples_seen / outcome.train_seconds, "precision": precision})


def child(args) -> None:
    """One contestant, in this fresh process; prints `RESULT {json}`."""
    assets = common.load_assets(args.assets)
    name = args.contestant
    if name == "profile":
        return profile_child(args, assets)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        if name.startswith("honed"):
            import honed

            precision = "fp32" if name == "honed-fp32" else "auto"
            recipe = honed_recipe(assets, args, precision, str(Path(tmp) / "run"))
            if name == "honed-pinned":
                recipe["train"]["threads"] = common.machine()["cores"]  # no fitting to the machine's load
            extra = {}
            start = time.perf_counter()
            result = honed.run(recipe, show_progress=False, hooks=common.training_hooks(extra))
            wall = time.perf_counter() - start
            timing = result.metrics["timing"]
            history = [h for h in common.honed_history(result.run_dir) if h["stage"] == "model"]
            samples = len(assets["train_lengths"]) * args.epochs
            common.emit({"samples": samples, "train_seconds": timing["train_seconds"], "samples_per_s": samples / timing["train_seconds"],
                         "final_loss": history[-1]["train_loss"], "steps": result.metrics["run"]["steps"], "run_wall_seconds": round(wall, 1),
                         "precision": timing["precision"], "threads": timing["threads"], "optimizer": "AdamW(fused)", **extra})
        else:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            torch.manual_seed(args.seed)
            tokenizer = AutoTokenizer.from_pretrained(assets["model"])
            model = AutoModelForSequenceClassification.from_pretrained(assets["model"])
            rows = common.tokenised_dataset(tokenizer, assets["train"], assets["max_length"])
            res = common.run_trainer(model, tokenizer, rows, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                                     bf16=name != "trainer-fp32", grouped=name == "trainer-bf16-grouped", seed=args.seed, out=tmp)
            res["threads"] = torch.get_num_threads()
            common.emit(res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=512, help="training sequences (8–128 tokens each)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs per contestant, interleaved; the median is reported")
    p.add_argument("--contestants", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(CONTESTANTS)}")
    p.add_argument("--check-precision", action="store_true", help="also run honed in fp32: bf16's final loss against fp32's")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table for honed's training steps")
    p.add_argument("--profile-steps", type=int, default=8)
    common.add_run_options(p)
    args = p.parse_args()
    if args.contestant:
        return child(args)

    names = common.chosen_contestants(p, args.contestants, CONTESTANTS)
    if args.check_precision and "honed-fp32" not in names:
        names.append("honed-fp32")
    info, load_before = common.announce_machine()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        assets = common.build_assets(Path(tmp), n_train=args.samples, seed=args.seed)
        shape = common.model_shape(assets["model"])
        lengths = assets["train_lengths"]
        flops = common.training_flops(shape, lengths, args.epochs)
        print(f"model: {shape['params'] / 1e6:.1f} M parameters ({shape['non_embedding_params'] / 1e6:.1f} M outside the embeddings); "
              f"data: {len(lengths)} sequences, {sum(lengths)} tokens (mean {statistics.mean(lengths):.0f}); "
              f"batch {args.batch_size}, {args.epochs} epoch(s), lr {args.lr}")
        peak_bf16 = common.matmul_flops("bf16")
        peak_fp32 = common.matmul_flops("fp32")
        print(f"2048² matmul: bf16 {peak_bf16 / 1e12:.2f} TFLOP/s, fp32 {peak_fp32 / 1e12:.2f} TFLOP/s")
        runs: dict[str, list[dict]] = {n: [] for n in names}
        extra = ["--samples", str(args.samples), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
                 "--lr", str(args.lr), "--seed", str(args.seed), "--profile-steps", str(args.profile_steps)]
        if args.profile:
            prof = common.run_child(__file__, "profile", tmp, extra)
            print(f"\ntorch.profiler, honed's loop, {prof['steps']} steps, {prof['precision']}, {prof['threads']} threads "
                  f"({prof['samples_per_s']:.1f} samples/s under the profiler):")
            print(prof["table"])
            share = prof["matmul_share"]
            print(f"matrix products (mm, addmm, bmm, attention) take {share:.0%} of the step's CPU time: with every other op "
                  f"removed, honed could run at most {1 / share:.2f}× its current speed at this matmul rate.\n")
        for r in range(args.repeats):
            for name in names:
                res = common.run_child(__file__, name, tmp, extra)
                runs[name].append(res)
                threads = res.get("threads_per_step") or {str(res.get("threads")): res.get("steps")}
                print(f"  [{r + 1}/{args.repeats}] {name:22s} {res['samples_per_s']:6.2f} samples/s  {res['train_seconds']:7.2f} s  "
                      f"loss {res['final_loss']:.4f}  peak RSS {res['peak_rss_mb']:.0f} MB (at train start "
                      f"{res.get('rss_at_train_start_mb', float('nan')):.0f})  threads×steps {threads}", flush=True)
    load_after = common.load_average()

    med = {n: statistics.median(x["samples_per_s"] for x in runs[n]) for n in names}
    print()
    print(f"{'contestant':22s} {'samples/s':>28s} {'final loss':>11s} {'peak RSS MB':>12s} {'MFU':>7s}")
    for n in names:
        sps = [x["samples_per_s"] for x in runs[n]]
        secs = statistics.median(x["train_seconds"] for x in runs[n])
        mfu = flops / secs / peak_bf16
        print(f"{n:22s} {common.spread(sps):>28s} {statistics.median(x['final_loss'] for x in runs[n]):11.4f} "
              f"{max(x['peak_rss_mb'] for x in runs[n]):12.0f} {mfu:7.2%}")
    print("(MFU: (6 × non-embedding params × real tokens + attention FLOPs) / train time / bf16 2048² matmul FLOP/s)")
    ratios = {}
    if "honed-pinned" in names:
        for n in names:
            if n.startswith("trainer"):
                print(f"honed-pinned / {n}: {med['honed-pinned'] / med[n]:.2f}× samples/s (same thread count as Trainer)")
    if "honed" in names:
        for n in names:
            if n.startswith("trainer"):
                ratios[n] = med["honed"] / med[n]
                print(f"honed / {n}: {ratios[n]:.2f}× samples/s; peak RSS {max(x['peak_rss_mb'] for x in runs['honed']):.0f} vs "
                      f"{max(x['peak_rss_mb'] for x in runs[n]):.0f} MB")
    if "honed" in names and "honed-fp32" in names:
        a = statistics.median(x["final_loss"] for x in runs["honed"])
        b = statistics.median(x["final_loss"] for x in runs["honed-fp32"])
        print(f"bf16 vs fp32 final training loss (honed): {a:.4f} vs {b:.4f} (difference {abs(a - b):.4f})")
    print(f"load average: {load_before:.2f} before, {load_after:.2f} after")

    if not args.no_record:
        honed_secs = statistics.median(x["train_seconds"] for x in runs["honed"]) if "honed" in names else None
        cell = lambda n: (f"{med[n]:.1f}" if n in med else "–")  # noqa: E731
        rss = lambda n: (f"{max(x['peak_rss_mb'] for x in runs[n]):.0f}" if n in runs else "–")  # noqa: E731
        ratio = lambda n: (f"{ratios[n]:.2f}×" if n in ratios else "–")  # noqa: E731
        loss = lambda n: (f"{statistics.median(x['final_loss'] for x in runs[n]):.3f}" if n in runs else "–")  # noqa: E731
        common.append_result(
            "throughput.py: full fine-tuning, samples/s",
            ["date", "machine", "versions", "work", "Trainer fp32", "Trainer bf16+grouped", "honed", "honed/Trainer fp32",
             "honed/Trainer best", "honed pinned threads: samples/s, /Trainer best", "peak RSS MB (T fp32 / T best / honed)",
             "final loss (T fp32 / T best / honed)", "honed MFU", "bf16 matmul TFLOP/s", "repeats, load", "note"],
            [common.today(), common.machine_cell(info), common.versions_cell(info),
             f"{args.samples}×{args.epochs} ep, bs {args.batch_size}", cell("trainer-fp32"), cell(BEST_TRAINER), cell("honed"),
             ratio("trainer-fp32"), ratio(BEST_TRAINER),
             f"{med['honed-pinned']:.1f}, {med['honed-pinned'] / med[BEST_TRAINER]:.2f}×" if "honed-pinned" in med and BEST_TRAINER in med else "–",
             f"{rss('trainer-fp32')} / {rss(BEST_TRAINER)} / {rss('honed')}",
             f"{loss('trainer-fp32')} / {loss(BEST_TRAINER)} / {loss('honed')}",
             f"{flops / honed_secs / peak_bf16:.1%}" if honed_secs else "–", f"{peak_bf16 / 1e12:.2f}",
             f"{args.repeats}, {load_before:.1f}→{load_after:.1f}", args.note or ""])
        print(f"row appended to {common.RESULTS}")


if __name__ == "__main__":
    main()
