"""Errors a user sees. Each message names the field, file or column, what was expected,
what was found, and what to do. The CLI prints `error: <message>` and exits with `exit_code`."""


class HonedError(Exception):
    """Base class; exit code 1 (anything that is neither a bad recipe nor bad data)."""

    exit_code = 1


class RecipeError(HonedError):
    """A bad recipe, bad command-line arguments, or a model path that cannot be used (exit 2)."""

    exit_code = 2


class DataError(HonedError):
    """Bad input data: missing files or columns, unreadable tables, unusable labels (exit 3)."""

    exit_code = 3


class TrainingInterrupted(HonedError):
    """Ctrl-C or SIGTERM during training; a checkpoint was saved and the run can be resumed."""

    exit_code = 130
