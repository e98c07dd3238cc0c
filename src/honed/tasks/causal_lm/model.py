"""Continued pre-training of a causal LM on raw text: tokenise every document once (through the
`Dataset.map` cache of data/tokens.py), end each with the tokenizer's EOS, lay the documents end to
end and cut the stream into rows of max_length tokens (packing), score perplexity, and generate
continuations of a few validation openings.

A split keeps the token stream of all its documents (`flat`, each document followed by EOS) and
its rows as spans of it (`row_starts`, `row_ends`): packed rows cut the stream every max_length
tokens, so a document may end in one row and go on in the next; without packing each document has
rows of its own. A batch has the layout of task chat's (tasks/chat/model.py): `input_ids`,
`position_ids` restarting at 0 at every document start and at every row start, and `targets`
(-100 where the position id is 0 and on padding, so no token is ever predicted from another
document or from before its row). `attention_mask` is None: from restarting position ids
transformers builds a block-diagonal causal mask, one block per document in the row.

Outputs (`predict`) are per document: [summed NLL, scored tokens, correct tokens], so the metrics
are the sums over a split and predictions.csv has one line per test document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ...data import tokens
from ...data.batching import epoch_generator
from ...errors import DataError, RecipeError
from ...models.load import load_saved
from ...train.loop import Batches
from ...train.precision import autocast, fit_threads
from ..chat.loss import last_hidden, scored_positions, split_model, token_scores
from ..chat.model import IGNORE, PRIMARY, eval_rows, greedy_continuations
from ..chat.model import loss as chat_loss
from ..chat.model import metrics as chat_metrics
from ..base import saved_device_and_precision
from .data import read_documents

DOCUMENT_CAP = 1 << 22  # tokens kept of one document (4 M; beyond it the document is cut, and counted)
CONTINUATIONS = 3  # validation openings continued before/after in metrics.json
OPENING_TOKENS = 16
CONTINUATION_TOKENS = 32
PREVIEW_CHARS = 200  # of each document's text in predictions.csv and `honed predict`'s output
CACHE_TAG = "+causal-lm-eos1"  # what this module adds to the tokenizer's cache key: the EOS after every document

__all__ = ["PRIMARY", "EncodedText", "encode", "encode_texts", "subset", "collate", "batches", "loss", "predict", "metrics",
           "hidden_features", "continuations", "write_predictions"]


@dataclass
class EncodedText:
    """Documents' token ids end to end (each ending with EOS), and the split's rows as spans of them."""

    flat: torch.Tensor  # token ids of every document, EOS after each
    doc_offsets: torch.Tensor  # [documents + 1] where each document starts in flat
    row_starts: torch.Tensor  # [rows] span of each row in flat
    row_ends: torch.Tensor
    max_length: int
    packing: bool
    truncated: int = 0  # documents longer than DOCUMENT_CAP, cut there
    from_cache: bool = False  # the token ids were read back from the tokenisation cache
    batches_tokenised: int = 0
    document_cap: int = DOCUMENT_CAP

    def __len__(self) -> int:
        return len(self.row_starts)

    @property
    def documents(self) -> int:
        return len(self.doc_offsets) - 1

    def row_lengths(self) -> torch.Tensor:
        return self.row_ends - self.row_starts

    def stats(self) -> dict:
        """audit.json's token figures: tokens, sequences (the rows of max_length tokens), and how full they are."""
        used = int(self.row_lengths().sum())
        return {"tokens": int(len(self.flat)), "sequences": len(self), "fill": round(used / max(1, len(self) * self.max_length), 3),
                "truncated": int(self.truncated)}


def _rows(doc_offsets: torch.Tensor, max_length: int, packing: bool) -> tuple[torch.Tensor, torch.Tensor]:
    total = int(doc_offsets[-1])
    if packing:  # the stream cut every max_length tokens: every row full but the last
        starts = torch.arange(0, total, max_length, dtype=torch.long)
        return starts, torch.clamp(starts + max_length, max=total)
    starts, ends = [], []
    for a, b in zip(doc_offsets[:-1].tolist(), doc_offsets[1:].tolist()):  # each document alone, in rows of max_length
        for s in range(a, b, max_length):
            starts.append(s)
            ends.append(min(b, s + max_length))
    return torch.tensor(starts, dtype=torch.long), torch.tensor(ends, dtype=torch.long)


def document_encoder(tokenizer, eos_id: int):
    """encode(texts, limit) for data/tokens.py: the tokenizer's ids (its BOS when it adds one), cut to
    limit - 1, then EOS."""
    def encode(texts: list[str], limit: int) -> list[list[int]]:
        ids = tokenizer(list(texts), truncation=True, max_length=max(1, limit - 1))["input_ids"]
        return [x + [eos_id] for x in ids]

    return encode


def document_token_counter(tokenizer):
    """count(frame) -> the tokens of each document (its `text`, uncut, with the EOS that ends it): what
    `data.mix_by: tokens` weighs a mixture with."""
    def count(frame: pd.DataFrame) -> list[int]:
        texts = frame["text"].tolist()
        return [len(ids) + 1 for ids in tokenizer(texts)["input_ids"]] if texts else []

    return count


def eos_id_of(tokenizer, source: str) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise RecipeError(f"model: the tokenizer of {source} has no EOS token; task causal-lm ends every document with it; "
                          "use a checkpoint whose tokenizer defines eos_token")
    return int(eos)


def encode_texts(tokenizer, family: str, texts: list[str], max_length: int, packing: bool) -> EncodedText:
    """Tokenise the documents once (cached under a fingerprint of texts and tokenizer: data/tokens.py)
    and lay out the rows."""
    eos = eos_id_of(tokenizer, "the model")
    key = tokens.tokenizer_key(tokenizer, family) + CACHE_TAG + str(eos)
    done = tokens.tokenise(list(texts), document_encoder(tokenizer, eos), key, DOCUMENT_CAP, eos)
    starts, ends = _rows(done.offsets, max_length, packing)
    return EncodedText(done.flat, done.offsets, starts, ends, max_length, packing, done.truncated, done.from_cache, done.batches_tokenised)


def encode(bundle, frame, labels, recipe) -> EncodedText:
    return encode_texts(bundle.tokenizer, bundle.family, frame["text"].tolist(), recipe.data.max_length, recipe.data.packing)


def subset(split: EncodedText, idx) -> EncodedText:
    """The rows `idx` (the token stream is shared, not copied)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    return EncodedText(split.flat, split.doc_offsets, split.row_starts[idx], split.row_ends[idx], split.max_length, split.packing)


# --------------------------------------------------------------------------- batches and loss

def _doc_of(split: EncodedText, positions: torch.Tensor) -> torch.Tensor:
    """The document each position of flat belongs to."""
    return torch.searchsorted(split.doc_offsets, positions, right=True) - 1


def collate(split: EncodedText, indices, pad_id: int) -> dict:
    """The rows `indices` (right-padded to the longest): ids, position ids restarting at every document
    and row start, and targets that never cross either."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    starts, ends = split.row_starts[idx], split.row_ends[idx]
    width = int((ends - starts).max())
    offsets = torch.arange(width)
    positions = starts[:, None] + offsets[None, :]  # where each cell sits in flat
    real = positions < ends[:, None]
    clipped = torch.where(real, positions, starts[:, None])
    doc_start = split.doc_offsets[_doc_of(split, clipped)]
    position_ids = clipped - torch.maximum(doc_start, starts[:, None])
    input_ids = torch.where(real, split.flat[clipped], torch.full_like(clipped, pad_id))
    targets = torch.where(real & (position_ids > 0), input_ids, torch.full_like(clipped, IGNORE))
    # padding continues the last document's positions: it sits after every real token, so causal attention keeps it away
    last = position_ids.gather(1, (ends - starts - 1)[:, None])
    position_ids = torch.where(real, position_ids, last + offsets[None, :] - (ends - starts - 1)[:, None])
    return {"input_ids": input_ids, "position_ids": position_ids, "targets": targets}


def batches(split: EncodedText, batch_size: int, seed: int, pad_id: int) -> Batches:
    """Rows in a seeded random order per epoch, batch_size rows a batch (packed rows are all full but one)."""
    def plan(epoch: int) -> list[list[int]]:
        perm = torch.randperm(len(split), generator=epoch_generator(seed, epoch)).tolist()
        return [perm[k : k + batch_size] for k in range(0, len(perm), batch_size)]

    # the loss is a mean over scored tokens: processes sharing a batch weigh their rows by them
    scored = (split.row_lengths() - 1 - _starts_inside(split)).clamp(min=0).float()
    return Batches(size=len(split), plan=plan, collate=lambda indices: collate(split, indices, pad_id),
                   weight=lambda indices: float(scored[torch.as_tensor(indices, dtype=torch.long)].sum()))


def _starts_inside(split: EncodedText) -> torch.Tensor:
    """Per row, the documents that start inside it after its first token (their first token is not scored)."""
    inner = split.doc_offsets[1:-1]
    after_first = torch.searchsorted(inner, split.row_starts, right=True)
    before_end = torch.searchsorted(inner, split.row_ends, right=False)
    return before_end - after_first


def loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean NLL over the scored tokens: task chat's loss (the chunked output layer of tasks/chat/loss.py), the same batch layout."""
    return chat_loss(model, batch)


# --------------------------------------------------------------------------- evaluation

def _forward(model: nn.Module, batch: dict, hidden: bool = False):
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                 use_cache=False, output_hidden_states=hidden)


def _eval_order(split: EncodedText, batch_size: int):
    order = torch.argsort(split.row_lengths(), descending=True, stable=True)
    return (order[s : s + batch_size] for s in range(0, len(order), batch_size))


def _token_stats(model, parts, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scored mask over [:, :-1], NLL and correct per scored position) of one batch."""
    scored, targets = scored_positions(batch["targets"], IGNORE)
    if parts is not None:
        nll, correct = token_scores(last_hidden(parts[0], batch)[:, :-1][scored], parts[1], targets)
        return scored, nll, correct
    logits = _forward(model, batch).logits[:, :-1][scored].float()
    return scored, F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1) == targets


@torch.no_grad()
def predict(model: nn.Module, split: EncodedText, pad_id: int, batch_size: int, precision: str, device) -> torch.Tensor:
    """Per document of the split: [summed NLL, scored tokens, correctly predicted tokens] over its rows in `split`."""
    fit_threads(precision, device)
    was_training = model.training
    model.eval()
    out = torch.zeros(split.documents, 3)
    parts = split_model(model)
    rows = eval_rows(model, split, batch_size)  # the plain path holds every position's logits: fewer rows for a large vocabulary
    try:
        with autocast(precision, device):
            for idx in _eval_order(split, rows):
                batch = {k: v.to(device) for k, v in collate(split, idx, pad_id).items()}
                scored, nll, correct = _token_stats(model, parts, batch)
                r, t = scored.nonzero(as_tuple=True)
                docs = _doc_of(split, split.row_starts[idx][r.cpu()] + t.cpu() + 1)
                out.index_add_(0, docs, torch.stack([nll.float().cpu(), torch.ones(len(docs)), correct.float().cpu()], 1))
    finally:
        model.train(was_training)
    return out


def metrics(stats: torch.Tensor, split=None) -> dict:
    """Loss, perplexity = exp(mean NLL over the scored tokens), token accuracy (task chat's)."""
    return chat_metrics(stats, split)


@torch.no_grad()
def hidden_features(model: nn.Module, split: EncodedText, pad_id: int, batch_size: int, precision: str, device) -> torch.Tensor:
    """Per row: the last hidden state averaged over its tokens (the CKA features), fp32."""
    fit_threads(precision, device)
    was_training = model.training
    model.eval()
    out = None
    try:
        with autocast(precision, device):
            for idx in _eval_order(split, batch_size):
                batch = {k: v.to(device) for k, v in collate(split, idx, pad_id).items()}
                hidden = _forward(model, batch, hidden=True).hidden_states[-1].float()
                lengths = split.row_lengths()[idx].to(device)
                real = (torch.arange(hidden.shape[1], device=device)[None, :] < lengths[:, None]).float()
                pooled = (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
                if out is None:
                    out = torch.zeros(len(split), pooled.shape[-1])
                out[idx] = pooled.cpu()
    finally:
        model.train(was_training)
    return out


def continuations(model: nn.Module, tokenizer, openings: list[str], device) -> list[str]:
    """Greedy continuations of a few openings, decoded together in one left-padded batch."""
    return greedy_continuations(model, tokenizer, openings, device, CONTINUATION_TOKENS)


def openings(tokenizer, texts: list[str]) -> list[str]:
    """The first OPENING_TOKENS tokens of each text, as text (the prompts of `continuations`)."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:OPENING_TOKENS]
        out.append(tokenizer.decode(ids))
    return out


# --------------------------------------------------------------------------- predictions

def document_table(texts: list[str], stats: torch.Tensor, sources: list | None = None) -> pd.DataFrame:
    """One line per document: its opening, scored tokens, loss and perplexity (empty when nothing was scored)."""
    tokens_scored = stats[:, 1]
    loss_values = [float(n / t) if t > 0 else math.nan for n, t in zip(stats[:, 0].tolist(), tokens_scored.tolist())]
    frame = pd.DataFrame({"text": [t[:PREVIEW_CHARS] for t in texts], "tokens": tokens_scored.long().tolist(),
                          "loss": [round(v, 6) for v in loss_values],
                          "perplexity": [round(math.exp(min(v, 80.0)), 4) if math.isfinite(v) else math.nan for v in loss_values]})
    if sources is not None:
        frame.insert(0, "source", sources)
    return frame


def write_predictions(path: Path, frame: pd.DataFrame, stats: torch.Tensor) -> None:
    """Test-set perplexity per document."""
    document_table(frame["text"].tolist(), stats, frame["source"].tolist()).to_csv(path, index=False)


def predict_documents(model_dir: Path, meta: dict, input_path: Path, batch_size: int = 16) -> pd.DataFrame:
    """`honed predict` for a causal-lm run: the perplexity of each document of INPUT (a table with the
    run's text column, a .txt file, a folder or glob of them), each document alone in rows of max_length."""
    frame = read_documents(str(input_path), "INPUT", meta.get("text_column") or "text", None, None, column_key="INPUT")
    frame = frame.loc[frame["text"].str.strip() != ""].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"INPUT: every document of {Path(input_path).name} is empty; give text to score")
    bundle = load_saved(model_dir)
    device, precision = saved_device_and_precision(meta)
    bundle.model.to(device)
    split = encode_texts(bundle.tokenizer, bundle.family, frame["text"].tolist(), int(meta.get("max_length") or 128), packing=False)
    stats = predict(bundle.model, split, bundle.pad_id, batch_size, precision, device)
    table = document_table(frame["text"].tolist(), stats, frame["source"].tolist())
    table["prediction"] = table["perplexity"]
    return table
