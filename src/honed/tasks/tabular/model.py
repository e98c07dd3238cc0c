"""Tabular classification and regression: preprocessed feature tensors, batches, loss,
evaluation, cached features and the linear probe (logistic or ridge)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data.batching import shuffled_plan
from ...models.capture import features_while
from ...train.loop import Batches
from ...train.precision import autocast
from ..text import model as text_model


@dataclass
class TabularSplit:
    x: torch.Tensor
    labels: torch.Tensor  # class ids (long) or targets (float)

    def __len__(self) -> int:
        return len(self.labels)


def class_ids(frame, labels: list[str]) -> torch.Tensor:
    """The frame's `label` column as class indices into `labels`; -1 for every row when it has none (prediction input)."""
    if "label" not in frame:
        return torch.full((len(frame),), -1)
    index = {label: i for i, label in enumerate(labels)}
    return torch.tensor([index[v] for v in frame["label"]], dtype=torch.long)


def encode(bundle, frame, labels: list[str] | None) -> TabularSplit:
    x = bundle.preprocessor.transform(frame, "data")
    if labels is None:
        y = torch.tensor(frame["label"].astype(float).to_numpy(), dtype=torch.float32) if "label" in frame else torch.zeros(len(frame))
    else:
        y = class_ids(frame, labels)
    return TabularSplit(x, y)


def subset(split: TabularSplit, idx: torch.Tensor) -> TabularSplit:
    return TabularSplit(split.x[idx], split.labels[idx])


def collate(split: TabularSplit, indices, pad_id: int = 0) -> dict:
    idx = torch.as_tensor(indices, dtype=torch.long)
    return {"x": split.x[idx], "labels": split.labels[idx]}


def batches(split: TabularSplit, batch_size: int, seed: int, pad_id: int = 0, group_by_length: bool = False) -> Batches:
    return Batches(size=len(split), plan=shuffled_plan(len(split), batch_size, seed), collate=lambda idx: collate(split, idx))


def regression_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    pred = model(batch["x"]).float()
    scale = model.target_std if hasattr(model, "target_std") else 1.0
    return F.mse_loss(pred / scale, batch["labels"] / scale)


def head_regression_loss(head: nn.Module, batch: dict) -> torch.Tensor:
    return F.mse_loss(head(batch["features"]).float().squeeze(-1), batch["labels"])


@torch.no_grad()
def predict(model: nn.Module, split: TabularSplit, pad_id: int, batch_size: int, precision: str, device) -> torch.Tensor:
    was = model.training
    model.eval()
    chunks = []
    for start in range(0, len(split), max(batch_size, 256)):
        with autocast(precision, device):
            chunks.append(model(split.x[start : start + max(batch_size, 256)].to(device)).float().cpu())
    model.train(was)
    return torch.cat(chunks) if chunks else torch.zeros(0)


features = features_while(predict)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    from sklearn.metrics import roc_auc_score  # imported when first evaluated, not with honed

    out = text_model.metrics_from_logits(logits, labels)
    probs = torch.softmax(logits, -1).numpy()
    y = labels.numpy()
    try:
        if probs.shape[1] == 2:
            out["roc_auc"] = float(roc_auc_score(y, probs[:, 1]))
        elif len(np.unique(y)) == probs.shape[1]:
            out["roc_auc"] = float(roc_auc_score(y, probs, multi_class="ovr"))
    except ValueError:  # a split with a single class has no ROC curve
        pass
    return out


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict:
    from sklearn.metrics import mean_absolute_error, r2_score

    p, y = pred.numpy().reshape(-1), target.numpy().reshape(-1)
    rmse = float(np.sqrt(np.mean((p - y) ** 2)))
    return {"loss": rmse**2, "rmse": rmse, "mae": float(mean_absolute_error(y, p)),
            "r2": float(r2_score(y, p)) if len(y) > 1 else 0.0}


def ridge_probe(train_x, train_y, val_x, val_y, test_x, test_y, seed: int) -> dict:
    """Ridge regression on frozen features, alpha picked on validation: the regression linear probe."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x.numpy())
    xs = [scaler.transform(x.numpy()) for x in (train_x, val_x, test_x)]
    best = None
    for alpha in (0.1, 1.0, 10.0):
        model = Ridge(alpha=alpha).fit(xs[0], train_y.numpy())
        score = r2_score(val_y.numpy(), model.predict(xs[1]))
        if best is None or score > best[0]:
            best = (score, alpha, model)
    _, alpha, model = best
    test_pred = torch.tensor(model.predict(xs[2]), dtype=torch.float32)
    val_pred = torch.tensor(model.predict(xs[1]), dtype=torch.float32)
    return {"test": regression_metrics(test_pred, test_y), "validation": regression_metrics(val_pred, val_y), "C": alpha,
            "test_predictions": test_pred.numpy()}
