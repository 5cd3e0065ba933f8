"""Loading MNIST / Fashion-MNIST from local IDX files.

The IDX parser is our own (numpy only) so that loading never touches the network
and works on the plain files shipped with the datasets, gzipped or not.
torchvision is only imported when the user explicitly asks for ``download=True``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "NUM_CLASSES",
    "IMAGE_SIZE",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DataFormatError",
    "DatasetMismatchError",
    "load_dataset",
    "to_float_images",
    "dataset_digest",
]

NUM_CLASSES = 10
IMAGE_SIZE = 28

# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), then the number of dimensions.
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset's IDX files may live, besides directly in ``root``."""

    name: str
    display_name: str  # as the dataset's authors write it, for messages
    # torchvision keeps raw files in root/<class name>/raw/ and this is also what download=True produces.
    torchvision_name: str
    # Conventional per-dataset folder names, so ``root`` may also be a folder holding several datasets.
    folder_names: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "MNIST", "MNIST", ("mnist",)),
    "fmnist": DatasetInfo("fmnist", "Fashion-MNIST", "FashionMNIST", ("fashion-mnist", "fmnist")),
}

# MD5 of every official IDX file's *decompressed* content: (dataset, split, part) -> hex digest.
# MD5 identifies files here (as torchvision does); it is no defence against a forged file.
#
# torchvision checks its downloads against the MD5s of the official .gz files (MNIST.resources,
# FashionMNIST.resources in torchvision/datasets/mnist.py, e.g. f68b3c2d... for MNIST's
# train-images-idx3-ubyte.gz). Such a digest recognises one compressed byte stream only: the
# copies in the project's shared/data are recompressed (other gzip headers and deflate output),
# so none of their .gz MD5s is torchvision's although their content is the official one. The
# decompressed files' MD5s are published too (for MNIST by many loaders of LeCun's files; for
# Fashion-MNIST in the `raw_data` tables of its loaders, and by `md5sum` run after `gunzip` on
# the .gz files whose MD5s are torchvision's), and all eight below equal the MD5s of the
# shared/data copies after gunzip. Checking decoded bytes covers .gz and plain files alike.
_OFFICIAL_MD5 = {
    ("mnist", "train", "images"): "6bbc9ace898e44ae57da46a324031adb",
    ("mnist", "train", "labels"): "a25bea736e30d166cdddb491f175f624",
    ("mnist", "test", "images"): "2646ac647ad5339dbf082846283269ea",
    ("mnist", "test", "labels"): "27ae3e4e09519cfbb04c329615203637",
    ("fmnist", "train", "images"): "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ("fmnist", "train", "labels"): "9018921c3c673c538a1fc5bad174d6f9",
    ("fmnist", "test", "images"): "8181f5470baa50b63fa0f6fddb340f0a",
    ("fmnist", "test", "labels"): "15d484375f8d13e6eb1aabb0c3f46965",
}
_OFFICIAL_FILE_BY_MD5 = {digest: key for key, digest in _OFFICIAL_MD5.items()}


class DatasetNotFoundError(FileNotFoundError):
    """The IDX files of a dataset are not in any of the places we look."""


class DataFormatError(ValueError):
    """An IDX file exists but is corrupt, truncated or not the expected kind of file."""


class DatasetMismatchError(DataFormatError):
    """Well-formed IDX files that are not the official files of the dataset and split asked for
    (another dataset's, another split's, or modified ones)."""


def _idx_file_names(split: str) -> tuple[str, str]:
    prefix = _SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _candidate_dirs(info: DatasetInfo, root: Path) -> list[Path]:
    """Directories that may hold the IDX files, in the order they are tried."""
    dirs = [root, root / info.torchvision_name / "raw"]
    dirs += [root / folder for folder in info.folder_names]
    return dirs


def _find_file(directory: Path, name: str) -> Path | None:
    # Prefer the uncompressed file: torchvision leaves both next to each other and plain is faster.
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate(info: DatasetInfo, root: Path, split: str) -> tuple[Path, Path] | None:
    """Return (images, labels) paths from the first candidate folder holding both."""
    images_name, labels_name = _idx_file_names(split)
    for directory in _candidate_dirs(info, root):
        images = _find_file(directory, images_name)
        labels = _find_file(directory, labels_name)
        # Both halves must come from the same folder, otherwise images and labels could be mismatched.
        if images is not None and labels is not None:
            return images, labels
    return None


def _read_bytes(path: Path) -> bytearray:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        return bytearray(raw)
    try:
        return bytearray(gzip.decompress(raw))
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{path}: corrupt gzip stream ({exc})") from exc


def _parse_idx(path: Path, data: bytearray, expected_ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes, checking magic number and size against the header."""
    # A bytearray gives numpy a writable buffer, so torch.from_numpy needs no extra copy.
    header_len = 4 + 4 * expected_ndim
    if len(data) < 4:
        raise DataFormatError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    zero1, zero2, type_code, ndim = data[:4]
    if zero1 != 0 or zero2 != 0 or type_code != _IDX_UBYTE or ndim != expected_ndim:
        raise DataFormatError(
            f"{path}: bad IDX magic number 0x{bytes(data[:4]).hex()} "
            f"(expected 0x000008{expected_ndim:02x}: unsigned bytes, {expected_ndim} dimension(s))"
        )
    if len(data) < header_len:
        raise DataFormatError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=expected_ndim, offset=4))
    expected_size = int(np.prod(shape, dtype=np.int64))
    actual_size = len(data) - header_len
    if actual_size != expected_size:
        raise DataFormatError(
            f"{path}: header announces shape {shape} ({expected_size} bytes of data) "
            f"but the file holds {actual_size} bytes of data"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def _download(info: DatasetInfo, root: Path, split: str) -> None:
    # Imported lazily: torchvision is only needed by users who ask for a download.
    import torchvision.datasets as tvd

    log.info("downloading %s (%s split) into %s", info.name, split, root)
    try:
        getattr(tvd, info.torchvision_name)(str(root), train=(split == "train"), download=True)
    except Exception as exc:  # torchvision reports network failures as RuntimeError, URLError, ...
        raise DatasetNotFoundError(f"downloading {info.name} into {root} failed: {exc}") from exc


def _describe_official(key: tuple[str, str, str]) -> str:
    dataset, split, part = key
    return f"the {DATASETS[dataset].display_name} {split} {part}"


def _verify_official(info: DatasetInfo, split: str, files: dict[str, tuple[Path, str]]) -> None:
    """Refuse files whose decoded content is not the official dataset's ``split``.

    ``files`` maps "images"/"labels" to (path, MD5 of the decoded file). The message says what
    the files are instead when they are another official file (another dataset, another split).
    """
    problems = []
    for part, (path, digest) in files.items():
        wanted = (info.name, split, part)
        if digest == _OFFICIAL_MD5[wanted]:
            continue
        actual = _OFFICIAL_FILE_BY_MD5.get(digest)
        problems.append((path, wanted, actual, digest))
    if not problems:
        return
    other_datasets = {actual[0] for _, _, actual, _ in problems if actual is not None}
    if len(problems) == len(files) and len(other_datasets) == 1 and other_datasets != {info.name}:
        other = DATASETS[other_datasets.pop()]
        folders = sorted({str(path.parent) for path, _, _, _ in problems})
        raise DatasetMismatchError(
            f"{', '.join(folders)}: these are {other.display_name} files, not {info.display_name}; "
            f"point the data root at the {info.display_name} files (or use --dataset {other.name})"
        )
    path, wanted, actual, digest = problems[0]
    if actual is not None:
        raise DatasetMismatchError(
            f"{path} holds {_describe_official(actual)}, not {_describe_official(wanted)}")
    raise DatasetMismatchError(
        f"{path} is not {_describe_official(wanted)} file: the MD5 of its decoded content is {digest}, "
        f"the official file's is {_OFFICIAL_MD5[wanted]} (modified, truncated or another dataset); "
        "replace it with the official file"
    )


def load_dataset(
    name: str, root: str | Path, split: str = "train", download: bool = False, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset split as ``(images uint8 [N,28,28], labels int64 [N])``.

    ``root`` may be a folder holding the standard IDX files (plain or ``.gz``), torchvision's
    layout (``root/MNIST/raw/...``, ``root/FashionMNIST/raw/...``), or a folder holding
    per-dataset subfolders (``root/mnist``, ``root/fashion-mnist``).

    MNIST and Fashion-MNIST use the same file names, so with ``verify`` (the default) the decoded
    files must be the official ones of ``name`` and ``split`` (published MD5s), otherwise
    DatasetMismatchError says what they are. ``verify=False`` is for hand-made IDX files
    (tests of the parser); nothing that reports results passes it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    info = DATASETS[name]
    root = Path(root).expanduser()

    found = _locate(info, root, split)
    if found is None and download:
        _download(info, root, split)
        found = _locate(info, root, split)
    if found is None:
        images_name, labels_name = _idx_file_names(split)
        tried = "\n  ".join(str(d) for d in _candidate_dirs(info, root))
        raise DatasetNotFoundError(
            f"{name} ({split} split) not found: looked for {images_name}[.gz] and "
            f"{labels_name}[.gz] in:\n  {tried}\n"
            "Point the data root at a folder holding these IDX files, or pass --download "
            "(download=True) to fetch the dataset with torchvision."
        )

    images_path, labels_path = found
    log.info("loading %s %s split from %s", name, split, images_path.parent)
    images_bytes, labels_bytes = _read_bytes(images_path), _read_bytes(labels_path)
    images = _parse_idx(images_path, images_bytes, expected_ndim=3)
    labels = _parse_idx(labels_path, labels_bytes, expected_ndim=1)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataFormatError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
            f"expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataFormatError(f"{labels_path}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    if verify:
        _verify_official(info, split, {
            "images": (images_path, hashlib.md5(images_bytes, usedforsecurity=False).hexdigest()),
            "labels": (labels_path, hashlib.md5(labels_bytes, usedforsecurity=False).hexdigest()),
        })
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def to_float_images(images: torch.Tensor | np.ndarray, binarize: bool = True) -> torch.Tensor:
    """Convert uint8 images [N,28,28] (or [N,1,28,28]) to float32 [N,1,28,28] in [0,1].

    With ``binarize`` every pixel becomes exactly 0.0 or 1.0 (threshold 0.5 after scaling,
    ``>= 0.5`` -> 1), as in the paper: the CVAE models pixels as Bernoulli variables.
    """
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images shaped [N,28,28] or [N,1,28,28], got {list(images.shape)}")
    scaled = images.to(torch.float32) / 255.0
    if binarize:
        scaled = (scaled >= 0.5).to(torch.float32)
    return scaled


def dataset_digest(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> str:
    """sha256 (hex) over the raw bytes of the images (uint8) followed by the labels (int64 little-endian).

    Fixing dtype and byte order makes the digest the same whichever container or platform the
    arrays come from, so server and clients can check that they partitioned the same data.
    """
    img = torch.as_tensor(images).numpy()
    lab = torch.as_tensor(labels).numpy()
    # Refuse to silently cast: a float image tensor would hash to something meaningless.
    if img.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {img.dtype}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"expected integer labels, got {lab.dtype}")
    img = np.ascontiguousarray(img)
    lab = np.ascontiguousarray(lab, dtype="<i8")
    h = hashlib.sha256()
    h.update(img.tobytes())
    h.update(lab.tobytes())
    return h.hexdigest()
