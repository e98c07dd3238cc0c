"""GGUF (llama.cpp, Ollama) for Llama-family chat models, written with the `gguf` package.

The layout follows llama.cpp's convert_hf_to_gguf.py for the `llama` architecture (Llama, Mistral
and Qwen2 checkpoints, whose blocks are the same shape; Qwen2's attention biases are written as
attn_q/k/v.bias): llama.cpp rotates query/key pairs interleaved, Hugging Face in two halves, so
the query and key weights are permuted on the way out exactly as that script does (transformers'
GGUF loader undoes it on the way back, which is what the verification relies on). 2-D weights in
f16, bf16 or q8_0, norms and biases in f32; the tokenizer (byte-level BPE as "gpt2", its merges)
and the chat template travel in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import RecipeError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
DTYPES = ("f16", "bf16", "q8_0")


def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's half-split rotary layout → llama.cpp's interleaved one (convert_hf_to_gguf.py `permute`)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _tensor_names(layers: int) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    parts = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(layers):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    return names


def check_convertible(model, tokenizer) -> str:
    """The GGUF architecture name, or a one-line error naming what cannot be converted."""
    architecture = type(model).__name__
    if architecture not in ARCHITECTURES:
        raise RecipeError(f"--format gguf: {architecture} is not a Llama-family model; gguf export covers {', '.join(ARCHITECTURES)}")
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "backend_tokenizer", None) else {}
    if backend.get("model", {}).get("type") != "BPE":
        raise RecipeError("--format gguf: the tokenizer is not a BPE tokenizer (llama.cpp's 'gpt2' tokenizer model); "
                          f"found {backend.get('model', {}).get('type', 'an unknown kind')}")
    return ARCHITECTURES[architecture]


def _tokenizer_metadata(writer, tokenizer) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_ids)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _array(tensor: torch.Tensor, dtype: str):
    """(data, raw GGML type or None) for one tensor: 1-D in f32; 2-D in the requested type."""
    import gguf

    values = tensor.detach().float().cpu()
    if values.ndim < 2:
        return values.numpy().astype(np.float32), None
    if dtype == "f16":
        return values.numpy().astype(np.float16), None
    if dtype == "bf16":
        return gguf.quants.quantize(values.numpy(), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return gguf.quants.quantize(values.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def write_gguf(model, tokenizer, path: Path, dtype: str, name: str) -> Path:
    """Write `model` (a plain, merged causal LM) and its tokenizer as one GGUF file."""
    import gguf

    architecture = check_convertible(model, tokenizer)
    config = model.config
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    _tokenizer_metadata(writer, tokenizer)
    names = _tensor_names(config.num_hidden_layers)
    state = model.state_dict()
    if "lm_head.weight" not in state or getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: llama.cpp reuses token_embd
    for key, tensor in state.items():
        if key not in names:
            raise RecipeError(f"--format gguf: the weight {key} has no place in the GGUF '{architecture}' layout")
        if architecture == "llama" and key.endswith("self_attn.q_proj.weight"):
            tensor = _permute(tensor, heads)
        elif architecture == "llama" and key.endswith("self_attn.k_proj.weight"):
            tensor = _permute(tensor, kv_heads)
        data, raw = _array(tensor, dtype)
        if raw is None:
            writer.add_tensor(names[key], data)
        else:
            writer.add_tensor(names[key], data, raw_shape=data.shape, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
