"""Splitting a dataset across federated clients, and the per-client shard files.

The non-IID split follows the paper's code: for every class, Dirichlet(alpha) proportions
over the clients decide how that class's samples are dealt out; small alpha means each
client sees few classes. Each client's part is then split into local training data and a
small held-out set.

Shards are written so that the same inputs always give byte-identical files (fixed zip
timestamps, fixed member order, no compression), which lets runs be compared by hash.
A shard holds only that client's own samples: no indices into the original dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import IMAGE_SIZE, NUM_CLASSES, dataset_digest, load_dataset
from .runfiles import atomic_write

log = logging.getLogger(__name__)

__all__ = [
    "PartitionError",
    "ShardError",
    "Shard",
    "dirichlet_partition",
    "iid_partition",
    "split_train_heldout",
    "subsample",
    "training_pool",
    "HELDOUT_FRACTION",
    "client_id",
    "shard_file_name",
    "write_shard",
    "load_shard",
    "partition_dataset",
    "PARTITION_JSON",
]

PARTITION_JSON = "partition.json"
HELDOUT_FRACTION = 0.1  # share of each client's samples held out for its evaluation
SHARD_FORMAT_VERSION = 1

# Member order inside a shard is part of the byte-level format: never reorder.
_ARRAY_KEYS = ("train_images", "train_labels", "heldout_images", "heldout_labels")
_SHARD_KEYS = (*_ARRAY_KEYS, "meta")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # earliest date a zip can hold; anything fixed would do
_SHARD_NAME_RE = re.compile(r"^client-\d{3,}\.npz$")

# Anything np.random.default_rng accepts: an int, a SeedSequence or a Generator.
SeedLike = int | np.random.SeedSequence | np.random.Generator


class PartitionError(ValueError):
    """The requested partition cannot be produced (e.g. too few samples for min_samples)."""


class ShardError(ValueError):
    """A shard file is missing, unreadable or does not hold what a shard must hold."""


# --------------------------------------------------------------------------------------
# Index-level partitioning
# --------------------------------------------------------------------------------------


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: SeedLike,
    min_samples: int = 40,
    max_retries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split of ``range(len(labels))`` into ``num_clients`` sorted index arrays.

    For each class: draw p ~ Dir(alpha * 1) over the clients, shuffle the class's indices and
    cut them at ``cumsum(p) * n_class``. If any client ends up with fewer than ``min_samples``
    indices, everything is redrawn (up to ``max_retries`` times), as in the paper's code.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:  # also rejects NaN
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_samples < 0 or max_retries < 1:
        raise ValueError(f"need min_samples >= 0 and max_retries >= 1, got {min_samples}, {max_retries}")
    what = f"Dirichlet partition (alpha={alpha}, {num_clients} clients, min_samples={min_samples})"
    # No amount of redrawing helps when there are simply not enough samples.
    if num_clients * min_samples > len(labels):
        raise PartitionError(
            f"{what} is impossible: {num_clients} x {min_samples} = {num_clients * min_samples} "
            f"samples needed but only {len(labels)} available; lower --min-samples or --clients"
        )

    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for attempt in range(1, max_retries + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in class_indices:
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            idx = rng.permutation(idx)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        clients = [np.sort(np.concatenate(chunks)) for chunks in parts]
        smallest = min(len(c) for c in clients)
        if smallest >= min_samples:
            if attempt > 1:
                log.debug("%s accepted after %d draws", what, attempt)
            return clients
    raise PartitionError(
        f"{what} failed: after {max_retries} draws some client still had fewer than "
        f"{min_samples} samples (smallest in last draw: {smallest}); use a larger alpha, "
        "fewer clients or a lower --min-samples"
    )


def iid_partition(n: int, num_clients: int, seed: SeedLike) -> list[np.ndarray]:
    """Uniformly random split of ``range(n)`` into ``num_clients`` sorted parts of equal size (+-1)."""
    if num_clients < 1 or n < num_clients:
        raise PartitionError(f"IID partition of {n} samples into {num_clients} clients is impossible")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def split_train_heldout(
    indices: np.ndarray, heldout_fraction: float = HELDOUT_FRACTION, *, rng: SeedLike
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into disjoint, sorted (train, held-out) arrays.

    About ``heldout_fraction`` of the samples are held out; a client with at least two
    samples always keeps at least one of each, so both parts are usable.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    indices = np.asarray(indices)
    n = len(indices)
    n_heldout = int(round(n * heldout_fraction))
    if heldout_fraction > 0 and n >= 2:
        n_heldout = min(max(n_heldout, 1), n - 1)
    perm = np.random.default_rng(rng).permutation(n)
    heldout = np.sort(indices[perm[:n_heldout]])
    train = np.sort(indices[perm[n_heldout:]])
    return train, heldout


def training_pool(labels: np.ndarray, train_subset: int | None, seed: int) -> np.ndarray:
    """Rows of the train split that ``partition_dataset(..., seed, train_subset=...)`` distributes:
    all of them, or its ``train_subset`` draw (from the first of the seed's three streams)."""
    if train_subset is None:
        return np.arange(len(labels))
    return subsample(labels, train_subset, np.random.SeedSequence(seed).spawn(3)[0])


def subsample(labels: np.ndarray, n: int, seed: SeedLike) -> np.ndarray:
    """Sorted indices of ``n`` training samples drawn uniformly without replacement.

    Used to shrink the dataset before partitioning (``--train-subset``), e.g. for quick runs.
    """
    total = len(labels)
    if not 1 <= n <= total:
        raise PartitionError(f"train subset of {n} samples requested, but the dataset has {total}")
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


# --------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------


def client_id(index: int) -> str:
    return f"client-{index:03d}"


def shard_file_name(index: int) -> str:
    return f"{client_id(index)}.npz"


@dataclass
class Shard:
    """One client's data, as loaded from its shard file (numpy arrays; wrap with torch.from_numpy)."""

    client_id: str
    client_index: int
    dataset: str
    train_images: np.ndarray  # uint8 [n, 28, 28]
    train_labels: np.ndarray  # int64 [n]
    heldout_images: np.ndarray  # uint8 [m, 28, 28], m may be 0
    heldout_labels: np.ndarray  # int64 [m]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_heldout(self) -> int:
        return len(self.heldout_labels)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # C order pins the header's fortran_order flag (ascontiguousarray would turn 0-d meta into 1-d).
    np.lib.format.write_array(buf, np.asarray(array, order="C"), allow_pickle=False)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def _shard_bytes(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    members = dict(arrays)
    # A 0-d unicode array keeps the metadata loadable with allow_pickle=False.
    members["meta"] = np.array(json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in _SHARD_KEYS:
            # A hand-made ZipInfo pins everything savez would take from the clock or the platform.
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # unix, whatever platform writes the file
            info.external_attr = 0o644 << 16
            zf.writestr(info, _npy_bytes(members[key]))
    return buf.getvalue()


def write_shard(
    path: str | Path,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    heldout_images: np.ndarray,
    heldout_labels: np.ndarray,
    meta: dict[str, Any],
) -> str:
    """Atomically write one deterministic shard file; returns its sha256 (hex)."""
    arrays = {
        "train_images": np.asarray(train_images, dtype=np.uint8),
        "train_labels": np.asarray(train_labels, dtype=np.int64),
        "heldout_images": np.asarray(heldout_images, dtype=np.uint8),
        "heldout_labels": np.asarray(heldout_labels, dtype=np.int64),
    }
    data = _shard_bytes(arrays, meta)
    _write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def _check_part(path: Path, arrays: dict[str, np.ndarray], part: str, allow_empty: bool) -> None:
    images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ShardError(
            f"{path}: {part}_images must be uint8 [n,{IMAGE_SIZE},{IMAGE_SIZE}], "
            f"got {images.dtype} {list(images.shape)}"
        )
    if labels.dtype != np.int64 or labels.ndim != 1:
        raise ShardError(f"{path}: {part}_labels must be int64 [n], got {labels.dtype} {list(labels.shape)}")
    if len(labels) != len(images):
        raise ShardError(f"{path}: {len(images)} {part} images but {len(labels)} {part} labels")
    if not allow_empty and len(labels) == 0:
        raise ShardError(f"{path}: the {part} part is empty")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ShardError(f"{path}: {part}_labels outside 0..{NUM_CLASSES - 1}")


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first member, or an empty zip
_NOT_A_SHARD = "not a GenFL shard (.npz)"


def _what_the_file_is(head: bytes) -> str:
    """A guess at what a file that is not a zip is, from its first bytes (for the message)."""
    for magic, kind in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                        (b"\x1f\x8b", "a gzip file"), (b"\x93NUMPY", "a single .npy array"),
                        (b"\x80", "a Python pickle")):
        if head.startswith(magic):
            return kind
    if not head:
        return "an empty file"
    # Text: no NUL bytes, and UTF-8 but for maybe a character cut off at the end of the sample.
    if b"\x00" not in head and head.decode("utf-8", "replace")[:-1].count("\ufffd") == 0:
        return "a text file"
    return "not a zip archive"


def _read_shard_arrays(path: Path) -> dict[str, np.ndarray]:
    """The members of a shard file as arrays; ShardError for anything that is not a whole .npz."""
    if path.is_dir():
        raise ShardError(f"{path}: is a directory, not a shard file")
    if not path.is_file():
        raise ShardError(f"{path}: shard file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read shard ({exc.strerror or exc})") from exc
    # Checked first: np.load takes anything that is not a zip or .npy for a pickle, and its refusal
    # ("pickled data") would say nothing useful about a text file or an image.
    if not head.startswith(_ZIP_MAGIC):
        raise ShardError(f"{path}: {_NOT_A_SHARD}: {_what_the_file_is(head)}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _SHARD_KEYS if k not in npz.files]
            if missing:
                raise ShardError(f"{path}: {_NOT_A_SHARD}: missing {', '.join(missing)}")
            return {k: npz[k] for k in _SHARD_KEYS}
    except ShardError:
        raise
    except zipfile.BadZipFile as exc:  # also a member whose CRC does not match
        raise ShardError(f"{path}: {_NOT_A_SHARD}: truncated or damaged zip archive ({exc})") from exc
    except EOFError as exc:
        raise ShardError(f"{path}: {_NOT_A_SHARD}: truncated member ({exc})") from exc
    except ValueError as exc:
        # numpy's refusals: an object (pickled) array, a bad .npy header.
        reason = ("holds pickled Python objects, which are never loaded" if "pickle" in str(exc)
                  else f"a member is not a valid .npy array ({exc})")
        raise ShardError(f"{path}: {_NOT_A_SHARD}: {reason}") from exc
    except OSError as exc:
        raise ShardError(f"{path}: cannot read shard ({exc.strerror or exc})") from exc


def load_shard(path: str | Path) -> Shard:
    """Load and validate one client's shard; any problem raises ShardError naming the file."""
    path = Path(path)
    arrays = _read_shard_arrays(path)
    meta_arr = arrays.pop("meta")
    if meta_arr.ndim != 0 or meta_arr.dtype.kind != "U":
        raise ShardError(
            f"{path}: meta must be a 0-d unicode array, got {meta_arr.dtype} {list(meta_arr.shape)}"
        )
    try:
        meta = json.loads(meta_arr.item())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: meta is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or not {"client_id", "client_index", "dataset"} <= meta.keys():
        raise ShardError(f"{path}: meta must be a JSON object with client_id, client_index and dataset")

    _check_part(path, arrays, "train", allow_empty=False)
    _check_part(path, arrays, "heldout", allow_empty=True)
    return Shard(
        client_id=str(meta["client_id"]),
        client_index=int(meta["client_index"]),
        dataset=str(meta["dataset"]),
        meta=meta,
        **arrays,
    )


# --------------------------------------------------------------------------------------
# Whole pipeline: dataset -> shard files + partition.json
# --------------------------------------------------------------------------------------


def _class_counts(labels: np.ndarray) -> list[int]:
    return np.bincount(labels, minlength=NUM_CLASSES).tolist()


def _remove_stale_shards(out_dir: Path, keep: set[str]) -> None:
    # A shard left over from an earlier run with more clients could be picked up by a client
    # launched with a high index and silently train on a different partition.
    for path in sorted(out_dir.iterdir()):
        if _SHARD_NAME_RE.match(path.name) and path.name not in keep:
            log.warning("removing stale shard %s from an earlier partition", path)
            path.unlink()


def partition_dataset(
    dataset: str,
    data_root: str | Path,
    num_clients: int,
    alpha: float | None,
    seed: int,
    out_dir: str | Path,
    heldout_fraction: float = HELDOUT_FRACTION,
    train_subset: int | None = None,
    min_samples: int = 40,
    download: bool = False,
) -> dict[str, Any]:
    """Partition a dataset's train split into per-client shard files plus ``partition.json``.

    ``alpha=None`` gives an IID split; otherwise a Dirichlet(alpha) label-skewed split.
    ``min_samples`` applies to each client's total before the held-out split.
    Returns the content written to ``partition.json``.
    """
    # Check the cheap things before spending time on loading the data.
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    out_dir = Path(out_dir)
    images_t, labels_t = load_dataset(dataset, data_root, split="train", download=download)
    images, labels = images_t.numpy(), labels_t.numpy()
    source_digest = dataset_digest(images, labels)

    # Independent random streams per step, so e.g. the held-out split of one client does not
    # depend on how many random numbers the partitioner happened to consume.
    _, partition_ss, heldout_ss = np.random.SeedSequence(seed).spawn(3)  # the first: training_pool()'s

    used = training_pool(labels, train_subset, seed)
    used_labels = labels[used]

    if alpha is None:
        if len(used) // num_clients < min_samples:
            raise PartitionError(
                f"IID partition ({num_clients} clients, min_samples={min_samples}) is impossible: "
                f"{len(used)} samples give only {len(used) // num_clients} per client"
            )
        parts = iid_partition(len(used), num_clients, partition_ss)
    else:
        parts = dirichlet_partition(used_labels, num_clients, alpha, partition_ss, min_samples=min_samples)

    out_dir.mkdir(parents=True, exist_ok=True)
    # An old partition.json would describe shards we are about to overwrite; without it the
    # folder reads as "incomplete" until the new one is written at the very end.
    (out_dir / PARTITION_JSON).unlink(missing_ok=True)
    alpha_json: float | str = "iid" if alpha is None else float(alpha)
    clients = []
    for index, (part, rng_ss) in enumerate(zip(parts, heldout_ss.spawn(num_clients))):
        # parts index into `used`; map back to rows of the full arrays.
        train_rows, heldout_rows = (used[p] for p in split_train_heldout(part, heldout_fraction, rng=rng_ss))
        meta = {
            "format_version": SHARD_FORMAT_VERSION,
            "client_index": index,
            "client_id": client_id(index),
            "dataset": dataset,
            "num_clients": num_clients,
            "alpha": alpha_json,
            "seed": seed,
            "source_digest": source_digest,
        }
        name = shard_file_name(index)
        sha256 = write_shard(
            out_dir / name,
            images[train_rows],
            labels[train_rows],
            images[heldout_rows],
            labels[heldout_rows],
            meta,
        )
        clients.append(
            {
                "file": name,
                "client_id": client_id(index),
                "client_index": index,
                "num_train": len(train_rows),
                "num_heldout": len(heldout_rows),
                "train_class_counts": _class_counts(labels[train_rows]),
                "heldout_class_counts": _class_counts(labels[heldout_rows]),
                "sha256": sha256,
            }
        )
    _remove_stale_shards(out_dir, {c["file"] for c in clients})

    summary = {
        "format_version": SHARD_FORMAT_VERSION,
        "dataset": dataset,
        "split": "train",
        "alpha": alpha_json,
        "seed": seed,
        "num_clients": num_clients,
        "heldout_fraction": heldout_fraction,
        "train_subset": train_subset,
        "min_samples": min_samples,
        "num_samples": len(used),
        "source_digest": source_digest,
        "class_counts": _class_counts(used_labels),
        "clients": clients,
    }
    # partition.json goes last: its presence means every shard it lists is complete.
    text = json.dumps(summary, sort_keys=True, indent=2) + "\n"
    _write_bytes(out_dir / PARTITION_JSON, text.encode("utf-8"))
    log.info("wrote %d shards and %s to %s", num_clients, PARTITION_JSON, out_dir)
    return summary
