"""Chat SFT against TRL's SFTTrainer on the same work: a Llama-shaped model with random weights
(~125 M, or ~500 M with --size 500m; benchmarks/llm_memory.py's shapes and its word-level 32 000-token
tokenizer), the same generated conversations (an optional system turn, 1–3 user/assistant exchanges
of varied length), the same LoRA (r 16, α 32, dropout 0.05, every projection) or full fine-tuning, the
same max_length, one epoch, the same batch in tokens, a linear schedule without warm-up, AdamW with
weight decay 0.01 and clipping at 1.0, fp32 (this CPU has no bf16 units; both get the same precision).

    python benchmarks/chat_sft.py [--conversations 160] [--method lora|full] [--contestants honed,trl-packing,trl-grouped]

Both compute the loss on the assistant's tokens only, from the same chat template with
`{% generation %}` markers (honed reads them with transformers' assistant mask; TRL's
`assistant_only_loss`). TRL is run in two settings: `trl-packing` (packing=True, best-fit-decreasing
into rows of max_length, which TRL trains padding-free with restarting position ids) and
`trl-grouped` (no packing, `train_sampling_strategy="group_by_length"`, dynamic padding), with as many
conversations per batch as honed's packed rows hold on average, so every step sees the same tokens.
honed packs (its default) with `batch_size` packed rows.

Each contestant is a fresh process. Printed per contestant: real (non-padding) trained tokens per
second of training, the peak RSS while training (the kernel's high-water mark, reset when training
starts, so loading and tokenising do not count, and read when it ends; the model is resident in both),
the final validation loss (the mean over the validation conversations' assistant tokens) and the
ratios to TRL's faster setting.

With `--profile`, each contestant instead trains 1 + `--profile-steps` optimizer steps under
torch.profiler (the first step is its warm-up and is not recorded) and the parent prints both
`key_averages()` tables, sorted by self CPU time, and the ops that allocated the most memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import announce_machine, append_result, cpu_flags, load_average, machine_cell, today, versions_cell  # noqa: E402
from llm_memory import VOCAB, build_model, build_tokenizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT = 16, 32, 0.05
LR = {"lora": 2e-4, "full": 2e-5}
EPOCHS, WEIGHT_DECAY, GRAD_CLIP = 1, 0.01, 1.0
CONTESTANTS = ("honed", "trl-packing", "trl-grouped")
# the template both contestants render with: the assistant's content and end marker are the training targets
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}"
            "{{ m['content'] }} <|end|>{% endgeneration %} {% else %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def conversation(rng: random.Random, words: list[str], max_words: int) -> list[dict]:
    """An optional system turn and 1–3 exchanges; replies longer than prompts, lengths spread widely."""
    say = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    messages = [{"role": "system", "content": say(5, 30)}] if rng.random() < 0.5 else []
    for _ in range(rng.choice((1, 1, 2, 3))):
        messages += [{"role": "user", "content": say(5, 60)}, {"role": "assistant", "content": say(10, 150)}]
    while sum(len(m["content"].split()) + 2 for m in messages) + 1 > max_words and len(messages) > 2:
        messages = messages[:-2]  # fits max_length: neither contestant truncates
    return messages


def write_conversations(path: Path, n: int, seed: int, words: list[str], max_length: int) -> list[int]:
    """n conversations as JSONL; returns each one's token count under TEMPLATE."""
    tokenizer, _ = build_tokenizer(VOCAB)
    tokenizer.chat_template = TEMPLATE
    rng, lengths = random.Random(seed), []
    with open(path, "w") as fh:
        for _ in range(n):
            messages = conversation(rng, words, max_length)
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            while len(ids) > max_length:  # a long single exchange: shorten its reply
                messages[-1]["content"] = " ".join(messages[-1]["content"].split()[: -(len(ids) - max_length)])
                ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            lengths.append(len(ids))
            fh.write(json.dumps({"messages": messages}) + "\n")
    return lengths


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the RSS now


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class StepProfiler:
    """torch.profiler over optimizer steps 2 .. 1 + `steps` (step 1 warms up); step() ends each step."""

    def __init__(self, steps: int):
        import torch

        self.tables: dict[str, str] = {}
        self.profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
            schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1), on_trace_ready=self.ready)
        self.started = False

    def ready(self, prof) -> None:
        averages = prof.key_averages()
        self.tables["time"] = averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=48)
        self.tables["memory"] = averages.table(sort_by="self_cpu_memory_usage", row_limit=10, max_name_column_width=48)

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.profiler.start()

    def step(self) -> None:
        self.profiler.step()

    def stop(self) -> dict[str, str]:
        if self.started:
            self.profiler.stop()
        return self.tables


def run_honed(folder: Path, args) -> dict:
    import honed
    from honed.hooks import Hooks

    seen = {"peak": 0.0, "rss_at_start": 0.0}
    profiler = StepProfiler(args.profile_steps) if args.profile else None

    def on_train_start(stage):
        reset_peak()
        seen["rss_at_start"] = vm_rss_mb()
        if profiler is not None:
            profiler.start()

    def on_step(step):
        if profiler is not None:
            profiler.step()

    def on_collate():  # the high-water mark so far: every earlier step's forward and backward
        seen["peak"] = max(seen["peak"], vm_hwm_mb())

    recipe = {"task": "chat", "model": str(folder / "model"), "method": args.method,
              "data": {"train": str(folder / "train.jsonl"), "validation": str(folder / "validation.jsonl"),
                       "test": str(folder / "test.jsonl"), "max_length": args.max_length, "packing": True},
              "lora": {"r": R, "alpha": ALPHA, "dropout": DROPOUT, "target_modules": TARGETS},
              "train": {"epochs": EPOCHS, "batch_size": args.batch_size, "lr": LR[args.method], "precision": "fp32",
                        "eval_every": 100_000, "patience": None, "warmup_ratio": 0.0, "weight_decay": WEIGHT_DECAY,
                        "grad_clip": GRAD_CLIP, "gradient_checkpointing": False, "threads": "auto",
                        "max_steps": 1 + args.profile_steps if args.profile else None},
              "guards": {"baseline": False}}
    started = time.perf_counter()
    result = honed.run(recipe, out=folder / "honed-run", overwrite=True, show_progress=False,
                       hooks=Hooks(on_train_start=on_train_start, on_collate=on_collate, on_step=on_step))
    m = result.metrics
    seen["peak"] = max(seen["peak"], vm_hwm_mb()) if seen["peak"] == 0 else seen["peak"]
    return {"train_seconds": m["timing"]["train_seconds"], "wall_seconds": time.perf_counter() - started,
            "val_loss": m["validation"]["loss"], "train_peak_mb": seen["peak"], "steps": m["run"]["steps"],
            "rss_at_start_mb": seen["rss_at_start"], "process_peak_mb": vm_hwm_mb() if profiler is None else None,
            "guards_seconds": m["timing"].get("guards", {}), "profile": profiler.stop() if profiler is not None else None}


def run_trl(folder: Path, args, packing: bool) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype="float32")
    train = load_dataset("json", data_files=str(folder / "train.jsonl"), split="train")
    validation = load_dataset("json", data_files=str(folder / "validation.jsonl"), split="train")
    batch = args.batch_size if packing else args.grouped_batch
    extra = {"packing": True, "packing_strategy": "bfd"} if packing else {"packing": False, "train_sampling_strategy": "group_by_length"}
    config = SFTConfig(output_dir=str(folder / "trl-run"), per_device_train_batch_size=batch, per_device_eval_batch_size=4,
                       num_train_epochs=EPOCHS, learning_rate=LR[args.method], lr_scheduler_type="linear", warmup_steps=0,
                       weight_decay=WEIGHT_DECAY, max_grad_norm=GRAD_CLIP, optim="adamw_torch_fused", max_length=args.max_length,
                       assistant_only_loss=True, eval_packing=False, logging_strategy="no", save_strategy="no", eval_strategy="no",
                       report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0, data_seed=0,
                       max_steps=1 + args.profile_steps if args.profile else -1, **extra)
    peft_config = (LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, task_type="CAUSAL_LM")
                   if args.method == "lora" else None)
    profiler = StepProfiler(args.profile_steps) if args.profile else None

    class Steps(TrainerCallback):
        def on_step_end(self, *a, **k):
            if profiler is not None:
                profiler.step()

    trainer = SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=validation, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Steps()])
    reset_peak()
    rss_at_start = vm_rss_mb()
    if profiler is not None:
        profiler.start()
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    peak = vm_hwm_mb()
    tables = profiler.stop() if profiler is not None else None
    evaluation = trainer.evaluate()
    return {"train_seconds": seconds, "train_runtime": output.metrics["train_runtime"], "val_loss": evaluation["eval_loss"],
            "train_peak_mb": peak, "steps": output.global_step, "rss_at_start_mb": rss_at_start,
            "process_peak_mb": vm_hwm_mb(), "profile": tables}


def child(name: str, folder: Path, args) -> None:
    out = run_honed(folder, args) if name == "honed" else run_trl(folder, args, name == "trl-packing")
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=160, help="training conversations (one epoch)")
    parser.add_argument("--eval-conversations", type=int, default=16, help="validation and test conversations, each")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per packed row (no conversation is longer)")
    parser.add_argument("--batch-size", type=int, default=4, help="packed rows per step (TRL without packing: as many tokens)")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--size", choices=("125m", "500m"), default="125m")
    parser.add_argument("--contestants", default=",".join(CONTESTANTS), help=f"comma-separated, of {', '.join(CONTESTANTS)}")
    parser.add_argument("--keep", help="build the model and data here and reuse them")
    parser.add_argument("--no-record", action="store_true", help="do not append a row to RESULTS.md")
    parser.add_argument("--note", default="", help="a note for the RESULTS.md row")
    parser.add_argument("--profile", action="store_true",
                        help="train each contestant 1 + --profile-steps steps under torch.profiler and print its tables (no RESULTS.md row)")
    parser.add_argument("--profile-steps", type=int, default=3, help="recorded optimizer steps with --profile (after one warm-up step)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--grouped-batch", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.folder), args)
        return
    names = [n.strip() for n in args.contestants.split(",") if n.strip()]
    if any(n not in CONTESTANTS for n in names):
        parser.error(f"--contestants: choose from {', '.join(CONTESTANTS)}")
    info, load_before = announce_machine()
    isa = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()) or "none"
    folder = Path(args.keep or tempfile.mkdtemp(prefix="chat_sft_bench_")) / args.size
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model" / "config.json").exists():
        build_model(args.size, folder / "model")
    tokenizer, words = build_tokenizer(VOCAB)
    tokenizer.chat_template = TEMPLATE  # both contestants read the template from the model folder
    tokenizer.save_pretrained(folder / "model")
    lengths = write_conversations(folder / "train.jsonl", args.conversations, 1, words, args.max_length)
    write_conversations(folder / "validation.jsonl", args.eval_conversations, 2, words, args.max_length)
    write_conversations(folder / "test.jsonl", args.eval_conversations, 3, words, args.max_length)
    tokens = sum(lengths) * EPOCHS
    per_row = args.max_length / (sum(lengths) / len(lengths))
    args.grouped_batch = max(1, round(args.batch_size * per_row * 0.9))  # packed rows are ~90 % full
    print(f"{args.conversations} conversations, {tokens:,} tokens (mean {sum(lengths) / len(lengths):.0f}, {min(lengths)}–{max(lengths)}); "
          f"{args.method}, {args.size}, fp32, max_length {args.max_length}, batch {args.batch_size} packed rows "
          f"(TRL unpacked: {args.grouped_batch} conversations); CPU flags: {isa}", flush=True)
    results = {}
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--folder", str(folder), "--max-length", str(args.max_length),
               "--batch-size", str(args.batch_size), "--method", args.method, "--grouped-batch", str(args.grouped_batch),
               "--profile-steps", str(args.profile_steps)] + (["--profile"] if args.profile else [])
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip().splitlines()[-3:]}", flush=True)
            continue
        r = results[name] = json.loads(line[len("RESULT "):])
        r["tokens_per_s"] = tokens / r["train_seconds"]
        tables = r.pop("profile", None)
        if tables:
            print(f"\n## {name}: {args.profile_steps} steps after one warm-up, sorted by self CPU time\n\n{tables['time']}\n"
                  f"## {name}: the ops that allocated the most memory\n\n{tables['memory']}", flush=True)
            continue
        print(f"{name:<12} {r['tokens_per_s']:8.1f} tokens/s  {r['train_seconds']:7.1f} s train  {r['steps']:4d} steps  "
              f"peak {r['train_peak_mb']:7.0f} MB (at start {r['rss_at_start_mb']:.0f}, process {r['process_peak_mb'] or 0:.0f})  "
              f"val loss {r['val_loss']:.4f}", flush=True)
    if args.profile:
        return
    trl = [n for n in ("trl-packing", "trl-grouped") if n in results]
    if "honed" not in results or not trl:
        return
    best = max(trl, key=lambda n: results[n]["tokens_per_s"])
    h, t = results["honed"], results[best]
    speed, memory = h["tokens_per_s"] / t["tokens_per_s"], h["train_peak_mb"] / t["train_peak_mb"]
    print(f"honed is {speed:.2f}x TRL's faster setting ({best}) in real tokens/s; peak RSS {memory:.2f}x; "
          f"val loss {h['val_loss']:.4f} vs {t['val_loss']:.4f}; load average {load_before:.2f} → {load_average():.2f}")
    if not args.no_record:
        cell = lambda n: f"{results[n]['tokens_per_s']:.0f}" if n in results else "–"  # noqa: E731
        append_result(f"Chat SFT: honed vs TRL SFTTrainer (Llama with random weights, 32k vocabulary, fp32)",
                      ["date", "size / method", "conversations × max_length (tokens)", "honed tokens/s", "TRL packing tokens/s",
                       "TRL grouped tokens/s", "ratio", "peak RSS MB honed / TRL (ratio)", "val loss honed / TRL", "CPU", "versions", "note"],
                      [today(), f"{args.size} {args.method}" + (f" r {R}" if args.method == "lora" else ""),
                       f"{args.conversations} × {args.max_length} ({tokens:,})", cell("honed"), cell("trl-packing"), cell("trl-grouped"),
                       f"{speed:.2f}×", f"{h['train_peak_mb']:.0f} / {t['train_peak_mb']:.0f} ({memory:.2f})",
                       f"{h['val_loss']:.3f} / {t['val_loss']:.3f}", machine_cell(info) + f" [{isa}]",
                       versions_cell(info) + f", trl {__import__('trl').__version__}",
                       f"load {load_before:.1f}→{load_average():.1f}. {args.note}".strip()])


if __name__ == "__main__":
    main()
