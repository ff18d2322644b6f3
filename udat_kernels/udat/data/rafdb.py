"""RAF-DB basic: `EmoLabel/list_patition_label.txt` ("train_00001.jpg 5" per line) and the aligned
images `Image/aligned/train_00001_aligned.jpg`; labels 1..7 = Surprise, Fear, Disgust, Happiness,
Sadness, Anger, Neutral."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .classes import EXPRESSIONS, RAFDB_TO_CANONICAL
from .imageset import DataFormatError, Domain, ImageSet, stack_images, to_uint8_square

__all__ = ["load_rafdb"]

LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"  # sic: the data set's spelling
IMAGE_DIR = Path("Image") / "aligned"


def load_rafdb(root, size: int = 224) -> Domain:
    """RAF-DB basic from its root folder; train_* and test_* images form the two splits."""
    root = Path(root)
    label_path = root / LABEL_FILE
    if not label_path.is_file():
        raise FileNotFoundError(f"RAF-DB: no {LABEL_FILE} under {root}")
    splits = {"train": ([], []), "test": ([], [])}
    with open(label_path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            fields = text.split()
            if len(fields) != 2:
                raise DataFormatError(label_path, line, f"expected 'name label', got {text!r}")
            name, label = fields
            if not label.isdigit() or int(label) not in RAFDB_TO_CANONICAL:
                raise DataFormatError(label_path, line, f"unknown label {label!r}")
            split = name.split("_", 1)[0]
            if split not in splits:
                raise DataFormatError(label_path, line, f"{name!r} is neither train_* nor test_*")
            stem = name.rsplit(".", 1)[0]
            image_path = root / IMAGE_DIR / f"{stem}_aligned.jpg"
            try:
                with Image.open(image_path) as image:
                    array = to_uint8_square(image, size, gray=False)
            except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
                raise DataFormatError(label_path, line,
                                      f"cannot read image {image_path}: {error}") from None
            splits[split][0].append(array)
            splits[split][1].append(RAFDB_TO_CANONICAL[int(label)])

    def image_set(split):
        images, labels = splits[split]
        return ImageSet(stack_images(images), torch.tensor(labels, dtype=torch.int64),
                        EXPRESSIONS)

    return Domain("rafdb", image_set("train"), image_set("test"), flip=True)
