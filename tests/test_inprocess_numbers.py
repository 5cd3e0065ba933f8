"""The in-process clients (tests/inprocess.py) are faithful to the wire: the small deterministic
``--phase all`` run of tests/deterministic_numbers.py, driven in-process, reports exactly the numbers
its real server and client processes recorded (tests/data/deterministic_numbers.json)."""

from __future__ import annotations

import pytest
import torch

from conftest import dataset_dir
from deterministic_numbers import CLIENTS, SERVER_ARGS, numbers, platform_key, recorded_events, recorded_platforms
from genfl_server.guard import UpdateGuard
from genfl_server.phases import PhaseContext, run_method
from genfl_server.runstate import RunState
from genfl_shared.config import RunConfig, argv_for
from genfl_shared.data import load_dataset, to_float_images
from genfl_shared.partition import load_shard
from genfl_shared.runfiles import METRICS_JSONL, read_events
from helpers import partition_mnist
from inprocess import federation

pytestmark = pytest.mark.integration  # a whole run on real MNIST: about 30 CPU seconds

# SERVER_ARGS' run settings (checked below against them).
SETTINGS = dict(clients=CLIENTS, cvae_rounds=2, classifier_rounds=3, synthetic_samples=300, cas_epochs=1,
                pretrain_epochs=1, seed=5, deterministic=True)


@pytest.fixture
def torch_as_the_recorded_processes():
    """One thread and deterministic kernels, as the recorded server and clients ran (--threads 1)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_an_in_process_run_reports_the_numbers_the_processes_recorded(tmp_path, torch_as_the_recorded_processes):
    expected = recorded_events(platform_key())
    if expected is None:
        pytest.skip(f"numbers recorded on {recorded_platforms()}, this is {platform_key()}: floats differ")
    for name, value in SETTINGS.items():
        assert " ".join(argv_for(**{name: value})) in " ".join(SERVER_ARGS), name
    config = RunConfig().override(**SETTINGS)
    shards = partition_mnist(tmp_path / "shards", CLIENTS, 600, alpha=0.5)
    images, labels = load_dataset("mnist", dataset_dir("mnist"), "test")
    test_set = (to_float_images(images, binarize=config.data.binarize), labels)
    out = tmp_path / "run"
    with federation(out, [load_shard(shards / f"client-00{i}.npz") for i in range(CLIENTS)], seed=config.reproducibility.seed,
                    deterministic=config.reproducibility.deterministic, guard=UpdateGuard.from_config(config.guard)) as fed:
        run_method(PhaseContext(fed.engine, fed.recorder, fed.metrics, config, out, torch.device("cpu"), test_set,
                                RunState.in_dir(out)), "all")
    assert numbers(read_events(out / METRICS_JSONL)) == expected
