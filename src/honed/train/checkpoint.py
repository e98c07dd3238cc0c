"""Checkpoints that survive a kill at any moment.

Each checkpoint is a folder written under a temporary name, fsynced, then renamed; a
pointer file (LATEST) written the same way names the newest complete one. A kill leaves
either the old pointer and old folder, or the new ones: never a partial checkpoint.

Two layouts share that commit. Plain (one process, DDP): rank 0 writes `weights.safetensors`
(with `buffers` and `best` where there are any), `state.pt` (optimizer, scheduler, every
process's RNG) and `state.json` (the loop's position). Sharded (FSDP): `sharded/` is a
torch.distributed.checkpoint folder that every process writes its own file into (rank 0 adds
`.metadata`) before rank 0 writes `state.pt` (scheduler, RNG) and `state.json` and commits.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import HonedError
from . import distributed
from ..fileio import fault, free_space, fsync_dir, fsync_file, write_advice, write_atomic, write_error_reason, write_failure, write_safetensors_atomic

POINTER = "LATEST"
SHARDS = "sharded"  # the torch.distributed.checkpoint folder of the sharded layout


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


class Checkpointer:
    """Saves and restores training state for one run directory, one pointer per training stage.

    Folder names are `<stage>-<step>-<ns>`; a folder being written is `.<name>.partial`. Only
    the folder the pointer names is ever read; the others (a partial one left by a kill, a
    complete one the pointer never reached, the previous one a kill kept from being removed)
    are swept away after the next successful save.
    """

    REQUIRED = ("state.json", "state.pt", "weights.safetensors")
    REQUIRED_SHARDED = ("state.json", "state.pt", f"{SHARDS}/.metadata")

    def __init__(self, root: Path):
        self.root = Path(root)

    def _pointer(self, stage: str) -> Path:
        return self.root / f"{stage}.{POINTER}"

    def save(self, stage: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, objects: dict,
             carry: dict[str, Path] | None = None) -> Path:
        """tensors: groups of tensors (weights, best weights) → safetensors; objects: optimizer, RNG → torch.save.

        carry: group name → a file of an earlier checkpoint to keep in this one (hard-linked where
        the filesystem allows, copied otherwise), e.g. the best weights, which then never need to
        be held in memory.
        """
        # a fresh name each time, so the folder the pointer names is never replaced in place
        name = f"{stage}-{step:08d}-{time.time_ns()}"
        tmp, previous = self._begin(name, stage)

        def write():
            for group, group_tensors in tensors.items():
                path = tmp / f"{group}.safetensors"
                save_file({k: v.detach().contiguous().cpu() for k, v in group_tensors.items()}, str(path))
                fsync_file(path)
            for group, source in (carry or {}).items():
                path = tmp / f"{group}.safetensors"
                try:
                    os.link(source, path)
                except OSError:
                    shutil.copyfile(source, path)
                    fsync_file(path)

        self._guarded(name, stage, previous, write)
        return self._commit(name, stage, previous, state, objects)

    def save_sharded(self, stage: str, step: int, write_shards, state: dict, objects: dict,
                     group: distributed.Group | None) -> Path | None:
        """The sharded layout: every process calls this; write_shards(folder) is collective (dcp.save).

        Rank 0 names the folder and, once every process's shard is written, commits it as save()
        does; returns the folder on rank 0, None elsewhere.
        """
        name = distributed.broadcast(f"{stage}-{step:08d}-{time.time_ns()}", group)
        main = group is None or group.main
        tmp, previous = self._begin(name, stage) if main else (self.root / f".{name}.partial", None)
        distributed.barrier(group)  # the folder exists before anyone writes into it
        self._guarded(name, stage, previous, lambda: write_shards(tmp / SHARDS))
        if not main:
            return None
        return self._commit(name, stage, previous, state, objects)

    def _begin(self, name: str, stage: str) -> tuple[Path, str | None]:
        tmp = self.root / f".{name}.partial"
        previous = self.latest_name(stage)
        self._guarded(name, stage, previous, lambda: self._fresh(tmp))
        return tmp, previous

    def _fresh(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def _guarded(self, name: str, stage: str, previous: str | None, action) -> None:
        """Run one step of a save; a full or failing disk becomes a one-line error and leaves no partial folder."""
        final, tmp = self.root / name, self.root / f".{name}.partial"
        try:
            action()
        except Exception as exc:
            reason = write_error_reason(exc)
            if reason is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            if self.latest_name(stage) != name:  # the pointer never reached it: it is not a checkpoint
                shutil.rmtree(final, ignore_errors=True)
            kept = f"the previous checkpoint ({previous}) is intact" if previous else "no earlier checkpoint was written"
            raise HonedError(
                f"checkpoint: could not write {final} ({reason}; {free_space(self.root)}); {kept}; {write_advice(reason)}"
            ) from None

    def _commit(self, name: str, stage: str, previous: str | None, state: dict, objects: dict) -> Path:
        """state.pt and state.json into the written folder, then the rename and the pointer."""
        final, tmp = self.root / name, self.root / f".{name}.partial"

        def commit():
            fault("checkpoint-write")
            torch.save(objects, tmp / "state.pt")
            fsync_file(tmp / "state.pt")
            with open(tmp / "state.json", "w") as fh:
                json.dump(state, fh, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(tmp)
            os.replace(tmp, final)
            fsync_dir(self.root)
            fault("checkpoint-commit")
            write_atomic(self._pointer(stage), json.dumps({"name": name}, indent=2))

        self._guarded(name, stage, previous, commit)
        self._sweep(stage, keep=name)
        return final

    def _sweep(self, stage: str, keep: str) -> None:
        """Remove this stage's folders other than `keep`: older checkpoints and leftovers of kills."""
        pattern = re.compile(rf"^\.?{re.escape(stage)}-\d{{8,}}-\d+(\.partial)?$")
        for entry in self.root.iterdir():
            if entry.name != keep and pattern.match(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def latest_name(self, stage: str) -> str | None:
        pointer = self._pointer(stage)
        if not pointer.exists():
            return None
        try:
            name = json.loads(pointer.read_text())["name"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None
        if not isinstance(name, str) or "/" in name or name.startswith(".") or name.endswith(".partial"):
            return None  # the pointer only ever names a complete folder beside it
        return name

    def exists(self, stage: str) -> bool:
        name = self.latest_name(stage)
        return name is not None and (self.root / name / "state.json").exists()

    def is_sharded(self, stage: str) -> bool:
        """True when the latest checkpoint has the sharded (FSDP, torch.distributed.checkpoint) layout."""
        name = self.latest_name(stage)
        return name is not None and (self.root / name / SHARDS / ".metadata").is_file()

    def shards(self, stage: str) -> Path:
        """The latest checkpoint's torch.distributed.checkpoint folder (sharded layout)."""
        return self.root / self.latest_name(stage) / SHARDS

    def group_file(self, stage: str, group: str) -> Path | None:
        """The latest checkpoint's file for one group of tensors, if it has one."""
        name = self.latest_name(stage)
        path = self.root / name / f"{group}.safetensors" if name is not None else None
        return path if path is not None and path.is_file() else None

    def load(self, stage: str, groups: tuple[str, ...] | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
        """The latest checkpoint: (tensor groups, state, objects); `groups` limits which tensor files are read.

        A sharded checkpoint has no tensor files here (read its shards with sharded.load_shards).
        """
        name = self.latest_name(stage)
        if name is None:
            raise HonedError(f"checkpoint: {self._pointer(stage)} is missing or names no checkpoint; "
                             "start the run again with --overwrite")
        folder = self.root / name
        required = self.REQUIRED_SHARDED if self.is_sharded(stage) else self.REQUIRED
        missing = [f for f in required if not (folder / f).is_file()]
        if missing:
            raise HonedError(f"checkpoint: {folder} is incomplete (no {', '.join(missing)}); it was changed outside honed; "
                             "start the run again with --overwrite")
        try:
            tensors = {p.stem: load_file(str(p)) for p in sorted(folder.glob("*.safetensors")) if groups is None or p.stem in groups}
            state = json.loads((folder / "state.json").read_text())
            # our own file, but still: weights_only refuses anything that would run code
            objects = torch.load(folder / "state.pt", weights_only=True)
        except Exception as exc:
            first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise HonedError(f"checkpoint: {folder} cannot be read ({type(exc).__name__}: {first}); it was damaged outside honed; "
                             "start the run again with --overwrite") from None
        return tensors, state, objects


class StateOnDisk(Mapping):
    """A state dict kept in a safetensors file and read tensor by tensor when asked for.

    The run keeps the pre-trained weights this way, so the model can be
    fine-tuned in place instead of beside a second full copy (the pre-trained state is needed
    again only for the guards and for extra fine-tunes: seeds, the learning curve, WiSE-FT).
    Tensors that share storage (tied embeddings) are written once and aliased.
    """

    def __init__(self, path: Path, aliases: dict[str, str], keys: list[str]):
        self.path, self.aliases, self._keys = Path(path), aliases, keys

    @classmethod
    def write(cls, state: dict[str, torch.Tensor], path: Path) -> "StateOnDisk":
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        first_by_storage: dict[tuple, str] = {}
        stored, aliases = {}, {}
        for key, tensor in state.items():
            where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
            if where in first_by_storage:
                aliases[key] = first_by_storage[where]
            else:
                first_by_storage[where] = key
                stored[key] = tensor.detach().contiguous().cpu()
        try:
            # written out now, not by the kernel's writeback in the middle of the training that follows
            write_safetensors_atomic(stored, path)
        except Exception as exc:
            if write_error_reason(exc) is None:
                raise
            raise HonedError(write_failure(path, exc)) from None
        return cls(path, aliases, list(state))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.aliases and key not in self._keys:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as fh:
            return fh.get_tensor(self.aliases.get(key, key))

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def load(self) -> dict[str, torch.Tensor]:
        """Every tensor at once (one file open), e.g. for load_state_dict."""
        with safe_open(str(self.path), framework="pt") as fh:
            return {key: fh.get_tensor(self.aliases.get(key, key)) for key in self._keys}

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
