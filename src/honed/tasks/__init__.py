"""Tasks, as a literal table: how each kind of data is encoded, batched, scored and probed.

The pipeline calls only these entries, so a new task is a new row here, not a new branch there.
"""

from . import chat
from . import forecasting as fc
from . import image
from . import tabular as tab
from . import text_classification as tc


def _encode_text(bundle, frame, labels, recipe):
    return tc.encode(bundle, frame["text"].tolist(), frame["label"].tolist() if "label" in frame else None, recipe.data.max_length)


def _encode_table(bundle, frame, labels, recipe):
    return tab.encode(bundle, frame, labels)


def _subset_text(split, idx):
    ids = [split.flat[int(split.offsets[i]) : int(split.offsets[i + 1])] for i in idx.tolist()]
    import torch

    lengths = split.lengths[idx]
    offsets = torch.zeros(len(idx) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    flat = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    return tc.EncodedSplit(flat, offsets, lengths, split.labels[idx], 0)


TEXT = {"kind": "classification", "primary": "accuracy", "encode": _encode_text, "subset": _subset_text,
        "collate": tc.collate, "batches": tc.token_batches, "loss": tc.classification_loss, "head_loss": tc.head_loss,
        "predict": tc.predict_logits, "features": tc.extract_features, "metrics": tc.metrics_from_logits,
        "probe": tc.linear_probe}

TASKS = {
    "text-classification": TEXT,
    "image-classification": {**TEXT, "encode": image.encode, "subset": image.subset, "collate": image.collate,
                             "batches_for": image.make_batches, "predict": image.predict, "features": image.features},
    "tabular-classification": {**TEXT, "encode": _encode_table, "subset": tab.subset, "collate": tab.collate,
                               "batches": tab.batches, "predict": tab.predict, "features": tab.features,
                               "metrics": tab.classification_metrics},
    "tabular-regression": {"kind": "regression", "primary": "r2", "encode": _encode_table, "subset": tab.subset,
                           "collate": tab.collate, "batches": tab.batches, "loss": tab.regression_loss,
                           "head_loss": tab.head_regression_loss, "predict": tab.predict, "features": tab.features,
                           "metrics": tab.regression_metrics, "probe": tab.ridge_probe},
    # the head trains inside the model (no cached features: the model rescales its output per window)
    "forecasting": {"kind": "forecast", "primary": fc.PRIMARY, "encode": fc.encode, "subset": fc.subset, "collate": fc.collate,
                    "batches": fc.batches, "loss": fc.loss, "head_loss": fc.unsupported, "predict": fc.predict,
                    "features": fc.features, "metrics": fc.metrics, "probe": fc.unsupported, "cached_head": False},
    "chat": {"kind": "lm", "primary": chat.PRIMARY, "encode": chat.encode, "subset": chat.subset, "collate": chat.collate,
             "batches": chat.batches, "loss": chat.loss, "head_loss": chat.unsupported, "predict": chat.predict,
             "features": chat.features, "metrics": chat.metrics, "probe": chat.unsupported},
}
