"""A multilayer perceptron for tables: the from-scratch architecture, and what an earlier
honed tabular run saves, so that run can be the pre-trained model of the next one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..data.preprocess import Preprocessor
from ..errors import RecipeError
from ..fileio import write_safetensors_atomic
from .bundle import ModelBundle

FAMILY = "mlp"


class TabularMLP(nn.Module):
    """body (Linear → ReLU → Dropout) × layers, then a linear head; regression rescales its output."""

    def __init__(self, in_dim: int, hidden: int, layers: int, out_dim: int, dropout: float = 0.1, regression: bool = False):
        super().__init__()
        blocks, width = [], in_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.classifier = nn.Linear(width, out_dim)
        self.regression = regression
        self.checkpointed = False  # train.gradient_checkpointing: recompute each layer in the backward pass
        self.register_buffer("target_mean", torch.tensor(0.0))
        self.register_buffer("target_std", torch.tensor(1.0))
        self.config = {"in_dim": in_dim, "hidden": hidden, "layers": layers, "dropout": dropout, "regression": regression}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint_sequential

            hidden = checkpoint_sequential(self.body, max(1, len(self.body) // 3), x, use_reentrant=False)
        else:
            hidden = self.body(x)
        out = self.classifier(hidden)
        if self.regression:
            return out.squeeze(-1) * self.target_std + self.target_mean
        return out


def build_mlp(spec, in_dim: int, out_dim: int, regression: bool) -> TabularMLP:
    return TabularMLP(in_dim, spec.hidden, spec.layers, out_dim, spec.dropout, regression)


def save_mlp(bundle: ModelBundle, model: TabularMLP, out: Path) -> dict:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_safetensors_atomic(state, out / "model.safetensors")
    (out / "preprocess.json").write_text(json.dumps(bundle.preprocessor.to_json(), indent=2))
    return dict(model.config)


def reload_mlp(model_dir: Path, meta: dict) -> ModelBundle:
    try:
        pre = Preprocessor.from_json(json.loads((model_dir / "preprocess.json").read_text()))
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise RecipeError(f"model: {model_dir}/preprocess.json is missing or damaged ({exc})") from None
    labels = meta.get("labels")
    out_dim = 1 if meta["regression"] else len(labels)
    model = TabularMLP(meta["in_dim"], meta["hidden"], meta["layers"], out_dim, meta["dropout"], meta["regression"])
    try:
        model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    except Exception as exc:
        raise RecipeError(f"model: {model_dir}/model.safetensors does not match honed.json ({str(exc).splitlines()[0][:160]})") from None
    bundle = ModelBundle(FAMILY, model, None, 0, "classifier", labels or [], str(model_dir))
    bundle.preprocessor = pre
    return bundle


def scratch_mlp(model: TabularMLP) -> TabularMLP:
    """The same architecture with fresh weights, keeping the target scaling (regression)."""
    cfg = model.config
    fresh = TabularMLP(cfg["in_dim"], cfg["hidden"], cfg["layers"], model.classifier.out_features, cfg["dropout"], cfg["regression"])
    fresh.target_mean.copy_(model.target_mean)
    fresh.target_std.copy_(model.target_std)
    return fresh
