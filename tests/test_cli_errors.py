"""A new user's mistakes at the command line end in one clear line and a documented exit code.

Every case runs the installed console script (genfl-partition, genfl-server, ...) as a real
subprocess and checks its exit code, that stderr carries the message, and that no traceback is
printed. Nothing here is mocked: ports are really occupied, files really malformed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from genfl_server.coordinator import Coordinator
from genfl_server.metrics import ServerMetrics
from genfl_server.listening import ListenError
from genfl_server.service import FederatedLearningService, start_grpc_server
from genfl_shared.partition import write_shard

from conftest import dataset_dir

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent  # the venv's console scripts, as a user runs them

# genfl-server's exit codes (README, "genfl-server").
EXIT_FAILED, EXIT_USAGE, EXIT_CANNOT_LISTEN, EXIT_CLIENTS_MISSING = 1, 2, 3, 4
CLIENT_EXIT_BAD_SHARD = 2  # genfl-client's code for an unusable shard or options


def run(tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENFL_")}
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_clean_failure(result: subprocess.CompletedProcess, code: int, line: str) -> None:
    """Exit ``code``, ``line`` as one line of stderr, and no traceback anywhere."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert line in result.stderr.splitlines(), output
    assert "Traceback" not in output, output


def server(*args: str, out: Path, clients: str = "2") -> subprocess.CompletedProcess:
    return run("genfl-server", "--clients", clients, "--out", str(out), "--log-level", "warning", *args)


# -- the dataset check --------------------------------------------------------------------------

def test_partition_of_mnist_files_as_fmnist_is_refused_and_writes_nothing(tmp_path):
    out = tmp_path / "shards"
    mnist = dataset_dir("mnist")
    result = run("genfl-partition", "--dataset", "fmnist", "--data-root", str(mnist), "--clients", "2",
                 "--iid", "--train-subset", "200", "--min-samples", "10", "--out", str(out))
    assert_clean_failure(result, 1, f"Error: {mnist}: these are MNIST files, not Fashion-MNIST; point the "
                                    "data root at the Fashion-MNIST files (or use --dataset mnist)")
    assert not out.exists() or not list(out.glob("client-*.npz"))
    assert not (out / "partition.json").exists()


def test_server_test_data_of_another_dataset_is_refused(tmp_path):
    fmnist = dataset_dir("fmnist")
    result = server("--address", "127.0.0.1:0", "--dataset", "mnist", "--test-data", str(fmnist),
                    out=tmp_path / "run")
    assert_clean_failure(result, EXIT_FAILED, f"Error: {fmnist}: these are Fashion-MNIST files, not MNIST; "
                                              "point the data root at the MNIST files (or use --dataset fmnist)")
    assert not (tmp_path / "run" / "endpoint.json").exists()  # refused before listening


def test_launch_of_mnist_files_as_fmnist_is_refused(tmp_path):
    mnist = dataset_dir("mnist")
    result = run("genfl-launch", "--dataset", "fmnist", "--data-root", str(mnist), "--clients", "2", "--iid",
                 "--out", str(tmp_path / "launch"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "these are MNIST files, not Fashion-MNIST" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not list((tmp_path / "launch").rglob("client-*.npz"))


def test_centralised_on_mnist_files_as_fmnist_is_refused(tmp_path):
    mnist = dataset_dir("mnist")
    result = run("genfl-centralised", "--dataset", "fmnist", "--data-root", str(mnist),
                 "--out", str(tmp_path / "central"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "these are MNIST files, not Fashion-MNIST" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


# -- where the server listens, and who registers ------------------------------------------------

@pytest.fixture(params=["socket", "grpc"])
def occupied_port(request):
    """A loopback port held by a plain listening socket, or by another gRPC server (which, with
    gRPC's default SO_REUSEPORT, a second gRPC server could otherwise share)."""
    if request.param == "socket":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            yield sock.getsockname()[1]
    else:
        other = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        port = other.add_insecure_port("127.0.0.1:0")
        other.start()
        yield port
        other.stop(grace=None)


def test_server_on_a_port_in_use(tmp_path, occupied_port):
    address = f"127.0.0.1:{occupied_port}"
    result = server("--address", address, out=tmp_path / "run")
    assert_clean_failure(result, EXIT_CANNOT_LISTEN, f"Error: cannot listen on {address}: address in use")
    assert not (tmp_path / "run" / "endpoint.json").exists()


def test_server_metrics_port_in_use(tmp_path):
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = server("--address", "127.0.0.1:0", "--metrics-port", str(port), out=tmp_path / "run")
    assert_clean_failure(result, EXIT_CANNOT_LISTEN,
                         f"Error: cannot serve metrics on 0.0.0.0:{port}: Address already in use")


def test_client_metrics_port_in_use(tmp_path):
    shard = tmp_path / "client-000.npz"
    write_shard(shard, **_shard_arrays(), meta={"client_id": "client-000", "client_index": 0, "dataset": "mnist"})
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run("genfl-client", "--server", "127.0.0.1:1", "--shard", str(shard), "--metrics-port", str(port),
                     "--max-reconnect-seconds", "1")
    assert result.returncode == CLIENT_EXIT_BAD_SHARD, result.stderr
    assert f"cannot serve metrics on --metrics-port {port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("address, reason", [
    ("no-such-host.invalid:50051", "unknown host 'no-such-host.invalid'"),
    ("localhost", "not a host:port address (e.g. 0.0.0.0:50051)"),  # gRPC would take port 443
])
def test_server_on_an_invalid_address(tmp_path, address, reason):
    result = server("--address", address, out=tmp_path / "run")
    assert result.returncode == EXIT_CANNOT_LISTEN, result.stderr
    assert f"Error: cannot listen on {address}: {reason}" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1
    assert "Traceback" not in result.stdout + result.stderr


def test_server_gives_up_when_clients_do_not_register(tmp_path):
    out = tmp_path / "run"
    result = server("--address", "127.0.0.1:0", "--register-timeout", "3", "--metrics-port", "0",
                    out=out, clients="2")
    assert_clean_failure(result, EXIT_CLIENTS_MISSING, "Error: only 0 of 2 clients registered within 3 s")
    assert result.stderr.splitlines()[-1] == "Error: only 0 of 2 clients registered within 3 s"
    assert (out / "endpoint.json").exists()  # it did listen, then shut down in order


# -- input files -----------------------------------------------------------------------------

@pytest.mark.parametrize("option, text, message", [
    ("--partition-info", "dataset: mnist\n", "Error: --partition-info {path} is not a readable JSON file"),
    ("--tokens-file", "client-000 secret\n", "Error: tokens file {path} is not JSON"),
])
def test_server_input_file_that_is_not_json(tmp_path, option, text, message):
    path = tmp_path / "input.json"
    path.write_text(text)
    result = server("--address", "127.0.0.1:0", option, str(path), out=tmp_path / "run")
    assert result.returncode == EXIT_FAILED, result.stderr
    assert message.format(path=path) in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def _shard_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"train_images": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
            "train_labels": np.arange(4, dtype=np.int64),
            "heldout_images": rng.integers(0, 256, (1, 28, 28), dtype=np.uint8),
            "heldout_labels": np.zeros(1, dtype=np.int64)}


def _make_bad_shard(path: Path, kind: str) -> None:
    meta = {"client_id": "client-000", "client_index": 0, "dataset": "mnist"}
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("client-000 train 4 heldout 1\n")
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    elif kind == "truncated":
        write_shard(path, **_shard_arrays(), meta=meta)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "missing_members":
        arrays = _shard_arrays()
        del arrays["heldout_images"], arrays["heldout_labels"]
        np.savez(path, **arrays, meta=np.array(json.dumps(meta)))


@pytest.mark.parametrize("kind, reason", [
    ("directory", "is a directory, not a shard file"),
    ("text", "not a GenFL shard (.npz): a text file"),
    ("png", "not a GenFL shard (.npz): a PNG image"),
    ("truncated", "not a GenFL shard (.npz): truncated or damaged zip archive"),
    ("missing_members", "not a GenFL shard (.npz): missing heldout_images, heldout_labels"),
])
def test_client_with_an_unusable_shard(tmp_path, kind, reason):
    shard = tmp_path / "client-000.npz"
    _make_bad_shard(shard, kind)
    # Port 1 on loopback: nothing listens, but the shard is refused before any connection.
    result = run("genfl-client", "--server", "127.0.0.1:1", "--shard", str(shard), "--max-reconnect-seconds", "1")
    assert result.returncode == CLIENT_EXIT_BAD_SHARD, result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"cannot use shard: {shard}: {reason}" in errors[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "pickled" not in result.stderr


def test_a_second_genfl_server_cannot_share_the_port():
    """Two real GenFL gRPC servers in process: the second is refused (with gRPC's default
    SO_REUSEPORT it used to bind too, and clients would have been split between the two)."""
    def service():
        return FederatedLearningService(Coordinator("run", expected_clients=1, dataset="mnist"), ServerMetrics())

    first, port, _ = start_grpc_server(service(), "127.0.0.1:0")
    try:
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: address in use"):
            start_grpc_server(service(), f"127.0.0.1:{port}")
    finally:
        first.stop(grace=None)
