"""Text classification's model side: tokenise once into ragged storage, length-grouped batches with
dynamic padding, loss, evaluation, cached backbone features and the linear probe."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data import ragged, tokens
from ...data.batching import batch_plan
from ...models.capture import head_inputs
from ...models.load import ModelBundle, logits_of
from ...models.wordllama import WordLlamaClassifier, pooled_features
from ...train.loop import Batches
from ...train.precision import autocast, fit_threads


@dataclass
class EncodedSplit:
    """Token ids stored flat with offsets, so a batch is built with a few tensor copies."""

    flat: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    truncated: int
    from_cache: bool = False  # the token ids were read back from the tokenisation cache (data/tokens.py)

    def __len__(self) -> int:
        return len(self.lengths)


def tokenise_texts(encoder, texts, max_length: int) -> tokens.Tokenised:
    """`texts` tokenised through the cache by `encoder` (a ModelBundle, or the TextEncoder that
    models.load.load_text_encoder gives before the model loads: the same fields, so the same cache
    entries), each cut to max_length."""
    texts = tokens.as_column(texts)  # Arrow-backed pandas columns pass without a Python string per row
    return tokens.tokenise(texts, encoder.encode, tokens.tokenizer_key(encoder.tokenizer, encoder.family), max_length, encoder.pad_id,
                           getattr(encoder, "encode_flat", None))


def text_token_counter(encoder, max_length: int):
    """count(table) -> the tokens of each row's `text` as the classifier reads them (cut to max_length:
    the tokens past it are never trained on): what `data.mix_by: tokens` weighs a mixture with. Counted
    through the tokenisation cache, so a second run on the same sources tokenises nothing to count them."""
    def count(table) -> np.ndarray:
        return tokenise_texts(encoder, table.column("text"), max_length).lengths.numpy()

    return count


def encode(bundle: ModelBundle, texts, labels, max_length: int) -> EncodedSplit:
    """Tokenise once (and, through the cache, once across runs); texts longer than max_length are
    cut and counted (never silently). labels: a list or an Arrow column of label strings, each one
    of bundle.labels (None: unlabelled rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    done = tokenise_texts(bundle, texts, max_length)
    if labels is not None:
        values = labels if isinstance(labels, (pa.Array, pa.ChunkedArray)) else pa.array(list(labels), type=pa.string())
        index = pc.index_in(values.cast(pa.string()), value_set=pa.array(bundle.labels, type=pa.string()))
        if index.null_count:
            unknown = pc.filter(values, pc.is_null(index))[0].as_py()
            raise KeyError(f"label {unknown!r} is not one of the model's labels ({', '.join(bundle.labels[:20])})")
        y = torch.from_numpy(index.to_numpy(zero_copy_only=False).astype(np.int64))
    else:
        y = torch.full((len(done.lengths),), -1)
    return EncodedSplit(done.flat, done.offsets, done.lengths, y, done.truncated, done.from_cache)


def collate(split: EncodedSplit, indices, pad_id: int) -> dict:
    idx = torch.as_tensor(indices, dtype=torch.long)
    lengths = split.lengths[idx]
    width = int(lengths.max())
    input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    for row, i in enumerate(idx.tolist()):
        start, end = int(split.offsets[i]), int(split.offsets[i + 1])
        input_ids[row, : end - start] = split.flat[start:end]
    attention_mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": split.labels[idx]}


def subset(split: EncodedSplit, idx) -> EncodedSplit:
    offsets, lengths, flat = ragged.take(split.offsets, split.lengths, idx, split.flat)
    return EncodedSplit(flat, offsets, lengths, split.labels[torch.as_tensor(idx, dtype=torch.long)], 0)


def token_batches(split: EncodedSplit, batch_size: int, seed: int, pad_id: int, group_by_length: bool) -> Batches:
    return Batches(
        size=len(split),
        plan=lambda epoch: batch_plan(split.lengths, batch_size, seed, epoch, group_by_length),
        collate=lambda indices: collate(split, indices, pad_id),
    )


def classification_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(logits_of(model, batch).float(), batch["labels"])


def head_loss(head: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(head(batch["features"]).float(), batch["labels"])


@contextmanager
def inference_weights(model: nn.Module, precision: str):
    """For a whole inference pass in bf16: the linear layers' fp32 weights swapped for bf16 copies.

    Autocast casts exactly these tensors (a linear's weight and bias) to bf16 for every batch when
    the weights are frozen or no autocast cache applies; casting them once gives the same numbers
    for a fraction of the memory traffic. The fp32 tensors are swapped back afterwards (exactly).
    """
    if precision != "bf16":
        yield
        return
    saved = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                for p in (module.weight, module.bias):
                    if p is not None and p.dtype == torch.float32:  # a tied weight is cast once
                        saved.append((p, p.data))
                        p.data = p.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for p, data in reversed(saved):
            p.data = data


EVAL_TOKENS = 4096  # padded tokens per inference batch: beyond this the activations leave the cache (measured: 128 rows × 128 tokens ran 25 % slower than 32 rows)


def sorted_batches(split: EncodedSplit, pad_id: int, batch_size: int):
    """Batches in descending length order (little padding), at most batch_size rows and about
    EVAL_TOKENS padded tokens each, with the order to undo the sort."""
    order = torch.argsort(split.lengths, descending=True, stable=True)
    lengths = split.lengths[order].tolist()

    def batches():
        start = 0
        while start < len(order):
            rows = max(1, min(batch_size, EVAL_TOKENS // max(1, lengths[start])))
            yield collate(split, order[start : start + rows], pad_id)
            start += rows

    return order, batches()


def unsort(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(rows)
    out[order] = rows
    return out


@torch.no_grad()
def predict_logits(model: nn.Module, split: EncodedSplit, pad_id: int, batch_size: int, precision: str, device) -> torch.Tensor:
    """Logits in the split's order; batches are sorted by length so evaluation pads little."""
    if isinstance(model, WordLlamaClassifier):  # the mean embeddings in a few vectorised calls, then the head
        pooled = pooled_features(model, split.flat, split.offsets)
        with autocast(precision, device):
            return torch.cat([model.classifier(chunk.to(device)).float().cpu() for chunk in pooled.split(65536)]) if len(pooled) else pooled
    fit_threads(precision, device)
    was_training = model.training
    model.eval()
    order, batches = sorted_batches(split, pad_id, batch_size)
    chunks = []
    try:
        with inference_weights(model, precision), autocast(precision, device):
            for batch in batches:
                logits = logits_of(model, {k: v.to(device) for k, v in batch.items()})
                chunks.append(logits.float().cpu())
    finally:
        model.train(was_training)
    return unsort(torch.cat(chunks), order)


def metrics(logits: torch.Tensor, split) -> dict:
    """Loss, accuracy and macro F1 of the logits against the split's labels."""
    return metrics_from_logits(logits, split.labels)


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    from sklearn.metrics import accuracy_score, f1_score  # imported when first evaluated, not with honed

    preds = logits.argmax(-1).numpy()
    y = labels.numpy()
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float(accuracy_score(y, preds)),
        "f1_macro": float(f1_score(y, preds, average="macro", zero_division=0)),
    }


@torch.no_grad()
def extract_features(bundle: ModelBundle, model: nn.Module, split: EncodedSplit, batch_size: int, precision: str, device) -> torch.Tensor:
    """The head's input for every example (the backbone's feature vector), in fp32."""
    if isinstance(model, WordLlamaClassifier):  # an embedding table and a mean: computed in a few vectorised calls
        return pooled_features(model, split.flat, split.offsets)
    fit_threads(precision, device)
    was_training = model.training
    with head_inputs(model, bundle.head_name, lambda x: x.float().cpu()) as captured:
        try:
            model.eval()
            order, batches = sorted_batches(split, bundle.pad_id, batch_size)
            with inference_weights(model, precision), autocast(precision, device):
                for batch in batches:
                    logits_of(model, {k: v.to(device) for k, v in batch.items()})
        finally:
            model.train(was_training)
    return unsort(torch.cat(captured), order)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x, val_y, test_x, test_y, seed: int) -> dict:
    """Logistic regression on frozen features; C picked on validation. What the backbone knew."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x.numpy())
    xs = [scaler.transform(x.numpy()) for x in (train_x, val_x, test_x)]
    best = None
    for c in (0.01, 0.1, 1.0):
        clf = LogisticRegression(C=c, max_iter=500, random_state=seed)
        clf.fit(xs[0], train_y.numpy())
        score = accuracy_score(val_y.numpy(), clf.predict(xs[1]))
        if best is None or score > best[0]:
            best = (score, c, clf)
    _, c, clf = best
    proba = clf.predict_proba(xs[2])
    logits = torch.tensor(np.log(np.clip(proba, 1e-12, 1.0)), dtype=torch.float32)
    test = metrics_from_logits(logits, test_y)
    val_logits = torch.tensor(np.log(np.clip(clf.predict_proba(xs[1]), 1e-12, 1.0)), dtype=torch.float32)
    coef, intercept = torch.tensor(clf.coef_, dtype=torch.float32), torch.tensor(clf.intercept_, dtype=torch.float32)
    if coef.shape[0] == 1:  # binary: scikit-learn keeps one row, the logit of the second class against the first
        coef, intercept = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros_like(intercept), intercept])
    head = {"weight": coef, "bias": intercept, "mean": torch.tensor(scaler.mean_, dtype=torch.float32),
            "scale": torch.tensor(scaler.scale_, dtype=torch.float32)}  # logits = weight · (x − mean) / scale + bias
    return {"test": test, "validation": metrics_from_logits(val_logits, val_y), "C": c, "test_predictions": proba.argmax(1), "head": head}
