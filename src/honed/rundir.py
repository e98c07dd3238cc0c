"""The run directory: where it is, refusing what would lose work, and its small files (design.md §3)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import RecipeError
from .fileio import write_text_atomic
from .recipe import Recipe, dump_recipe, load_recipe

# Files a launcher (honed ui) writes into a run directory before `honed run` starts in it: the
# process's output and its pid. A folder holding only these is not yet a run.
PID_FILE = "run.pid"
LOG_FILE = "run.log"
LAUNCH_RECIPE = "launch.yaml"
LAUNCH_FILES = frozenset({PID_FILE, LOG_FILE, LAUNCH_RECIPE})


def default_run_dir(recipe: Recipe, source) -> Path:
    if recipe.out:
        return Path(recipe.out)
    stem = Path(source).stem if isinstance(source, (str, Path)) else "run"
    return Path("runs") / stem


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse what would lose or overwrite work, before anything is loaded (writes nothing)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"out: {run_dir} exists and is a file; choose another --out")
    exists = holds_run(run_dir)
    if resume and exists and not (run_dir / "recipe.yaml").exists():
        raise RecipeError(f"--resume: {run_dir} is not a honed run directory (no recipe.yaml)")
    if resume and not exists:
        raise RecipeError(f"--resume: {run_dir} holds no run to resume; drop --resume to start one")
    if exists and not resume and not overwrite:
        raise RecipeError(f"out: run directory {run_dir} already exists; pass --resume to continue it, --overwrite to replace it, or --out for a new one")
    if exists and overwrite and not (run_dir / "recipe.yaml").exists():
        raise RecipeError(f"--overwrite: {run_dir} is not a honed run directory; refusing to delete it")


def holds_run(run_dir: Path) -> bool:
    """Whether the folder holds anything but what a launcher wrote before the run started."""
    return run_dir.is_dir() and any(entry.name not in LAUNCH_FILES for entry in run_dir.iterdir())


def write_pid(run_dir: Path) -> None:
    """RUN_DIR/run.pid: which process trains here (honed ui's Stop button sends it SIGTERM)."""
    write_text_atomic(run_dir / PID_FILE, f"{os.getpid()}\n")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Never silently overwrite: an existing run needs --resume or --overwrite."""
    check_run_dir(run_dir, resume, overwrite)
    exists = holds_run(run_dir)
    if exists and overwrite and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def check_resume_recipe(run_dir: Path, recipe: Recipe) -> None:
    try:  # read with today's defaults, so a field added by an upgrade does not block a resume
        saved = dump_recipe(load_recipe(run_dir / "recipe.yaml"))
    except RecipeError:
        saved = None
    if saved != dump_recipe(recipe):
        raise RecipeError(f"--resume: the recipe differs from the one {run_dir} was started with; resume with the same recipe and overrides, or start a new run")


def write_history(run_dir: Path, history: list[dict]) -> None:
    write_text_atomic(run_dir / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def write_recipe(run_dir: Path, recipe: Recipe, resume: bool, notes: list[str] | None = None) -> None:
    """The resolved recipe, headed by `notes` as YAML comments (how each `auto` was resolved);
    on --resume, the recipe must be the one the run was started with."""
    if resume and (run_dir / "recipe.yaml").exists():
        check_resume_recipe(run_dir, recipe)
    else:  # a kill mid-write must not leave a run that cannot resume
        header = "".join(f"# {note}\n" for note in notes or [])
        write_text_atomic(run_dir / "recipe.yaml", header + dump_recipe(recipe))
