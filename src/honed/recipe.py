"""The recipe: pydantic models of recipe.yaml, loading, dotted overrides, and path resolution.

Nothing below this module reads YAML. Unknown keys fail loudly (extra="forbid"); nothing
here rewrites a value the user gave. `auto` values are resolved later, by honed.auto when the run loads the model,
and the resolved recipe is written to RUN_DIR/recipe.yaml.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RecipeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSpec(Strict):
    """One source of a mixture: `data.train: [{path: a.jsonl, weight: 0.7}, {path: hf:owner/name, weight: 0.3}]`."""

    path: str  # any single-source form: a file, a folder of shards, a glob, a save_to_disk folder, hf:owner/name
    weight: float | None = Field(None, gt=0)  # this source's share of the examples or tokens (data.mix_by; normalised); none: every row
    subset: str | None = None  # hf: the dataset's configuration (default: data.subset)
    split: str | None = None  # hf: or a save_to_disk DatasetDict: the split (default: data.split)


class DataSpec(Strict):
    # a file (csv/jsonl/parquet), a folder of shards, a glob, a save_to_disk folder, hf:owner/name, or a mixture
    train: str | list[SourceSpec]
    validation: str | list[SourceSpec] | None = None
    test: str | list[SourceSpec] | None = None
    subset: str | None = None  # hf: sources: the dataset's configuration (load_dataset's `name`)
    split: str | None = None  # hf: sources and save_to_disk DatasetDicts: the split to read (default: train)
    # a mixture's weights are shares of its examples, or (chat, causal-lm, text-classification) of its tokens, counted with the run's tokenizer
    mix_by: Literal["examples", "tokens"] = "examples"
    format: Literal["auto", "messages", "sharegpt", "alpaca"] = "auto"  # chat: the conversation format; auto: from the first rows
    text: str = "text"
    label: str = "label"
    groups: list[str] = Field(default_factory=list)
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_length: int = Field(128, ge=8, le=8192)
    image: str = "image"  # image-classification from a table: the column of image paths
    max_bad_images: float = Field(0.01, ge=0, le=1)  # share of unreadable images skipped before it is an error
    features: list[str] = Field(default_factory=list)  # tabular: the input columns
    categorical: list[str] = Field(default_factory=list)  # tabular: force these columns to be categorical
    numeric: list[str] = Field(default_factory=list)  # tabular: force these columns to be numeric
    messages: str = "messages"  # chat: the column holding the list of {role, content} messages
    prompt: str = "prompt"  # preference: the prompt (a string or a messages list)
    chosen: str = "chosen"  # preference: the preferred reply (a string, an assistant message, or the whole conversation)
    rejected: str = "rejected"  # preference: the rejected reply, in the same form
    chat_template: str | None = None  # chat: a Jinja template (or a .jinja file) when the tokenizer has none
    packing: bool = True  # chat: pack short conversations into sequences of max_length tokens; causal-lm: documents end to end
    # causal-lm: when off, each document alone in rows of max_length tokens
    series: str = "series"  # forecasting: the column naming each series (long format: one row per series and time)
    time: str = "time"  # forecasting: the timestamp column
    target: str = "target"  # forecasting: the value to forecast
    covariates: list[str] = Field(default_factory=list)  # forecasting: extra numeric input channels (past values only)
    context_length: int = Field(32, ge=2)  # forecasting: points of history the model reads
    horizon: int = Field(8, ge=1)  # forecasting: points it forecasts
    season: int | Literal["auto"] = "auto"  # forecasting: seasonal period of the seasonal-naive baseline and MASE
    stride: int = Field(1, ge=1)  # forecasting: step between consecutive training windows


class AugmentSpec(Strict):
    """Train-time image augmentation (none at evaluation)."""

    flip: bool = True
    crop: float = Field(0.85, gt=0, le=1)  # smallest crop side, as a share of the image, before resizing back
    color: float = Field(0.1, ge=0, lt=1)  # brightness/contrast jitter amplitude


class MLPSpec(Strict):
    """A from-scratch tabular model: `model: {architecture: mlp}`."""

    architecture: Literal["mlp"]
    hidden: int = Field(128, ge=1)
    layers: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


class SeriesModelSpec(Strict):
    """A from-scratch forecasting model: `model: {architecture: patchtst}` (or patchtsmixer)."""

    architecture: Literal["patchtst", "patchtsmixer"]
    d_model: int = Field(32, ge=2)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)  # patchtst only; d_model must be a multiple of it
    patch_length: int | Literal["auto"] = "auto"  # auto: context_length // 8, at least 2
    dropout: float = Field(0.1, ge=0, lt=1)


class LoraSpec(Strict):
    r: int = Field(8, ge=1)
    alpha: int | None = None  # None → 2·r
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None  # None → every linear/embedding layer except the head
    keep_adapter: bool = False  # also save the unmerged adapter beside the merged model


class QloraSpec(Strict):
    """method: qlora: the frozen base weights quantised by bitsandbytes; the adapters come from `lora:`."""

    bits: Literal[4, 8] = 4  # 4: NF4 (QLoRA, Dettmers et al. 2023); 8: LLM.int8
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit only
    double_quant: bool = True  # 4-bit only: quantise the quantisation constants too (~0.4 bit/param saved)


class PreferenceSpec(Strict):
    """task: preference: the objective and the likelihood-displacement threshold."""

    loss: Literal["dpo", "ipo", "simpo"] = "dpo"  # simpo is reference-free
    beta: float | None = Field(None, gt=0)  # None: 0.1 for dpo and ipo, 2.0 for simpo (their papers' defaults)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # dpo: conservative DPO's assumed share of flipped labels
    simpo_gamma: float = Field(0.5, ge=0)  # simpo: the target reward margin
    displacement: float = Field(0.1, gt=0)  # warn when the chosen replies' log-probability per token falls by more (nats)
    max_kl: float = Field(1.0, gt=0)  # warn when KL(policy ‖ start) where the replies start exceeds this (nats)


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
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps (resolved with epochs in recipe.yaml)
    gradient_checkpointing: bool | Literal["auto"] = "auto"  # auto: on only when the run would not fit in memory without it
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"  # under torchrun: auto = fsdp when one device cannot hold the run
    offload: bool = False  # fsdp: keep parameters, gradients and optimizer state in CPU memory between uses
    patience: int | None = Field(3, ge=1)
    group_by_length: bool = True
    threads: int | Literal["auto"] = "auto"
    head_epochs: int = Field(30, ge=1)  # epochs over cached features (head, and lp-ft's first stage)
    head_lr: float | Literal["auto"] = "auto"
    track: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)  # experiment trackers (honed[track])
    tracking_uri: str | None = None  # MLflow tracking URI; default sqlite:///<runs folder>/mlflow.db
    experiment: str | None = None  # MLflow experiment; default the name of the folder holding the run


class OverfitSpec(Strict):
    max_gap: float = Field(0.10, ge=0)


class ForgettingSpec(Strict):
    floor: float | None = Field(0.95, ge=0, le=1)
    cka_floor: float | None = Field(None, ge=0, le=1)


class GuardsSpec(Strict):
    overfitting: OverfitSpec = Field(default_factory=OverfitSpec)
    forgetting: ForgettingSpec = Field(default_factory=ForgettingSpec)
    data_curve: bool = False  # fine-tune on nested fractions of the training data (the learning curve)
    curve_fractions: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.4, 0.7, 1.0], min_length=3)
    target: float | None = None  # the metric the user needs; the curve estimates the data it takes
    epsilon: float = Field(0.01, gt=0)  # "within ε of the full-data score" means more data no longer pays
    min_per_class: int = Field(20, ge=1)
    min_group_size: int = Field(30, ge=1)
    bias_threshold: float = Field(0.1, ge=0, le=1)
    baseline: bool | Literal["auto"] = "auto"
    # the learning curve's and the scratch baseline's training together, at most this share of the
    # fine-tune's optimizer steps (checks/budget.py); null: no limit
    budget: float | None = Field(0.3, gt=0)
    # the seed spread (train.seeds) on a training split larger than this: every seed, the run's own included,
    # retrained on one seeded sample of this many rows (checks/seeds.py); null: every seed on every row
    seed_rows: int | None = Field(50_000, ge=1)


class ReplaySpec(Strict):
    fraction: float = Field(0.25, gt=0, le=1)  # reference rows per step, as a fraction of the batch size
    weight: float = Field(1.0, gt=0)


class ReferenceSpec(Strict):
    data: str
    text: str = "text"
    label: str | None = None


class TuneParam(Strict):
    """One searched parameter of `honed tune`: a range, or a list of choices."""

    low: int | float | None = None  # int | float keeps 2 as an int
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[bool | int | float | str | None] | None = None


class TuneSpec(Strict):
    """`tune:`: honed tune's search space; honed run ignores it."""

    space: dict[str, TuneParam | None] = Field(default_factory=dict)  # recipe key → range/choices; null drops a default


class Recipe(Strict):
    task: Literal["text-classification", "image-classification", "tabular-classification", "tabular-regression", "forecasting", "chat", "preference",
                  "causal-lm"] = "text-classification"
    model: str | MLPSpec | SeriesModelSpec
    data: DataSpec
    method: Literal["full", "head", "freeze", "lora", "qlora", "lp-ft"] = "full"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    qlora: QloraSpec = Field(default_factory=QloraSpec)
    preference: PreferenceSpec = Field(default_factory=PreferenceSpec)
    # Hugging Face models: attn_implementation; auto = flash_attention_2 on CUDA when installed, else sdpa
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    freeze: FreezeSpec = Field(default_factory=FreezeSpec)
    l2sp: L2SPSpec | None = None
    replay: ReplaySpec | None = None
    augment: AugmentSpec | None = Field(default_factory=AugmentSpec)  # image-classification only
    interpolate: bool | list[float] = False  # WiSE-FT sweep: true → α ∈ {0, 0.1, …, 1}; or a list of α
    train: TrainSpec = Field(default_factory=TrainSpec)
    guards: GuardsSpec = Field(default_factory=GuardsSpec)
    reference: ReferenceSpec | None = None
    out: str | None = None
    tune: TuneSpec | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # where relative paths were resolved from; not a recipe key a user writes
    base_dir: str | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _chat_defaults_to_lora(cls, data):
        """task: chat, preference and causal-lm fine-tune with LoRA unless the recipe names a method (the other tasks default to full)."""
        if isinstance(data, dict) and data.get("task") in ("chat", "preference", "causal-lm") and data.get("method") is None:
            data = {**data, "method": "lora"}
        return data


def _submodel(annotation) -> type[BaseModel] | None:
    """The recipe section class inside an annotation such as `L2SPSpec | None`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _key_of(loc: tuple) -> str:
    """The recipe key of a pydantic error location, without union-member tags such as 'int' or "literal['auto']"."""
    key, model = "", Recipe
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif model is not None:
            key += f".{part}" if key else str(part)
            field = model.model_fields.get(part)
            model = _submodel(field.annotation) if field is not None else None
        # else: a union member's tag below a plain value: not part of the key
    return key or "recipe"


def _expected(msg: str) -> str:
    msg = msg.split(", unable to")[0]
    if msg.startswith("Input should be a valid dictionary"):
        msg = "Input should be a section of keys"
    return msg[len("Input should be "):] if msg.startswith("Input should be ") else msg[:1].lower() + msg[1:]


def _did_you_mean(where: str) -> str:
    """'; did you mean train.lr?' for a misspelt key, from the fields of the section it sits in."""
    import difflib

    *section, name = where.split(".")
    model = Recipe
    for part in section:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return ""
        model = candidates[0]
    close = difflib.get_close_matches(name, [k for k in model.model_fields if k != "base_dir"], n=1, cutoff=0.6)
    return f"; did you mean {'.'.join([*section, close[0]])}?" if close else ""


def validation_message(exc: ValidationError) -> str:
    """Turn pydantic's report into one line naming the key, what was expected and what was found."""
    by_key: dict[str, list[dict]] = {}
    for err in exc.errors():
        by_key.setdefault(_key_of(err["loc"]), []).append(err)
    parts = []
    for where, errs in by_key.items():
        types = {e["type"] for e in errs}
        if "extra_forbidden" in types:
            parts.append(f"{where}: unknown key{_did_you_mean(where)} (see the README's recipe keys)")
        elif "missing" in types:
            parts.append(f"{where}: required key is missing")
        else:
            expected = " or ".join(dict.fromkeys(_expected(e["msg"]) for e in errs))
            should = "should be " if all(e["msg"].startswith("Input should be ") for e in errs) else ""
            parts.append(f"{where}: {should}{expected}, got {errs[0].get('input')!r}")
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
        raise RecipeError(f"-s {text}: the value {_yaml_problem(exc)}") from None
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


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    tag = re.search(r"constructor for the tag '([^']+)'", problem)
    if tag:  # e.g. !!python/object/apply:os.system: safe_load refuses to construct (or run) it
        return f"uses the YAML tag '{tag.group(1).replace('tag:yaml.org,2002:', '!!')}'; recipes hold plain values only, remove the tag"
    return f"is not valid YAML: {problem}"


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
        raise RecipeError(f"recipe: {path}{where} {_yaml_problem(exc)}") from None
    if raw is None:
        raise RecipeError(f"recipe: {path} is empty; expected keys such as task, model and data")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe: {path} must be a mapping of keys (task, model, data, ...), got {type(raw).__name__}")
    return raw


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None or value.startswith("hf:"):  # a Hub dataset id is not a path
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make the recipe's relative paths relative to the recipe file's folder."""
    data = recipe.data
    for key in ("train", "validation", "test"):
        value = getattr(data, key)
        if isinstance(value, list):
            for source in value:
                source.path = _resolve(base, source.path)
        else:
            setattr(data, key, _resolve(base, value))
    if recipe.reference is not None:
        recipe.reference.data = _resolve(base, recipe.reference.data)
    if recipe.out is not None:
        recipe.out = _resolve(base, recipe.out)
    model = recipe.model
    if isinstance(model, str) and model != "wordllama":
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
        raise RecipeError(validation_message(exc)) from None
    return resolve_paths(recipe, base)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default filled in."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def main_seed(recipe: Recipe) -> int:
    """The seed of the run's own fine-tune: the first of train.seeds when several are given."""
    return recipe.train.seeds[0] if recipe.train.seeds else recipe.train.seed


def features_key(recipe: Recipe, precision: str) -> str:
    """What the encoded splits and the pre-trained features depend on; none of it is a training hyperparameter."""
    model = recipe.model if isinstance(recipe.model, str) else recipe.model.model_dump(mode="json")
    return json.dumps({"task": recipe.task, "model": model, "data": recipe.data.model_dump(mode="json"),
                       "seed": main_seed(recipe), "precision": precision, "attention": recipe.attention,
                       "quantised": recipe.qlora.model_dump() if recipe.method == "qlora" else None}, sort_keys=True)
