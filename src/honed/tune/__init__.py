"""`honed tune`: hyperparameter search with Optuna, one honed run directory per trial.

    OUT/study.db          the Optuna study (default storage; any Optuna URL with --storage)
    OUT/trial-0007/       one run directory per trial (written by runner.run)
    OUT/best.yaml         the full resolved recipe with the best parameters (`honed run` loads it)
    OUT/best/             best.yaml run once more, with the recipe's own guards: the only test score read
    OUT/tune.json         every trial (number, params, value, state, duration), the best, importances

The objective is the primary metric on the validation split (the test split is never read
during the search). A TPE sampler proposes parameters; a median or successive-halving pruner
is fed the validation metric after every evaluation and stops trials that fall behind.
Several processes or machines can work on one study: they share the storage (SQLite next
to the runs by default, `--storage postgresql://...` for many machines), trial numbers come
from the storage, so every trial directory is written by exactly one worker.

The package, one concern a module:

    space.py     the search space: defaults per method and model family, `tune.space`, overrides
    load.py      the recipe to tune and its `tune:` section
    study.py     storage, sampler, pruner; one OUT folder holds one study
    trials.py    the objective (one run per trial, pruned from its evaluations) and progress lines
    outputs.py   after the search: tune.json, OUT/best/, OUT/best.yaml
    tables.py    what the CLI prints
    search.py    `tune()`, which ties them together
"""

from .load import load_base
from .outputs import TuneResult, importances
from .search import default_out, tune
from .space import (
    ALPHA_RATIO,
    Param,
    check_space,
    default_params,
    default_space,
    format_value,
    model_depth,
    model_family,
    parse_space,
    to_overrides,
)
from .study import PRUNERS, TrialSeededTPE, make_pruner, open_storage, redact
from .tables import summary_tables

__all__ = [
    "ALPHA_RATIO", "PRUNERS", "Param", "TrialSeededTPE", "TuneResult", "check_space", "default_out", "default_params",
    "default_space", "format_value", "importances", "load_base", "make_pruner", "model_depth", "model_family",
    "open_storage", "parse_space", "redact", "summary_tables", "to_overrides", "tune",
]
