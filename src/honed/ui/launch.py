"""Starting, stopping and resuming runs from the UI, and checking a recipe first.

A run the UI starts is a background `honed run` process (the CLI, unchanged): its output goes to
RUN_DIR/run.log and its pid to RUN_DIR/run.pid, both written before the run itself starts (the
run directory accepts them: rundir.LAUNCH_FILES). A recipe built from the form is written to
RUN_DIR/launch.yaml with absolute paths. The check is `honed check`'s own code (session.prepare
and session.check_audit); its one-line error comes back with absolute paths taken out.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import HonedError
from ..rundir import LAUNCH_RECIPE, LOG_FILE, PID_FILE
from .runs import RunsRoot, process_alive, read_pid, run_state

RECIPE_SUFFIXES = (".yaml", ".yml")
DATA_SUFFIXES = (".csv", ".jsonl", ".parquet")
MAX_LISTED = 200
ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s,;:'\"()\[\]]+/)*([^\s,;:'\"()\[\]/]+)")
FORM_TRAIN_KEYS = ("epochs", "lr", "batch_size", "seed")


class LaunchError(ValueError):
    """A launch refused before any process started; the message is safe to show."""

    def __init__(self, message: str, field_name: str = ""):
        super().__init__(message)
        self.message, self.field = message, field_name


@dataclass
class Workspace:
    """Where runs go (--runs) and where recipes and data files are picked from (--files)."""

    runs: RunsRoot
    files: Path
    processes: dict = field(default_factory=dict)  # run dir → Popen, waited on by a thread (no zombies)

    def scrub(self, text: str) -> str:
        """An error message without absolute paths: the two roots become relative, any other path its file name."""
        text = self.runs.display(text)
        text = text.replace(str(self.files) + os.sep, "")
        return ABSOLUTE_PATH.sub(lambda m: m.group(1), text)

    def recipe_files(self) -> list[str]:
        """YAML files under --files (two levels) that hold a recipe (a `task:` key)."""
        return [p for p in self._files(RECIPE_SUFFIXES) if self._is_recipe(self.files / p)]

    def data_files(self) -> list[str]:
        return self._files(DATA_SUFFIXES)

    def _files(self, suffixes: tuple[str, ...]) -> list[str]:
        found = []
        runs_root = self.runs.root
        for depth in ("*", "*/*", "*/*/*"):
            for path in sorted(self.files.glob(depth)):
                if path.suffix.lower() in suffixes and path.is_file() and not path.is_symlink():
                    resolved = path.resolve()
                    if resolved.is_relative_to(runs_root) or any(p.startswith(".") for p in path.relative_to(self.files).parts):
                        continue  # a run's own resolved recipe is not a starting point
                    found.append(path.relative_to(self.files).as_posix())
                    if len(found) >= MAX_LISTED:
                        return found
        return found

    @staticmethod
    def _is_recipe(path: Path) -> bool:
        try:
            value = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return False
        return isinstance(value, dict) and "task" in value

    def pick(self, relative: str, listed: list[str], what: str) -> Path:
        """A file chosen from a list the UI showed; anything else is refused."""
        if relative not in listed:
            raise LaunchError(f"{what}: choose one of the listed files", what)
        return (self.files / relative).resolve()

    def columns(self, relative: str) -> list[str]:
        """The columns of a listed data file (its header), for the form's column pickers."""
        import pandas as pd

        path = self.pick(relative, self.data_files(), "data.train")
        try:
            if path.suffix == ".csv":
                return [str(c) for c in pd.read_csv(path, nrows=0).columns]
            if path.suffix == ".jsonl":
                return [str(c) for c in pd.read_json(path, lines=True, nrows=1).columns]
            import pyarrow.parquet as pq

            return [str(c) for c in pq.read_schema(path).names]
        except Exception:  # an unreadable file: the check names the problem
            return []


# --------------------------------------------------------------------------- the form

def form_recipe(workspace: Workspace, form: dict) -> dict:
    """A recipe dict from the new-run form's fields (absolute paths; empty fields left out)."""
    get = lambda key: str(form.get(key) or "").strip()  # noqa: E731
    task = get("task")
    model = get("model")
    if model and not Path(model).is_absolute() and (workspace.files / model).exists():
        model = str((workspace.files / model).resolve())
    data: dict = {}
    for split in ("train", "validation", "test"):
        if get(split):
            data[split] = str(workspace.pick(get(split), workspace.data_files(), f"data.{split}"))
    if get("text"):
        data["text"] = get("text")
    if get("features"):
        data["features"] = [f.strip() for f in get("features").split(",") if f.strip()]
    if get("label"):
        data["label"] = get("label")
    if get("groups"):
        data["groups"] = [g.strip() for g in get("groups").split(",") if g.strip()]
    recipe: dict = {"task": task, "model": model_value(model), "data": data}
    if get("method"):
        recipe["method"] = get("method")
    train = {}
    for key in FORM_TRAIN_KEYS:
        if get(key):
            try:
                train[key] = yaml.safe_load(get(key))  # numbers as numbers, `auto` as text
            except yaml.YAMLError:
                raise LaunchError(f"train.{key}: expected a number or auto. Got {get(key)[:40]!r} instead.", f"train.{key}") from None
    if train:
        recipe["train"] = train
    guards = {key: form.get(key) in ("on", "true", True) for key in ("baseline", "data_curve")}
    recipe["guards"] = guards
    return recipe


def model_value(model: str):
    """`mlp` (or `mlp:32`) in the model field is the from-scratch tabular MLP; anything else a path or Hub id."""
    if model.startswith("mlp"):
        hidden = model.partition(":")[2]
        return {"architecture": "mlp", **({"hidden": int(hidden)} if hidden.isdigit() else {})}
    return model


def check(workspace: Workspace, source, overrides: list[str] | None = None) -> dict:
    """`honed check` on a recipe (a dict or a file): {"ok": True, "summary", "findings"} or
    {"ok": False, "error": one line, "field": the recipe key it names}."""
    from ..session import check_audit, prepare

    try:
        recipe, splits = prepare(source, overrides or [])
        audit = check_audit(recipe, splits)
    except HonedError as exc:
        message = workspace.scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return {"ok": False, "error": message, "field": message.split(":", 1)[0] if ":" in message else ""}
    except Exception as exc:  # a bug below the check: say so in one line, without the traceback
        return {"ok": False, "error": f"the check failed unexpectedly ({type(exc).__name__}); run `honed check` on the recipe for details",
                "field": ""}
    rows = {name: info.get("rows") for name, info in audit.get("splits", {}).items()}
    findings = [workspace.scrub(f"{f['level']}: {f['message']}") for f in audit.get("findings", [])]
    model = recipe.model if isinstance(recipe.model, str) else recipe.model.architecture
    return {"ok": True, "summary": f"recipe ok: task {recipe.task}, model {workspace.scrub(model)}, method {recipe.method}; rows "
            + ", ".join(f"{k} {v}" for k, v in rows.items()), "findings": findings}


# --------------------------------------------------------------------------- processes

def start(workspace: Workspace, run_dir: Path, argv: list[str]) -> int:
    """`honed <argv>` in the background, output appended to RUN_DIR/run.log; returns its pid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}
    with open(run_dir / LOG_FILE, "ab") as log:
        log.write(f"launched: honed {argv[0]}{' --resume' if '--resume' in argv else ''}\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "honed", *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=workspace.files, env=env, start_new_session=True)
    (run_dir / PID_FILE).write_text(f"{proc.pid}\n")  # the run writes the same pid again once its folder is open
    workspace.processes[str(run_dir)] = proc
    threading.Thread(target=proc.wait, name=f"honed-ui-wait-{proc.pid}", daemon=True).start()
    return proc.pid


def launch_form(workspace: Workspace, name: str, recipe: dict, overrides: list[str] | None = None) -> Path:
    """Check the form's recipe (and its `key=value` lines), then start it as RUN_DIR = --runs/NAME."""
    run_dir = new_run_dir(workspace, name)
    result = check(workspace, recipe, overrides)
    if not result["ok"]:
        raise LaunchError(result["error"], result["field"])
    try:
        run_dir.mkdir(parents=True)
    except FileExistsError:  # another launch of the same name got there first
        raise LaunchError(f"name: a run called '{name}' already exists; choose another name", "name") from None
    (run_dir / LAUNCH_RECIPE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    sets = [part for item in overrides or [] for part in ("-s", item)]
    start(workspace, run_dir, ["run", str(run_dir / LAUNCH_RECIPE), *sets, "--out", str(run_dir)])
    return run_dir


def launch_file(workspace: Workspace, name: str, relative: str, overrides: list[str]) -> Path:
    """Check a listed recipe file, then start it as RUN_DIR = --runs/NAME."""
    recipe = workspace.pick(relative, workspace.recipe_files(), "recipe")
    run_dir = new_run_dir(workspace, name)
    result = check(workspace, str(recipe), overrides)
    if not result["ok"]:
        raise LaunchError(result["error"], result["field"])
    sets = [part for item in overrides for part in ("-s", item)]
    start(workspace, run_dir, ["run", str(recipe), *sets, "--out", str(run_dir)])
    return run_dir


def new_run_dir(workspace: Workspace, name: str) -> Path:
    try:
        return workspace.runs.new_path(name)
    except ValueError as exc:
        raise LaunchError(str(exc), "name") from None


def stop(run_dir: Path) -> bool:
    """SIGTERM to the run's process: the loop checkpoints at its next step and stops (resumable)."""
    pid = read_pid(run_dir)
    if pid is None or not process_alive(pid):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def resume(workspace: Workspace, run_dir: Path) -> int:
    """`honed run RUN_DIR/recipe.yaml --out RUN_DIR --resume` (the resolved recipe it started with)."""
    state = run_state(run_dir)
    if state not in ("interrupted", "failed"):
        raise LaunchError(f"resume: the run is {state}; only an interrupted or failed run can be resumed")
    if not (run_dir / "recipe.yaml").is_file():
        raise LaunchError("resume: the run stopped before it wrote recipe.yaml; start it again as a new run")
    return start(workspace, run_dir, ["run", str(run_dir / "recipe.yaml"), "--out", str(run_dir), "--resume"])
