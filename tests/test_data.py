"""Tests for genfl_shared.data: IDX loading from the supported layouts, errors, preprocessing."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

from genfl_shared.data import (
    DATASETS,
    DataFormatError,
    DatasetMismatchError,
    DatasetNotFoundError,
    dataset_digest,
    load_dataset,
    to_float_images,
)

pytestmark = pytest.mark.unit

TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="module")
def mnist_test(data_root):
    """MNIST test split as loaded from the shipped .gz files (the reference for layout tests)."""
    return load_dataset("mnist", data_root("mnist"), split="test")


def _copy_test_split(src_dir, dst_dir, decompress):
    """Copy the (small) test split into dst_dir, gunzipped or as is."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in TEST_FILES:
        if decompress:
            with gzip.open(src_dir / f"{name}.gz", "rb") as src, open(dst_dir / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(src_dir / f"{name}.gz", dst_dir / f"{name}.gz")


@pytest.mark.parametrize(
    "dataset, split, n, first_labels",
    [
        ("mnist", "train", 60000, [5, 0, 4, 1, 9]),
        ("mnist", "test", 10000, [7, 2, 1, 0, 4]),
        ("fmnist", "train", 60000, [9, 0, 0, 3, 0]),
        ("fmnist", "test", 10000, [9, 2, 1, 1, 6]),
    ],
)
def test_load_real_data(data_root, dataset, split, n, first_labels):
    images, labels = load_dataset(dataset, data_root(dataset), split=split)
    assert images.dtype == torch.uint8 and images.shape == (n, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (n,)
    assert labels[:5].tolist() == first_labels
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert images.max() == 255 and images.min() == 0


def test_plain_idx_files(tmp_path, data_root, mnist_test):
    _copy_test_split(data_root("mnist"), tmp_path, decompress=True)
    images, labels = load_dataset("mnist", tmp_path, split="test")
    assert torch.equal(images, mnist_test[0]) and torch.equal(labels, mnist_test[1])


@pytest.mark.parametrize("decompress", [True, False], ids=["plain", "gz"])
def test_torchvision_layout(tmp_path, data_root, mnist_test, decompress):
    _copy_test_split(data_root("mnist"), tmp_path / "MNIST" / "raw", decompress=decompress)
    images, labels = load_dataset("mnist", tmp_path, split="test")
    assert torch.equal(images, mnist_test[0]) and torch.equal(labels, mnist_test[1])


def test_torchvision_layout_fashion(tmp_path, data_root):
    _copy_test_split(data_root("fmnist"), tmp_path / "FashionMNIST" / "raw", decompress=False)
    _, labels = load_dataset("fmnist", tmp_path, split="test")
    assert labels[:3].tolist() == [9, 2, 1]


def test_folder_of_datasets(data_root):
    # The shared data folder holds mnist/ and fashion-mnist/ side by side.
    _, labels = load_dataset("fmnist", data_root("fmnist").parent, split="test")
    assert labels[:3].tolist() == [9, 2, 1]


def test_missing_dataset_error(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fmnist", tmp_path / "nowhere", split="train")
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "--download" in message
    assert str(tmp_path / "nowhere" / "FashionMNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message


def test_images_without_labels_is_missing(tmp_path, data_root):
    _copy_test_split(data_root("mnist"), tmp_path, decompress=False)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", tmp_path, split="test")


def _write_idx(path, magic, dims, payload):
    header = bytes(magic) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    path.write_bytes(header + payload)


@pytest.mark.parametrize(
    "corruption, expected",
    [
        ("bad_magic", "magic"),
        ("truncated", "bytes of data"),
        ("bad_gzip", "gzip"),
        ("count_mismatch", "labels"),
        ("bad_label", "outside"),
    ],
)
def test_corrupt_files(tmp_path, corruption, expected):
    images = np.zeros((3, 28, 28), np.uint8).tobytes()
    labels = bytes([1, 2, 3])
    img_path, lab_path = tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte"
    _write_idx(img_path, [0, 0, 8, 3], [3, 28, 28], images)
    _write_idx(lab_path, [0, 0, 8, 1], [3], labels)
    # Hand-made files are not the official ones: only verify=False parses them.
    load_dataset("mnist", tmp_path, split="test", verify=False)  # the uncorrupted files load

    if corruption == "bad_magic":
        _write_idx(img_path, [0, 0, 9, 3], [3, 28, 28], images)
    elif corruption == "truncated":
        _write_idx(img_path, [0, 0, 8, 3], [3, 28, 28], images[:-10])
    elif corruption == "bad_gzip":
        img_path.unlink()
        (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images)[:-20])
    elif corruption == "count_mismatch":
        _write_idx(lab_path, [0, 0, 8, 1], [2], labels[:2])
    elif corruption == "bad_label":
        _write_idx(lab_path, [0, 0, 8, 1], [3], bytes([1, 2, 10]))
    with pytest.raises(DataFormatError, match=expected) as info:
        load_dataset("mnist", tmp_path, split="test", verify=False)
    assert str(tmp_path) in str(info.value)  # the message names the offending file


def test_hand_made_files_are_not_the_official_dataset(tmp_path):
    labels = bytes([1, 2, 3])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", [0, 0, 8, 3], [3, 28, 28], bytes(3 * 28 * 28))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", [0, 0, 8, 1], [3], labels)
    with pytest.raises(DatasetMismatchError, match="is not the MNIST test images file") as info:
        load_dataset("mnist", tmp_path, split="test")
    assert str(tmp_path / "t10k-images-idx3-ubyte") in str(info.value)
    assert "2646ac647ad5339dbf082846283269ea" in str(info.value)  # the official file's MD5


@pytest.mark.parametrize("decompress", [True, False], ids=["plain", "gz"])
def test_other_dataset_is_refused_and_named(tmp_path, data_root, decompress):
    _copy_test_split(data_root("mnist"), tmp_path, decompress=decompress)
    with pytest.raises(DatasetMismatchError, match="these are MNIST files, not Fashion-MNIST"):
        load_dataset("fmnist", tmp_path, split="test")
    # The same files are accepted as what they are.
    assert len(load_dataset("mnist", tmp_path, split="test")[1]) == 10000


def test_other_split_is_refused_and_named(tmp_path, data_root):
    # Test files renamed to look like the train split: right dataset, wrong split.
    for name in TEST_FILES:
        shutil.copy(data_root("fmnist") / f"{name}.gz", tmp_path / f"{name.replace('t10k', 'train')}.gz")
    with pytest.raises(DatasetMismatchError,
                       match="holds the Fashion-MNIST test images, not the Fashion-MNIST train images"):
        load_dataset("fmnist", tmp_path, split="train")


def test_one_changed_pixel_is_refused(tmp_path, data_root):
    _copy_test_split(data_root("mnist"), tmp_path, decompress=True)
    images = tmp_path / "t10k-images-idx3-ubyte"
    data = bytearray(images.read_bytes())
    data[16 + 14 * 28 + 14] ^= 0xFF  # one pixel of the first image
    images.write_bytes(bytes(data))
    with pytest.raises(DatasetMismatchError, match="is not the MNIST test images file"):
        load_dataset("mnist", tmp_path, split="test")


def test_download_uses_torchvision(tmp_path, monkeypatch, data_root):
    """download=True goes through torchvision (faked here: tests never touch the network)."""
    import torchvision.datasets

    src = data_root("mnist")
    calls = []

    def fake_mnist(root, train, download):
        calls.append((root, train, download))
        _copy_test_split(src, tmp_path / "MNIST" / "raw", decompress=True)

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)
    _, labels = load_dataset("mnist", tmp_path, split="test", download=True)
    assert calls == [(str(tmp_path), False, True)]
    assert labels[0] == 7
    # Already there: a second call must not download again.
    load_dataset("mnist", tmp_path, split="test", download=True)
    assert len(calls) == 1


def test_unknown_dataset_or_split(tmp_path):
    assert set(DATASETS) == {"mnist", "fmnist"}
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("mnist", tmp_path, split="val")


def test_to_float_images_binarized(mnist_test):
    x = to_float_images(mnist_test[0][:500])
    assert x.dtype == torch.float32 and x.shape == (500, 1, 28, 28)
    assert set(x.unique().tolist()) == {0.0, 1.0}


def test_to_float_images_threshold_and_scaling():
    images = torch.tensor([[0, 127, 128, 255]], dtype=torch.uint8).expand(28, 4).reshape(1, 28, 4)
    images = torch.nn.functional.pad(images, (0, 24))  # -> [1, 28, 28]
    row = to_float_images(images)[0, 0, 0, :4]
    assert row.tolist() == [0.0, 0.0, 1.0, 1.0]  # 127/255 < 0.5 <= 128/255
    scaled = to_float_images(images, binarize=False)[0, 0, 0, :4]
    assert torch.allclose(scaled, torch.tensor([0, 127, 128, 255]) / 255.0)
    # [N,1,28,28] input is accepted too, and non-uint8 input is refused rather than rescaled.
    assert to_float_images(images.unsqueeze(1)).shape == (1, 1, 28, 28)
    with pytest.raises(TypeError):
        to_float_images(images.float())


def test_dataset_digest(mnist_test):
    images, labels = mnist_test
    digest = dataset_digest(images, labels)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert dataset_digest(images.numpy(), labels.numpy()) == digest  # container does not matter
    changed = labels.clone()
    changed[0] = (changed[0] + 1) % 10
    assert dataset_digest(images, changed) != digest
