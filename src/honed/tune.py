"""`honed tune`: hyperparameter search with Optuna, one honed run directory per trial.

    OUT/study.db          the Optuna study (default storage; any Optuna URL with --storage)
    OUT/trial-0007/       one run directory per trial (written by pipeline.run)
    OUT/best.yaml         the full resolved recipe with the best parameters (`honed run` loads it)
    OUT/best/             best.yaml run once more, with the recipe's own guards: the only test score read
    OUT/tune.json         every trial (number, params, value, state, duration), the best, importances

The objective is the primary metric on the validation split (the test split is never read
during the search). A TPE sampler proposes parameters; a median or successive-halving pruner
is fed the validation metric after every evaluation and stops trials that fall behind.
Several processes or machines can work on one study: they share the storage (SQLite next
to the runs by default, `--storage postgresql://...` for many machines), trial numbers come
from the storage, so every trial directory is written by exactly one worker.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from pydantic import ValidationError

from . import pipeline
from .errors import HonedError, RecipeError, TrainingInterrupted
from .models.load import HONED_MODEL_FILE, run_model_dir
from .recipe import Recipe, apply_overrides, dump_recipe, load_recipe, read_yaml, resolve_paths
from .tasks import TASKS

PRUNERS = ("median", "successive-halving", "none")
MINIMISED = {"loss", "rmse", "mse", "mae", "mape"}  # primary metrics where lower is better
# Guards that cost extra training are off inside trials; the final run of the best recipe keeps the recipe's own.
TRIAL_ONLY = ["guards.data_curve=false", "guards.baseline=false", "train.seeds=null"]
ALPHA_RATIO = "lora.alpha_ratio"  # not a recipe key: lora.alpha = ratio × lora.r
MAX_CONSECUTIVE_FAILURES = 3

# Learning-rate ranges for transformer checkpoints (family "hf"), per method; design.md §4 and docs/auto.md.
HF_LR_RANGE = {"full": (1e-5, 1e-4), "freeze": (1e-5, 1e-4), "lp-ft": (1e-5, 1e-4), "lora": (5e-5, 1e-3)}
HEAD_LR_RANGE = (1e-3, 1e-1)  # the head trains on standardised features, whatever the backbone
OTHER_LR_FACTOR = 5.0  # WordLlama (an embedding table) and tabular MLPs: auto lr ÷5 … ×5 around pipeline.AUTO_LR
HF_BATCH_SIZES = (8, 16, 32)  # transformers; other families search half, once and twice their auto batch size
TRANSFORMERS = ("hf", "hf-image", "causal-lm")  # families whose learning rates follow HF_LR_RANGE


# --------------------------------------------------------------------------- the search space

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
    """The family `resolve_auto` will be given (pipeline.setup learns it from the loaded model;
    tune needs it before any model is loaded): from the model, or from an earlier run's honed.json."""
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
    return {"chat": "causal-lm", "image-classification": "hf-image", "forecasting": "ts-forecast"}.get(recipe.task, "mlp" if recipe.task.startswith("tabular") else "hf")


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
    auto = pipeline.AUTO_LR.get((family, method))
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


# --------------------------------------------------------------------------- loading the recipe and its tune section

def load_base(source, overrides: list[str] | None = None) -> tuple[Recipe, Any]:
    """The recipe without its `tune` section, and that section's `space` (or None)."""
    overrides = list(overrides or [])
    if isinstance(source, Recipe):
        recipe = load_recipe(source, overrides)
        return _split_tune(recipe)
    if "tune" in Recipe.model_fields:  # the recipe schema knows the section
        return _split_tune(load_recipe(source, overrides))
    if isinstance(source, dict):
        raw, base = copy.deepcopy(source), Path(".").resolve()
    else:
        path = Path(source).expanduser()
        raw, base = read_yaml(path), path.resolve().parent
    section = raw.pop("tune", None)
    if section is not None and (not isinstance(section, dict) or set(section) - {"space"}):
        raise RecipeError(f"tune: should be a section with one key, space; got {section!r}")
    raw = apply_overrides(raw, overrides)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        from .recipe import _validation_message

        raise RecipeError(_validation_message(exc)) from None
    return resolve_paths(recipe, base), (section or {}).get("space")


def _split_tune(recipe: Recipe) -> tuple[Recipe, Any]:
    section = getattr(recipe, "tune", None)
    if section is None:
        return recipe, None
    space = section.get("space") if isinstance(section, dict) else getattr(section, "space", None)
    if hasattr(space, "items"):
        space = {k: (v.model_dump(exclude_unset=True) if hasattr(v, "model_dump") else v) for k, v in space.items()}
    return recipe, space


# --------------------------------------------------------------------------- storage and sampler

def redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage; a URL that cannot be opened is a bad argument (exit 2)."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # workers wait for each other's writes
    last: Exception | None = None
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=300, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one clear message
            last = exc
            text = str(exc).lower()
            racing = url.startswith("sqlite") and any(w in text for w in ("locked", "already exists", "unique constraint"))
            if not racing:
                break
            time.sleep(0.2 + random.random() * (attempt + 1))  # two workers creating the tables at once
    detail = str(last).splitlines()[0][:200] if str(last) else ""
    raise RecipeError(f"--storage: cannot open '{redact(url)}' ({type(last).__name__}: {detail}); give an Optuna storage URL "
                      "such as sqlite:///path/study.db or postgresql://user@host/db (with its driver installed)")


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE seeded with seed + the number of the first trial this worker runs.

    One worker on a fresh study starts at trial 0, so a search is reproducible; several
    workers on one study start at different trial numbers, so they do not propose the same
    random start-up points.
    """

    def __init__(self, seed: int, **kwargs):
        self._seed, self._kwargs, self._inner = seed, kwargs, None

    def _sampler(self, number: int = 0) -> optuna.samplers.TPESampler:
        if self._inner is None:
            with warnings.catch_warnings():  # multivariate TPE is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._inner = optuna.samplers.TPESampler(seed=self._seed + number, multivariate=True, **self._kwargs)
        return self._inner

    def before_trial(self, study, trial):
        self._sampler(trial.number).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._sampler(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler(trial.number).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._sampler(trial.number).after_trial(study, trial, state, values)

    def reseed_rng(self):
        self._sampler().reseed_rng()


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        # wait for 3 finished trials, and never judge a trial on its first two evaluations
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource="auto", reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise RecipeError(f"--pruner: should be one of {', '.join(PRUNERS)}; got '{name}'")


# --------------------------------------------------------------------------- the search

@dataclass
class TuneResult:
    out: Path
    study_name: str
    summary: dict  # the contents of tune.json
    best_metrics: dict | None = None  # metrics.json of OUT/best


class _Stop(Exception):
    """Raised out of a trial to end the whole search (Ctrl-C, or a problem no trial can get past)."""

    def __init__(self, message: str, interrupted: bool = False):
        super().__init__(message)
        self.interrupted = interrupted


def default_out(recipe: Recipe, source) -> Path:
    if recipe.out:
        out = Path(recipe.out)
        return out.with_name(out.name + "-tune")
    stem = Path(source).stem if isinstance(source, (str, Path)) else "recipe"
    return Path("runs") / f"{stem}-tune"


def _fingerprint(recipe: Recipe, space: dict[str, Param], metric: str) -> str:
    text = dump_recipe(recipe) + json.dumps({k: p.describe() for k, p in space.items()}, sort_keys=True) + metric
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _trial_dir(out: Path, number: int) -> Path:
    return out / f"trial-{number:04d}"


def _check_trial_dirs(out: Path, study: optuna.Study) -> None:
    """A trial-N folder whose number the study does not hold came from another study: refuse to mix them."""
    # list the folders first: a worker creates a trial in the storage before its folder, so every
    # folder seen here has its trial in the list read next, however busy the other workers are
    folders = sorted(out.glob("trial-*"))
    numbers = {t.number for t in study.get_trials(deepcopy=False)}
    for path in folders:
        suffix = path.name[len("trial-"):]
        if suffix.isdigit() and int(suffix) not in numbers:
            raise RecipeError(f"--out: {out} holds {path.name} from another study (study '{study.study_name}' has no trial "
                              f"{int(suffix)}); use the same --storage/--study as before, or choose another --out")


def tune(source, trials: int | None = None, timeout: float | None = None, storage: str | None = None,
         study_name: str | None = None, out: str | Path | None = None, pruner: str = "median",
         overrides: list[str] | None = None, defaults_first: bool = True, show_progress: bool = True,
         final_run: bool = True) -> TuneResult:
    """Search the recipe's hyperparameters; write OUT/best.yaml, OUT/best/ and OUT/tune.json."""
    if trials is None and timeout is None:
        raise RecipeError("--trials/--timeout: give a trial budget (--trials N), a time budget (--timeout S), or both")
    if trials is not None and trials < 1:
        raise RecipeError(f"--trials: should be at least 1; got {trials}")
    if timeout is not None and timeout <= 0:
        raise RecipeError(f"--timeout: should be a positive number of seconds; got {timeout}")
    the_pruner = make_pruner(pruner)

    base, section = load_base(source, overrides)
    recipe, splits = pipeline.prepare(base)  # validates the recipe and reads the data before any study exists
    family = model_family(recipe)
    depth = model_depth(recipe.model, family) if recipe.method == "freeze" else None
    resolved = pipeline.resolve_auto(recipe.model_copy(deep=True), family, len(splits.train))
    space = parse_space(section, default_space(recipe, resolved, family, depth))
    check_space(space, base)
    metric = TASKS[recipe.task]["primary"]
    direction = "minimize" if metric in MINIMISED else "maximize"

    out = Path(out) if out is not None else default_out(base, source)
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out: {out} exists and is a file; choose a folder")
    store = open_storage(storage) if storage else None  # a bad URL fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{out / 'study.db'}"
    store = store or open_storage(url)
    name = study_name or out.name
    seed = base.train.seed
    sampler = TrialSeededTPE(seed, n_startup_trials=max(3, min(10, (trials or 30) // 3)))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = _open_study(store, name, sampler, the_pruner, direction, url)
        fingerprint = _fingerprint(base, space, metric)
        saved = study.user_attrs.get("honed_fingerprint")
        if saved is None:
            study.set_user_attr("honed_fingerprint", fingerprint)
            study.set_user_attr("honed_metric", f"validation {metric}")
        elif saved != fingerprint:
            raise RecipeError(f"--study: study '{name}' in {redact(url)} was started with another recipe or search space; "
                              "use a new --study name (or another --out) for this one")
        _check_trial_dirs(out, study)
        if defaults_first and not study.get_trials(deepcopy=False):
            study.enqueue_trial(default_params(space, resolved, depth), user_attrs={"defaults": True}, skip_if_exists=True)

        objective, state = _objective(base, space, out, metric, timeout, show_progress)
        try:
            study.optimize(objective, n_trials=trials, timeout=timeout, catch=(HonedError, RuntimeError, ValueError),
                           callbacks=[state.after_trial])
        except _Stop as exc:
            if exc.interrupted:
                raise TrainingInterrupted(f"tune: interrupted; the study keeps every finished trial. Continue with the same "
                                          f"command (it loads study '{name}' and adds trials)") from None
            raise HonedError(str(exc)) from None
        return _finalise(study, base, space, out, url, metric, direction, seed, show_progress, final_run)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _open_study(store, name, sampler, pruner, direction, url) -> optuna.Study:
    last = None
    for attempt in range(6):
        try:
            study = optuna.create_study(storage=store, study_name=name, sampler=sampler, pruner=pruner,
                                        direction=direction, load_if_exists=True)
            if study.direction != optuna.study.StudyDirection[direction.upper()]:
                raise RecipeError(f"--study: study '{name}' in {redact(url)} was created to {study.direction.name.lower()}; "
                                  f"this search must {direction}; use another --study name")
            return study
        except RecipeError:
            raise
        except Exception as exc:  # noqa: BLE001 - two workers creating the same study at once
            last = exc
            time.sleep(0.2 + random.random() * (attempt + 1))
    raise RecipeError(f"--study: cannot create or load study '{name}' in {redact(url)} ({type(last).__name__}: {str(last)[:200]})")


@dataclass
class _State:
    show_progress: bool
    failures: int = 0

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.FAIL:
            self.failures += 1
        elif trial.state == optuna.trial.TrialState.COMPLETE:
            self.failures = 0
        if self.show_progress:
            _say(_trial_line(trial))
        if self.failures >= MAX_CONSECUTIVE_FAILURES and not _complete(study):
            error = trial.user_attrs.get("error", "see the trial directories")
            raise _Stop(f"tune: the first {self.failures} trials failed and none completed; last error: {error}")


def _objective(base: Recipe, space: dict[str, Param], out: Path, metric: str, timeout: float | None, show_progress: bool):
    """The objective (one honed run per trial, pruned from its evaluations) and the per-trial progress callback."""
    deadline = time.time() + timeout if timeout is not None else None
    state = _State(show_progress)
    extra: dict[str, Any] = {}
    if "cache" in inspect.signature(pipeline.run).parameters:
        # pre-trained features (and the linear probe on them) do not depend on the searched values:
        # computed by the first trial of this worker, reused by the others
        extra["cache"] = {}

    def objective(trial: optuna.Trial) -> float:
        params = {name: param.suggest(trial) for name, param in space.items()}
        sets = to_overrides(params, base)
        run_dir = _trial_dir(out, trial.number)
        trial.set_user_attr("overrides", sets)
        trial.set_user_attr("run_dir", str(run_dir))
        evaluations = {"n": 0}

        def on_evaluation(record: dict) -> None:
            value = record.get(f"val_{metric}")
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return
            trial.report(float(value), evaluations["n"])  # step = evaluation index (every half epoch with eval_every: auto)
            evaluations["n"] += 1
            if deadline is not None and time.time() > deadline:
                trial.set_user_attr("stopped", "the --timeout budget ran out during this trial")
                raise optuna.TrialPruned(f"stopped at evaluation {evaluations['n']}: the time budget ran out")
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at evaluation {evaluations['n']} (validation {metric} {value:.4f})")

        try:
            result = pipeline.run(base, sets + TRIAL_ONLY, out=run_dir, show_progress=False, on_evaluation=on_evaluation, **extra)
        except TrainingInterrupted as exc:
            raise _Stop("tune: interrupted", interrupted=True) from exc
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            raise
        finally:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a trial is never resumed; its model/ stays
        validation = result.metrics.get("validation") or {}
        trial.set_user_attr("validation", validation)
        trial.set_user_attr("evaluations", evaluations["n"])
        if validation.get(metric) is None:
            raise HonedError(f"tune: {run_dir / 'metrics.json'} has no validation {metric} to optimise")
        return float(validation[metric])

    return objective, state


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(text, markup=False, highlight=False)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _trial_line(trial: optuna.trial.FrozenTrial) -> str:
    state = "stopped (time budget)" if trial.user_attrs.get("stopped") else trial.state.name.lower()
    value = f" validation {trial.value:.4f}" if trial.value is not None else ""
    if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
        last = trial.intermediate_values[max(trial.intermediate_values)]
        value = f" at validation {last:.4f}"
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    seconds = f" {trial.duration.total_seconds():.0f} s" if trial.duration is not None else ""
    error = f" ({trial.user_attrs['error']})" if trial.state == optuna.trial.TrialState.FAIL and "error" in trial.user_attrs else ""
    return f"trial {trial.number}: {state}{value}{seconds}  [{params}]{error}"


# --------------------------------------------------------------------------- after the search

@contextlib.contextmanager
def _exclusive(path: Path):
    """One worker at a time finalises an OUT folder (workers on one machine share it)."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: workers finalise one after another by chance
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _trial_record(t: optuna.trial.FrozenTrial) -> dict:
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "params": t.params,
        "duration_s": round(t.duration.total_seconds(), 2) if t.duration is not None else None,
        "evaluations": len(t.intermediate_values),
        "last_intermediate": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
        "run_dir": t.user_attrs.get("run_dir"),
        "overrides": t.user_attrs.get("overrides"),
        "defaults": bool(t.user_attrs.get("defaults", False)),
        "error": t.user_attrs.get("error"),
        "stopped": t.user_attrs.get("stopped"),
    }


def importances(study: optuna.Study, seed: int) -> tuple[dict | None, str | None]:
    """fANOVA importances over the complete trials (≥ 2 needed); (None, why) when they cannot be computed."""
    complete = _complete(study)
    if len(complete) < 2:
        return None, f"{len(complete)} complete trial(s); importances need at least 2"
    if len({t.value for t in complete}) == 1:
        return None, f"every complete trial scored {complete[0].value:.4f}: no parameter made a difference in this range"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
        return {k: round(float(v), 4) for k, v in found.items()}, None
    except Exception as exc:  # noqa: BLE001 - e.g. every complete trial has the same value of every parameter
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def _finalise(study: optuna.Study, base: Recipe, space: dict[str, Param], out: Path, url: str, metric: str,
              direction: str, seed: int, show_progress: bool, final_run: bool) -> TuneResult:
    with _exclusive(out / ".tune.lock"):
        trials = study.get_trials(deepcopy=False)
        complete = _complete(study)
        found, why = importances(study, seed)
        defaults = next((t for t in trials if t.user_attrs.get("defaults")), None)
        summary: dict[str, Any] = {
            "study": study.study_name,
            "storage": redact(url),
            "direction": direction,
            "objective": f"validation {metric}",
            "space": {k: p.describe() for k, p in space.items()},
            "trials": [_trial_record(t) for t in trials],
            "counts": {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
            "best": None,
            "defaults": {"number": defaults.number, "value": defaults.value, "state": defaults.state.name} if defaults else None,
            "importances": found,
            "importances_note": why,
        }
        result = TuneResult(out, study.study_name, summary)
        if not complete:
            _write_json(out / "tune.json", summary)
            errors = [t.user_attrs["error"] for t in trials if "error" in t.user_attrs]
            raise HonedError(f"tune: no trial completed ({summary['counts']['PRUNED']} pruned, {summary['counts']['FAIL']} failed"
                             f"{'; first error: ' + errors[0] if errors else ''}); see {out / 'tune.json'}")
        best = study.best_trial
        sets = best.user_attrs.get("overrides") or to_overrides(best.params, base)
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params, "overrides": sets,
                           "trial_dir": best.user_attrs.get("run_dir"), "validation": best.user_attrs.get("validation"),
                           "recipe": str(out / "best.yaml"), "run_dir": str(out / "best")}
        if final_run:
            result.best_metrics = _run_best(base, sets, best.number, study.study_name, out, show_progress)
            metrics = result.best_metrics
            summary["best"].update({"final_validation": metrics.get("validation"), "test": metrics.get("test")})
            _write_best_yaml(out)
        _write_json(out / "tune.json", summary)
        return result


def _run_best(base: Recipe, sets: list[str], number: int, study_name: str, out: Path, show_progress: bool) -> dict:
    """Run the best recipe once more, with the recipe's own guards, into OUT/best: the only test score read."""
    best_dir = out / "best"
    previous = _read_json(out / "tune.json")
    same = (previous and previous.get("study") == study_name and (previous.get("best") or {}).get("number") == number
            and (best_dir / "metrics.json").exists())
    if same:  # another worker already ran this very trial's recipe
        return json.loads((best_dir / "metrics.json").read_text())
    if show_progress:
        _say(f"best trial {number}: running its recipe once more into {best_dir} (the recipe's own guards on; test split read once)")
    overwrite = best_dir.exists() and (best_dir / "recipe.yaml").exists()
    return pipeline.run(base, sets, out=best_dir, overwrite=overwrite, show_progress=show_progress).metrics


def _write_best_yaml(out: Path) -> None:
    """best.yaml is the resolved recipe the best run used: every auto filled in, loadable by `honed run`."""
    text = (out / "best" / "recipe.yaml").read_text()
    tmp = out / "best.yaml.partial"
    tmp.write_text(text)
    os.replace(tmp, out / "best.yaml")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- what the CLI prints

SHORT_NAMES = {"warmup_ratio": "warmup", "weight_decay": "decay", "batch_size": "batch", "head_lr": "lr",
               "head_epochs": "epochs", "alpha_ratio": "α/r", "fraction": "replay", "layers": "frozen"}


def _header(name: str, names: list[str]) -> str:
    """A parameter's column title: a short form of the last part of its key, unless two keys share it."""
    short = lambda n: SHORT_NAMES.get(n.rsplit(".", 1)[-1], n.rsplit(".", 1)[-1])  # noqa: E731
    return short(name) if sum(short(n) == short(name) for n in names) == 1 else name


def _cell(value) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def summary_tables(summary: dict) -> list:
    """Rich tables: every trial with its parameters, then the parameter importances."""
    from rich import box
    from rich.table import Table

    names = list(summary["space"])
    best = (summary.get("best") or {}).get("number")
    table = Table(title=f"honed tune: study {summary['study']}, {summary['objective']} (* best; d: the recipe's own settings)",
                  box=box.SIMPLE_HEAD, caption="exact values in tune.json")
    table.add_column("trial", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("s", justify="right", no_wrap=True)
    for name in names:
        table.add_column(_header(name, names), justify="right", no_wrap=True)
    states = {"COMPLETE": "done", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
    for t in summary["trials"]:
        if t["state"] == "COMPLETE":
            value = f"{t['value']:.4f}"
        else:  # a pruned or stopped trial: its last validation figure, in brackets
            value = f"({t['last_intermediate']:.4f})" if t["last_intermediate"] is not None else ""
        number = f"{t['number']}{'*' if t['number'] == best else ''}{'d' if t['defaults'] else ''}"
        style = {"COMPLETE": "", "PRUNED": "dim", "FAIL": "red"}.get(t["state"], "yellow")
        state = "stopped" if t.get("stopped") else states.get(t["state"], t["state"].lower())
        table.add_row(number, state, value,
                      f"{t['duration_s']:.0f}" if t["duration_s"] is not None else "",
                      *(_cell(t["params"].get(n, "")) for n in names), style=style)
    tables = [table]
    if summary.get("importances"):
        imp = Table(title="parameter importances (fANOVA over complete trials)", box=box.SIMPLE_HEAD)
        imp.add_column("parameter")
        imp.add_column("importance", justify="right")
        for name, value in summary["importances"].items():
            imp.add_row(name, f"{value:.3f}")
        tables.append(imp)
    return tables
