"""Clients that talk to the Coordinator in-process: the round logic without sockets or processes.

``InProcessClient`` plays, for one client, the part the gRPC servicer (genfl_server/service.py)
and the client's runner (genfl_client/runner.py) play together: it registers through the
coordinator, long-polls for its tasks, decodes the weights as a download does, runs the task with
the real ``TaskExecutor`` on a tiny shard, encodes the new weights as an upload does, and hands
the result back the way SubmitResult does after its transport work: ``open_task(header)``, the
update received chunk by chunk as the server's receiver takes it, metrics validated, then
``finish`` (or ``fail`` for a task the client cannot execute). A refusal is kept in
``rejections`` (the servicer would answer it with a gRPC status) and the client polls on.

Each client is a thread; the clients of a ``Federation`` share one compute lock, so their tasks run
one after another and each is seeded alone (torch's global RNG is the process's): an in-process
run is as repeatable as separate processes are.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from genfl_client.executor import TaskError, TaskExecutor
from genfl_client.runner import shard_label_counts
from genfl_server.coordinator import Coordinator, Task, TaskResult
from genfl_server.engine import RoundEngine
from genfl_server.guard import check_dp_epsilon, validated_metrics
from genfl_server.metrics import ServerMetrics
from genfl_server.results import RunRecorder
from genfl_server.service import task_header
from genfl_server.upload import ChunkedUpdate
from genfl_shared.codec import CodecError, Payload, decode_payload, encode_state_dict
from genfl_shared.errors import Rejected, RejectReason
from genfl_shared.partition import Shard
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.tasks import TaskSettings, from_header

State = dict[str, torch.Tensor]
# (the task as the client received it, the weights it trained) -> the weights it sends instead.
Tamper = Callable[["ReceivedTask", State], State]

POLL_SECONDS = 0.2  # how long one poll waits: bounds how late a stopped client notices


def tiny_shard(client_id: str, seed: int, train: int = 32, heldout: int = 16, dataset: str = "mnist") -> Shard:
    """A shard of random images and labels: enough for the round logic, seconds per round."""
    rng = np.random.default_rng(seed)
    return Shard(client_id, seed, dataset,
                 rng.integers(0, 256, (train, 28, 28), dtype=np.uint8), rng.integers(0, 10, train).astype(np.int64),
                 rng.integers(0, 256, (heldout, 28, 28), dtype=np.uint8), rng.integers(0, 10, heldout).astype(np.int64))


@dataclass
class ReceivedTask:
    """One task as the client saw it: its header's fields, parsed settings and decoded weights."""

    task_id: str
    type: int
    phase: str
    round: int
    settings: TaskSettings
    weights: State
    payload: Payload | None  # the encoded download: clients given one model share one

    @property
    def is_train(self) -> bool:
        return self.type == pb.TASK_TYPE_TRAIN


@dataclass
class SentResult:
    """One result the client handed back: its task, samples, metrics and (TRAIN) the weights sent."""

    task: ReceivedTask
    num_samples: int
    metrics: dict[str, float]
    weights: State | None


def received_task(run_id: str, task: Task) -> tuple[pb.TaskHeader, dict[str, torch.Tensor] | None]:
    """The header FetchTask sends for ``task``, and its synthetic images as the client receives
    them (None without)."""
    header, synthetic = task_header(run_id, task)
    return header, None if synthetic is None else decode_payload(synthetic.manifest, synthetic.chunks)


def downloaded_weights(payload: Payload) -> State:
    """The weights a client assembles from a task's payload (pre-framed chunks unwrapped first)."""
    chunks = [pb.TaskMessage.FromString(c).chunk if payload.wrapped else c for c in payload.chunks]
    return decode_payload(payload.manifest, chunks)


def received_update(manifest: pb.Manifest, chunks: Sequence[bytes], start_model: Mapping[str, torch.Tensor]
                    ) -> ChunkedUpdate:
    """An upload as the server receives it: each chunk checked, hashed and measured from the task's
    start model, the digest verified; raises Rejected as SubmitResult would refuse it."""
    try:
        update = ChunkedUpdate(manifest, start_model)
        for index, data in enumerate(chunks):
            update.add(pb.Chunk(index=index, data=data))
        return update.finish()
    except CodecError as error:
        raise Rejected(error.reason, f"update rejected: {error}") from None


class InProcessClient:
    """One client of the run, driving the coordinator from its own thread (see the module docstring)."""

    def __init__(self, coordinator: Coordinator, executor: TaskExecutor, *, dataset: str = "mnist",
                 tamper: Tamper | None = None, share_label_counts: bool = False):
        self.coordinator = coordinator
        self.executor = executor
        self.client_id = executor.shard.client_id
        self.dataset = dataset
        self.tamper = tamper  # a hostile client: what it sends instead of what it trained
        self.share_label_counts = share_label_counts  # as genfl-client --share-label-counts
        self.received: list[ReceivedTask] = []
        self.sent: list[SentResult] = []
        self.rejections: list[Rejected] = []
        self.errors: list[BaseException] = []  # anything unexpected: the thread stops on it
        self.secret = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"client-{self.client_id}", daemon=True)

    # -- life ----------------------------------------------------------------------------------
    def register(self) -> None:
        shard = self.executor.shard
        _info, self.secret = self.coordinator.register(pb.RegisterRequest(
            client_id=self.client_id, num_train_samples=shard.num_train, num_heldout_samples=shard.num_heldout,
            dataset=self.dataset, label_counts=shard_label_counts(shard) if self.share_label_counts else ()))

    def start(self) -> None:
        self.register()
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _serve(self) -> None:
        presence = self.coordinator.presence_opened(self.client_id)
        answered: set[str] = set()  # a refused result's task is handed out again: not redone
        try:
            while not self._stop.is_set():
                item = self.coordinator.next_task(self.client_id, POLL_SECONDS)
                if isinstance(item, pb.TaskHeader):  # the run is over
                    return
                if item is None or item.task_id in answered:
                    if item is not None:
                        self._stop.wait(POLL_SECONDS)
                    continue
                answered.add(item.task_id)
                self._answer(item)
        except BaseException as error:  # noqa: BLE001 - reported by the Federation's checks
            self.errors.append(error)
        finally:
            self.coordinator.presence_closed(self.client_id, presence)

    # -- one task ------------------------------------------------------------------------------
    def _answer(self, task: Task) -> None:
        header, synthetic = received_task(self.coordinator.run_id, task)
        weights = downloaded_weights(task.payload) if task.payload is not None else None
        received = ReceivedTask(task.task_id, task.type, task.phase, task.round, from_header(header, synthetic),
                                weights, task.payload)
        self.received.append(received)
        result = pb.ResultHeader(run_id=header.run_id, task_id=task.task_id, client_id=self.client_id,
                                 phase=task.phase, round=task.round, type=task.type, session_secret=self.secret)
        try:
            outcome = self.executor.run(header, weights, synthetic)
        except TaskError as error:
            result.error = str(error)
            self._submit(result, None)
            return
        state = outcome.state
        if state is not None and self.tamper is not None:
            state = self.tamper(received, state)
        result.num_samples = outcome.num_samples
        result.metrics.update(outcome.metrics)
        payload = None
        if state is not None:
            payload = encode_state_dict(state)
            result.manifest.CopyFrom(payload.manifest)
        if self._submit(result, payload):
            # A copy: the executor's model, whose tensors these are, is reloaded by the next task.
            kept = None if state is None else {name: value.clone() for name, value in state.items()}
            self.sent.append(SentResult(received, outcome.num_samples, dict(outcome.metrics), kept))

    def _submit(self, header: pb.ResultHeader, payload: Payload | None) -> bool:
        """SubmitResult's steps after the transport: True when the result was accepted."""
        try:
            task, batch = self.coordinator.open_task(header)
            if header.error:
                self.coordinator.fail(task, batch, header.error.strip())
                return False
            update = None
            if task.expects_weights:
                if payload is None:
                    raise Rejected(RejectReason.MALFORMED, "a training result must carry the updated weights")
                update = received_update(header.manifest, payload.chunks, task.model)
            metrics = validated_metrics(header.metrics)
            check_dp_epsilon(task.config, metrics)
            self.coordinator.finish(TaskResult(task, int(header.num_samples), metrics), batch, update)
            return True
        except Rejected as error:
            self.rejections.append(error)
            return False

    # -- what it did ---------------------------------------------------------------------------
    def tasks(self, phase: str | None = None, *, train: bool | None = None) -> list[ReceivedTask]:
        return [t for t in self.received if (phase is None or t.phase == phase)
                and (train is None or t.is_train == train)]

    def updates(self, phase: str, rnd: int) -> list[SentResult]:
        """The accepted TRAIN results of ``phase`` round ``rnd`` (more than one when it was redone)."""
        return [s for s in self.sent if s.weights is not None and (s.task.phase, s.task.round) == (phase, rnd)]


@dataclass
class Federation:
    """A coordinator, a round engine and in-process clients, serving until the ``federation`` ends."""

    coordinator: Coordinator
    engine: RoundEngine
    metrics: ServerMetrics
    recorder: RunRecorder
    clients: dict[str, InProcessClient] = field(default_factory=dict)

    def check_clients(self) -> None:
        """Fail on whatever went wrong inside a client's thread."""
        for client in self.clients.values():
            if client.errors:
                raise AssertionError(f"client {client.client_id} failed") from client.errors[0]


@contextmanager
def federation(out_dir, shards: Sequence[Shard], *, tamper: Mapping[str, Tamper] | None = None,
               run_id: str = "run-inprocess", share_label_counts: bool | Sequence[str] = False,
               **engine_options) -> Iterator[Federation]:
    """A federation of one in-process client per shard (``tamper``: client_id -> its hostile change
    of the weights it sends; ``share_label_counts``: every client, or those named, report their
    label counts), every client registered before the body runs. ``engine_options``
    go to the RoundEngine (default: seed 11, deterministic, a 60 s round timeout)."""
    coordinator = Coordinator(run_id, expected_clients=len(shards), dataset="mnist", poll_timeout=POLL_SECONDS)
    metrics = ServerMetrics()
    recorder = RunRecorder(out_dir, run_id=run_id)
    engine = RoundEngine(coordinator, metrics, recorder,
                         **{"seed": 11, "deterministic": True, "round_timeout": 60.0, **engine_options})
    compute = threading.Lock()  # one task at a time: each seeds torch's global RNG alone
    clients = {shard.client_id: InProcessClient(coordinator, TaskExecutor(shard, torch.device("cpu"), compute),
                                                tamper=(tamper or {}).get(shard.client_id),
                                                share_label_counts=share_label_counts is True or (
                                                    share_label_counts is not False
                                                    and shard.client_id in share_label_counts))
               for shard in shards}
    running = Federation(coordinator, engine, metrics, recorder, clients)
    # A deterministic TRAIN task switches torch to deterministic kernels process-wide: undone after.
    deterministic_kernels = torch.are_deterministic_algorithms_enabled()
    for client in clients.values():
        client.start()
    try:
        engine.wait_for_clients(timeout=10)
        yield running
        running.check_clients()
    finally:
        coordinator.shutdown(reason="test over")
        for client in clients.values():
            client.stop()
        torch.use_deterministic_algorithms(deterministic_kernels)
