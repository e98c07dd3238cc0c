"""Memory before launch: estimate the peak a run will need and refuse, naming the cheapest change
that fits, when the device does not have it, rather than dying with out-of-memory an hour in.

The formula and where each term comes from are in docs/memory.md. In short, per process:

    peak = weights + optimizer + max(gradients + activations + logits, evaluation logits) + runtime

weights are the loaded model's real bytes (4-bit/8-bit weights as bitsandbytes stores them);
gradients (4 B) and AdamW's two moments (8 B) cover the exact trainable parameters of the method;
activations are counted per transformer block (every block's saved tensors, or with gradient
checkpointing each block's input plus one block recomputed); logits are batch·seq·vocab fp32 in
the copies a cross-entropy forward and backward hold. Under FSDP weights, gradients and optimizer
state are divided by the world size, plus one block gathered whole.
"""

from __future__ import annotations

import dataclasses
import math
import resource
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from .errors import RecipeError
from .methods.freeze import embedding_module, find_layers
from .methods.lora import target_modules as default_lora_targets

MB = 1024 * 1024
HEADROOM = 0.9  # refuse above 90 % of what the device has free
# Measured: `import torch, transformers, peft, honed` is 432 MB of RSS on this CPU build (torch
# 2.13, transformers 5.24); the tokenizer, the data and glibc's arenas add ~100 MB more.
RUNTIME_OVERHEAD_MB = 530
# Measured on a Llama block in fp32 by counting what autograd saves (saved_tensors_hooks, one
# storage counted once), in elements per token of one block; see docs/memory.md.
GATED_FULL_H, GATED_FULL_I = 10, 4  # full fine-tuning: 10·hidden + 4·intermediate (+ heads + seq for the packed mask)
# What a process's RSS grows by over what autograd saves: the backward's gradient buffers and the
# heap's holes (measured: a 500M Llama's LoRA step peaked 1.3x the saved tensors' bytes above its weights and logits).
ALLOCATOR_FACTOR = 1.3
# Language models train keeping only freed blocks under 4 MB in the heap (train/allocator.py), which leaves fewer
# holes: with 1.3 the estimate was 1.26x the 1.1B LoRA peak and 1.34x the 1.1B QLoRA one (benchmarks/RESULTS.md)
LANGUAGE_MODEL_ALLOCATOR_FACTOR = 1.15


def allocator_factor(plan) -> float:
    """What RSS holds beyond the saved tensors, for this plan's allocator setting."""
    return LANGUAGE_MODEL_ALLOCATOR_FACTOR if plan.family == "causal-lm" else ALLOCATOR_FACTOR
# LoRA/QLoRA against full fine-tuning: the frozen base layers save no inputs for weight gradients, the adapters
# save their (undropped, shared: methods/dropout.py DroppedLinear) inputs and low-rank outputs; the same with 4-bit
# base layers. Measured with benchmarks/saved_activations.py on the 125M Llama at 512 tokens: 539 MiB saved with
# peft's nn.Dropout (8·hidden + 1·intermediate above full), 387 MiB with a seeded dropout that saves no mask (+1·hidden),
# 315 MiB with the dropout fused into the adapter's first matrix (−3.2·hidden)
LORA_EXTRA_H, LORA_EXTRA_I = -3, 0
# Logits: the forward holds the logits and log_softmax's output (the chat loss shifts the targets, not
# the logits), the backward a gradient while the first are freed: 3.5 copies were measured as peak RSS
# over a step with the shifted copy, one fewer without it
TRAIN_LOGIT_COPIES = 2.5
EVAL_LOGIT_COPIES = 3  # no backward: logits, log_softmax, the float copy (measured 3.1)
# tasks/chat/model.py sizes evaluation batches so their logits, held about three times, stay within this
EVAL_LOGITS_BYTES = 512 * MB
# With gradient checkpointing autograd saves one value per hidden unit per token per block (the block's
# input; counted with saved_tensors_hooks), and the loop hands freed buffers back at once
# (train/allocator.py return_freed_memory), so the recomputed block's temporaries do not stay in the heap:
# these terms count without ALLOCATOR_FACTOR. (With glibc's dynamic threshold a 125M LoRA run held ~12.5
# values per block instead: 2,045 MB peak; with the threshold fixed 1,373 MB; benchmarks/RESULTS.md.)
CHECKPOINTED_PER_HIDDEN = 1.0
# chat's loss and evaluation form the logits CHUNKED_LOGITS_BYTES at a time (tasks/chat/loss.py CHUNK_BYTES):
# a chunk, its softmax's gradient and the gathered hidden states' gradient are held at once
CHUNKED_LOGITS_BYTES = 64 * MB
CHUNKED_LOGIT_COPIES = 2
QUANT_BLOCK = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights (8-bit with double quantisation, else fp32)


@dataclass(frozen=True)
class Plan:
    """What the estimate needs to know about a run besides the model (every field a recipe key or its resolution)."""

    method: str = "full"  # full | head | freeze | lora | qlora | lp-ft
    batch_size: int = 8  # rows per optimizer micro-step, over all processes (train.batch_size)
    seq_len: int = 128
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    world_size: int = 1
    fsdp: bool = False
    offload: bool = False
    grad_accumulation: int = 1
    family: str = ""  # the bundle's family; "causal-lm" has per-token logits over the vocabulary
    head_name: str = ""
    lora_r: int = 8
    lora_targets: tuple[str, ...] | None = None  # None: every linear layer outside the head
    qlora_bits: int = 4
    qlora_double_quant: bool = True
    freeze_layers: int | str = "half"
    eval_rows: int = 32  # rows in the largest evaluation batch
    packed_mask: bool = True  # chat packs conversations: SDPA gets a (batch, 1, seq, seq) mask per block
    chunked_logits: bool = False  # chat's loss: the output layer runs over the scored positions in chunks (tasks/chat/loss.py)

    def but(self, **changes) -> Plan:
        """The same plan with some fields changed (an alternative the refusal evaluates)."""
        return dataclasses.replace(self, **changes)


def _config_value(model: nn.Module, *names, default=None):
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None) if config is not None and not isinstance(config, dict) else (config or {}).get(name)
        if value:
            return value
    return default


def _is_quantised(p: torch.Tensor) -> bool:
    return p.dtype in (torch.uint8, torch.int8) or type(p).__name__ in ("Params4bit", "Int8Params")


def _base_model(model: nn.Module) -> nn.Module:
    """Inside a peft wrapper, the transformers model (its config and module names)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _matches(name: str, targets) -> bool:
    # peft's rule for a list of target names: the module's full name, or its last dotted parts
    return any(name == t or name.endswith("." + t) for t in targets)


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D":  # GPT-2's projection: weight (in, out)
        return tuple(module.weight.shape)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):  # bitsandbytes' Linear4bit/Linear8bitLt
        return module.in_features, module.out_features
    return None


def _head_params(model: nn.Module, head_name: str) -> int:
    head = dict(model.named_modules()).get(head_name) if head_name else None
    return sum(p.numel() for p in head.parameters()) if head is not None else 0


def lora_parameters(model: nn.Module, plan: Plan) -> int:
    """The adapter's parameters exactly as peft creates them: r·(in + out) per targeted layer
    (A is r×in, B is out×r); 0 when the model already carries its adapters."""
    base = _base_model(model)
    if base is not model:
        return 0
    targets = plan.lora_targets or default_lora_targets(model, plan.head_name)
    total = 0
    for name, module in model.named_modules():
        shape = _in_out(module) if name and _matches(name, targets) else None
        if shape is not None:
            total += plan.lora_r * (shape[0] + shape[1])
    return total


def trainable_parameters(model: nn.Module, plan: Plan) -> int:
    """Parameters the method trains: every one (full, lp-ft), the head (head), all above the frozen
    embeddings and lowest layers (freeze), the adapters (lora, qlora; plus the head for classifiers:
    a language model keeps its output layer frozen, as methods/lora.py does)."""
    total = sum(p.numel() for p in model.parameters())
    if plan.method in ("full", "lp-ft"):
        return total
    if plan.method == "head":
        return _head_params(model, plan.head_name)
    if plan.method == "freeze":
        _, layers = find_layers(model, plan.head_name)
        depth = len(layers) if layers is not None else 0
        n = depth // 2 if plan.freeze_layers == "half" else min(int(plan.freeze_layers), depth)
        frozen = {id(p) for block in list(layers or [])[:n] for p in block.parameters()}
        embeddings = embedding_module(model)
        frozen |= {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
        head = dict(model.named_modules()).get(plan.head_name)
        frozen -= {id(p) for p in head.parameters()} if head is not None else set()
        return sum(p.numel() for p in model.parameters() if id(p) not in frozen)
    adapters = lora_parameters(model, plan)
    if adapters == 0:  # already wrapped: peft marked what trains
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    return adapters + (0 if plan.family == "causal-lm" else _head_params(model, plan.head_name))


def weight_bytes(model: nn.Module, plan: Plan) -> int:
    """The weights' bytes as held during training: the loaded tensors' real sizes, plus fp32
    adapters not yet added; for qlora on a model loaded in full precision, what bitsandbytes
    would make of every linear layer outside the head (bits/8 per weight plus the block constants)."""
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held += sum(b.numel() * b.element_size() for b in model.buffers())
    if plan.method in ("lora", "qlora"):
        held += 4 * lora_parameters(model, plan)
    if plan.method != "qlora" or any(_is_quantised(p) for p in model.parameters()):
        return held
    if plan.qlora_bits == 4:
        per_weight = 0.5 + (1 + 4 / 256 if plan.qlora_double_quant else 4) / QUANT_BLOCK
    else:
        per_weight = 1.0  # LLM.int8: int8 weights (one fp32 scale per row, counted below)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != plan.head_name and not name.startswith(plan.head_name + "."):
            w = module.weight
            quantised = per_weight * w.numel() + (4 * w.shape[0] if plan.qlora_bits == 8 else 0)
            held += int(quantised) - w.numel() * w.element_size()
    return held


def _shape(model: nn.Module) -> dict:
    base = _base_model(model)
    layers = _config_value(base, "num_hidden_layers", "n_layer", "num_layers", default=0)
    hidden = _config_value(base, "hidden_size", "n_embd", "dim", "d_model", default=0)
    heads = _config_value(base, "num_attention_heads", "n_head", default=1)
    inner = _config_value(base, "intermediate_size", "n_inner", default=4 * hidden if hidden else 0)
    act = str(_config_value(base, "hidden_act", "activation_function", default="")).lower()
    vocab = _config_value(base, "vocab_size", default=0)
    return {"layers": int(layers), "hidden": int(hidden), "heads": int(heads), "inner": int(inner),
            "gated": act in ("silu", "swish", "swiglu"), "vocab": int(vocab)}


def block_activation_bytes(shape: dict, plan: Plan, rows: int) -> float:
    """Bytes one transformer block keeps for the backward at `rows` × seq tokens.

    Gated (Llama-family) blocks: counted on a Llama block (see the constants above). Other blocks:
    Korthikanti et al. 2022, s·b·h·(34 + 5·a·s/h) bytes in 16-bit, scaled to the precision."""
    tokens = rows * plan.seq_len
    h, i, a, s = shape["hidden"], shape["inner"], shape["heads"], plan.seq_len
    per = 2 if plan.precision == "bf16" else 4
    if not shape["gated"]:
        return tokens * h * (34 + 5 * a * s / h) * per / 2
    elements = GATED_FULL_H * h + GATED_FULL_I * i + a + (s if plan.packed_mask else 0)
    if plan.method in ("lora", "qlora"):
        elements += LORA_EXTRA_H * h + LORA_EXTRA_I * i
    return tokens * elements * per


def process_peak_rss_mb() -> float:
    """This process's peak resident memory so far (getrusage's ru_maxrss), in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def activation_bytes(model: nn.Module, plan: Plan, rows: int) -> float:
    """Every trained block's saved tensors plus one block's gradients in flight; with gradient
    checkpointing, each block's input plus one block recomputed and its gradients."""
    shape = _shape(model)
    per = 2 if plan.precision == "bf16" else 4
    if plan.method == "head":  # trains on cached features: one batch of them
        return 6 * rows * max(shape["hidden"], 256) * 4
    if not (shape["layers"] and shape["hidden"]):
        width = max((m.out_features for m in model.modules() if isinstance(m, nn.Linear)), default=256)
        return 6 * rows * max(plan.seq_len, 1) * width * 4
    block = block_activation_bytes(shape, plan, rows) * allocator_factor(plan)
    depth = shape["layers"]
    if plan.method == "freeze":  # nothing below the first trained block is kept for the backward
        n = depth // 2 if plan.freeze_layers == "half" else min(int(plan.freeze_layers), depth)
        depth -= n
    if plan.gradient_checkpointing:
        return depth * rows * plan.seq_len * shape["hidden"] * per * CHECKPOINTED_PER_HIDDEN + 2 * block / allocator_factor(plan)
    return (depth + 1) * block


def _largest_block_params(model: nn.Module, head_name: str) -> int:
    _, layers = find_layers(model, head_name)
    return max((sum(p.numel() for p in block.parameters()) for block in layers or []), default=0)


def estimate_training_memory(model: nn.Module, plan: Plan) -> dict:
    """The peak one training process needs, in MB, and its parts (weights_mb, gradients_mb and
    optimizer_mb are the whole model's, unsharded; total_mb is per process under the plan)."""
    params = sum(p.numel() for p in model.parameters())
    trainable = trainable_parameters(model, plan)
    shape = _shape(model)
    weights = weight_bytes(model, plan)
    gradients = 4 * trainable
    optimizer = 8 * trainable
    world = max(1, plan.world_size)
    rows = max(1, math.ceil(plan.batch_size / world))  # train.batch_size is the global batch
    activations = activation_bytes(model, plan, rows)
    per_token_logits = plan.family == "causal-lm" and shape["vocab"] > 0
    logits = TRAIN_LOGIT_COPIES * rows * plan.seq_len * shape["vocab"] * 4 if per_token_logits else 0
    eval_rows = max(1, min(plan.eval_rows, EVAL_LOGITS_BYTES // (EVAL_LOGIT_COPIES * 4 * plan.seq_len * max(1, shape["vocab"]))))
    eval_logits = EVAL_LOGIT_COPIES * eval_rows * plan.seq_len * shape["vocab"] * 4 if per_token_logits else 0
    if per_token_logits and plan.chunked_logits:
        # the hidden states of the scored positions, gathered (with their gradient), and one chunk of logits at a time
        gathered = 2 * rows * plan.seq_len * shape["hidden"] * 4
        logits = CHUNKED_LOGIT_COPIES * min(CHUNKED_LOGITS_BYTES, rows * plan.seq_len * shape["vocab"] * 4) + gathered
        # with the logits this small the evaluation batch's own pass counts: one block's temporaries at eval_rows
        # (no autograd: one block at a time), measured 344 MB at 16 x 256 tokens on a 125M Llama, as this counts
        eval_pass = block_activation_bytes(shape, plan.but(method="full"), plan.eval_rows) * allocator_factor(plan) if shape["layers"] else 0
        eval_logits = CHUNKED_LOGIT_COPIES * min(CHUNKED_LOGITS_BYTES, plan.eval_rows * plan.seq_len * shape["vocab"] * 4) + eval_pass
    held_weights, held_grads, held_optimizer = weights, gradients, optimizer
    if plan.fsdp and world > 1:
        # each process keeps 1/N of every sharded tensor, and gathers one block whole (weights and gradients) at a time
        block = 4 * _largest_block_params(model, plan.head_name)
        held_weights, held_grads, held_optimizer = weights / world + block, gradients / world + block, optimizer / world
        if plan.offload:  # the shards wait in host memory: a GPU holds only the gathered block
            held_weights, held_grads, held_optimizer = block, block, 0
    elif world > 1:
        held_grads = 2 * gradients  # DDP's gradient buckets are a second copy of the gradients
    # the backward frees each block's saved tensors as it makes that block's gradients: the step's
    # peak is the larger of the two, not their sum (measured: full fine-tuning of 125M and 500M Llamas)
    step = max(activations + logits, held_grads + logits / TRAIN_LOGIT_COPIES)
    peak = held_weights + held_optimizer + max(step, eval_logits)
    return {"params": params, "trainable": trainable, "weights_mb": weights / MB, "gradients_mb": gradients / MB,
            "optimizer_mb": optimizer / MB, "activations_mb": activations / MB, "logits_mb": logits / MB,
            "eval_logits_mb": eval_logits / MB, "runtime_mb": RUNTIME_OVERHEAD_MB,
            "per_process_state_mb": (held_weights + held_grads + held_optimizer) / MB,
            "total_mb": peak / MB + RUNTIME_OVERHEAD_MB, "plan": dataclasses.asdict(plan)}


def available_mb(device: torch.device) -> float:
    """What the device has free now: a GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / MB
    return psutil.virtual_memory().available / MB


def need_on_device(estimate: dict, device: torch.device) -> float:
    """MB the device must have free: one process per GPU, but every process on a CPU host shares its memory."""
    world = estimate["plan"]["world_size"]
    return estimate["total_mb"] * (world if device.type != "cuda" and world > 1 else 1)


def fits(estimate: dict, device: torch.device, have_mb: float) -> bool:
    """True when the estimate stays under HEADROOM of what the device has free."""
    return need_on_device(estimate, device) <= HEADROOM * have_mb


def resolve_gradient_checkpointing(model: nn.Module, plan: Plan, device: torch.device, have_mb: float) -> bool:
    """`train.gradient_checkpointing: auto`: on only when the run would not fit without it (it
    costs one more forward per step, ~30 % of the step)."""
    return not fits(estimate_training_memory(model, plan.but(gradient_checkpointing=False)), device, have_mb)


def largest_fitting_batch(model: nn.Module, plan: Plan, device: torch.device, have_mb: float) -> Plan | None:
    """`train.batch_size: auto`: plan.batch_size is the effective batch to keep; the largest micro-batch
    (the effective batch, then halved) whose estimate fits under HEADROOM, with gradient accumulation
    multiplied so that rows per optimizer step stay the same. None when not even one row fits."""
    target = plan.batch_size
    micro = target
    while micro >= 1:
        candidate = plan.but(batch_size=micro, grad_accumulation=plan.grad_accumulation * math.ceil(target / micro))
        if fits(estimate_training_memory(model, candidate), device, have_mb):
            return candidate
        micro //= 2
    return None


def alternatives(plan: Plan, methods: tuple[str, ...]) -> list[tuple[str, Plan]]:
    """Changes that lower the peak, cheapest first: the ones that keep the result (checkpointing,
    a smaller batch with accumulation, FSDP over the launched processes), then the methods that train fewer parameters."""
    out = []
    if not plan.gradient_checkpointing:
        out.append(("train.gradient_checkpointing: true", plan.but(gradient_checkpointing=True)))
    k = 2
    while plan.batch_size // k >= 1:
        out.append((f"train.batch_size: {plan.batch_size // k} and train.grad_accumulation: {plan.grad_accumulation * k}",
                    plan.but(batch_size=plan.batch_size // k, grad_accumulation=plan.grad_accumulation * k)))
        k *= 2
    if plan.world_size > 1 and not plan.fsdp:
        out.append((f"train.distributed: fsdp (over the {plan.world_size} processes launched)", plan.but(fsdp=True)))
    lighter = [m for m in ("lora", "qlora") if m in methods and m != plan.method and not (m == "lora" and plan.method == "qlora")]
    if plan.method in ("head",):
        lighter = []
    for method in lighter:
        out.append((f"method: {method}", plan.but(method=method)))
        if not plan.gradient_checkpointing:
            out.append((f"method: {method} with train.gradient_checkpointing: true", plan.but(method=method, gradient_checkpointing=True)))
    return out


def _gb(mb: float) -> str:
    return f"{mb / 1024:.1f} GB"


def check_memory(model: nn.Module, plan: Plan, device: torch.device, methods: tuple[str, ...] = (),
                 have_mb: float | None = None) -> dict:
    """The estimate under `plan`; raises a one-line RecipeError, naming the cheapest alternative
    that fits and the figures of the others, when it exceeds what the device has free.

    have_mb: the memory to plan for (default: what the device reports free now)."""
    have = available_mb(device) if have_mb is None else have_mb
    estimate = estimate_training_memory(model, plan)
    if fits(estimate, device, have):
        return estimate
    options = []
    for label, alternative in alternatives(plan, methods):
        other = estimate_training_memory(model, alternative)
        options.append((label, need_on_device(other, device), fits(other, device, have)))
    fitting = [o for o in options if o[2]]
    tried = "; ".join(f"with {label} {_gb(need)}" for label, need, _ in options[:6])
    where = f"{_gb(have)} free on the {device.type}" + (f" shared by {plan.world_size} processes" if plan.world_size > 1 and device.type != "cuda" else "")
    parts = (f"weights {_gb(estimate['weights_mb'])}, gradients {_gb(estimate['gradients_mb'])}, optimizer {_gb(estimate['optimizer_mb'])}, "
             f"activations {_gb(estimate['activations_mb'])}, logits {_gb(max(estimate['logits_mb'], estimate['eval_logits_mb']))}")
    if fitting:
        label, need, _ = fitting[0]
        advice = f"set {label} ({_gb(need)}, the cheapest change that fits)" + (f"; {tried}" if tried else "")
    else:
        advice = (f"nothing tried fits ({tried}); " if tried else "") + "use a device with more memory or a shorter data.max_length"
    raise RecipeError(f"memory: training needs {_gb(need_on_device(estimate, device))} ({parts}) with {where}; {advice}")
