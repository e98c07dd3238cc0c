"""The run's phases before and after training (reading data, loading the model, tokenising, the
feature pass, the guards): one line each with its time, so piped output (logs, CI, notebooks)
shows where a long start-up is; and, on Ctrl-C, which phase was cut short and what was kept."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import HonedError


class RunInterrupted(HonedError):
    """Ctrl-C outside the training loop: the message says what was kept and how to go on (exit 130)."""

    exit_code = 130


class Phases:
    """Times named phases; `enabled` prints one line per finished phase on stdout (stderr keeps the
    one-line error contract: a failing run's stderr is its error line only)."""

    def __init__(self, enabled: bool = True, on_phase=None):
        self.enabled = enabled
        self.on_phase = on_phase  # hooks.on_phase: (name, seconds)
        self.started = time.perf_counter()
        self.current: str | None = None
        self.seconds: dict[str, float] = {}
        self.run_dir: Path | None = None  # set once the run directory holds recipe.yaml and audit.json

    @contextmanager
    def phase(self, name: str, detail=None):
        """Time the block as phase `name`; detail() (e.g. '1,000,000 rows') is added to its line."""
        outer, self.current = self.current, name
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.current = outer
        took = time.perf_counter() - begun
        self.seconds[name] = self.seconds.get(name, 0.0) + took
        if self.on_phase is not None:
            self.on_phase(name, took)
        if self.enabled:
            extra = f" ({detail()})" if detail is not None else ""
            print(f"{name}: {took:.1f} s{extra}", file=sys.stdout, flush=True)

    def interrupted(self, command: str) -> RunInterrupted:
        """The error for a Ctrl-C in the current phase: what was kept, and the command that goes on."""
        where = f"while {self.current}" if self.current else "before training"
        after = f" after {time.perf_counter() - self.started:.0f} s"
        if self.run_dir is None:
            kept = ("nothing was written (no run directory yet); tokenised splits already done stay in the tokenisation cache, "
                    f"so running {command} again starts faster")
        elif (self.run_dir / "checkpoints").exists() and any((self.run_dir / "checkpoints").iterdir()):
            kept = f"{self.run_dir} keeps its checkpoints; resume with: {command} --resume"
        else:
            kept = f"{self.run_dir} holds recipe.yaml and audit.json but no checkpoint; start again with: {command} --overwrite"
        return RunInterrupted(f"interrupted {where}{after}: {kept}")
