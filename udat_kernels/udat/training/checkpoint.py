"""Atomic checkpoint files: a crash at any moment leaves either the old file or the new one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["atomic_save", "atomic_write_text", "atomic_write_json", "load_checkpoint"]


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers never see a partial file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    _atomic_replace(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path) -> None:
    _atomic_replace(Path(path), lambda f: f.write(text.encode()))


def atomic_write_json(obj, path) -> None:
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
