"""A real server with many clients: 200 fake protocol clients (benchmarks/fake_clients.py: asyncio +
grpc.aio, no torch, in two processes) through 2 CVAE rounds, while a health probe checks that the
server keeps answering within a second throughout."""

from __future__ import annotations

import sys
import threading
import time

import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import REPO_ROOT
from genfl_server.coordinator import Coordinator
from genfl_server.engine import RoundEngine
from genfl_server.metrics import ServerMetrics
from genfl_server.results import RunRecorder
from genfl_server.strategy import Instruction
from genfl_shared.models import initial_state
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.tasks import TrainTask
from helpers import log_tail, run_rounds, start_server

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from fake_clients import ClientProcesses  # noqa: E402

CLIENTS = 200
ROUNDS = 2
PROBE_DEADLINE_SECONDS = 1.0
PROBE_INTERVAL_SECONDS = 0.25


class HealthProbe(threading.Thread):
    """Asks the server's health service every PROBE_INTERVAL_SECONDS, each call with a 1 s deadline,
    until ``done()`` (the last round is recorded: after it the server shuts down and stops
    answering); records every answer's latency and every failure."""

    def __init__(self, address: str, done):
        super().__init__(daemon=True)
        self.address, self.done = address, done
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._halt.is_set() and not self.done():
                started = time.monotonic()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=PROBE_DEADLINE_SECONDS)
                    self.latencies.append(time.monotonic() - started)
                except grpc.RpcError as error:
                    self.failures.append(f"after {time.monotonic() - started:.2f} s: {error.code().name}")
                self._halt.wait(PROBE_INTERVAL_SECONDS)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


@pytest.mark.integration
def test_server_completes_rounds_with_200_protocol_clients_and_stays_responsive(tmp_path):
    out, log = tmp_path / "server", tmp_path / "server.log"
    server, endpoint = start_server(out, "--phase", "cvae", "--rounds", str(ROUNDS), "--clients", str(CLIENTS),
                                    "--local-epochs", "0", "--threads", "1", "--address", "127.0.0.1:0",
                                    log=log)
    probe = HealthProbe(endpoint["address"], done=lambda: len(run_rounds(out)) == ROUNDS)
    probe.start()
    clients = ClientProcesses(endpoint["address"], CLIENTS, processes=2, verify_downloads=True)
    try:
        stats = clients.join(timeout=900)
        assert server.wait(60) == 0, log_tail(log)
    finally:
        probe.stop()
        clients.stop()
        if server.poll() is None:
            server.kill()
            server.wait()
    assert stats.error is None, stats.error
    # Every client trained in every round (round r's evaluation rides on round r + 1's TRAIN task) and
    # evaluated the last round's model, and downloaded verified weights each time.
    assert stats.tasks == {"TASK_TYPE_TRAIN": CLIENTS * ROUNDS, "TASK_TYPE_EVALUATE": CLIENTS}
    rounds = run_rounds(out)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["clients"] == CLIENTS for r in rounds)
    # Responsive throughout: the probe ran the whole time and every check answered within 1 s.
    assert not probe.failures, probe.failures[:5]
    expected_probes = sum(r["seconds"] for r in rounds) / (PROBE_INTERVAL_SECONDS + PROBE_DEADLINE_SECONDS)
    assert len(probe.latencies) >= expected_probes, (len(probe.latencies), expected_probes)
    assert max(probe.latencies) < PROBE_DEADLINE_SECONDS


@pytest.mark.unit
def test_the_broadcast_is_one_immutable_encoded_copy_shared_by_every_client(tmp_path):
    """However many clients, a step's weights are encoded once: every client's task carries the
    same frozen Payload, whose chunks are immutable bytes (ready-to-send TaskMessage frames)."""
    clients = [f"c{i}" for i in range(5)]
    coordinator = Coordinator("run-broadcast", expected_clients=len(clients), dataset=None, poll_timeout=1.0)
    for cid in clients:
        coordinator.register(pb.RegisterRequest(client_id=cid, num_train_samples=100, num_heldout_samples=10))
    engine = RoundEngine(coordinator, ServerMetrics(), RunRecorder(tmp_path, run_id="run-broadcast"), seed=0,
                         round_timeout=1.0, round_retries=0)
    engine.wait_for_clients(timeout=5)
    state = initial_state("cvae", seed=0)
    settings = TrainTask(model="cvae", epochs=0, batch_size=32, optimizer="adam", lr=0.001, sgd_momentum=0.0,
                         binarize=True)
    instructions = {cid: Instruction(settings, state) for cid in clients}  # one model: one encoded download
    step = threading.Thread(target=engine._run_batch, args=(pb.TASK_TYPE_TRAIN, "cvae", 1, instructions),
                            daemon=True)
    step.start()
    tasks = [coordinator.next_task(cid, timeout=5) for cid in clients]
    step.join(10)
    assert all(task is not None and task.payload is not None for task in tasks)
    payload = tasks[0].payload
    assert all(task.payload is payload for task in tasks)
    assert isinstance(payload.chunks, tuple) and all(type(chunk) is bytes for chunk in payload.chunks)
    assert payload.wrapped and pb.TaskMessage.FromString(payload.chunks[0]).chunk.index == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        payload.chunks = ()


@pytest.mark.integration
def test_a_failed_fake_client_is_reported_at_once_not_waited_for(tmp_path):
    """The M = 1,000 "hang": one fake client failed, its process cancelled its other clients, and
    the server (rightly: no --round-timeout, no Presence streams) waited for them for ever, while
    ``ClientProcesses.join`` waited for the other processes, whose clients waited for the server.
    Here a server that takes 3 clients gets 4 in 2 processes: one registration is refused
    (run_full), and join must say so at once, naming the step."""
    out, log = tmp_path / "server", tmp_path / "server.log"
    server, endpoint = start_server(out, "--phase", "cvae", "--rounds", "1", "--clients", "3",
                                    "--local-epochs", "0", "--threads", "1", "--address", "127.0.0.1:0",
                                    log=log)
    clients = ClientProcesses(endpoint["address"], 4, processes=2)
    try:
        started = time.monotonic()
        stats = clients.join(timeout=120)
        waited = time.monotonic() - started
    finally:
        clients.stop()
        server.kill()
        server.wait()
    assert stats.error is not None and "Register: RESOURCE_EXHAUSTED" in stats.error, stats.error
    assert waited < 60, f"join took {waited:.0f} s"
