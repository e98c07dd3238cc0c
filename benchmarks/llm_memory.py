"""Chat fine-tuning of Llama-shaped models at the sizes people fine-tune: peak RSS per process against
the memory estimate (docs/memory.md), and tokens/s, for lora, qlora, checkpointing, full and FSDP2.

    python benchmarks/llm_memory.py --sizes 125m,500m --rows lora,full --steps 3

Each model is a LlamaConfig with random weights saved locally (~125 M, ~500 M, and TinyLlama's
1.1 B shape), with a word-level tokenizer of exactly the model's vocabulary (32 000) and a chat
template; the conversations are generated. Every row is a fresh `python -m honed run` process
(torchrun with 2 processes for fsdp2), so one row's peak never mixes with another's; the peak is
the child's ru_maxrss (the largest process under torchrun), the estimate is metrics.json's
timing.memory_estimate_mb. tokens/s counts the packed rows' real tokens per training second.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import announce_machine, append_result, cpu_flags, machine_cell, today, versions_cell  # noqa: E402

VOCAB = 32000
SIZES = {  # LlamaConfig fields; parameter counts with the untied 32k head
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 2048},
    "500m": {"hidden_size": 1536, "num_hidden_layers": 16, "num_attention_heads": 24, "num_key_value_heads": 4, "intermediate_size": 4096},
    "1.1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 5632},
}
ROWS = {  # recipe overrides of each row
    "lora": ["method=lora", "train.gradient_checkpointing=false"],
    "qlora": ["method=qlora", "train.gradient_checkpointing=false"],
    "lora+gc": ["method=lora", "train.gradient_checkpointing=true"],
    "qlora+gc": ["method=qlora", "train.gradient_checkpointing=true"],
    "full": ["method=full", "train.gradient_checkpointing=false"],
    "full+gc": ["method=full", "train.gradient_checkpointing=true"],
    "fsdp2": ["method=full", "train.gradient_checkpointing=false", "train.distributed=fsdp"],
}
# Full fine-tuning in fp32 holds 16 B per parameter before any activation: 1.1 B needs ~18 GB,
# more than this shared 24 GB host can give without risking everyone's processes.
TOO_BIG = {("1.1b", "full"): "fp32 weights + gradients + AdamW alone are ~16.4 GB; the peak ~21 GB would risk the shared host's 24 GB",
           ("1.1b", "full+gc"): "fp32 weights + gradients + AdamW alone are ~16.4 GB (~18 GB peak) on a shared 24 GB host",
           ("1.1b", "fsdp2"): "two processes of ~11 GB each on one shared 24 GB host"}
SPECIAL = ["<s>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<unk>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _words(n: int) -> list[str]:
    rng, syllables, out = random.Random(1234), ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "ba", "de"], set()
    while len(out) < n:
        out.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 5))))
    return sorted(out)


def build_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer whose vocabulary is exactly `vocab_size` (the model's
    embedding rows): the special tokens, 4 000 generated words, then unused filler tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = _words(4000)
    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins word tokens with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<|pad|>", unk_token="<unk>",
                                        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"], model_max_length=2048)
    tokenizer.chat_template = TEMPLATE
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer, words


def build_model(size: str, folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, _ = build_tokenizer(VOCAB)
    config = LlamaConfig(**SIZES[size], vocab_size=VOCAB, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {size}: {n / 1e6:.0f} M parameters in {folder}", flush=True)
    return folder


def write_conversations(path: Path, n: int, seed: int, words: list[str]) -> float:
    """n conversations of 40–250 words; returns the mean token count (template and specials included)."""
    rng, total = random.Random(seed), 0
    with open(path, "w") as fh:
        for _ in range(n):
            user = " ".join(rng.choice(words) for _ in range(rng.randint(10, 80)))
            reply = " ".join(rng.choice(words) for _ in range(rng.randint(30, 160)))
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            total += len(user.split()) + len(reply.split()) + 5  # <s>, two role tokens, two <|end|>
            fh.write(json.dumps({"messages": messages}) + "\n")
    return total / n


def recipe_for(folder: Path, model: Path, args) -> Path:
    import yaml

    recipe = {"task": "chat", "model": str(model),
              "data": {"train": str(folder / "train.jsonl"), "validation": str(folder / "validation.jsonl"),
                       "test": str(folder / "test.jsonl"), "max_length": args.max_length},
              "lora": {"r": 8}, "qlora": {"bits": 4},
              "train": {"max_steps": args.steps, "batch_size": args.batch_size, "precision": "fp32", "lr": 1e-4, "eval_every": args.steps,
                        "patience": None, "threads": "auto"},
              "guards": {"baseline": False}, "out": str(folder / "run")}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_row(row: str, recipe: Path, folder: Path) -> dict:
    """One fresh process (two under torchrun for fsdp2); returns its metrics' timing and the measured peak."""
    out = folder / f"run-{row}"
    shutil.rmtree(out, ignore_errors=True)
    sets = [a for kv in ROWS[row] for a in ("-s", kv)]
    if row == "fsdp2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "honed", "run", str(recipe), "--out", str(out), *sets]
    else:
        cmd = [sys.executable, "-m", "honed", "run", str(recipe), "--out", str(out), *sets]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output, _ = proc.communicate()
    wall = time.time() - started
    # ru_maxrss of waited-for children: the largest single process (rank 0 or 1 under torchrun)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        return {"error": " ".join(output.strip().splitlines()[-1:])[:300] or f"exit {proc.returncode}", "wall": wall}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"timing": metrics["timing"], "peak_children_mb": peak, "wall": wall, "shards": metrics["run"].get("shards")}


def shard_share(shards: dict | None) -> str:
    """FSDP: the largest process's parameters + optimizer state as a share of one process holding them all
    (AdamW: two fp32 moments per trainable parameter), from the local shard sizes metrics.json records."""
    if not shards:
        return ""
    whole = shards["params"] + 2 * shards["trainable"]
    largest = max(r["params"] + r["optimizer_state"] for r in shards["ranks"])
    return f"params + optimizer state on the largest of {shards['world']} processes: {largest / whole:.3f} of one process's"


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def activation_probe(model_dir: Path, checkpointing: bool, batch_size: int, max_length: int) -> dict:
    """Activation memory alone: one forward and backward of a LoRA model through its blocks (a loss on
    the last hidden state, so no logits), the peak RSS over it minus the RSS before it. The kernel's
    peak counter (VmHWM) is reset first (/proc/self/clear_refs), so loading the model does not count."""
    import psutil
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from honed.methods.dropout import replace_adapter_dropout
    from honed.train.allocator import LANGUAGE_MODEL_OWN_MAPPING_FROM, keep_freed_memory

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
    replace_adapter_dropout(model)  # as honed's lora method does
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch_size, max_length))
    half = max_length // 2  # two packed conversations per row, as chat batches are
    positions = torch.cat([torch.arange(half), torch.arange(max_length - half)]).repeat(batch_size, 1)
    with torch.no_grad():  # page the weights in (from_pretrained maps the safetensors file): they are not activations
        model.base_model.model.model(input_ids=ids[:1, :8], use_cache=False)
    Path("/proc/self/clear_refs").write_text("5")
    before = psutil.Process().memory_info().rss / 2**20
    # the allocator setting honed's loop trains a language model under (train/allocator.py): freed blocks
    # under 4 MB kept for reuse without checkpointing, every one handed back at once with it
    with keep_freed_memory(torch.device("cpu"), return_at_once=checkpointing,
                           own_mapping_from=None if checkpointing else LANGUAGE_MODEL_OWN_MAPPING_FROM):
        hidden = model.base_model.model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        hidden.pow(2).mean().backward()
    return {"activation_mb": _vm_hwm_mb() - before}


def child(row: str, recipe: Path, folder: Path) -> None:
    """A row in its own process, so RUSAGE_CHILDREN holds only this row's processes."""
    if row.startswith("probe"):
        print("ROW " + json.dumps(activation_probe(folder / "model", row == "probe+gc", *map(int, recipe.name.split("x")))), flush=True)
        return
    print("ROW " + json.dumps(run_row(row, recipe, folder)), flush=True)


def measure(row: str, recipe: Path, folder: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", row, "--folder", str(folder), "--recipe", str(recipe)],
                          capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("ROW "):
            return json.loads(line[4:])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300] if (proc.stderr or proc.stdout).strip() else f"exit {proc.returncode}"}


HEADER = ["date", "size", "row", "steps × batch × max_length", "peak RSS MB", "estimate MB", "estimate / peak", "tokens/s",
          "train s", "CPU", "versions", "note"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="125m", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--rows", default="lora,full", help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per row (train.max_steps)")
    parser.add_argument("--batch-size", type=int, default=4, help="packed rows per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--conversations", type=int, default=16, help="training conversations (every evaluation scores them too, "
                        "so more only costs time)")
    parser.add_argument("--eval-conversations", type=int, default=4, help="validation and test conversations, each")
    parser.add_argument("--activations", action="store_true",
                        help="also measure activation memory alone (LoRA, one step through the blocks) with and without checkpointing")
    parser.add_argument("--no-record", action="store_true", help="do not append rows to RESULTS.md")
    parser.add_argument("--note", default="")
    parser.add_argument("--keep", help="build the models in this folder and keep them (reused when present)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.recipe), Path(args.folder))
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [s for s in sizes if s not in SIZES] + [r for r in rows if r not in ROWS]
    if bad:
        parser.error(f"unknown {bad}; sizes are {', '.join(SIZES)}, rows {', '.join(ROWS)}")
    info, _ = announce_machine()
    flags = cpu_flags()
    isa = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none"
    print(f"CPU flags: {isa}")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="llm_memory_"))
    root.mkdir(parents=True, exist_ok=True)
    _, words = build_tokenizer(VOCAB)
    print(f"{'size':<6} {'row':<8} {'peak MB':>9} {'estimate MB':>12} {'est/peak':>9} {'tokens/s':>9} {'train s':>8}  CPU flags")
    try:
        for size in sizes:
            folder = root / size
            folder.mkdir(exist_ok=True)
            model = folder / "model"
            if not (model / "config.json").exists():
                build_model(size, model)
            mean_tokens = write_conversations(folder / "train.jsonl", args.conversations, 1, words)
            write_conversations(folder / "validation.jsonl", args.eval_conversations, 2, words)
            write_conversations(folder / "test.jsonl", args.eval_conversations, 3, words)
            recipe = recipe_for(folder, model, args)
            if args.activations:
                shape = Path(f"{args.batch_size}x{args.max_length}")
                probes = {r: measure(r, shape, folder) for r in ("probe", "probe+gc")}
                if all("activation_mb" in p for p in probes.values()):
                    off, on = probes["probe"]["activation_mb"], probes["probe+gc"]["activation_mb"]
                    print(f"{size:<6} activations (LoRA, blocks only): {off:,.0f} MB without checkpointing, {on:,.0f} MB with: "
                          f"{off / on:.1f}x less", flush=True)
                    if not args.no_record:
                        append_result("llm_memory.py: activation memory alone, LoRA, with and without gradient checkpointing",
                                      ["date", "size", "batch × max_length", "without MB", "with MB", "cut", "CPU", "versions"],
                                      [today(), size, f"{args.batch_size} × {args.max_length}", f"{off:,.0f}", f"{on:,.0f}", f"{off / on:.1f}x",
                                       f"{machine_cell(info)}; {isa}", versions_cell(info)])
                else:
                    print(f"{size:<6} activation probe failed: {probes}", flush=True)
            for row in rows:
                if (size, row) in TOO_BIG:
                    print(f"{size:<6} {row:<8} skipped: {TOO_BIG[size, row]}", flush=True)
                    continue
                result = measure(row, recipe, folder)
                if "error" in result:
                    print(f"{size:<6} {row:<8} failed: {result['error']}", flush=True)
                    continue
                t = result["timing"]
                # the estimate is of training's peak: compare it with the peak at the end of training (the largest
                # process's); the whole run's (evaluation, export and the guards after it) goes in the note
                whole = max(result["peak_children_mb"], t["peak_rss_mb"])
                peak, estimate = t.get("training_peak_rss_mb") or whole, t["memory_estimate_mb"]
                ranks = t.get("training_peak_rss_mb_per_process") or []
                per_rank = f"training peak per process {' / '.join(f'{r:,.0f}' for r in ranks)} MB" if len(ranks) > 1 else ""
                share = "; ".join(x for x in (f"whole run's peak {whole:,.0f} MB", shard_share(result.get("shards")), per_rank) if x)
                tokens = t["samples_per_second"] * mean_tokens
                print(f"{size:<6} {row:<8} {peak:>9,.0f} {estimate:>12,.0f} {estimate / peak:>9.2f} {tokens:>9,.0f} {t['train_seconds']:>8.1f}  {isa}"
                      + (f"  ({share})" if share else ""), flush=True)
                if not args.no_record:
                    append_result("llm_memory.py: chat fine-tuning, peak RSS per process vs the memory estimate", HEADER,
                                  [today(), size, row, f"{args.steps} × {args.batch_size} × {args.max_length}", f"{peak:,.0f}", f"{estimate:,.0f}",
                                   f"{estimate / peak:.2f}", f"{tokens:,.0f}", f"{t['train_seconds']:.1f}", f"{machine_cell(info)}; {isa}",
                                   versions_cell(info), "; ".join(x for x in (args.note, share) if x)])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
