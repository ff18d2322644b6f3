"""A plain image-folder domain: one folder per class, for anyone's own data.

`root/train/<class>/*` and `root/test/<class>/*` when both exist; otherwise `root/<class>/*`,
split once into a stratified 80/20 train/test with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .classes import folder_classes
from .imageset import (DataFormatError, Domain, ImageSet, stack_images, stratified_split,
                       to_uint8_square)

__all__ = ["load_folder"]

SPLIT_SEED = 0


def _class_dirs(root: Path) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"image folder {root} has no class folders")
    return names


def read_folder(root: Path, size: int, gray: bool, classes=None, mapping=None) -> ImageSet:
    """Every file under root/<class>/ is an image; one that Pillow cannot read is an error."""
    if classes is None:
        classes, mapping = folder_classes(_class_dirs(root))
    images, labels = [], []
    for folder in sorted(p.name for p in root.iterdir() if p.is_dir()):
        if folder not in mapping:
            raise DataFormatError(root / folder, None, "class folder not in the train classes")
        for path in sorted(p for p in (root / folder).iterdir() if p.is_file()):
            try:
                with Image.open(path) as image:
                    images.append(to_uint8_square(image, size, gray))
            except (UnidentifiedImageError, OSError) as error:
                raise DataFormatError(path, None, f"cannot read image: {error}") from None
            labels.append(mapping[folder])
    return ImageSet(stack_images(images), torch.tensor(labels, dtype=torch.int64), tuple(classes))


def load_folder(root, size: int = 224, gray: bool = False, flip: bool = True) -> Domain:
    """An image-folder domain; `flip` says whether horizontal flips preserve the labels."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    train_root, test_root = root / "train", root / "test"
    if train_root.is_dir() and test_root.is_dir():
        classes, mapping = folder_classes(_class_dirs(train_root))
        train = read_folder(train_root, size, gray, classes, mapping)
        test = read_folder(test_root, size, gray, classes, mapping)
    else:
        data = read_folder(root, size, gray)
        train_index, test_index = stratified_split(data.labels.numpy(), 0.2, SPLIT_SEED)
        train, test = data.subset(train_index), data.subset(test_index)
    return Domain(root.name, train, test, flip=flip)
