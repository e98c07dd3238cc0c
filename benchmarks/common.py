"""Shared pieces of the benchmarks: generated data and model, contestants, measurement, RESULTS.md.

Every benchmark script runs in one process invocation: the parent builds the assets once
(a DistilBERT-size checkpoint with random weights, a WordPiece tokenizer, CSV splits), then
runs each contestant in a fresh subprocess (`SCRIPT --contestant NAME --assets DIR`), so one
contestant's peak memory never mixes with another's. A child prints one line `RESULT {json}`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
RESULT_PREFIX = "RESULT "

# The optimizer semantics every contestant shares (honed's defaults, given to Trainer explicitly).
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
GRAD_CLIP = 1.0
LABELS = ["neg", "pos"]


# --------------------------------------------------------------------------- generated data and model

_SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "ba", "de", "fo", "gi", "hu", "ja"]


def _words(rng: random.Random, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(out)


def generate_rows(n: int, seed: int, min_tokens: int = 8, max_tokens: int = 128) -> list[tuple[str, str]]:
    """`n` texts whose token count (with [CLS] and [SEP]) is uniform in [min_tokens, max_tokens].

    The label is learnable: a class's marker words are three times as frequent in its texts."""
    rng = random.Random(1234)  # the vocabulary is the same for every split
    vocab = _words(rng, 3000)
    markers = {"neg": vocab[:60], "pos": vocab[60:120]}
    neutral = vocab[120:]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        other = "pos" if label == "neg" else "neg"
        words = []
        for _ in range(rng.randint(min_tokens - 2, max_tokens - 2)):
            r = rng.random()
            pool = markers[label] if r < 0.15 else markers[other] if r < 0.20 else neutral
            words.append(rng.choice(pool))
        rows.append((" ".join(words), label))
    return rows


def _write_csv(path: Path, rows) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)


def build_assets(root: Path, n_train: int = 512, n_eval: int = 128, seed: int = 0, max_tokens: int = 128) -> dict:
    """A DistilBERT-size sequence classifier (random init, DistilBertConfig() defaults), a WordPiece
    tokenizer trained on the generated text (each word one token), and train/validation/test CSVs."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train = generate_rows(n_train, seed, max_tokens=max_tokens)
    validation = generate_rows(n_eval, seed + 1, max_tokens=max_tokens)
    test = generate_rows(n_eval, seed + 2, max_tokens=max_tokens)
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        _write_csv(root / f"{name}.csv", rows)

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    corpus = [t for t, _ in train] + [" ".join(_words(random.Random(1234), 3000))]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=30522, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tokenizer = DistilBertTokenizerFast(tokenizer_object=tok)
    model_dir = root / "model"
    tokenizer.save_pretrained(str(model_dir))

    torch.manual_seed(seed)
    config = DistilBertConfig(num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)},
                              pad_token_id=tokenizer.pad_token_id)
    model = DistilBertForSequenceClassification(config)
    model.save_pretrained(str(model_dir), safe_serialization=True)

    lengths = [len(x) for x in tokenizer([t for t, _ in train], truncation=True, max_length=max_tokens)["input_ids"]]
    meta = {"root": str(root), "model": str(model_dir), "train": str(root / "train.csv"), "validation": str(root / "validation.csv"),
            "test": str(root / "test.csv"), "n_train": n_train, "max_length": max_tokens, "seed": seed, "train_lengths": lengths}
    (root / "assets.json").write_text(json.dumps(meta))
    return meta


def load_assets(root: Path) -> dict:
    return json.loads((Path(root) / "assets.json").read_text())


# --------------------------------------------------------------------------- model arithmetic

def model_shape(model_dir: str) -> dict:
    """Parameter counts and the attention geometry, from the checkpoint's config."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n and p.ndim == 2)
    layers = getattr(config, "n_layers", None) or getattr(config, "num_hidden_layers")
    width = getattr(config, "dim", None) or getattr(config, "hidden_size")
    return {"params": total, "non_embedding_params": total - embedding, "layers": layers, "width": width}


def training_flops(shape: dict, lengths: list[int], epochs: int) -> float:
    """6·N·tokens (forward + backward of the non-embedding weights) plus attention's two
    L×L products per layer (QKᵀ and AV: 4·L²·d forward, ×3 with backward), on real tokens."""
    tokens = sum(lengths)
    attention = 12 * shape["layers"] * shape["width"] * sum(length * length for length in lengths)
    return epochs * (6 * shape["non_embedding_params"] * tokens + attention)


def matmul_flops(dtype_name: str, n: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of an n×n @ n×n product in this dtype: the hardware's practical peak."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


# --------------------------------------------------------------------------- contestants

def probe_model(model_dir: str, qlora: bool = False):
    """A causal LM in fp32 with SDPA attention for the activation and heap probes; qlora: loaded as honed's
    `method: qlora` loads it (models/quantise.py: its quantisation settings with the recipe defaults, fp32
    compute, the pread load), then peft's prepare_model_for_kbit_training as methods/qlora.py runs it."""
    import torch
    from transformers import AutoModelForCausalLM

    if not qlora:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32", attn_implementation="sdpa")
    from types import SimpleNamespace

    from peft import prepare_model_for_kbit_training
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from honed.models.quantise import pretrained, quantisation_kwargs
    from honed.recipe import QloraSpec

    settings = quantisation_kwargs(SimpleNamespace(method="qlora", qlora=QloraSpec()), "fp32", torch.device("cpu"))
    model = pretrained(AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING, model_dir, AutoConfig.from_pretrained(model_dir),
                       settings, attn_implementation="sdpa")
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb() -> float:
    """Resident memory now (peak_rss_mb is the high-water mark)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return float("nan")


def training_hooks(into: dict):
    """A `honed.hooks.Hooks` for `honed.run(..., hooks=...)` that fills `into` with the resident
    memory when training starts (`rss_at_train_start_mb`: at the first stage's `on_train_start`,
    which the loop calls before building the optimizer, where Trainer's figure is read too) and
    the intra-op thread counts honed's loop trained with, step by step (`threads_per_step`:
    count → steps)."""
    from honed.hooks import Hooks

    counts = into.setdefault("threads_per_step", {})

    def on_train_start(stage: str) -> None:
        into.setdefault("rss_at_train_start_mb", rss_mb())

    def on_threads(n: int) -> None:
        counts[str(n)] = counts.get(str(n), 0) + 1

    return Hooks(on_train_start=on_train_start, on_threads=on_threads)


def trainer_args(out: str, batch_size: int, epochs: int, lr: float, steps: int, bf16: bool, grouped: bool, seed: int):
    """TrainingArguments with honed's optimizer semantics and nothing else running while timed."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=epochs, learning_rate=lr,
        weight_decay=WEIGHT_DECAY, warmup_steps=int(WARMUP_RATIO * steps),  # honed: int(ratio · total steps)
        lr_scheduler_type="linear", max_grad_norm=GRAD_CLIP, optim="adamw_torch_fused", bf16=bf16,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", seed=seed, data_seed=seed,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    if grouped:
        kwargs["train_sampling_strategy"] = "group_by_length"  # transformers 5; group_by_length=True in 4.x
    return TrainingArguments(**kwargs)


def tokenised_dataset(tokenizer, csv_path: str, max_length: int) -> list[dict]:
    import pandas as pd

    frame = pd.read_csv(csv_path)
    index = {label: i for i, label in enumerate(LABELS)}
    enc = tokenizer(frame["text"].tolist(), truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": index[label]}
            for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], frame["label"])]


def run_trainer(model, tokenizer, train_rows: list[dict], *, batch_size: int, epochs: int, lr: float, bf16: bool,
                grouped: bool, seed: int, out: str) -> dict:
    """Hugging Face Trainer as users run it: DataCollatorWithPadding (dynamic padding), fused AdamW."""
    from transformers import DataCollatorWithPadding, Trainer

    steps = math.ceil(len(train_rows) / batch_size) * epochs
    args = trainer_args(out, batch_size, epochs, lr, steps, bf16, grouped, seed)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer))
    rss_start = rss_mb()
    start = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - start
    runtime = output.metrics["train_runtime"]
    samples = len(train_rows) * epochs
    return {"samples": samples, "train_seconds": round(runtime, 3), "train_wall_seconds": round(wall, 3),
            "samples_per_s": samples / runtime, "final_loss": output.training_loss, "steps": output.global_step,
            "rss_at_train_start_mb": rss_start,
            "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__}


def honed_history(run_dir) -> list[dict]:
    path = Path(run_dir) / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def emit(result: dict) -> None:
    """A child's answer: one line the parent reads back."""
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: str, name: str, assets: str, extra: list[str], timeout: float | None = None) -> dict:
    """Run one contestant in a fresh interpreter; its stdout's RESULT line is the answer."""
    cmd = [sys.executable, script, "--contestant", name, "--assets", assets, *extra]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"contestant {name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def spread(values: list[float]) -> str:
    """median, and min–max when measured more than once."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} ({min(values):.2f}–{max(values):.2f}, n={len(values)})"


# --------------------------------------------------------------------------- the machine and RESULTS.md

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict:
    import torch
    import transformers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = cpu_flags()
    bf16 = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"
    info = {"cpu": cpu_model(), "cores": cores, "bf16_isa": bf16, "torch": torch.__version__,
            "transformers": transformers.__version__, "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def append_result(section: str, header: list[str], row: list[str]) -> None:
    """Append a row to the section's table in RESULTS.md (the section and table are created if missing)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nRows are appended by the scripts in this folder; see README.md.\n"
    title = f"## {section}"
    line = "| " + " | ".join(row) + " |"
    if title not in text:
        table = "| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|\n"
        text = text.rstrip("\n") + f"\n\n{title}\n\n{table}{line}\n"
    else:
        start = text.index(title)
        nxt = text.find("\n## ", start + len(title))
        end = len(text) if nxt == -1 else nxt
        body = text[start:end].rstrip("\n") + "\n" + line + "\n"
        text = text[:start] + body + ("\n" + text[end:].lstrip("\n") if nxt != -1 else "")
    RESULTS.write_text(text)


def today() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")


def machine_cell(info: dict) -> str:
    where = f"{info['cpu']}, {info['cores']} cores ({info['bf16_isa']})"
    if info.get("gpu"):
        where += f"; GPU {info['gpu']}"
    return where


def versions_cell(info: dict) -> str:
    return f"torch {info['torch']}, transformers {info['transformers']}"


# --------------------------------------------------------------------------- the scripts' shared command line

def add_run_options(parser) -> None:
    """The options every comparison script has: recording, and the hidden ones its child processes get."""
    import argparse

    parser.add_argument("--no-record", action="store_true", help="do not append a row to RESULTS.md")
    parser.add_argument("--note", default="", help="a note for the RESULTS.md row")
    parser.add_argument("--contestant", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)


def chosen_contestants(parser, text: str, known) -> list[str]:
    """The comma-separated --contestants, each checked against the script's table."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--contestants: unknown {unknown}; choose from {', '.join(known)}")
    return names


def announce_machine() -> tuple[dict, float]:
    """Print the machine line every script starts with; returns (machine info, load average before)."""
    info = machine()
    load_before = load_average()
    print(f"machine: {machine_cell(info)}; {versions_cell(info)}; load average {load_before:.2f}")
    return info, load_before
