"""The Optuna study: its storage (SQLite next to the runs, or any Optuna URL), the sampler, the
pruner, and the checks that keep one OUT folder to one study."""

from __future__ import annotations

import hashlib
import json
import random
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from ..errors import RecipeError
from ..recipe import Recipe, dump_recipe
from .space import Param


PRUNERS = ("median", "successive-halving", "none")


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


def open_study(store, name, sampler, pruner, direction, url) -> optuna.Study:
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


def recipe_fingerprint(recipe: Recipe, space: dict[str, Param], metric: str) -> str:
    text = dump_recipe(recipe) + json.dumps({k: p.describe() for k, p in space.items()}, sort_keys=True) + metric
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_trial_dirs(out: Path, study: optuna.Study) -> None:
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
