"""`tune()`: validate the recipe and the search space, open the study, run the trials, finalise."""

from __future__ import annotations

from pathlib import Path

import optuna

from .. import session
from ..auto import resolve_auto
from ..errors import HonedError, RecipeError, TrainingInterrupted
from ..recipe import Recipe
from ..tasks import TASKS
from .load import load_base
from .outputs import TuneResult, finalise
from .space import check_space, default_params, default_space, model_depth, model_family, parse_space
from .study import TrialSeededTPE, check_trial_dirs, make_pruner, open_storage, open_study, recipe_fingerprint, redact
from .trials import StopSearch, make_objective


def default_out(recipe: Recipe, source) -> Path:
    if recipe.out:
        out = Path(recipe.out)
        return out.with_name(out.name + "-tune")
    stem = Path(source).stem if isinstance(source, (str, Path)) else "recipe"
    return Path("runs") / f"{stem}-tune"


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
    recipe, splits = session.prepare(base)  # validates the recipe and reads the data before any study exists
    family = model_family(recipe)
    depth = model_depth(recipe.model, family) if recipe.method == "freeze" else None
    resolved = resolve_auto(recipe.model_copy(deep=True), family, len(splits.train))
    space = parse_space(section, default_space(recipe, resolved, family, depth))
    check_space(space, base)
    metric = TASKS[recipe.task].primary
    direction = "minimize" if metric in TASKS[recipe.task].lower_is_better else "maximize"

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
        study = open_study(store, name, sampler, the_pruner, direction, url)
        fingerprint = recipe_fingerprint(base, space, metric)
        saved = study.user_attrs.get("honed_fingerprint")
        if saved is None:
            study.set_user_attr("honed_fingerprint", fingerprint)
            study.set_user_attr("honed_metric", f"validation {metric}")
        elif saved != fingerprint:
            raise RecipeError(f"--study: study '{name}' in {redact(url)} was started with another recipe or search space; "
                              "use a new --study name (or another --out) for this one")
        check_trial_dirs(out, study)
        if defaults_first and not study.get_trials(deepcopy=False):
            study.enqueue_trial(default_params(space, resolved, depth), user_attrs={"defaults": True}, skip_if_exists=True)

        objective, state = make_objective(base, space, out, metric, timeout, show_progress)
        try:
            study.optimize(objective, n_trials=trials, timeout=timeout, catch=(HonedError, RuntimeError, ValueError),
                           callbacks=[state.after_trial])
        except StopSearch as exc:
            if exc.interrupted:
                raise TrainingInterrupted(f"tune: interrupted; the study keeps every finished trial. Continue with the same "
                                          f"command (it loads study '{name}' and adds trials)") from None
            raise HonedError(str(exc)) from None
        return finalise(study, base, space, out, url, metric, direction, seed, show_progress, final_run)
    finally:
        optuna.logging.set_verbosity(verbosity)
