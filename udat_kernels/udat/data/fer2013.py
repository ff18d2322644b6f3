"""FER2013: one CSV, columns emotion, pixels (2304 space-separated ints, 48×48), Usage."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .classes import EXPRESSIONS, FER2013_TO_CANONICAL
from .imageset import DataFormatError, Domain, ImageSet, stack_images, to_uint8_square

__all__ = ["load_fer2013", "FER2013_USAGES"]

FER2013_USAGES = ("Training", "PublicTest", "PrivateTest")
_SIDE = 48


def _find_csv(root: Path) -> Path:
    if root.is_file():
        return root
    path = root / "fer2013.csv"
    if not path.is_file():
        raise FileNotFoundError(f"FER2013: no fer2013.csv under {root}")
    return path


def _parse_pixels(path: Path, line: int, text: str) -> np.ndarray:
    fields = text.split()
    if len(fields) != _SIDE * _SIDE:
        raise DataFormatError(path, line, f"pixels has {len(fields)} values, expected "
                                          f"{_SIDE * _SIDE}")
    try:
        values = np.array(fields, dtype=np.int32)
    except ValueError:
        raise DataFormatError(path, line, "pixels holds a value that is not an integer") from None
    if values.min() < 0 or values.max() > 255:
        raise DataFormatError(path, line, "pixels holds a value outside 0..255")
    return values.astype(np.uint8).reshape(_SIDE, _SIDE)


def read_fer2013(path: Path, size: int) -> dict[str, tuple[list, list]]:
    """Parse the CSV -> {usage: (images (1, size, size) uint8 arrays, canonical labels)}.

    The header may have leading spaces before the column names (a common re-export).
    """
    splits = {usage: ([], []) for usage in FER2013_USAGES}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(path, 1, "empty file")
        columns = [name.strip().lower() for name in header]
        try:
            col = {name: columns.index(name) for name in ("emotion", "pixels", "usage")}
        except ValueError:
            raise DataFormatError(path, 1, f"header {header} lacks emotion, pixels, Usage") \
                from None
        for line, row in enumerate(reader, start=2):
            if len(row) != len(columns):
                raise DataFormatError(path, line, f"{len(row)} fields, expected {len(columns)}")
            emotion, usage = row[col["emotion"]].strip(), row[col["usage"]].strip()
            if not emotion.isdigit() or int(emotion) not in FER2013_TO_CANONICAL:
                raise DataFormatError(path, line, f"unknown emotion label {emotion!r}")
            if usage not in splits:
                raise DataFormatError(path, line, f"unknown Usage {usage!r}")
            pixels = _parse_pixels(path, line, row[col["pixels"]])
            image = to_uint8_square(Image.fromarray(pixels), size, gray=True)
            splits[usage][0].append(image)
            splits[usage][1].append(FER2013_TO_CANONICAL[int(emotion)])
    return splits


def load_fer2013(root, size: int = 224, test_usage: str = "PrivateTest") -> Domain:
    """FER2013 from `root` (the CSV or its folder): train = Training, test = `test_usage`."""
    if test_usage not in ("PublicTest", "PrivateTest"):
        raise ValueError(f"test_usage must be 'PublicTest' or 'PrivateTest', got {test_usage!r}")
    path = _find_csv(Path(root))
    splits = read_fer2013(path, size)

    def image_set(usage):
        images, labels = splits[usage]
        return ImageSet(stack_images(images), torch.tensor(labels, dtype=torch.int64), EXPRESSIONS)

    return Domain("fer2013", image_set("Training"), image_set(test_usage), flip=True)

