"""Bytes of activations autograd saves in one LoRA training step of the benchmark's model, by op.

    python benchmarks/saved_activations.py /tmp/perf18/bench/125m/model --tokens 2048

Runs one forward of `--tokens` tokens (one flattened row, fp32, LoRA r 16 / alpha 32 / dropout 0.05 on
every projection, as benchmarks/chat_sft.py) under `torch.autograd.graph.saved_tensors_hooks` and sums,
per grad_fn name, the bytes of every distinct storage autograd keeps for backward. Weights (parameters)
are excluded: they exist anyway. No logits and no backward are run: the table is the per-layer
activations only. `--qlora`: the base in 4-bit NF4 as `method: qlora` loads it. The op names are approximate (see the comment in main).
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import probe_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def main() -> None:
    """Print bytes saved for backward per autograd op for one forward pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="folder of a causal LM saved with save_pretrained")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the one flattened row")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (0 removes peft's dropped copies)")
    parser.add_argument("--peft-dropout", action="store_true",
                        help="keep peft's nn.Dropout (a saved float mask) instead of honed's SeededDropout (methods/dropout.py)")
    parser.add_argument("--qlora", action="store_true",
                        help="the base in 4-bit NF4 (bitsandbytes, fp32 compute) and peft's prepare_model_for_kbit_training, as method: qlora")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = probe_model(args.model, qlora=args.qlora)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    if not args.peft_dropout:
        from honed.methods.dropout import replace_adapter_dropout

        replace_adapter_dropout(model)  # as honed's lora method does
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, str] = {}
    per_op: dict[str, int] = defaultdict(int)
    state = {"op": "?"}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = state["op"]
            per_op[state["op"]] += t.untyped_storage().nbytes()
        return t

    # The hook does not say which op saves a tensor; the last aten op dispatched before it fired is
    # usually the producer of that tensor (e.g. dropout's div_), so the names are a rough attribution.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Naming(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            state["op"] = func.overloadpacket.__name__
            return func(*args, **(kwargs or {}))

    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Naming():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    total = sum(per_op.values())
    print(f"{args.tokens} tokens, {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
          f"intermediate {model.config.intermediate_size}: {total / 2**20:.0f} MiB saved for backward")
    for op, n in sorted(per_op.items(), key=lambda kv: -kv[1]):
        print(f"  {op:<40} {n / 2**20:9.1f} MiB  {100 * n / total:5.1f} %")


if __name__ == "__main__":
    main()
