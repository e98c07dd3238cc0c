"""ONNX for the classifiers and regressors (text, image, tabular): torch.onnx's exporter, verified
with onnxruntime on validation batches of two sizes (the batch, and for text the sequence, axes
are dynamic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.bundle import logits_of

INPUTS = ("input_ids", "attention_mask", "pixel_values", "x")


class Outputs(nn.Module):
    """The model as a function of positional tensors (ONNX graphs take no dicts), returning its logits or values."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        return logits_of(self.model, dict(zip(self.names, tensors)))


def graph_inputs(batch: dict) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in INPUTS if k in batch and isinstance(batch[k], torch.Tensor)}


def write_onnx(model: nn.Module, batch: dict, path: Path) -> Path:
    inputs = graph_inputs(batch)
    names = list(inputs)
    dynamic = {name: ({0: "batch", 1: "sequence"} if name in ("input_ids", "attention_mask") else {0: "batch"}) for name in names}
    dynamic["output"] = {0: "batch"}
    wrapped = Outputs(model, names).eval()  # the exporter restores the wrapper's mode afterwards: it must be eval too
    with torch.no_grad():
        torch.onnx.export(wrapped, tuple(inputs.values()), str(path), input_names=names, output_names=["output"],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return path


def run_onnx(path: Path, batch: dict) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in graph_inputs(batch).items()}
    return session.run(None, feeds)[0]
