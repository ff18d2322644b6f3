"""Data loaders on small files in the real layouts, the label mapping, the batch pipeline."""

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from udat_kernels.udat.data import (EXPRESSIONS, DataFormatError, load_digits, load_domain,
                                    load_fer2013, load_folder, load_mnist5k, load_rafdb,
                                    to_input)
from udat_kernels.udat.data.classes import RAFDB_TO_CANONICAL, folder_classes

FER_ROWS = [(0, "Training"), (3, "Training"), (6, "Training"), (5, "PublicTest"),
            (2, "PrivateTest"), (1, "PrivateTest")]


def write_fer(path, rows=FER_ROWS, header="emotion,pixels,Usage", pixels=None):
    lines = [header]
    for i, (emotion, usage) in enumerate(rows):
        values = pixels if pixels is not None else " ".join(str((i * 7 + k) % 256)
                                                            for k in range(48 * 48))
        lines.append(f"{emotion},{values},{usage}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("header", ["emotion,pixels,Usage", "emotion, pixels, Usage"])
def test_fer2013_both_headers(tmp_path, header):
    write_fer(tmp_path / "fer2013.csv", header=header)
    domain = load_fer2013(tmp_path, size=32)
    assert domain.classes == EXPRESSIONS
    assert domain.train.images.shape == (3, 1, 32, 32)
    assert domain.train.labels.tolist() == [0, 3, 6]  # FER order is the canonical order
    assert domain.test.labels.tolist() == [2, 1]  # PrivateTest by default
    assert load_fer2013(tmp_path / "fer2013.csv", 48, "PublicTest").test.labels.tolist() == [5]


def test_fer2013_pixels_kept_at_native_size(tmp_path):
    write_fer(tmp_path / "fer2013.csv")
    image = load_fer2013(tmp_path, size=48).train.images[1, 0]
    assert image.flatten()[:3].tolist() == [7, 8, 9]


@pytest.mark.parametrize("rows,pixels,match", [
    ([(0, "Training")], "1 2 3", "line 2: pixels has 3 values"),
    ([(0, "Training"), (7, "Training")], None, "line 3: unknown emotion label '7'"),
    ([(0, "Validation")], None, "line 2: unknown Usage"),
    ([(0, "Training")], " ".join(["300"] * 2304), "line 2: .*outside 0..255"),
])
def test_fer2013_corrupt_rows_name_file_and_line(tmp_path, rows, pixels, match):
    path = write_fer(tmp_path / "fer2013.csv", rows=rows, pixels=pixels)
    with pytest.raises(DataFormatError, match=match) as info:
        load_fer2013(path, size=48)
    assert str(path) in str(info.value)


def write_rafdb(root, entries, skip_image=None):
    (root / "EmoLabel").mkdir(parents=True)
    (root / "Image" / "aligned").mkdir(parents=True)
    lines = []
    for i, (name, label) in enumerate(entries):
        lines.append(f"{name} {label}")
        if name != skip_image:
            rgb = np.full((100, 100, 3), (i * 40) % 256, dtype=np.uint8)
            Image.fromarray(rgb).save(root / "Image" / "aligned" /
                                      name.replace(".jpg", "_aligned.jpg"))
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")


def test_rafdb_layout_and_label_mapping(tmp_path):
    entries = [("train_00001.jpg", 1), ("train_00002.jpg", 6), ("train_00003.jpg", 7),
               ("test_0001.jpg", 4), ("test_0002.jpg", 3)]
    write_rafdb(tmp_path, entries)
    domain = load_rafdb(tmp_path, size=32)
    assert domain.train.images.shape == (3, 3, 32, 32) and domain.flip
    names = [EXPRESSIONS[i] for i in domain.train.labels.tolist()]
    assert names == ["surprise", "anger", "neutral"]
    assert [EXPRESSIONS[i] for i in domain.test.labels.tolist()] == ["happiness", "disgust"]


def test_rafdb_mapping_is_a_permutation():
    assert sorted(RAFDB_TO_CANONICAL.values()) == list(range(7))
    raf_names = ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
    for raf_label, name in enumerate(raf_names, start=1):
        assert EXPRESSIONS[RAFDB_TO_CANONICAL[raf_label]] == name


@pytest.mark.parametrize("entries,skip,match", [
    ([("train_00001.jpg", 1), ("train_00002.jpg", 8)], None, "line 2: unknown label '8'"),
    ([("train_00001.jpg", 1), ("train_00002.jpg", 2)], "train_00002.jpg",
     "line 2: cannot read image"),
    ([("val_00001.jpg", 1)], None, "line 1: .*neither train"),
])
def test_rafdb_corrupt_entries(tmp_path, entries, skip, match):
    write_rafdb(tmp_path, entries, skip_image=skip)
    with pytest.raises(DataFormatError, match=match) as info:
        load_rafdb(tmp_path, size=32)
    assert "list_patition_label.txt" in str(info.value)


def test_mnist5k_and_digits_fixed_stratified_splits():
    mnist = load_mnist5k(size=32)
    assert (len(mnist.train), len(mnist.test)) == (4000, 1000)
    assert mnist.train.labels.bincount().tolist() == [400] * 10
    assert mnist.train.images.shape[1:] == (1, 32, 32) and not mnist.flip
    digits = load_digits(size=32)
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.train.images.max() == 255
    again = load_digits(size=32)
    assert torch.equal(again.test.images, digits.test.images)  # the split never moves
    assert load_domain("digits", size=64).train.images.shape[-1] == 64


def test_digit_csv_corrupt_line(tmp_path):
    good = ",".join(["0"] * 784 + ["3"])
    path = tmp_path / "mnist.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(good + "\n" + ",".join(["0"] * 783 + ["3"]) + "\n")
    with pytest.raises(DataFormatError, match=r"mnist.csv.gz, line 2: 784 fields"):
        load_mnist5k(path)
    with gzip.open(path, "wt") as f:
        f.write(good + "\n" + ",".join(["0"] * 784 + ["12"]) + "\n")
    with pytest.raises(DataFormatError, match="line 2: unknown label"):
        load_mnist5k(path)


def write_folder(root, classes, per_class=5, bad=None):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((20, 24, 3), i * 30, np.uint8)).save(root / c / f"{i}.png")
    if bad:
        (root / classes[0] / bad).write_bytes(b"not an image")


def test_folder_expression_names_take_canonical_order(tmp_path):
    write_folder(tmp_path / "faces" / "train", ["sad", "Happy", "angry"])
    write_folder(tmp_path / "faces" / "test", ["sad", "Happy", "angry"], per_class=2)
    domain = load_folder(tmp_path / "faces", size=32)
    assert domain.classes == EXPRESSIONS
    assert sorted(set(domain.train.labels.tolist())) == [0, 3, 4]
    assert domain.train.images.shape == (15, 3, 32, 32) and len(domain.test) == 6


def test_folder_plain_names_and_split(tmp_path):
    write_folder(tmp_path / "cats", ["tabby", "siamese"])
    domain = load_folder(tmp_path / "cats", size=32, gray=True)
    assert domain.classes == ("siamese", "tabby")
    assert len(domain.train) == 8 and len(domain.test) == 2
    assert domain.train.images.shape[1] == 1
    assert folder_classes(["b", "a"]) == (("a", "b"), {"a": 0, "b": 1})


def test_folder_unreadable_image(tmp_path):
    write_folder(tmp_path / "d", ["x", "y"], bad="broken.png")
    with pytest.raises(DataFormatError, match="broken.png: cannot read image"):
        load_folder(tmp_path / "d", size=32)


def test_load_domain_arguments():
    with pytest.raises(ValueError, match="unknown domain"):
        load_domain("svhn")
    with pytest.raises(ValueError, match="needs a root"):
        load_domain("fer2013")


def test_to_input_pipeline():
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    plain = to_input(images)
    assert plain.shape == (6, 3, 32, 32) and plain.dtype == torch.float32
    assert torch.allclose(plain[:, 0], images[:, 0].float() / 127.5 - 1)
    a = to_input(images, generator=torch.Generator().manual_seed(3), flip=True)
    b = to_input(images, generator=torch.Generator().manual_seed(3), flip=True)
    assert torch.equal(a, b) and not torch.equal(a, plain)
