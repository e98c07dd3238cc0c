"""The run directories under `--runs`, as the UI reads them: which folders are runs, a run name
that can only ever name one of them (never a path outside the root), each run's state and its
row in the runs table, the history so far, and the phase its log says it is in.

State comes from what the folder holds (design.md §3 and rundir.py): `running` while the
process in run.pid is alive, `finished` once metrics.json exists, `interrupted` when a
checkpoint is left to resume from (or the log says it was stopped), `failed` otherwise.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..rundir import LAUNCH_RECIPE, LOG_FILE, PID_FILE

GUARDS = ("overfitting", "forgetting", "data", "bias", "baseline", "export")
STATES = ("running", "finished", "interrupted", "failed")
MARKERS = ("recipe.yaml", "metrics.json", PID_FILE, LOG_FILE, LAUNCH_RECIPE)  # any one makes a folder a run
MAX_DEPTH = 3  # runs/<study>/trial-0001 is two levels down; deeper folders are the runs' own (model/, checkpoints/)
SKIP = {"model", "checkpoints", "adapter", "export", "__pycache__"}
NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._\- ]{0,127}$")


class UnknownRun(LookupError):
    """A run name that is not a run directory under the root (or tries to leave it)."""


@dataclass(frozen=True)
class RunsRoot:
    """The folder `honed ui --runs` shows; every run is named by its path relative to it."""

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> "RunsRoot":
        return cls(Path(root).resolve())

    def names(self) -> list[str]:
        """Every run directory under the root, as relative names ("a", "study-tune/trial-0001")."""
        found: list[str] = []
        if not self.root.is_dir():
            return found

        def walk(folder: Path, depth: int) -> None:
            try:
                entries = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
            except OSError:
                return
            for entry in entries:
                if entry.name in SKIP or entry.name.startswith("."):
                    continue
                if is_run_dir(entry):
                    found.append(entry.relative_to(self.root).as_posix())
                if depth < MAX_DEPTH:
                    walk(entry, depth + 1)

        walk(self.root, 1)
        return found

    def path(self, name: str) -> Path:
        """The run directory a name stands for; UnknownRun for anything else: an absolute path,
        `..`, a symlink out of the root, a folder that is not a run."""
        if not isinstance(name, str) or not name or "\\" in name or "\x00" in name or name.startswith("/"):
            raise UnknownRun(name)
        parts = name.split("/")
        if len(parts) > MAX_DEPTH or any(not NAME_PART.match(p) or p in (".", "..") for p in parts):
            raise UnknownRun(name)
        candidate = (self.root / Path(*parts)).resolve()
        if candidate == self.root or not candidate.is_relative_to(self.root) or not is_run_dir(candidate):
            raise UnknownRun(name)
        return candidate

    def new_path(self, name: str) -> Path:
        """Where a new run called `name` (one plain folder name) goes; ValueError when it cannot."""
        if not NAME_PART.match(name or "") or name in (".", "..") or " " in name:
            raise ValueError("name: use letters, digits, '.', '_' or '-' (up to 128), starting with a letter or digit")
        target = self.root / name
        if target.exists():
            raise ValueError(f"name: a run called '{name}' already exists; choose another name")
        return target

    def display(self, text: str) -> str:
        """`text` with the root's absolute path taken out (error messages never show where files are)."""
        return text.replace(str(self.root) + os.sep, "").replace(str(self.root), "runs")


def is_run_dir(folder: Path) -> bool:
    return folder.is_dir() and any((folder / marker).exists() for marker in MARKERS)


# --------------------------------------------------------------------------- reading one run

def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_history(run_dir: Path, start: int = 0) -> list[dict]:
    """history.jsonl's records from index `start` on (unreadable lines skipped, as the report does)."""
    try:
        text = (run_dir / "history.jsonl").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records[start:]


def read_pid(run_dir: Path) -> int | None:
    try:
        text = (run_dir / PID_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def process_alive(pid: int) -> bool:
    """A live (not zombie) honed process: a pid reused by another program does not count."""
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            return False
        state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
        return state not in ("Z", "X") and b"honed" in cmdline
    try:  # no /proc (macOS): signal 0 says whether the pid exists
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def log_tail(run_dir: Path, max_bytes: int = 16384) -> list[str]:
    """The last lines of run.log (what `honed run` printed), for the phase and the final word."""
    path = run_dir / LOG_FILE
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return []
    return [line.strip() for line in data.decode("utf-8", errors="replace").replace("\r", "\n").splitlines() if line.strip()]


def has_checkpoint(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.endswith(".LATEST") for p in folder.iterdir())


def run_state(run_dir: Path) -> str:
    """running / finished / interrupted / failed, from the folder's files alone."""
    pid = read_pid(run_dir)
    if pid is not None and process_alive(pid):
        return "running"
    if (run_dir / "metrics.json").is_file():
        return "finished"
    last_word = next((line for line in reversed(log_tail(run_dir)) if line.startswith(("error:", "interrupted:", "launched:"))), "")
    if last_word.startswith("interrupted:"):
        return "interrupted"
    if last_word.startswith("error:"):
        return "failed"
    return "interrupted" if has_checkpoint(run_dir) else "failed"


PHASES = (  # (what `honed run` prints, the phase it starts); the last matching line wins
    (re.compile(r"^launched: "), "starting"),
    (re.compile(r"^phase: (.*)"), "{0}"),
    (re.compile(r"^training \(([^)]*)\)"), "training ({0})"),
    (re.compile(r"^step\s+\d+"), "training"),
    (re.compile(r"^learning curve: (.*)"), "data guard: learning curve, {0}"),
    (re.compile(r"^baseline: "), "baseline guard: training from random initialisation"),
    (re.compile(r"^seed (\S+): "), "overfitting guard: seed {0}"),
    (re.compile(r"^interrupted: "), "interrupted (checkpoint saved)"),
    (re.compile(r"^error: "), "failed"),
    (re.compile(r"^test \S+: "), "finished"),
)


def current_phase(run_dir: Path, state: str) -> str:
    """What the run is doing now, read from the last line of its log that names a phase."""
    if state == "finished":
        return "finished"
    phase = None
    for line in log_tail(run_dir):
        for pattern, label in PHASES:
            match = pattern.match(line)
            if match:
                phase = label.format(*match.groups())
    if state == "running":
        return phase if phase not in (None, "starting") else "starting: reading the recipe and the data"
    return phase or state


# --------------------------------------------------------------------------- the runs table

def recipe_of(run_dir: Path) -> dict:
    """recipe.yaml as a dict (launch.yaml before the run has written it); {} when unreadable."""
    import yaml

    for name in ("recipe.yaml", LAUNCH_RECIPE):
        try:
            value = yaml.safe_load((run_dir / name).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        if isinstance(value, dict):
            return value
    return {}


def model_name(model) -> str:
    if isinstance(model, dict):
        return str(model.get("architecture") or "model")
    text = str(model or "")
    return Path(text).name if "/" in text and Path(text).is_absolute() else text


def run_row(roots: RunsRoot, name: str) -> dict:
    """One row of the runs table (also the JSON the table refreshes from)."""
    run_dir = roots.path(name)
    metrics = read_json(run_dir / "metrics.json") or {}
    recipe = recipe_of(run_dir)
    state = run_state(run_dir)
    primary = metrics.get("primary_metric")
    test = (metrics.get("test") or {}).get(primary) if primary else None
    guards = metrics.get("guards") or {}
    timing = metrics.get("timing") or {}
    stamp_file = next((run_dir / f for f in ("metrics.json", "recipe.yaml", LAUNCH_RECIPE, PID_FILE) if (run_dir / f).exists()), run_dir)
    started = datetime.fromtimestamp(stamp_file.stat().st_mtime, tz=timezone.utc)
    return {
        "name": name,
        "task": metrics.get("task") or recipe.get("task") or "",
        "model": model_name((metrics.get("run") or {}).get("model") or recipe.get("model")),
        "method": (metrics.get("run") or {}).get("method") or recipe.get("method") or "",
        "metric": primary or "",
        "test": test if isinstance(test, (int, float)) else None,
        "guards": {g: str((guards.get(g) or {}).get("status") or "—") for g in GUARDS},
        "train_seconds": timing.get("train_seconds"),
        "date": started.strftime("%Y-%m-%d %H:%M"),
        "state": state,
        "phase": current_phase(run_dir, state),
    }


def all_rows(roots: RunsRoot) -> list[dict]:
    rows = []
    for name in roots.names():
        try:
            rows.append(run_row(roots, name))
        except (UnknownRun, OSError):  # removed while we looked
            continue
    return rows


def progress(run_dir: Path, start: int = 0) -> dict:
    """What the live view needs: the state, the phase, the history records from `start` on."""
    state = run_state(run_dir)
    records = read_history(run_dir, start)
    last = records[-1] if records else None
    return {"state": state, "phase": current_phase(run_dir, state), "records": records,
            "samples_per_s": last.get("samples_per_s") if last else None}
