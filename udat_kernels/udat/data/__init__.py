"""Data sets as in-memory domains: FER2013, RAF-DB, the offline digit pair, image folders.

`load_domain(name, root, size)` returns a `Domain` (train and test `ImageSet`s of uint8 images
resized to size×size, canonical labels), `load_domains(data, size)` the source and target of a
`DataConfig`, and `to_input` turns a batch into model input.
"""

from __future__ import annotations

from .classes import EXPRESSIONS
from .digits import load_digits, load_mnist5k
from .fer2013 import load_fer2013
from .folder import load_folder
from .imageset import DataFormatError, Domain, ImageSet
from .rafdb import load_rafdb
from .transforms import to_input

__all__ = ["DOMAINS", "load_domain", "load_domains", "training_counts", "Domain", "ImageSet", "DataFormatError", "EXPRESSIONS",
           "to_input", "load_fer2013", "load_rafdb", "load_mnist5k", "load_digits",
           "load_folder"]

DOMAINS = ("mnist5k", "digits", "fer2013", "rafdb", "folder")


def load_domain(name: str, root=None, size: int = 32, **options) -> Domain:
    """Load domain `name` from `root` (needed for fer2013, rafdb and folder), resized to `size`.

    options: fer2013 `test_usage` ("PrivateTest" or "PublicTest"); folder `gray`, `flip`.
    """
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; choose from {', '.join(DOMAINS)}")
    if name in ("fer2013", "rafdb", "folder") and root is None:
        raise ValueError(f"domain {name!r} needs a root (the folder holding the data)")
    loader = {"mnist5k": load_mnist5k, "digits": load_digits, "fer2013": load_fer2013,
              "rafdb": load_rafdb, "folder": load_folder}[name]
    return loader(root, size=size, **options)


def load_domains(data, size: int) -> tuple[Domain, Domain]:
    """(source, target) of a `DataConfig`, resized to `size` (the model's input side)."""
    options = {"fer2013": {"test_usage": data.fer_test}}
    source = load_domain(data.source, data.source_root, size, **options.get(data.source, {}))
    target = load_domain(data.target, data.target_root, size, **options.get(data.target, {}))
    return source, target


def training_counts(name: str, root=None) -> tuple[int, int] | None:
    """(training images, classes) of a domain from its metadata alone — file names and the
    RAF-DB label list, no image is read — or None where only reading the data tells (FER2013,
    a CSV in mnist5k's layout). Used to reject a bad validation split before loading."""
    import math
    from pathlib import Path

    if name == "mnist5k" and root is None:
        return 4000, 10  # 5,000 digits, 80 % for training
    if name == "digits":
        return 1797 - math.ceil(0.2 * 1797), 10
    if name == "rafdb" and root is not None:
        from .rafdb import LABEL_FILE

        path = Path(root) / LABEL_FILE
        if not path.is_file():
            return None
        rows = [line.split() for line in path.read_text(errors="replace").splitlines()]
        labels = [r[1] for r in rows if len(r) == 2 and r[0].startswith("train_")]
        return len(labels), len(set(labels))
    if name == "folder" and root is not None:
        root = Path(root)
        if not root.is_dir():
            return None
        split = (root / "train").is_dir() and (root / "test").is_dir()
        base = root / "train" if split else root
        counts = [sum(1 for f in d.iterdir() if f.is_file()) for d in sorted(base.iterdir())
                  if d.is_dir() and not d.name.startswith(".")]
        total = sum(counts)
        return (total if split else total - math.ceil(0.2 * total)), len(counts)
    return None
