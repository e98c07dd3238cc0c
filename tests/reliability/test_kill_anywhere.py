"""Kill anywhere, lose nothing: SIGKILL `honed run` at 10 seeded random moments, resume each
time, and end with exactly the uninterrupted run's metrics and weights.

The kills, in a seeded random order:
- timed: a random moment in the process's training phase. The window is measured from the
  `training (model): N steps` line (after imports and set-up, whose length depends on how busy
  the machine is) and scaled to the steps still to go divided by the kills still to make, so
  the kills spread over the whole run instead of all landing in the first seconds;
- mid-write: HONED_FAULT=checkpoint-write:sleep=S holds a checkpoint write open (weights
  written, optimizer state and state.json not yet), and the kill lands while its `.partial`
  folder exists;
- mid-commit: HONED_FAULT=checkpoint-commit:sleep=S holds the moment between the rename of the
  finished folder and the move of the pointer; the kill leaves a complete folder the pointer
  never named, which a resume must ignore and the next save must sweep away;
- the last kill lands while RUN_DIR/model is being written (model-write): training is done,
  the resume skips it and writes the model again.

After every kill the pointer must name a complete, loadable checkpoint; every resume must pick
up from it (its first reported step is the checkpoint's step + eval_every) rather than from
scratch. HONED_KILL_SEED picks another schedule.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from reliability.harness import (
    EPOCHS,
    EVAL_EVERY,
    Honed,
    assert_checkpoint_sound,
    assert_same_result,
    checkpoint,
    history_steps,
    stray_checkpoint_folders,
)

KILLS = 10
SEED = int(os.environ.get("HONED_KILL_SEED", "7"))
HOLD = 5.0  # seconds a fault hook holds a write open; the kill comes within its first ~1.5 s, so it costs nothing
CONFIRM = 0.3


def _partials(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob(".model-*.partial")) if ckpt_dir.exists() else []


def _orphans(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders that the pointer does not name (yet)."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.exists():
        return []
    info = checkpoint(run_dir)
    named = info[0] if info else None
    return [p for p in sorted(ckpt_dir.glob("model-*")) if p.is_dir() and p.name != named]


def _held(proc: Honed, find, what: str) -> Path:
    """A folder `find()` keeps returning for CONFIRM seconds: the one a fault hook holds, not one
    an ordinary save passes through in milliseconds."""
    while True:
        seen = set(proc.wait_until(find, what))
        time.sleep(CONFIRM)
        still = [p for p in find() if p in seen]
        if still:
            return still[-1]


@pytest.mark.slow
def test_kill_anywhere_then_resume_equals_uninterrupted(recipe, reference, workspace):
    rng = random.Random(SEED)
    run_dir = workspace / "killed"
    ckpt_dir = run_dir / "checkpoints"
    kinds = ["write", "write", "commit"] + ["timed"] * (KILLS - 4)
    rng.shuffle(kinds)
    kinds.append("model-write")  # the last one: after training, while the model folder is written
    seconds_per_step = None
    total = None
    log = []

    for number, kind in enumerate(kinds, start=1):
        kills_left = KILLS - number + 1
        before = assert_checkpoint_sound(run_dir) if run_dir.exists() else None
        resumed_step = before[1]["step"] if before else 0
        fault = None
        skip = 0
        if kind in ("write", "commit"):
            # hold open a random one of the next few checkpoint writes, not always the first
            saves_left = (total - resumed_step) // EVAL_EVERY + 1 if total else 3  # + the end-of-training save
            skip = rng.randint(0, max(0, min(2, saves_left - 1)))
            fault = f"checkpoint-{kind}:sleep={HOLD}:after={skip}"
        elif kind == "model-write":
            fault = f"model-write:sleep={HOLD}"
        resume = (run_dir / "recipe.yaml").exists()
        # leftovers of earlier kills (swept at the next successful save) are not this attempt's
        stale = set(_partials(ckpt_dir)) | set(_orphans(run_dir))
        proc = Honed("run", recipe, "--out", run_dir, *(["--resume"] if resume else []), fault=fault)
        t0, total = proc.wait_until(proc.training_start, "the start of training")
        entry = {"kill": number, "kind": kind, "resumed_from": resumed_step}

        if kind == "timed":
            if seconds_per_step is None:  # first sight of this machine's speed: two evaluations in
                steps = proc.wait_until(lambda: len(proc.steps()) >= 2 and proc.steps(), "two evaluations")
                seconds_per_step = (steps[-1][0] - steps[0][0]) / (steps[-1][1] - steps[0][1])
                t0 = time.monotonic()
                resumed_step = steps[-1][1]
            window = (total - resumed_step) * seconds_per_step / kills_left
            delay = rng.uniform(0.05, 1.0) * window
            entry["delay_s"] = round(delay, 3)
            time.sleep(max(0.0, t0 + delay - time.monotonic()))
        elif kind == "write":
            partial = _held(proc, lambda: [p for p in _partials(ckpt_dir) if p not in stale], "a checkpoint write held open")
            time.sleep(rng.uniform(0.0, 1.0))
            assert partial.exists(), "the kill must land while the .partial folder exists"
        elif kind == "commit":
            orphan = _held(proc, lambda: [p for p in _orphans(run_dir) if p not in stale], "a renamed checkpoint the pointer does not name yet")
            time.sleep(rng.uniform(0.0, 1.0))
        else:
            proc.wait_until(lambda: (run_dir / "model.tmp").exists(), "the model folder to be written")
            time.sleep(rng.uniform(0.0, 1.0))

        finished_before_kill = not proc.alive()
        proc.kill()
        assert not finished_before_kill or proc.proc.returncode == 0, proc.stderr[-3000:]
        after = assert_checkpoint_sound(run_dir)  # never a partial checkpoint: the pointer names a complete one
        reported = proc.steps()
        if before is not None and not before[1]["done"] and reported:
            # the resume continued from the checkpoint, not from the start
            assert reported[0][1] == before[1]["step"] + EVAL_EVERY, (reported[:3], before[1]["step"])
        if len(reported) >= 2 and kind == "timed":
            seconds_per_step = (reported[-1][0] - reported[0][0]) / (reported[-1][1] - reported[0][1])
        done = bool(after and after[1]["done"])
        entry["landed"] = ("after training" if finished_before_kill or done else "mid-training")
        if kind == "write":
            assert partial.exists() and after[0] not in partial.name, "killed mid-write: the partial folder is left, unnamed"
            entry["landed"] += ", mid-write"
        if kind == "commit":
            assert orphan.exists() and after[0] != orphan.name, "killed before the pointer moved: the pointer names the older folder"
            entry["landed"] += ", between the renamed folder and the pointer"
        if kind == "model-write":
            assert done and not (run_dir / "metrics.json").exists()
            entry["landed"] += ", mid model write"
        if after is not None:
            per_epoch = total // EPOCHS
            state = after[1]
            entry["checkpoint"] = {"step": state["step"], "epoch": state["epoch"], "batch": state["batch"], "done": state["done"]}
            entry["mid_epoch"] = 0 < state["batch"] < per_epoch
        entry["seconds"] = round(time.monotonic() - proc.started, 1)
        log.append(entry)
        (workspace / "kill_log.json").write_text(json.dumps(log, indent=2))

    final = Honed("run", recipe, "--out", run_dir, "--resume")
    assert final.wait(300) == 0, final.stderr[-3000:]
    assert "Traceback" not in final.stderr

    mid_training = [e for e in log if e["landed"].startswith("mid-training")]
    mid_write = [e for e in log if "mid-write" in e["landed"]]
    mid_epoch = [e for e in log if e.get("mid_epoch")]
    summary = {"kills": len(log), "mid_training": len(mid_training), "mid_write": len(mid_write), "mid_epoch": len(mid_epoch),
               "seed": SEED}
    print(json.dumps(summary), *map(json.dumps, log), sep="\n")
    (workspace / "kill_log.json").write_text(json.dumps({"summary": summary, "kills": log}, indent=2))
    assert len(log) == KILLS
    assert len(mid_training) >= 8, log
    assert len(mid_write) >= 2, log
    assert mid_epoch, "at least one resume must start mid-epoch (state.json batch > 0)"

    assert_same_result(reference.path(), run_dir)
    steps = history_steps(run_dir)
    assert steps == list(range(EVAL_EVERY, steps[-1] + 1, EVAL_EVERY)), "history after the resumes has no gaps or repeats"
    assert stray_checkpoint_folders(run_dir) == [], "leftovers of the kills are swept away"
    assert not (run_dir / "model.tmp").exists()
