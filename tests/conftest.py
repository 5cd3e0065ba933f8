"""Shared test fixtures.

Real datasets are not in the repo: CI clones it with ``../shared`` beside it, so they live in
``<repo>/../shared/data/<dataset folder>``. Set ``GENFL_TESTS_DATA_DIR`` to use another data folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# tests/test_tiers.py runs pytest on small test files of its own.
pytest_plugins = ["pytester"]

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


# Every test belongs to exactly one tier, so `pytest -m unit` is a fast, honest subset. Tiers, by
# what a test starts:
#   unit         everything stays in the pytest process (no subprocess, no network socket, no
#                container) and is quick: the whole tier runs in under a minute on two cores
#   integration  real gRPC over loopback (an in-process server or one genfl-server process, with the
#                clients the test drives), CLI processes, external tools (promtool, Prometheus,
#                openssl, sh, ip netns); also in-process tests that train models for several seconds,
#                which would make the unit tier slow
#   system       the whole method end to end: genfl-launch, genfl-sweep, a `--phase all` run of server
#                and client processes, Docker images and containers
TIERS = ("unit", "integration", "system")


def tier_problems(items) -> list[str]:
    """One line per collected test that has no tier marker or more than one."""
    problems = []
    for item in items:
        tiers = [tier for tier in TIERS if item.get_closest_marker(tier) is not None]
        if len(tiers) != 1:
            found = "no tier" if not tiers else "tiers " + ", ".join(tiers)
            problems.append(f"{item.nodeid}: {found}")
    return problems


def pytest_collection_modifyitems(config, items):
    problems = tier_problems(items)
    if problems:
        raise pytest.UsageError(
            "every test needs exactly one tier marker (" + ", ".join(f"pytest.mark.{t}" for t in TIERS)
            + "): `pytestmark = pytest.mark.<tier>` after a module's imports, or a decorator on each test "
            "of a module that mixes tiers; see tests/conftest.py for what each tier may start.\n"
            + "\n".join(problems))
