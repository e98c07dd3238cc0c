"""Kill a training process and resume it: the result must equal an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reliability.harness import assert_same_result

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def honed(*args, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "honed", *map(str, args)], env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "checkpoints" / "model.LATEST").exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before its first checkpoint: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture
def resume_recipe(recipe_factory):
    # fp32 on CPU so the comparison can be bit-for-bit; dropout on, so RNG restoration matters
    return recipe_factory(**{"train.epochs": 4, "train.eval_every": 4, "train.precision": "fp32"})


@pytest.mark.slow  # a subprocess run killed and resumed: 45-100 s
def test_sigkill_after_first_checkpoint_then_resume_equals_uninterrupted(resume_recipe, tmp_path):
    reference = tmp_path / "uninterrupted"
    done = honed("run", resume_recipe, "--out", reference)
    assert done.wait(300) == 0, done.stderr.read()

    killed = tmp_path / "killed"
    # each checkpoint write is slowed down so the kill lands mid-training
    proc = honed("run", resume_recipe, "--out", killed, env={**ENV, "HONED_FAULT": "checkpoint-write:sleep=0.4"})
    wait_for_checkpoint(killed, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (killed / "metrics.json").exists(), "the kill must land before training finished"

    resumed = honed("run", resume_recipe, "--out", killed, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_result(reference, killed)
    history = [json.loads(x) for x in (killed / "history.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in history]
    assert steps == sorted(set(steps)), "history after resume has no gaps or repeats"


@pytest.mark.slow  # a subprocess run killed and resumed: 45-100 s
def test_sigterm_saves_a_checkpoint_and_prints_the_resume_command(resume_recipe, tmp_path):
    run_dir = tmp_path / "terminated"
    proc = honed("run", resume_recipe, "--out", run_dir, env={**ENV, "HONED_FAULT": "checkpoint-write:sleep=0.4"})
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert (run_dir / "checkpoints" / "model.LATEST").exists()
    assert not (run_dir / "metrics.json").exists()
    resumed = honed("run", resume_recipe, "--out", run_dir, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert (run_dir / "metrics.json").exists()


@pytest.mark.slow  # a subprocess run killed and resumed: 45-100 s
def test_resume_refuses_a_changed_recipe(resume_recipe, tmp_path):
    run_dir = tmp_path / "changed"
    proc = honed("run", resume_recipe, "--out", run_dir, env={**ENV, "HONED_FAULT": "checkpoint-write:sleep=0.4"})
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    again = honed("run", resume_recipe, "--out", run_dir, "--resume", "-s", "train.lr=0.5")
    _, err = again.communicate(timeout=120)
    assert again.returncode == 2 and "differs" in err
