"""The in-memory image set every loader returns, and the helpers the loaders share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = ["DataFormatError", "ImageSet", "Domain", "to_uint8_square", "stack_images",
           "stratified_split"]


class DataFormatError(ValueError):
    """A data file that does not have the expected format; the message names file and line."""

    def __init__(self, path, line: int | None, message: str):
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path, self.line = str(path), line


@dataclass
class ImageSet:
    """Images resized to a common square size, with their labels.

    images: (N, C, S, S) uint8, C = 1 (grayscale, expanded to 3 channels per batch) or 3.
    labels: (N,) int64 in [0, len(classes)).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be (N, C, S, S) uint8, got {tuple(self.images.shape)} "
                             f"{self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.classes)


@dataclass
class Domain:
    """One domain: its train and test sets, and how training batches may be augmented.

    flip: horizontal flips are label-preserving (faces yes, digits no).
    """

    name: str
    train: ImageSet
    test: ImageSet
    flip: bool

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes


def to_uint8_square(image: Image.Image, size: int, gray: bool) -> np.ndarray:
    """A PIL image -> (C, size, size) uint8, C = 1 when gray else 3 (bilinear resize)."""
    image = image.convert("L" if gray else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if gray else array.transpose(2, 0, 1)


def stack_images(arrays: list[np.ndarray]) -> torch.Tensor:
    """A list of (C, S, S) uint8 arrays -> (N, C, S, S); an empty list keeps C = 1 and S = 0."""
    if not arrays:
        return torch.zeros((0, 1, 0, 0), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays))


def stratified_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
    """Fixed stratified split -> (train_index, test_index), each sorted.

    The split depends only on the labels and `seed`, never on the training seed, so every run
    of an experiment sees the same test images.
    """
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed,
                                   stratify=labels)
    return np.sort(train), np.sort(test)
