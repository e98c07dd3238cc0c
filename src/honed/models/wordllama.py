"""WordLlama (family "wordllama"): the token embeddings shipped in the wordllama wheel,
mean-pooled, and a linear head. Small and offline: the quick start and the benchmarks' baseline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from ..errors import RecipeError
from ..fileio import write_safetensors_atomic
from .bundle import HONED_MODEL_FILE, ModelBundle, TextEncoder, clip_texts
from .word_memo import memo_encoder

FAMILY = "wordllama"


class WordLlamaClassifier(nn.Module):
    """WordLlama's token embeddings, mean-pooled over the real tokens, and a linear head."""

    def __init__(self, vocab_size: int, dim: int, num_labels: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        summed = (self.embedding(input_ids) * mask).sum(dim=1)
        pooled = summed / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(pooled)


POOL_TOKENS = 1 << 21  # tokens per embedding_bag call: bounds the chunk's (rows × 256) output and its index copies


@torch.no_grad()
def pooled_features(model: WordLlamaClassifier, flat: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The classifier's input (each row's mean token embedding) for rows stored flat with offsets:
    one embedding_bag call per chunk of rows, no padding, no per-batch Python. The same numbers as
    forward() up to the order of the additions."""
    weight = model.embedding.weight
    n = len(offsets) - 1
    out = torch.empty(n, weight.shape[1], dtype=torch.float32)  # filled chunk by chunk: no list of chunks and a second copy
    start = 0
    while start < n:
        end = int(torch.searchsorted(offsets, offsets[start] + POOL_TOKENS, right=True)) - 1
        end = min(n, max(end, start + 1))
        a, b = int(offsets[start]), int(offsets[end])
        ids = flat[a:b].to(weight.device)
        out[start:end] = torch.nn.functional.embedding_bag(ids, weight, (offsets[start:end] - a).to(weight.device), mode="mean").float().cpu()
        start = end
    return out


def wordllama_files() -> tuple[Path, Path]:
    """The weights and tokenizer inside the installed wordllama wheel (its own loader reaches for the network)."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or spec.origin is None:
        raise RecipeError("model: 'wordllama' needs the wordllama package (pip install wordllama)")
    root = Path(spec.origin).parent
    weights = sorted((root / "weights").glob("*.safetensors"))
    tokenizers = sorted((root / "tokenizers").glob("*.json"))
    if not weights or not tokenizers:
        raise RecipeError(f"model: the wordllama package at {root} has no weights/*.safetensors or tokenizers/*.json")
    return weights[0], tokenizers[0]


def wordllama_encoder(tokenizer_path: Path) -> TextEncoder:
    """The tokenizer in `tokenizer_path` (tokenizer.json) with its encoders and pad id, no weights."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()

    def encode(texts: list[str], max_length: int) -> list[list[int]]:
        tokenizer.enable_truncation(max_length)
        return [e.ids for e in tokenizer.encode_batch(clip_texts(texts, max_length))]

    pad = tokenizer.token_to_id("</s>")
    return TextEncoder(FAMILY, tokenizer, encode, pad if pad is not None else 0, memo_encoder(tokenizer))


def _bundle(model: WordLlamaClassifier, enc: TextEncoder, labels: list[str], source: str) -> ModelBundle:
    return ModelBundle(FAMILY, model, enc.encode, enc.pad_id, "classifier", labels, source, enc.tokenizer, encode_flat=enc.encode_flat)


def load_wordllama(labels: list[str], recipe=None) -> ModelBundle:
    weights_path, tokenizer_path = wordllama_files()
    embedding = load_file(str(weights_path))["embedding.weight"].float()
    model = WordLlamaClassifier(embedding.shape[0], embedding.shape[1], len(labels))
    with torch.no_grad():
        model.embedding.weight.copy_(embedding)
    return _bundle(model, wordllama_encoder(tokenizer_path), labels, "wordllama")


def save_wordllama(bundle: ModelBundle, model: nn.Module, out: Path) -> dict:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_safetensors_atomic(state, out / "model.safetensors")
    bundle.tokenizer.no_truncation()
    bundle.tokenizer.save(str(out / "tokenizer.json"))
    dims = model.embedding.weight.shape
    return {"vocab_size": int(dims[0]), "dim": int(dims[1])}


def reload_wordllama(model_dir: Path, meta: dict) -> ModelBundle:
    model = WordLlamaClassifier(meta["vocab_size"], meta["dim"], len(meta["labels"]))
    state = _load_safetensors(model_dir / "model.safetensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RecipeError(f"model: {model_dir}/model.safetensors does not match {HONED_MODEL_FILE} ({str(exc).splitlines()[0]})") from None
    return _bundle(model, wordllama_encoder(model_dir / "tokenizer.json"), meta["labels"], str(model_dir))


def scratch_wordllama(model: nn.Module) -> nn.Module:
    dims = model.embedding.weight.shape
    return WordLlamaClassifier(int(dims[0]), int(dims[1]), model.classifier.out_features)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:
        raise RecipeError(f"model: {path} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:160]})") from None
