"""Shared test fixtures.

Real datasets are not in the repo: CI clones it with ``../shared`` beside it, so they live in
``<repo>/../shared/data/<dataset folder>``. Set ``GENFL_TESTS_DATA_DIR`` to use another data folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA_ROOT = Path(os.environ.get("GENFL_TESTS_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
# Folder of each dataset (by its genfl_shared.data.DATASETS name) under TEST_DATA_ROOT.
DATASET_DIRS = {"mnist": "mnist", "fmnist": "fashion-mnist"}


def dataset_dir(dataset: str) -> Path:
    """Folder holding ``dataset``'s IDX files. Missing data fails the test (never a silent skip)."""
    path = TEST_DATA_ROOT / DATASET_DIRS[dataset]
    if not any((path / name).is_file() for name in ("train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte")):
        pytest.fail(f"{dataset} test data not found in {path} (set GENFL_TESTS_DATA_DIR to the data folder)")
    return path


@pytest.fixture(scope="session")
def data_root():
    """``data_root("mnist")`` -> folder with that dataset's IDX files (the test fails if missing)."""
    return dataset_dir
