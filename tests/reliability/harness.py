"""Helpers for the reliability tests: `honed run` as a subprocess whose stderr is read as it
comes (for the moment training starts and the steps it reports), the one recipe they share,
and the checks that compare two run directories bit for bit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from honed.train.checkpoint import Checkpointer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("HONED_FAULT", None)

EPOCHS = 6
EVAL_EVERY = 3  # a checkpoint every 3 steps: 24 in a run, most of them mid-epoch
# fp32 on the CPU with a pinned thread count: the thread count decides the order of floating-point
# sums, so it is part of what makes a run repeatable (and 1 thread is fastest on a shared 2-core box)
RECIPE = {"train.epochs": EPOCHS, "train.eval_every": EVAL_EVERY, "train.precision": "fp32", "train.threads": 1,
          "guards.baseline": False}

TRAINING = re.compile(r"training \((\w+)\): (\d+) steps")
STEP = re.compile(r"^step\s+(\d+)\s")


class Honed:
    """`python -m honed ARGS` with stderr read line by line, each line stamped with its arrival time."""

    def __init__(self, *args, fault: str | None = None, env: dict | None = None):
        env = {**(env or ENV)}
        if fault:
            env["HONED_FAULT"] = fault
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "honed", *map(str, args)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL
        self.wait(30)

    def training_start(self) -> tuple[float, int] | None:
        """(arrival time, total steps) of the `training (model): N steps` line, once it has come."""
        for t, line in list(self.lines):
            found = TRAINING.search(line)
            if found:
                return t, int(found.group(2))
        return None

    def steps(self) -> list[tuple[float, int]]:
        return [(t, int(m.group(1))) for t, line in list(self.lines) if (m := STEP.match(line.strip()))]

    def wait_until(self, condition, what: str, timeout: float = 240, poll: float = 0.01):
        """Poll `condition()` until it is truthy; fail if the process ends first (with its stderr)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if not self.alive():
                value = condition()
                if value:
                    return value
                self.wait()
                raise AssertionError(f"honed ended (exit {self.proc.returncode}) while waiting for {what}:\n{self.stderr[-3000:]}")
            time.sleep(poll)
        self.kill()
        raise AssertionError(f"timed out waiting for {what}:\n{self.stderr[-3000:]}")


def checkpoint(run_dir: Path, stage: str = "model") -> tuple[str, dict] | None:
    """(folder name, state.json) of the checkpoint the pointer names; None before the first one."""
    ckpt = Checkpointer(run_dir / "checkpoints")
    name = ckpt.latest_name(stage)
    if name is None:
        return None
    return name, json.loads((run_dir / "checkpoints" / name / "state.json").read_text())


def assert_checkpoint_sound(run_dir: Path, stage: str = "model") -> tuple[str, dict] | None:
    """The pointer names a complete folder (never a .partial one) and Checkpointer.load reads it."""
    info = checkpoint(run_dir, stage)
    if info is None:
        return None
    name, state = info
    folder = run_dir / "checkpoints" / name
    assert not name.startswith(".") and not name.endswith(".partial"), name
    assert {"state.json", "state.pt", "weights.safetensors"} <= {p.name for p in folder.iterdir()}, sorted(folder.iterdir())
    tensors, loaded_state, objects = Checkpointer(run_dir / "checkpoints").load(stage)
    assert loaded_state == state and tensors["weights"] and {"optimizer", "scheduler", "rng"} <= objects.keys()
    return info


def stray_checkpoint_folders(run_dir: Path) -> list[str]:
    """Folders in checkpoints/ that no pointer names: leftovers of kills."""
    root = run_dir / "checkpoints"
    named = {Checkpointer(root).latest_name(p.name.rsplit(".", 1)[0]) for p in root.glob("*.LATEST")}
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in named)


def final_state(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    return metrics, weights


def figures(metrics: dict) -> dict:
    """metrics.json without what legitimately differs between two runs: timings and the run's own path."""
    out = {k: v for k, v in metrics.items() if k not in ("timing", "run")}
    out["run"] = {k: v for k, v in metrics["run"].items() if k != "run_dir"}
    return out


def assert_same_result(a: Path, b: Path) -> None:
    """metrics.json's test and validation figures, the best step, and every weight: equal bit for bit."""
    metrics_a, weights_a = final_state(a)
    metrics_b, weights_b = final_state(b)
    assert metrics_a["test"] == metrics_b["test"]
    assert metrics_a["validation"] == metrics_b["validation"]
    assert metrics_a["guards"]["overfitting"]["details"]["best_step"] == metrics_b["guards"]["overfitting"]["details"]["best_step"]
    assert weights_a.keys() == weights_b.keys()
    different = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def history_steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "history.jsonl").read_text().splitlines()]
