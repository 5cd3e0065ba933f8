"""What many tests need, written once: a free port, waiting for a condition, MNIST shards, a real
genfl-server process and the endpoint it announces, real genfl-client processes, the rounds a run
recorded, and an in-process gRPC server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import grpc

from genfl_server.coordinator import Coordinator
from genfl_server.metrics import ServerMetrics
from genfl_server.service import FederatedLearningService, start_grpc_server
from genfl_shared.codec import MAX_MESSAGE_BYTES
from genfl_shared.runfiles import METRICS_JSONL, round_events, wait_for_endpoint

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.05,
               details: Callable[[], str] | None = None,
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` seconds pass
    (AssertionError naming ``what``, followed by ``details()``, e.g. the processes' logs). An
    exception in ``ignore`` (say, a port that does not answer yet) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f"\n{details()}" if details is not None else ""))
        time.sleep(interval)


def run_rounds(out: Path) -> list[dict]:
    """The per-round records a run has written to OUT/metrics.jsonl so far."""
    return round_events(Path(out) / METRICS_JSONL)


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no {path})"


def start_server(out: Path, *args: str, log: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60.0) -> tuple[subprocess.Popen, dict]:
    """Start ``python -m genfl_server.cli --out OUT ARGS`` (output to ``log``, else discarded) and
    wait until it listens; returns (process, its endpoint.json). A server that exits or does not
    listen in time is killed and fails the test with the end of its log."""
    with open(log, "w") if log is not None else open(os.devnull, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "genfl_server.cli", "--out", str(out), *args],
                                stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        return proc, wait_for_endpoint(out, timeout, [proc])
    except (RuntimeError, TimeoutError) as error:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise AssertionError(f"{error}\n{log_tail(log) if log is not None else ''}") from None


def partition_mnist(out: Path, clients: int, train_subset: int, *, alpha: float | None = None,
                    seed: int = 0) -> Path:
    """MNIST shards (IID, or Dirichlet ``alpha``) for ``clients`` clients from ``train_subset``
    images, written to OUT by the real ``genfl-partition``; returns OUT."""
    from conftest import dataset_dir

    split = ["--iid"] if alpha is None else ["--alpha", str(alpha)]
    part = subprocess.run([sys.executable, "-m", "genfl_shared.partition_cli", "--dataset", "mnist",
                           "--data-root", str(dataset_dir("mnist")), "--clients", str(clients), *split,
                           "--train-subset", str(train_subset), "--seed", str(seed), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert part.returncode == 0, part.stderr
    return out


def start_client(address: str, shard: Path, log: Path, *args: str) -> subprocess.Popen:
    """``python -m genfl_client.cli --server ADDRESS --shard SHARD --threads 1 ARGS``, its output
    appended to ``log`` (a restarted client keeps one log)."""
    with open(log, "a") as sink:
        return subprocess.Popen([sys.executable, "-m", "genfl_client.cli", "--server", address, "--shard",
                                 str(shard), "--threads", "1", *args], stdout=sink, stderr=subprocess.STDOUT)


def kill_all(processes) -> None:
    """Kill (and reap) whichever of ``processes`` still run: a test's clean-up after a failure."""
    for proc in processes:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def loopback_server(coordinator: Coordinator, metrics: ServerMetrics | None = None,
                    **service_options) -> Iterator[tuple[grpc.Channel, int]]:
    """A real gRPC server in this process serving ``coordinator`` on 127.0.0.1, and a channel to
    it; yields (channel, port). At the end the run is shut down (releasing any waiting poll) and
    the server must stop within 10 s."""
    service = FederatedLearningService(coordinator, metrics or ServerMetrics(), **service_options)
    server, port, _health = start_grpc_server(service, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel, port
    finally:
        coordinator.shutdown(reason="test over")
        channel.close()
        stopped = server.stop(grace=1).wait(10)
    assert stopped, "the gRPC server did not stop within 10 s of stop(grace=1)"
