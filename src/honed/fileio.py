"""Files that are either whole or absent, and failed writes in words.

A file is written under a temporary name (`<name>.partial`), fsynced, then renamed over the
old one, and the folder fsynced: a kill or a full disk leaves the old file or the new one,
never a torn one. A failed write becomes one line saying why (`write_error_reason`), how much
room is left (`free_space`) and what to do (`write_advice`).

`fault` is the write-fault hook of the reliability tests (HONED_FAULT).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

from .errors import HonedError

PARTIAL = ".partial"  # suffix of a file being written


# --------------------------------------------------------------------------- fsync and rename

def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable; a folder that cannot be opened (some filesystems) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` under a temporary name, fsync, rename over `path`, fsync the folder.

    A failure leaves `path` as it was, removes the temporary file and raises the OSError as
    it came: for writers that word the failure themselves (the checkpoint pointer). Others
    use write_text_atomic / write_json_atomic.
    """
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """write_atomic, with a failed write reported as one HonedError line (why, free space, what to do)."""
    path = Path(path)
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise HonedError(write_failure(path, exc)) from None


def write_json_atomic(path: Path, payload) -> None:
    """`payload` as indented JSON (anything else as str), written as write_text_atomic does."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def write_safetensors_atomic(state: dict, path: Path) -> None:
    """safetensors' save_file under a temporary name, fsync, rename; a failed write leaves
    nothing behind and raises OSError (safetensors reports a full disk as a SafetensorError
    naming the OS error); any other SafetensorError is raised as it came."""
    from safetensors.torch import save_file  # imports torch: deferred so text and JSON writers stay light

    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL)
    try:
        save_file(state, str(tmp))
        fsync_file(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


# --------------------------------------------------------------------------- failed writes in words

def write_error_reason(exc: BaseException) -> str | None:
    """What went wrong, in words, when `exc` is a failed write; None when it is something else.

    The writers fail in their own ways on a full disk: open/write raise OSError, safetensors a
    SafetensorError naming "(os error 28)", torch.save a RuntimeError from its zip writer
    ("unexpected pos ..."), which names no cause at all.
    """
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    text = str(exc)
    found = re.search(r"os error (\d+)", text)
    if found:
        return os.strerror(int(found.group(1)))
    if type(exc).__name__ == "SafetensorError" or (isinstance(exc, RuntimeError) and "inline_container" in text):
        first = text.splitlines()[0][:160] if text else type(exc).__name__
        return f"{type(exc).__name__}: {first}"
    return None


def write_advice(reason: str | None) -> str:
    """What to do about a failed write, for the end of its error message."""
    if reason in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)):
        return "free disk space and resume with --resume"
    return "fix the cause (disk space, permissions, the disk itself) and resume with --resume"


def free_space(path: Path) -> str:
    """How much room is left where `path` lives, for an error message: "812 MB free there"."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.0f} MB free there" if free < 2**30 else f"{free / 2**30:.1f} GB free there"


def write_failure(path: Path, exc: BaseException) -> str:
    """The one-line message for a failed write of `path`: "could not write P (why; room); what to do"."""
    reason = write_error_reason(exc)
    return f"could not write {path} ({reason}; {free_space(Path(path).parent)}); {write_advice(reason)}"


# --------------------------------------------------------------------------- the fault hook

_FAULT_HITS: dict[str, int] = {}  # passes through each point so far (after=N); the tests reset it


def fault(point: str) -> None:
    """Test hook for the reliability tests; does nothing unless HONED_FAULT is set.

    HONED_FAULT=<point>:<action>[:after=N][,<point>:<action>...], where action is sleep=S (a
    window for a kill) or ENOSPC / EIO / EDQUOT (raise that OSError, as a full or failing disk
    would). after=N lets the first N passes through the point go by. Points: checkpoint-write
    (weights written, the rest of the checkpoint not yet), checkpoint-commit (the checkpoint
    folder renamed into place, the pointer not yet moved to it), model-write (RUN_DIR/model's
    files written into its temporary folder, not yet renamed into place).
    """
    spec = os.environ.get("HONED_FAULT", "")
    if not spec:
        return
    for item in spec.split(","):
        name, *args = item.strip().split(":")
        if name != point:
            continue
        options = dict(a.split("=", 1) if "=" in a else (a, "") for a in args)
        hits = _FAULT_HITS[point] = _FAULT_HITS.get(point, 0) + 1
        if hits <= int(options.get("after", 0)):
            continue
        if "sleep" in options:
            time.sleep(float(options["sleep"]))
        for code_name in ("ENOSPC", "EIO", "EDQUOT"):
            if code_name in options:
                code = getattr(errno, code_name)
                raise OSError(code, os.strerror(code))
