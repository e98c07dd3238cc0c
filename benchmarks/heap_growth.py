"""How far glibc's heap grows beyond the live tensors in LoRA training steps, per allocator setting.

    python benchmarks/heap_growth.py /tmp/perf18/bench/125m/model keep
    python benchmarks/heap_growth.py /tmp/perf18/bench/125m/model language-model

Runs three forward and backward passes of the model's decoder (no logits) at 4 × 512 tokens with
LoRA r 16 on the seven projections and honed's adapter dropout, under one allocator setting of
train/allocator.py: `keep` (every freed block kept in the heap, what classifiers train under),
`language-model` (only blocks under 4 MB kept, what chat/causal-lm/preference train under) or
`mmapN` (blocks from N MB up on their own mappings). A 3 ms sampler reads mallinfo2 and
/proc/self/statm; prints the heap's growth (arena + mapped), the live bytes' growth and RSS's,
and the wall time of each step. Run each setting in its own process: the heap is the process's.
`--qlora` loads the base in 4-bit NF4 as `method: qlora` does (the adapters the same).
"""
import argparse
import ctypes
import sys
import threading
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import probe_model  # noqa: E402
from honed.methods.dropout import replace_adapter_dropout
from honed.train.allocator import LANGUAGE_MODEL_OWN_MAPPING_FROM, keep_freed_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def main() -> None:
    """Print heap, live and RSS growth over three LoRA steps under one allocator setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="folder of a causal LM saved with save_pretrained")
    parser.add_argument("setting", help="keep | language-model | mmapN (N in MB)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per row (4 rows)")
    parser.add_argument("--qlora", action="store_true", help="the base in 4-bit NF4, as method: qlora (benchmarks/common.py probe_model)")
    args = parser.parse_args()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    own = {"keep": None, "language-model": LANGUAGE_MODEL_OWN_MAPPING_FROM}.get(args.setting)
    if args.setting.startswith("mmap"):
        own = int(args.setting[4:]) << 20
    elif args.setting not in ("keep", "language-model"):
        parser.error(f"setting: expected keep, language-model or mmapN, got {args.setting!r}")
    torch.set_num_threads(2)
    model = probe_model(args.model, qlora=args.qlora)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM"))
    replace_adapter_dropout(model)  # as honed's lora method does
    model.train()
    decoder = model.base_model.model.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (4, args.tokens), generator=torch.Generator().manual_seed(0))
    libc.malloc_trim(0)
    peak = {"heap": 0, "live": 0, "rss": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            m = libc.mallinfo2()
            peak["heap"] = max(peak["heap"], m.arena + m.hblkhd)
            peak["live"] = max(peak["live"], m.uordblks + m.hblkhd)
            peak["rss"] = max(peak["rss"], rss_bytes())
            time.sleep(0.003)

    start, start_rss = libc.mallinfo2(), rss_bytes()
    threading.Thread(target=sample, daemon=True).start()
    walls = []
    with keep_freed_memory(torch.device("cpu"), own_mapping_from=own):
        for _ in range(3):
            began = time.perf_counter()
            decoder(input_ids=ids).last_hidden_state.pow(2).mean().backward()  # the blocks' activations only
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            walls.append(time.perf_counter() - began)
        done.set()
        time.sleep(0.01)
    mb = 2**20
    print(f"{args.setting:<15} heap growth {(peak['heap'] - start.arena - start.hblkhd) / mb:6.0f} MB  "
          f"live growth {(peak['live'] - start.uordblks - start.hblkhd) / mb:6.0f} MB  rss growth {(peak['rss'] - start_rss) / mb:6.0f} MB  "
          f"step wall {' '.join(f'{w:.2f}' for w in walls)} s")


if __name__ == "__main__":
    main()
