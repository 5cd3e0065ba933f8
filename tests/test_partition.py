"""Tests for genfl_shared.partition and the genfl-partition CLI.

Shards deliberately hold no indices into the original dataset, so completeness and
disjointness are checked at the index level on the partition functions, and at the file
level through sample counts, per-class counts and the multiset of (label, image bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from genfl_shared.data import dataset_digest, load_dataset
from genfl_shared.partition import (
    PARTITION_JSON,
    PartitionError,
    ShardError,
    dirichlet_partition,
    iid_partition,
    load_shard,
    partition_dataset,
    split_train_heldout,
    subsample,
    write_shard,
)
from genfl_shared.partition_cli import main as cli_main

SHARD_KEYS = {"train_images", "train_labels", "heldout_images", "heldout_labels", "meta"}


@pytest.fixture(scope="module")
def mnist_train(data_root):
    images, labels = load_dataset("mnist", data_root("mnist"), split="train")
    return images.numpy(), labels.numpy()


@pytest.fixture(scope="module")
def mnist_labels(mnist_train):
    return mnist_train[1]


def _assert_exact_cover(parts, n):
    """The parts are sorted, pairwise disjoint and together hold each of range(n) exactly once."""
    for part in parts:
        assert np.all(np.diff(part) > 0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _mean_label_entropy(parts, labels):
    entropies = []
    for part in parts:
        if len(part):
            p = np.bincount(labels[part], minlength=10) / len(part)
            entropies.append(-np.sum(p[p > 0] * np.log(p[p > 0])))
    return float(np.mean(entropies))


# --------------------------------------------------------------------------------------
# Index level
# --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_dirichlet_exact_cover_and_determinism(mnist_labels):
    parts = dirichlet_partition(mnist_labels, num_clients=10, alpha=0.5, seed=3)
    assert len(parts) == 10
    _assert_exact_cover(parts, len(mnist_labels))
    assert min(len(p) for p in parts) >= 40

    again = dirichlet_partition(mnist_labels, num_clients=10, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_partition(mnist_labels, num_clients=10, alpha=0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.unit
def test_skew_grows_as_alpha_shrinks(mnist_labels):
    entropies = [
        _mean_label_entropy(dirichlet_partition(mnist_labels, 10, alpha, seed=0, min_samples=0), mnist_labels)
        for alpha in (100, 1, 0.1, 0.01)
    ]
    assert entropies == sorted(entropies, reverse=True) and len(set(entropies)) == 4
    assert entropies[0] > 0.95 * np.log(10)  # alpha=100 is close to IID
    assert entropies[-1] < 0.5  # alpha=0.01: nearly one class per client


@pytest.mark.unit
def test_min_samples_forces_redraw(mnist_labels):
    first = dirichlet_partition(mnist_labels, 10, alpha=0.1, seed=7, min_samples=0, max_retries=1)
    smallest = min(len(p) for p in first)
    redrawn = dirichlet_partition(mnist_labels, 10, alpha=0.1, seed=7, min_samples=smallest + 1)
    assert min(len(p) for p in redrawn) > smallest
    _assert_exact_cover(redrawn, len(mnist_labels))


@pytest.mark.unit
def test_impossible_partition_errors(mnist_labels):
    # Not enough samples at all: refused at once, with the parameters in the message.
    with pytest.raises(PartitionError, match=r"alpha=0\.1, 40 clients, min_samples=2000"):
        dirichlet_partition(mnist_labels, num_clients=40, alpha=0.1, seed=0, min_samples=2000)
    # Possible in principle but (practically) never drawn: bounded retries, then an error.
    with pytest.raises(PartitionError, match="after 5 draws"):
        dirichlet_partition(mnist_labels, num_clients=10, alpha=0.01, seed=0, min_samples=1000, max_retries=5)


@pytest.mark.unit
def test_dirichlet_rejects_bad_arguments(mnist_labels):
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(mnist_labels, 10, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_partition(mnist_labels, 0, alpha=1.0, seed=0)


@pytest.mark.unit
def test_iid_partition():
    parts = iid_partition(1003, num_clients=10, seed=1)
    _assert_exact_cover(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(1003, 10, seed=1)))
    assert not np.array_equal(parts[0], iid_partition(1003, 10, seed=2)[0])
    with pytest.raises(PartitionError):
        iid_partition(5, num_clients=10, seed=0)


@pytest.mark.unit
def test_split_train_heldout():
    indices = np.arange(100, 300, 2)  # 100 arbitrary indices
    train, heldout = split_train_heldout(indices, 0.1, rng=0)
    assert len(heldout) == 10 and len(train) == 90
    assert not set(train) & set(heldout)
    assert np.array_equal(np.sort(np.concatenate([train, heldout])), indices)
    again = split_train_heldout(indices, 0.1, rng=0)
    assert np.array_equal(again[1], heldout)
    assert not np.array_equal(split_train_heldout(indices, 0.1, rng=1)[1], heldout)

    # Tiny clients still get one held-out sample when they can spare it, never all of them.
    heldout_sizes = [len(split_train_heldout(np.arange(n), 0.1, rng=0)[1]) for n in (1, 2, 3)]
    assert heldout_sizes == [0, 1, 1]
    assert len(split_train_heldout(np.arange(10), 0.0, rng=0)[1]) == 0
    with pytest.raises(ValueError):
        split_train_heldout(indices, 1.0, rng=0)


@pytest.mark.unit
def test_subsample(mnist_labels):
    chosen = subsample(mnist_labels, 1000, seed=0)
    assert len(chosen) == 1000 and len(np.unique(chosen)) == 1000
    assert np.all(np.diff(chosen) > 0) and chosen[-1] < len(mnist_labels)
    assert np.array_equal(chosen, subsample(mnist_labels, 1000, seed=0))
    with pytest.raises(PartitionError):
        subsample(mnist_labels, len(mnist_labels) + 1, seed=0)


# --------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------


def _rows(images, labels):
    """Multiset of samples, as sorted (label, image bytes) pairs: identifies data without indices."""
    return sorted(zip(labels.tolist(), (img.tobytes() for img in images)))


@pytest.mark.unit
def test_partition_dataset_files(tmp_path, data_root, mnist_train):
    images, labels = mnist_train
    summary = partition_dataset(
        "mnist", data_root("mnist"), num_clients=10, alpha=0.1, seed=0, out_dir=tmp_path
    )

    assert json.loads((tmp_path / PARTITION_JSON).read_text()) == summary
    assert summary["alpha"] == 0.1 and summary["num_samples"] == 60000
    assert summary["source_digest"] == dataset_digest(images, labels)
    expected_files = [f"client-{i:03d}.npz" for i in range(10)] + [PARTITION_JSON]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected_files

    train_rows, heldout_rows = [], []
    for i, entry in enumerate(summary["clients"]):
        path = tmp_path / entry["file"]
        with np.load(path, allow_pickle=False) as npz:
            assert set(npz.files) == SHARD_KEYS  # only this client's data, no original indices
        shard = load_shard(path)
        assert (shard.client_id, shard.client_index, shard.dataset) == (f"client-{i:03d}", i, "mnist")
        assert shard.meta["alpha"] == 0.1 and shard.meta["num_clients"] == 10
        assert shard.meta["source_digest"] == summary["source_digest"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert (shard.num_train, shard.num_heldout) == (entry["num_train"], entry["num_heldout"])
        assert shard.num_train + shard.num_heldout >= 40 and shard.num_heldout >= 1
        assert np.bincount(shard.train_labels, minlength=10).tolist() == entry["train_class_counts"]
        assert np.bincount(shard.heldout_labels, minlength=10).tolist() == entry["heldout_class_counts"]
        assert abs(shard.num_heldout - 0.1 * (shard.num_train + shard.num_heldout)) <= 1
        train_rows += _rows(shard.train_images, shard.train_labels)
        heldout_rows += _rows(shard.heldout_images, shard.heldout_labels)

    all_rows = sorted(train_rows + heldout_rows)
    # Together the shards hold every training sample exactly once (as a multiset of samples).
    assert all_rows == _rows(images, labels)
    class_totals = sum(
        np.add(c["train_class_counts"], c["heldout_class_counts"]) for c in summary["clients"]
    )
    assert class_totals.tolist() == np.bincount(labels).tolist() == summary["class_counts"]
    # Held-out samples are not also training samples (MNIST's train set has no duplicate images).
    assert not set(train_rows) & set(heldout_rows)


@pytest.mark.unit
def test_partition_dataset_iid_subset_and_stale_shards(tmp_path, data_root):
    root = data_root("mnist")
    partition_dataset("mnist", root, num_clients=5, alpha=None, seed=1, out_dir=tmp_path, train_subset=1000)
    summary = partition_dataset(
        "mnist", root, num_clients=3, alpha=None, seed=1, out_dir=tmp_path,
        train_subset=999, heldout_fraction=0.2,
    )
    assert summary["alpha"] == "iid" and summary["train_subset"] == 999 and summary["num_samples"] == 999
    assert [c["num_train"] + c["num_heldout"] for c in summary["clients"]] == [333, 333, 333]
    assert all(c["num_heldout"] == 67 for c in summary["clients"])
    assert sum(sum(c["train_class_counts"]) for c in summary["clients"]) == 999 - 3 * 67
    # Shards of the earlier 5-client run must not linger next to the 3-client partition.
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == [f"client-{i:03d}.npz" for i in range(3)]
    assert load_shard(tmp_path / "client-002.npz").meta["alpha"] == "iid"

    with pytest.raises(PartitionError, match="min_samples=40"):
        partition_dataset(
            "mnist", root, num_clients=30, alpha=None, seed=1, out_dir=tmp_path, train_subset=1000
        )


def _good_arrays(n_train=5, n_heldout=2):
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train).astype(np.int64),
        "heldout_images": rng.integers(0, 256, (n_heldout, 28, 28), dtype=np.uint8),
        "heldout_labels": rng.integers(0, 10, n_heldout).astype(np.int64),
    }


GOOD_META = {"client_id": "client-000", "client_index": 0, "dataset": "mnist"}


@pytest.mark.unit
def test_write_shard_round_trip_and_bytes(tmp_path):
    arrays = _good_arrays()
    sha = write_shard(tmp_path / "a.npz", **arrays, meta=GOOD_META)
    write_shard(tmp_path / "b.npz", **arrays, meta=GOOD_META)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert sha == hashlib.sha256((tmp_path / "a.npz").read_bytes()).hexdigest()
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    shard = load_shard(tmp_path / "a.npz")
    for key, value in arrays.items():
        assert np.array_equal(getattr(shard, key), value)
    assert shard.meta == GOOD_META
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temp files left


def _raw_npz(path, arrays, meta=json.dumps(GOOD_META)):
    np.savez(path, **arrays, meta=np.array(meta))


@pytest.mark.unit
@pytest.mark.parametrize(
    "problem, expected",
    [
        ("missing_file", "not found"),
        ("not_zip", r"not a GenFL shard \(\.npz\): a text file"),
        ("png", r"not a GenFL shard \(\.npz\): a PNG image"),
        ("empty", r"not a GenFL shard \(\.npz\): an empty file"),
        ("directory", "is a directory, not a shard file"),
        ("truncated", r"not a GenFL shard \(\.npz\): truncated or damaged zip archive"),
        ("damaged_member", r"not a GenFL shard \(\.npz\): truncated or damaged zip archive"),
        ("missing_key", r"not a GenFL shard \(\.npz\): missing heldout_labels"),
        ("float_images", "train_images must be uint8"),
        ("wrong_shape", r"heldout_images must be uint8 \[n,28,28\]"),
        ("int32_labels", "train_labels must be int64"),
        ("label_out_of_range", "outside 0..9"),
        ("empty_train", "train part is empty"),
        ("count_mismatch", "5 train images but 4 train labels"),
        ("bad_meta", "meta is not valid JSON"),
        ("pickled_object", r"not a GenFL shard \(\.npz\): holds pickled Python objects"),
    ],
)
def test_load_shard_errors(tmp_path, problem, expected):
    path = tmp_path / "client-000.npz"
    arrays = _good_arrays()
    if problem == "not_zip":
        path.write_bytes(b"definitely not a zip file")
    elif problem == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    elif problem == "empty":
        path.write_bytes(b"")
    elif problem == "directory":
        path.mkdir()
    elif problem == "truncated":
        write_shard(path, **arrays, meta=GOOD_META)
        path.write_bytes(path.read_bytes()[:-200])
    elif problem == "damaged_member":
        write_shard(path, **arrays, meta=GOOD_META)
        data = bytearray(path.read_bytes())
        data[200] ^= 0xFF  # inside the first member's array data: its CRC no longer matches
        path.write_bytes(bytes(data))
    elif problem == "missing_key":
        del arrays["heldout_labels"]
        _raw_npz(path, arrays)
    elif problem == "float_images":
        arrays["train_images"] = arrays["train_images"].astype(np.float32)
        _raw_npz(path, arrays)
    elif problem == "wrong_shape":
        arrays["heldout_images"] = arrays["heldout_images"].reshape(2, 784)
        _raw_npz(path, arrays)
    elif problem == "int32_labels":
        arrays["train_labels"] = arrays["train_labels"].astype(np.int32)
        _raw_npz(path, arrays)
    elif problem == "label_out_of_range":
        arrays["train_labels"][0] = 10
        _raw_npz(path, arrays)
    elif problem == "empty_train":
        arrays.update(train_images=arrays["train_images"][:0], train_labels=arrays["train_labels"][:0])
        _raw_npz(path, arrays)
    elif problem == "count_mismatch":
        arrays["train_labels"] = arrays["train_labels"][:4]
        _raw_npz(path, arrays)
    elif problem == "bad_meta":
        _raw_npz(path, arrays, meta="{not json")
    elif problem == "pickled_object":
        arrays["train_labels"] = np.array([1, "x"], dtype=object)
        np.savez(path, **arrays, meta=np.array(json.dumps(GOOD_META)), allow_pickle=True)
    with pytest.raises(ShardError, match=expected) as info:
        load_shard(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _run_cli(args=(), env_extra=None):
    # Start from a clean GENFL_* environment so a developer's settings cannot leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENFL_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "genfl_shared.partition_cli", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )


def _dir_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.integration
def test_cli_deterministic(tmp_path, data_root):
    common = ["--dataset", "mnist", "--data-root", str(data_root("mnist")), "--clients", "4",
              "--alpha", "0.3", "--train-subset", "4000", "--log-level", "WARNING"]
    outputs = {}
    for run, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        result = _run_cli([*common, "--seed", seed, "--out", str(tmp_path / run)])
        assert result.returncode == 0, result.stderr
        outputs[run] = _dir_bytes(tmp_path / run)
    assert outputs["a"] == outputs["b"]  # byte-identical shards and partition.json
    assert len(outputs["a"]) == 5
    assert all(outputs["a"][name] != outputs["c"][name] for name in outputs["a"])
    # The summary table lists every client.
    assert all(f"client-{i:03d}" in result.stdout for i in range(4))


@pytest.mark.integration
def test_cli_environment_variables(tmp_path, data_root):
    env = {
        "GENFL_DATASET": "fmnist",
        "GENFL_DATA_ROOT": str(data_root("fmnist")),
        "GENFL_CLIENTS": "3",
        "GENFL_IID": "1",
        "GENFL_SEED": "5",
        "GENFL_OUT": str(tmp_path / "out"),
        "GENFL_HELDOUT_FRACTION": "0.25",
        "GENFL_TRAIN_SUBSET": "600",
        "GENFL_MIN_SAMPLES": "10",
        "GENFL_LOG_LEVEL": "WARNING",
    }
    result = _run_cli(env_extra=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / PARTITION_JSON).read_text())
    assert summary["dataset"] == "fmnist" and summary["alpha"] == "iid"
    assert (summary["seed"], summary["num_clients"]) == (5, 3)
    assert (summary["heldout_fraction"], summary["train_subset"], summary["min_samples"]) == (0.25, 600, 10)
    assert [c["num_heldout"] for c in summary["clients"]] == [50, 50, 50]


@pytest.mark.integration
def test_cli_missing_dataset_is_clean_error(tmp_path):
    result = _run_cli(["--dataset", "mnist", "--data-root", str(tmp_path), "--clients", "2", "--iid",
                       "--out", str(tmp_path / "out")])
    assert result.returncode == 1
    assert "not found" in result.stderr and "--download" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    "extra, env, expected",
    [
        ([], {}, "exactly one of --alpha"),
        (["--alpha", "0.1", "--iid"], {}, "mutually exclusive"),
        (["--iid"], {"GENFL_ALPHA": "0.5"}, r"--alpha \(from the environment\)"),
        (["--alpha", "0"], {}, "not in the range"),
    ],
)
def test_cli_alpha_iid_usage_errors(tmp_path, extra, env, expected):
    args = ["--dataset", "mnist", "--data-root", str(tmp_path), "--clients", "2",
            "--out", str(tmp_path / "o"), *extra]
    result = CliRunner().invoke(cli_main, args, env=env)
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert re.search(expected, result.output), result.output


@pytest.mark.unit
def test_cli_impossible_partition(tmp_path, data_root):
    args = ["--dataset", "mnist", "--data-root", str(data_root("mnist")), "--clients", "40", "--alpha", "0.1",
            "--min-samples", "2000", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # handled: no traceback
    assert "40 clients, min_samples=2000" in result.output and "impossible" in result.output
