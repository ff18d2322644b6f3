"""Run files written atomically, read with clear errors.

A crash at any moment leaves either the old file or the new one: each file is written to a
temporary file in the same folder, flushed to disk, then renamed over the old one. A full disk
during a save leaves the old file in place and raises `DiskFullError` naming the file. Files get
the ordinary permissions of new files (0666 less the umask), not a temporary file's 0600.
Checkpoints are loaded with `weights_only=True` (tensors and plain containers only); one that is
empty, truncated or not a checkpoint raises `CheckpointError` naming the file, the cause and the
remedy.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["CheckpointError", "DiskFullError", "atomic_save", "atomic_write_text",
           "atomic_write_json", "append_line", "load_checkpoint", "file_mode"]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read."""


class DiskFullError(OSError):
    """No space left while writing a run file."""


def file_mode() -> int:
    """0666 less the process's umask: the mode `open()` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.0f} MiB free"
    except OSError:
        return "free space unknown"


def _disk_full(path: Path, error: OSError, kept: bool) -> DiskFullError:
    old = (f"the previous {path.name} is intact" if kept and path.exists()
           else f"{path.name} was not written")
    return DiskFullError(error.errno, f"cannot write {path}: no space left on device "
                                      f"({_free(path.parent)}); {old}. Free some space, then "
                                      f"rerun with --resume to continue")


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers never see a partial file
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            raise _disk_full(path, error, kept=True) from error
        # torch.save wraps the OSError of a failed write in a RuntimeError
        if isinstance(error, RuntimeError) and "No space left" in str(error):
            raise _disk_full(path, OSError(errno.ENOSPC, str(error)), kept=True) from error
        raise


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    _atomic_replace(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path) -> None:
    _atomic_replace(Path(path), lambda f: f.write(text.encode()))


def atomic_write_json(obj, path) -> None:
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def append_line(text: str, path) -> None:
    """Append one line to a log. A crash can tear the last line; readers of the log allow
    that (the trainer's resume drops a torn last line)."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(text + "\n")
    except OSError as error:
        if error.errno in _NO_SPACE:
            raise _disk_full(path, error, kept=False) from error
        raise


def load_checkpoint(path, remedy: str = "delete it, or start the run again with --overwrite"
                    ) -> dict:
    """A checkpoint written by `atomic_save`, read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot read checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (it was cut "
                              f"short, for example by a full disk or a copy that did not "
                              f"finish); {remedy}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a "
                              f"checkpoint ({type(error).__name__}: {cause}); {remedy}") \
            from None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot read checkpoint {path}: it holds a "
                              f"{type(state).__name__}, not a checkpoint; {remedy}")
    return state
