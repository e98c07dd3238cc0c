"""Disk full and write errors: a failed checkpoint or model write leaves the previous checkpoint
intact and loadable, prints one `error:` line (no traceback), exits non-zero, and a later
`--resume` finishes the run with the same result as an uninterrupted one.

Two kinds of injection:
- the HONED_FAULT hook raises OSError(ENOSPC) or OSError(EIO) at a named point
  (checkpoint-write, checkpoint-commit, model-write), as a full or failing disk would;
- a real failed write: the real writer (safetensors, torch.save, the pointer's JSON,
  transformers' save_pretrained) runs under RLIMIT_FSIZE=0, so the kernel refuses its writes
  (EFBIG) and each library fails in its own way: SafetensorError, a RuntimeError from torch's
  zip writer that names no cause, OSError. This is what catches a handler that only knows OSError.

The CLI runs in-process here (honed.cli.main, the `honed` entry point), so a wrapper can record
the weights of every checkpoint as it is saved.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal

import pytest
import torch

import honed.fileio as fileio
import honed.models.load as model_load
import honed.train.checkpoint as ckpt_mod
from honed.cli import main
from honed.errors import HonedError
from honed.train.checkpoint import Checkpointer
from reliability.harness import EVAL_EVERY, assert_checkpoint_sound, assert_same_result, stray_checkpoint_folders


@contextlib.contextmanager
def no_file_writes():
    """The kernel refuses every write that would grow a file (EFBIG), while inside the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def failing(real):
    def writer(*args, **kwargs):
        with no_file_writes():
            return real(*args, **kwargs)

    return writer


def invoke(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def the_error_line(err: str) -> str:
    """Progress lines may come before it; exactly one `error:` line, and it is the last line."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


@pytest.fixture
def no_fault(monkeypatch):
    monkeypatch.delenv("HONED_FAULT", raising=False)
    monkeypatch.setattr(fileio, "_FAULT_HITS", {})
    return monkeypatch


# --------------------------------------------------------------------------- the Checkpointer alone

def _tensors(value: float) -> dict:
    return {"weights": {"w": torch.full((64, 64), value), "b": torch.full((64,), value)}}


def _objects() -> dict:
    return {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 1}, "rng": ckpt_mod.rng_state()}


INJECTIONS = {
    "ENOSPC while writing": ("env", "checkpoint-write:ENOSPC", "No space left on device"),
    "EIO after the rename, before the pointer": ("env", "checkpoint-commit:EIO", "Input/output error"),
    "real failure in safetensors": ("patch", "save_file", "File too large"),
    "real failure in torch.save": ("patch", "torch.save", "RuntimeError"),
    "real failure writing the pointer": ("patch", "write_atomic", "File too large"),
}


@pytest.mark.parametrize("how", list(INJECTIONS))
def test_failed_checkpoint_write_keeps_the_previous_one(how, tmp_path, no_fault):
    kind, what, words = INJECTIONS[how]
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save("model", 3, _tensors(1.0), {"step": 3, "done": False}, _objects())
    first = ckpt.latest_name("model")

    if kind == "env":
        no_fault.setenv("HONED_FAULT", what)
    elif what == "torch.save":
        no_fault.setattr(torch, "save", failing(torch.save))
    else:
        no_fault.setattr(ckpt_mod, what, failing(getattr(ckpt_mod, what)))
    with pytest.raises(HonedError) as info:
        ckpt.save("model", 6, _tensors(2.0), {"step": 6, "done": False}, _objects())
    message = str(info.value)
    assert "\n" not in message and words in message, message
    assert message.startswith("checkpoint: could not write") and f"the previous checkpoint ({first}) is intact" in message
    assert "--resume" in message

    no_fault.undo()
    no_fault.setattr(fileio, "_FAULT_HITS", {})
    assert ckpt.latest_name("model") == first
    assert sorted(p.name for p in ckpt.root.iterdir()) == [first, "model.LATEST"], "no partial or orphan folder is left"
    tensors, state, _ = ckpt.load("model")
    assert state["step"] == 3 and all(torch.equal(tensors["weights"][k], v) for k, v in _tensors(1.0)["weights"].items())

    ckpt.save("model", 6, _tensors(2.0), {"step": 6, "done": False}, _objects())  # the disk is back
    assert ckpt.load("model")[1]["step"] == 6
    assert len([p for p in ckpt.root.iterdir() if p.is_dir()]) == 1


def test_a_failed_first_checkpoint_says_there_is_none(tmp_path, no_fault):
    no_fault.setenv("HONED_FAULT", "checkpoint-write:ENOSPC")
    ckpt = Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(HonedError, match="no earlier checkpoint was written"):
        ckpt.save("model", 3, _tensors(1.0), {"step": 3, "done": False}, _objects())
    assert not ckpt.exists("model") and [p.name for p in ckpt.root.iterdir()] == []


# --------------------------------------------------------------------------- through the CLI

@pytest.mark.parametrize("code", ["ENOSPC", "EIO"])
def test_checkpoint_write_fault_in_a_run_then_resume(code, recipe, reference, tmp_path, capsys, no_fault):
    saved = []  # the weights of every checkpoint that was written, as it was written
    real_save = Checkpointer.save

    def recording_save(self, stage, step, tensors, state, objects, carry=None):
        path = real_save(self, stage, step, tensors, state, objects, carry)
        saved.append((path.name, {k: v.detach().clone() for k, v in tensors["weights"].items()}))
        return path

    no_fault.setattr(Checkpointer, "save", recording_save)
    no_fault.setenv("HONED_FAULT", f"checkpoint-write:{code}:after=3")
    run_dir = tmp_path / "run"
    exit_code, err = invoke(["run", recipe, "--out", run_dir], capsys)
    line = the_error_line(err)
    assert exit_code == 1, err
    reason = os.strerror(getattr(errno, code))
    assert line.startswith("error: checkpoint: could not write") and reason in line, line
    assert f"the previous checkpoint ({saved[-1][0]}) is intact" in line and "--resume" in line, line

    assert len(saved) == 3 and not (run_dir / "metrics.json").exists()
    name, state = assert_checkpoint_sound(run_dir)
    assert name == saved[-1][0] and state["step"] == 3 * EVAL_EVERY
    weights = Checkpointer(run_dir / "checkpoints").load("model")[0]["weights"]
    assert all(torch.equal(weights[k], v) for k, v in saved[-1][1].items()), "the previous checkpoint's weights are unchanged"
    assert stray_checkpoint_folders(run_dir) == []

    no_fault.delenv("HONED_FAULT")
    exit_code, err = invoke(["run", recipe, "--out", run_dir, "--resume"], capsys)
    assert exit_code == 0, err
    assert_same_result(reference.path(), run_dir)


MODEL_FAULTS = {
    "ENOSPC (hook)": ("env", "model-write:ENOSPC", "No space left on device"),
    "real failure in save_pretrained": ("patch", "hf", "File too large"),
}


@pytest.mark.parametrize("how", list(MODEL_FAULTS))
def test_model_write_fault_then_resume(how, recipe, reference, tmp_path, capsys, no_fault):
    kind, what, words = MODEL_FAULTS[how]
    if kind == "env":
        no_fault.setenv("HONED_FAULT", what)
    else:
        family = dict(model_load.FAMILIES[what])
        family["save"] = failing(family["save"])
        no_fault.setitem(model_load.FAMILIES, what, family)
    run_dir = tmp_path / "run"
    exit_code, err = invoke(["run", recipe, "--out", run_dir], capsys)
    line = the_error_line(err)
    assert exit_code == 1, err
    assert line.startswith(f"error: model: could not write {run_dir / 'model'}") and words in line, line
    assert "the training checkpoint is intact" in line and "--resume" in line, line
    assert not (run_dir / "model").exists() and not (run_dir / "model.tmp").exists()
    assert not (run_dir / "metrics.json").exists()
    assert assert_checkpoint_sound(run_dir)[1]["done"]

    no_fault.undo()
    exit_code, err = invoke(["run", recipe, "--out", run_dir, "--resume"], capsys)
    assert exit_code == 0, err
    assert_same_result(reference.path(), run_dir)
