"""DPO against TRL's DPOTrainer on the same work: a Llama-shaped model with random weights (~125 M,
benchmarks/llm_memory.py's shape and tokenizer), the same generated pairs, LoRA config (r 8, α 16,
dropout 0.05, every projection), β 0.1 sigmoid loss, one epoch, batch 8, linear schedule, fp32.

    python benchmarks/preference.py [--pairs 64] [--contestants honed,trl,trl-precompute]

Each contestant is a fresh process. Printed per contestant: training pairs/s (the reference pass
included: honed computes the starting model's log-probabilities once before training, TRL either
scores the reference at every step with the adapter disabled or, `trl-precompute`, once before
training with `precompute_ref_log_probs`), seconds, peak RSS, and the ratio to TRL's faster setting.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import announce_machine, append_result, cpu_flags, machine_cell, today, versions_cell  # noqa: E402
from llm_memory import VOCAB, build_model, build_tokenizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, BETA, BATCH, EPOCHS = 5e-5, 0.1, 8, 1
CONTESTANTS = ("honed", "trl", "trl-precompute")


def write_pairs(path: Path, n: int, seed: int, words: list[str]) -> None:
    """Pairs whose replies share a prompt and differ in content and length (20–80 words each)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(10, 50)))
            chosen = " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
            rejected = " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
            fh.write(json.dumps({"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
                                 "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")


def run_honed(folder: Path, max_length: int) -> dict:
    import honed
    from honed.hooks import Hooks

    reference = {"seconds": 0.0, "calls": 0}

    def on_features(rows, seconds):
        if reference["calls"] == 0:  # the first split scored is train; validation and test are not training work
            reference["seconds"] = seconds
        reference["calls"] += 1

    recipe = {"task": "preference", "model": str(folder / "model"), "method": "lora",
              "data": {"train": str(folder / "train.jsonl"), "validation": str(folder / "validation.jsonl"),
                       "test": str(folder / "test.jsonl"), "max_length": max_length},
              "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": TARGETS},
              "preference": {"loss": "dpo", "beta": BETA},
              "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "precision": "fp32", "eval_every": 10_000, "patience": None,
                        "warmup_ratio": 0.0, "group_by_length": True},
              "guards": {"baseline": False}}
    result = honed.run(recipe, out=folder / "honed-run", overwrite=True, show_progress=False, hooks=Hooks(on_features=on_features))
    train = result.metrics["timing"]["train_seconds"]
    return {"seconds": train + reference["seconds"], "train_seconds": train, "reference_seconds": reference["seconds"],
            "val_preference_accuracy": result.metrics["validation"]["preference_accuracy"]}


def run_trl(folder: Path, max_length: int, precompute: bool) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    train = load_dataset("json", data_files=str(folder / "train.jsonl"), split="train")
    args = DPOConfig(output_dir=str(folder / "trl-run"), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, learning_rate=LR,
                     beta=BETA, loss_type=["sigmoid"], max_length=max_length, lr_scheduler_type="linear", warmup_steps=0,
                     weight_decay=0.01, max_grad_norm=1.0, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=False, precompute_ref_log_probs=precompute, dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"))
    started = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - started}


def child(name: str, folder: Path, max_length: int) -> None:
    out = run_honed(folder, max_length) if name == "honed" else run_trl(folder, max_length, name == "trl-precompute")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    import subprocess
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="training pairs (one epoch)")
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--contestants", default=",".join(CONTESTANTS))
    parser.add_argument("--keep", help="build the model here and reuse it")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--note", default="")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.folder), args.max_length)
        return
    names = [n for n in args.contestants.split(",") if n]
    if any(n not in CONTESTANTS for n in names):
        parser.error(f"--contestants: choose from {', '.join(CONTESTANTS)}")
    info, _ = announce_machine()
    isa = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()) or "none"
    folder = Path(args.keep or tempfile.mkdtemp(prefix="preference_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model" / "config.json").exists():
        build_model("125m", folder / "model")
    _, words = build_tokenizer(VOCAB)
    write_pairs(folder / "train.jsonl", args.pairs, 1, words)
    write_pairs(folder / "validation.jsonl", 8, 2, words)
    write_pairs(folder / "test.jsonl", 8, 3, words)
    results = {}
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--folder", str(folder), "--max-length", str(args.max_length)],
                              capture_output=True, text=True, env={**__import__("os").environ, "TOKENIZERS_PARALLELISM": "false",
                                                                    "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}", flush=True)
            continue
        results[name] = json.loads(line[len("RESULT "):])
        r = results[name]
        print(f"{name:<15} {args.pairs / r['seconds']:7.2f} pairs/s  {r['seconds']:7.1f} s  peak {r['peak_rss_mb']:8.0f} MB  "
              f"CPU flags: {isa}", flush=True)
    trl = [results[n]["seconds"] for n in ("trl", "trl-precompute") if n in results]
    if "honed" in results and trl:
        ratio = min(trl) / results["honed"]["seconds"]
        print(f"honed is {ratio:.2f}x TRL's faster setting (pairs/s)")
        if not args.no_record:
            h = results["honed"]
            append_result("Preference tuning: honed DPO vs TRL DPOTrainer (LoRA r 8, 125 M Llama, fp32)",
                          ["date", "pairs × max_length", "honed pairs/s", "TRL pairs/s (per-step ref)", "TRL pairs/s (precomputed ref)",
                           "ratio", "peak RSS MB honed / TRL", "CPU", "versions", "note"],
                          [today(), f"{args.pairs} × {args.max_length}", f"{args.pairs / h['seconds']:.2f}",
                           f"{args.pairs / results['trl']['seconds']:.2f}" if "trl" in results else "–",
                           f"{args.pairs / results['trl-precompute']['seconds']:.2f}" if "trl-precompute" in results else "–",
                           f"{ratio:.2f}×", f"{h['peak_rss_mb']:.0f} / {min(results[n]['peak_rss_mb'] for n in results if n != 'honed'):.0f}",
                           machine_cell(info) + f" [{isa}]", versions_cell(info), args.note])


if __name__ == "__main__":
    main()
