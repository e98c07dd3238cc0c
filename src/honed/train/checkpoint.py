"""Checkpoints that survive a kill at any moment.

Each checkpoint is a folder written under a temporary name, fsynced, then renamed; a
pointer file (LATEST) written the same way names the newest complete one. A kill leaves
either the old pointer and old folder, or the new ones: never a partial checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import HonedError

POINTER = "LATEST"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_json_atomic(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fault(point: str) -> None:
    """Test hook: HONED_FAULT=<point>[:seconds] sleeps there (a window for a kill) or raises an OSError."""
    spec = os.environ.get("HONED_FAULT", "")
    if not spec:
        return
    name, _, arg = spec.partition(":")
    if name != point:
        return
    if arg.startswith("sleep="):
        import time

        time.sleep(float(arg[6:]))
    elif arg in ("ENOSPC", "EIO"):
        import errno

        code = getattr(errno, arg)
        raise OSError(code, os.strerror(code))


class Checkpointer:
    """Saves and restores training state for one run directory, one pointer per training stage."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _pointer(self, stage: str) -> Path:
        return self.root / f"{stage}.{POINTER}"

    def save(self, stage: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, objects: dict) -> Path:
        """tensors: groups of tensors (weights, best weights) → safetensors; objects: optimizer, RNG → torch.save."""
        self.root.mkdir(parents=True, exist_ok=True)
        # a fresh name each time, so the folder the pointer names is never replaced in place
        name = f"{stage}-{step:08d}-{time.time_ns()}"
        final = self.root / name
        tmp = self.root / f".{name}.partial"
        previous = self.latest_name(stage)
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            for group, group_tensors in tensors.items():
                path = tmp / f"{group}.safetensors"
                save_file({k: v.detach().contiguous().cpu() for k, v in group_tensors.items()}, str(path))
                _fsync_file(path)
            _fault("checkpoint-write")
            torch.save(objects, tmp / "state.pt")
            _fsync_file(tmp / "state.pt")
            with open(tmp / "state.json", "w") as fh:
                json.dump(state, fh, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            write_json_atomic(self._pointer(stage), {"name": name})
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise HonedError(
                f"checkpoint: could not write {final} ({exc.strerror or exc}); the previous checkpoint is intact; "
                "free disk space and resume with --resume"
            ) from None
        if previous and previous != name:
            shutil.rmtree(self.root / previous, ignore_errors=True)
        return final

    def latest_name(self, stage: str) -> str | None:
        pointer = self._pointer(stage)
        if not pointer.exists():
            return None
        try:
            return json.loads(pointer.read_text())["name"]
        except (json.JSONDecodeError, KeyError):
            return None

    def exists(self, stage: str) -> bool:
        name = self.latest_name(stage)
        return name is not None and (self.root / name / "state.json").exists()

    def load(self, stage: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
        folder = self.root / self.latest_name(stage)
        tensors = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}
        state = json.loads((folder / "state.json").read_text())
        # our own file, but still: weights_only refuses anything that would run code
        objects = torch.load(folder / "state.pt", weights_only=True)
        return tensors, state, objects
