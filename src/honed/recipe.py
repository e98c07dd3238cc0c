"""The recipe: pydantic models of recipe.yaml, loading, dotted overrides, and path resolution.

Nothing below this module reads YAML. Unknown keys fail loudly (extra="forbid"); nothing
here rewrites a value the user gave. `auto` values are resolved later, by the pipeline,
and the resolved recipe is written to RUN_DIR/recipe.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RecipeError

TASKS = ("text-classification",)
METHOD_NAMES = ("full", "head", "freeze", "lora", "lp-ft")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSpec(Strict):
    train: str
    validation: str | None = None
    test: str | None = None
    text: str = "text"
    label: str = "label"
    groups: list[str] = Field(default_factory=list)
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_length: int = Field(128, ge=8, le=8192)


class LoraSpec(Strict):
    r: int = Field(8, ge=1)
    alpha: int | None = None  # None → 2·r
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None  # None → every linear/embedding layer except the head
    keep_adapter: bool = False  # also save the unmerged adapter beside the merged model


class FreezeSpec(Strict):
    layers: int | Literal["half"] = "half"  # lowest N transformer layers (plus embeddings)


class L2SPSpec(Strict):
    alpha: float = Field(0.01, ge=0)
    beta: float = Field(0.0, ge=0)


class TrainSpec(Strict):
    epochs: int | Literal["auto"] = "auto"
    lr: float | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    seed: int = 0
    seeds: list[int] | None = None
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accumulation: int = Field(1, ge=1)
    eval_every: int | Literal["auto"] = "auto"
    patience: int | None = Field(3, ge=1)
    group_by_length: bool = True
    threads: int | Literal["auto"] = "auto"
    head_epochs: int = Field(30, ge=1)  # epochs over cached features (head, and lp-ft's first stage)
    head_lr: float | Literal["auto"] = "auto"


class OverfitSpec(Strict):
    max_gap: float = Field(0.10, ge=0)


class ForgettingSpec(Strict):
    floor: float | None = Field(0.95, ge=0, le=1)
    cka_floor: float | None = Field(None, ge=0, le=1)


class GuardsSpec(Strict):
    overfitting: OverfitSpec = Field(default_factory=OverfitSpec)
    forgetting: ForgettingSpec = Field(default_factory=ForgettingSpec)
    data_curve: bool = False
    bias_threshold: float = Field(0.1, ge=0, le=1)
    baseline: bool | Literal["auto"] = "auto"


class ReferenceSpec(Strict):
    data: str
    text: str = "text"
    label: str | None = None


class Recipe(Strict):
    task: Literal["text-classification"] = "text-classification"
    model: str
    data: DataSpec
    method: Literal["full", "head", "freeze", "lora", "lp-ft"] = "full"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    freeze: FreezeSpec = Field(default_factory=FreezeSpec)
    l2sp: L2SPSpec | None = None
    train: TrainSpec = Field(default_factory=TrainSpec)
    guards: GuardsSpec = Field(default_factory=GuardsSpec)
    reference: ReferenceSpec | None = None
    out: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # where relative paths were resolved from; not a recipe key a user writes
    base_dir: str | None = Field(None, exclude=True)


def _validation_message(exc: ValidationError) -> str:
    """Turn pydantic's report into one line naming the key, what was expected and what was found."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "recipe"
        found = err.get("input")
        if err["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown key (check the spelling; see `honed run --help` and the README's recipe keys)")
        elif err["type"] == "missing":
            parts.append(f"{where}: required key is missing")
        else:
            parts.append(f"{where}: {err['msg'].lower()}, got {found!r}")
    return "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `-s train.lr=1e-4` into (["train", "lr"], 0.0001); the value is read as YAML."""
    if "=" not in text:
        raise RecipeError(f"-s {text}: expected key=value, e.g. -s train.lr=1e-4")
    key, raw = text.split("=", 1)
    if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key.strip()):
        raise RecipeError(f"-s {text}: '{key}' is not a dotted recipe key such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"-s {text}: the value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"-s {text}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: Path) -> dict:
    """Read a recipe file with yaml.safe_load: tags that construct Python objects are refused."""
    if not path.exists():
        raise RecipeError(f"recipe: file {path} not found")
    if path.is_dir():
        raise RecipeError(f"recipe: {path} is a directory; expected a recipe.yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe: {path} is not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise RecipeError(f"recipe: {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe: {path} must be a mapping of keys (task, model, data, ...), got {type(raw).__name__}")
    return raw


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make the recipe's relative paths relative to the recipe file's folder."""
    data = recipe.data
    data.train = _resolve(base, data.train)
    data.validation = _resolve(base, data.validation)
    data.test = _resolve(base, data.test)
    if recipe.reference is not None:
        recipe.reference.data = _resolve(base, recipe.reference.data)
    if recipe.out is not None:
        recipe.out = _resolve(base, recipe.out)
    model = recipe.model
    if model != "wordllama":
        candidate = (base / model).expanduser() if not Path(model).is_absolute() else Path(model)
        if candidate.exists() or _looks_local(model):
            recipe.model = str(candidate.resolve())
    recipe.base_dir = str(base)
    return recipe


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | None = None) -> Recipe:
    """Build a validated Recipe from a YAML path, a dict, or a Recipe, applying `-s` overrides.

    Relative paths resolve against the recipe file's folder (the current folder for a dict).
    """
    overrides = overrides or []
    if isinstance(source, Recipe):
        raw = source.model_dump(exclude_none=False)
        base = Path(source.base_dir or ".").resolve()
    elif isinstance(source, dict):
        raw = dict(source)
        base = Path(".").resolve()
    else:
        path = Path(source).expanduser()
        raw = read_yaml(path)
        base = path.resolve().parent
    raw = apply_overrides(raw, overrides)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_validation_message(exc)) from None
    return resolve_paths(recipe, base)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default filled in."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
