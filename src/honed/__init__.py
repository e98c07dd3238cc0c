"""honed: fine-tune a pre-trained model to your task and data, and measure whether to trust it.

    import honed
    result = honed.run("recipe.yaml", ["train.lr=3e-5"])
    result.metrics["test"], result.run_dir
"""

from .errors import DataError, HonedError, RecipeError
from .recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = ["run", "check", "predict", "load_recipe", "Recipe", "HonedError", "RecipeError", "DataError", "__version__"]


def run(recipe, overrides=None, retry_on_fail: bool = False, **kwargs):
    """Fine-tune as `recipe` (a path, a dict or a Recipe) says; returns a RunResult (run_dir, metrics).
    retry_on_fail: when a guard says the run failed, run its next step once (RUN-retry1; result.retry)."""
    from .retry import run as run_honed

    return run_honed(recipe, overrides, retry_on_fail=retry_on_fail, **kwargs)


def check(recipe, overrides=None) -> dict:
    """Validate the recipe and audit its data without training; returns the audit."""
    from .session import check_audit, prepare

    resolved, splits = prepare(recipe, overrides)
    return check_audit(resolved, splits)


def predict(run_dir, input_path):
    """Predictions (a DataFrame) for a CSV/JSONL/Parquet file from a finished run."""
    from .inference import predict as predict_file

    return predict_file(run_dir, input_path)
