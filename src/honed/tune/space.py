"""The search space: one `Param` per searched recipe key, the defaults per method and model
family (centred on what `auto` resolves to, docs/auto.md), the recipe's `tune.space` merged in,
and the trial parameters written back as `-s key=value` overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from ..auto import AUTO_LR
from ..errors import RecipeError
from ..models.load import HONED_MODEL_FILE, run_model_dir
from ..recipe import Recipe, load_recipe
from ..tasks import TASKS


ALPHA_RATIO = "lora.alpha_ratio"  # not a recipe key: lora.alpha = ratio × lora.r
# Learning-rate ranges for transformer checkpoints (family "hf"), per method; design.md §4 and docs/auto.md.
HF_LR_RANGE = {"full": (1e-5, 1e-4), "freeze": (1e-5, 1e-4), "lp-ft": (1e-5, 1e-4), "lora": (5e-5, 1e-3)}
HEAD_LR_RANGE = (1e-3, 1e-1)  # the head trains on standardised features, whatever the backbone
OTHER_LR_FACTOR = 5.0  # WordLlama (an embedding table) and tabular MLPs: auto lr ÷5 … ×5 around auto.AUTO_LR
HF_BATCH_SIZES = (8, 16, 32)  # transformers; other families search half, once and twice their auto batch size
TRANSFORMERS = ("hf", "hf-image", "causal-lm")  # families whose learning rates follow HF_LR_RANGE


@dataclass
class Param:
    """One searched parameter: a float or int range (log or linear), or a list of choices."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    def suggest(self, trial: optuna.Trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def contains(self, value) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> dict:
        if self.kind == "categorical":
            return {"choices": self.choices}
        out = {"low": self.low, "high": self.high, "log": self.log, "type": self.kind}
        if self.step is not None:
            out["step"] = self.step
        return out


def _around(value, low, high):
    """Widen (low, high) so that the recipe's own value lies inside it."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return min(low, value), max(high, value)
    return low, high


def model_family(recipe: Recipe) -> str:
    """The family `resolve_auto` will be given (session.setup learns it from the loaded model;
    tune needs it before any model is loaded): from the model, or from an earlier run's honed.json, else the task's default."""
    model = recipe.model
    if not isinstance(model, str):  # model: {architecture: mlp | patchtst | patchtsmixer}
        return "mlp" if model.architecture == "mlp" else "ts-forecast"
    if model == "wordllama":
        return "wordllama"
    path = Path(model)
    found = run_model_dir(path) if path.exists() else None
    if found is not None:
        try:
            return json.loads((found / HONED_MODEL_FILE).read_text()).get("family", "hf")
        except (OSError, json.JSONDecodeError):
            pass
    return TASKS[recipe.task].default_family


def model_depth(model, family: str) -> int | None:
    """Number of transformer layers (what freeze.layers counts), when the config says; None when unknown."""
    if family not in TRANSFORMERS or not isinstance(model, str):
        return None
    path = Path(model)
    folder = (run_model_dir(path) or path) if path.exists() else None
    config = None
    if folder is not None and (folder / "config.json").exists():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            config = None
    if config is None:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model).to_dict()
        except Exception:
            return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def default_space(recipe: Recipe, resolved: Recipe, family: str, depth: int | None) -> dict[str, Param]:
    """The search space for the recipe's method, centred on what `auto` resolves to (docs/auto.md)."""
    method, t, r = recipe.method, resolved.train, resolved
    space: dict[str, Param] = {}
    if method == "head":
        low, high = _around(t.head_lr, *HEAD_LR_RANGE)
        space["train.head_lr"] = Param("train.head_lr", "float", low, high, log=True)
        low, high = _around(t.head_epochs, 10, 100)
        space["train.head_epochs"] = Param("train.head_epochs", "int", low, high, log=True)
        space["train.weight_decay"] = Param("train.weight_decay", "float", *_around(t.weight_decay, 0.0, 0.1))
        return space  # the head trains on cached features in batches of at least 64: batch size hardly matters
    auto = AUTO_LR.get((family, method))
    if family in TRANSFORMERS or auto is None:
        low, high = HF_LR_RANGE[method]
    else:
        low, high = auto / OTHER_LR_FACTOR, auto * OTHER_LR_FACTOR
    space["train.lr"] = Param("train.lr", "float", *_around(t.lr, low, high), log=True)
    epochs = int(t.epochs)
    space["train.epochs"] = Param("train.epochs", "int", *_around(epochs, max(1, epochs // 2), max(2, min(2 * epochs, 20))))
    space["train.warmup_ratio"] = Param("train.warmup_ratio", "float", *_around(t.warmup_ratio, 0.0, 0.2))
    space["train.weight_decay"] = Param("train.weight_decay", "float", *_around(t.weight_decay, 0.0, 0.1))
    b = int(t.batch_size)
    sizes = sorted(set(HF_BATCH_SIZES if family in TRANSFORMERS else (max(1, b // 2), b, 2 * b)) | {b})
    space["train.batch_size"] = Param("train.batch_size", "categorical", choices=sizes)
    if method == "lora":
        space["lora.r"] = Param("lora.r", "categorical", choices=sorted({4, 8, 16} | {r.lora.r}))
        ratio = (r.lora.alpha / r.lora.r) if r.lora.alpha is not None else 2
        ratios = sorted({1, 2, 4} | ({int(ratio)} if float(ratio).is_integer() else set()))
        space[ALPHA_RATIO] = Param(ALPHA_RATIO, "categorical", choices=ratios)
        space["lora.dropout"] = Param("lora.dropout", "float", *_around(r.lora.dropout, 0.0, 0.2))
    if method == "freeze" and depth:
        space["freeze.layers"] = Param("freeze.layers", "int", 0, depth)
    if r.l2sp is not None:
        space["l2sp.alpha"] = Param("l2sp.alpha", "float", *_around(r.l2sp.alpha or 1e-4, 1e-4, 1.0), log=True)
    if r.replay is not None:
        space["replay.fraction"] = Param("replay.fraction", "float", *_around(r.replay.fraction, 0.05, 0.5))
    return space


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_space(section: Any, defaults: dict[str, Param]) -> dict[str, Param]:
    """Merge the recipe's `tune.space` into the defaults: param → {low, high, log, step} | {choices} | null (drop)."""
    if section is None:
        return dict(defaults)
    if not isinstance(section, dict):
        raise RecipeError(f"tune.space: should be a mapping of recipe keys to ranges, e.g. train.lr: {{low: 1e-5, high: 1e-4, log: true}}; got {section!r}")
    space = dict(defaults)
    for name, spec in section.items():
        where = f"tune.space.{name}"
        if spec is None or spec is False:
            space.pop(name, None)
            continue
        if not isinstance(spec, dict):
            raise RecipeError(f"{where}: should be {{low, high, log}} or {{choices: [...]}} (or null to leave it out); got {spec!r}")
        unknown = set(spec) - {"low", "high", "log", "step", "choices"}
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: low, high, log, step, choices")
        if "choices" in spec:
            choices = spec["choices"]
            if set(spec) - {"choices"}:
                raise RecipeError(f"{where}: give either choices or low/high, not both")
            if not isinstance(choices, list) or not choices or not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                raise RecipeError(f"{where}.choices: should be a non-empty list of plain values; got {choices!r}")
            space[name] = Param(name, "categorical", choices=list(choices))
            continue
        low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
        if not (_number(low) and _number(high)) or low > high:
            raise RecipeError(f"{where}: low and high should be numbers with low ≤ high; got low={low!r}, high={high!r}")
        if not isinstance(log, bool):
            raise RecipeError(f"{where}.log: should be true or false; got {log!r}")
        if log and low <= 0:
            raise RecipeError(f"{where}: a log range needs low > 0; got low={low!r}")
        if step is not None and (not _number(step) or step <= 0 or log):
            raise RecipeError(f"{where}.step: should be a positive number, and not combined with log: true; got {step!r}")
        previous = defaults.get(name)
        integer = isinstance(low, int) and isinstance(high, int) and (previous is None or previous.kind != "float")
        if name == "freeze.layers" or (previous is not None and previous.kind == "int"):
            if not (float(low).is_integer() and float(high).is_integer()):
                raise RecipeError(f"{where}: {name} is a whole number; got low={low!r}, high={high!r}")
            integer = True
        space[name] = Param(name, "int" if integer else "float", low, high, log=log, step=step)
    return space


def format_value(value) -> str:
    """A value as YAML that reads back as the same type (PyYAML reads 1e-05 as a string, 1.0e-05 as a float)."""
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    return json.dumps(value)


def to_overrides(params: dict, base: Recipe) -> list[str]:
    """Trial parameters as `-s key=value` strings (lora.alpha_ratio becomes lora.alpha = ratio × r)."""
    sets = [f"{name}={format_value(value)}" for name, value in params.items() if name != ALPHA_RATIO]
    if ALPHA_RATIO in params:
        r = params.get("lora.r", base.lora.r)
        sets.append(f"lora.alpha={max(1, round(params[ALPHA_RATIO] * r))}")
    return sets


def default_params(space: dict[str, Param], resolved: Recipe, depth: int | None = None) -> dict:
    """The recipe's own (auto-resolved) values of the searched parameters: the first trial."""
    values = {}
    for name, param in space.items():
        if name == ALPHA_RATIO:
            value = (resolved.lora.alpha / resolved.lora.r) if resolved.lora.alpha is not None else 2
            value = int(value) if float(value).is_integer() else value
        elif name == "freeze.layers" and resolved.freeze.layers == "half":
            value = depth // 2 if depth else None
        else:
            node: Any = resolved
            for part in name.split("."):
                node = getattr(node, part, None) if node is not None else None
            value = node
        if value is not None and param.contains(value):
            values[name] = value
    return values


def check_space(space: dict[str, Param], base: Recipe) -> None:
    """Every searched name must be a recipe key that accepts the range's ends: fail before any training."""
    if not space:
        raise RecipeError("tune.space: nothing left to search; keep at least one parameter")
    lows = {k: (p.choices[0] if p.kind == "categorical" else int(p.low) if p.kind == "int" else p.low) for k, p in space.items()}
    highs = {k: (p.choices[-1] if p.kind == "categorical" else int(p.high) if p.kind == "int" else p.high) for k, p in space.items()}
    for params in (lows, highs):
        try:
            load_recipe(base, to_overrides(params, base))
        except RecipeError as exc:
            raise RecipeError(f"tune.space: a value in the search space is not a valid recipe value ({exc}); fix the range in tune.space") from None
