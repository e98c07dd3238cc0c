"""Progress display: a rich bar on a terminal, one line per evaluation otherwise (CI logs)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainingProgress:
    """Shows step, loss, the latest validation metric and samples/s."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self._progress = None
        self._task = None
        self._metric = ""
        self._sps = ""
        self._t0 = time.perf_counter()

    def start(self, stage: str, total: int, done: int = 0) -> None:
        self._t0 = time.perf_counter()
        if not self.live:
            if self.enabled:
                self.console.print(f"[dim]training ({stage}): {total} steps[/dim]")
            return
        self._progress = Progress(
            TextColumn(f"[bold]{stage}[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[metric]}"), TextColumn("{task.fields[sps]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(stage, total=total, completed=done, loss="-", metric="", sps="")

    def step(self, step: int, loss: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", metric=self._metric, sps=self._sps)

    def evaluation(self, record: dict, primary: str) -> None:
        value = record.get(f"val_{primary}")
        self._metric = f"val {primary} {value:.4f}" if value is not None else ""
        self._sps = f"{record['samples_per_s']:.1f} samples/s"
        if not self.live and self.enabled:
            self.console.print(
                f"step {record['step']:>6}  epoch {record['epoch']:<6} train_loss {record['train_loss']:.4f}  "
                f"val_loss {record.get('val_loss', float('nan')):.4f}  {self._metric}  {self._sps}"
            )

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def quiet() -> TrainingProgress:
    return TrainingProgress(Console(file=sys.stderr), enabled=False)


def say(enabled: bool, text: str) -> None:
    """One dim line on stderr for a phase that takes a while (a seed, a learning-curve point, a baseline)."""
    if enabled:
        Console(stderr=True, soft_wrap=True).print(f"[dim]{text}[/dim]")
