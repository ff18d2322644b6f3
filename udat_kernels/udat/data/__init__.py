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

__all__ = ["DOMAINS", "load_domain", "load_domains", "Domain", "ImageSet", "DataFormatError", "EXPRESSIONS",
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
