"""Shared state between the gRPC threads and the round engine: who is registered, which task each
client holds, and which results are still awaited.

The engine posts a batch of tasks (one per client) and waits; gRPC threads hand tasks to long-polling
clients and feed results back into the batch. One condition variable wakes waiting pollers the
moment a task is posted, so task delivery costs no polling interval.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import grpc
import torch

from genfl_shared.codec import Payload
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.tasks import TaskSettings

from .guard import check_registered_samples

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A request the server refuses: carries the gRPC status code and a metrics label."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str):
        super().__init__(message)
        self.code = code
        self.reason = reason


class RegistrationTimeout(TimeoutError):
    """Fewer clients than the run needs registered before the registration deadline."""


@dataclass
class ClientInfo:
    client_id: str
    num_train_samples: int
    num_heldout_samples: int
    dataset: str
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class Task:
    task_id: str
    client_id: str
    type: int  # pb.TaskType
    phase: str
    round: int
    config: TaskSettings
    payload: Payload | None = None

    @property
    def expects_weights(self) -> bool:
        return self.type == pb.TASK_TYPE_TRAIN


@dataclass
class TaskResult:
    task: Task
    num_samples: int
    metrics: dict[str, float]
    # A TRAIN result's update is not kept here: it is folded in by on_update as it arrives (the
    # batch would otherwise hold K models).


UpdateHook = Callable[[Task, int, Mapping[str, torch.Tensor]], None]


class TaskBatch:
    """The tasks of one step (a round's training, or an evaluation) and their results."""

    def __init__(self, tasks: list[Task], *, template: Mapping[str, torch.Tensor] | None,
                 on_update: UpdateHook | None):
        self.tasks = {t.task_id: t for t in tasks}
        self.template = template
        self._on_update = on_update
        self.results: dict[str, TaskResult] = {}
        self.failures: dict[str, str] = {}  # task_id -> the client's error: it could not run the task
        self._cond = threading.Condition()
        self.closed = False

    def deliver(self, result: TaskResult, update: Mapping[str, torch.Tensor] | None) -> None:
        """Record one result (and fold its update in) exactly once; raises Rejected otherwise."""
        with self._cond:
            task = result.task
            self._check_open(task)
            if update is not None and self._on_update is not None:
                self._on_update(task, result.num_samples, update)
            self.results[task.task_id] = result
            self._cond.notify_all()

    def fail(self, task: Task, message: str) -> None:
        """Record that the client could not execute ``task`` (once, instead of a result)."""
        with self._cond:
            self._check_open(task)
            self.failures[task.task_id] = message
            self._cond.notify_all()

    def _check_open(self, task: Task) -> None:
        if self.closed:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, "late",
                           f"task {task.task_id} (round {task.round}) closed before this result arrived")
        if task.task_id in self.results or task.task_id in self.failures:
            raise Rejected(grpc.StatusCode.ALREADY_EXISTS, "duplicate",
                           f"a result for task {task.task_id} was already accepted")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every task has a result or an error (True) or the timeout passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self.results) + len(self.failures) < len(self.tasks):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        with self._cond:
            self.closed = True


class Coordinator:
    def __init__(self, run_id: str, *, expected_clients: int, dataset: str | None,
                 poll_timeout: float = 30.0, max_client_samples: int | None = None):
        self.run_id = run_id
        self.max_client_samples = max_client_samples  # None: any count (guard.check_registered_samples)
        self.expected_clients = expected_clients
        self.dataset = dataset
        self.poll_timeout = poll_timeout
        self.clients: dict[str, ClientInfo] = {}
        self._pending: dict[str, Task] = {}              # client_id -> task it must do now
        self._open: dict[str, tuple[Task, TaskBatch]] = {}  # task_id -> (task, batch)
        self._finished: set[str] = set()                  # task ids with an accepted result
        self._closed: set[str] = set()                    # task ids whose batch closed unanswered
        self._cond = threading.Condition()
        self._task_ids = itertools.count(1)
        self._shutdown: pb.TaskHeader | None = None
        self.shutdown_delivered: set[str] = set()
        self.started = False  # set once the run begins: registrations are then frozen

    # -- registration -------------------------------------------------------------------------
    def register(self, request: pb.RegisterRequest) -> ClientInfo:
        cid = request.client_id
        if not cid or len(cid) > 128 or not cid.isprintable():
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "bad_client_id",
                           "client_id must be 1-128 printable characters")
        if request.num_train_samples <= 0:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "bad_sample_count",
                           f"client {cid!r} reports {request.num_train_samples} training samples")
        check_registered_samples(cid, request.num_train_samples, self.max_client_samples)
        if self.dataset and request.dataset and request.dataset != self.dataset:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, "wrong_dataset",
                           f"client {cid!r} holds {request.dataset!r} data but this run trains on {self.dataset!r}")
        with self._cond:
            known = self.clients.get(cid)
            if known is None and len(self.clients) >= self.expected_clients:
                raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, "run_full",
                               f"this run takes {self.expected_clients} clients and all have registered")
            if known is not None and self.started and (
                    known.num_train_samples != request.num_train_samples
                    or known.num_heldout_samples != request.num_heldout_samples):
                raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, "sample_count_changed",
                               f"client {cid!r} re-registered with different sample counts mid-run")
            info = ClientInfo(cid, request.num_train_samples, request.num_heldout_samples, request.dataset)
            self.clients[cid] = info
            self._cond.notify_all()
        log.info("client %s registered (%d train / %d held-out samples)%s", cid, info.num_train_samples,
                 info.num_heldout_samples, " again" if known else "")
        return info

    def wait_for_clients(self, timeout: float | None) -> list[ClientInfo]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self.clients) < self.expected_clients:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise RegistrationTimeout(f"only {len(self.clients)} of {self.expected_clients} clients "
                                              f"registered within {timeout:g} s")
                self._cond.wait(remaining)
            self.started = True
            return sorted(self.clients.values(), key=lambda c: c.client_id)

    def client(self, client_id: str) -> ClientInfo:
        info = self.clients.get(client_id)
        if info is None:
            raise Rejected(grpc.StatusCode.NOT_FOUND, "unknown_client",
                           f"client {client_id!r} is not registered in run {self.run_id}")
        info.last_seen = time.monotonic()
        return info

    def check_run(self, run_id: str) -> None:
        if run_id != self.run_id:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, "wrong_run",
                           f"run {run_id!r} is not running here (this is run {self.run_id}); register again")

    # -- tasks --------------------------------------------------------------------------------
    def new_task(self, client_id: str, type_: int, phase: str, rnd: int, config: TaskSettings,
                 payload: Payload | None) -> Task:
        return Task(f"{self.run_id}-{next(self._task_ids)}", client_id, type_, phase, rnd, config, payload)

    def dispatch(self, tasks: list[Task], *, template: Mapping[str, torch.Tensor] | None = None,
                 on_update: UpdateHook | None = None) -> TaskBatch:
        """Post one task per client and wake their pollers at once."""
        batch = TaskBatch(tasks, template=template, on_update=on_update)
        with self._cond:
            for task in tasks:
                self._pending[task.client_id] = task
                self._open[task.task_id] = (task, batch)
            self._cond.notify_all()
        return batch

    def close(self, batch: TaskBatch) -> None:
        """Withdraw a batch's unanswered tasks (deadline passed): their results will count as late."""
        batch.close()
        with self._cond:
            for task_id, task in batch.tasks.items():
                if self._open.pop(task_id, None) is not None:
                    self._closed.add(task_id)
                if self._pending.get(task.client_id) is task:
                    del self._pending[task.client_id]

    def next_task(self, client_id: str, timeout: float, is_active: Callable[[], bool] = lambda: True
                  ) -> Task | pb.TaskHeader | None:
        """The client's current task (re-delivered until answered), the shutdown header, or None
        when nothing came within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._shutdown is not None:
                    self.shutdown_delivered.add(client_id)
                    self._cond.notify_all()
                    return self._shutdown
                task = self._pending.get(client_id)
                if task is not None:
                    return task
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not is_active():
                    return None
                self._cond.wait(remaining)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def open_task(self, header: pb.ResultHeader) -> tuple[Task, TaskBatch]:
        """Match a result header to the task it answers; raise Rejected with the precise reason."""
        self.check_run(header.run_id)
        info = self.client(header.client_id)
        with self._cond:
            entry = self._open.get(header.task_id)
            if entry is None:
                if header.task_id in self._finished:
                    raise Rejected(grpc.StatusCode.ALREADY_EXISTS, "duplicate",
                                   f"a result for task {header.task_id} was already accepted")
                if header.task_id in self._closed:
                    raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, "late",
                                   f"task {header.task_id} closed before this result arrived")
                raise Rejected(grpc.StatusCode.NOT_FOUND, "unknown_task",
                               f"no task {header.task_id!r} was handed out")
        task, batch = entry
        if task.client_id != header.client_id:
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED, "wrong_client",
                           f"task {task.task_id} belongs to another client")
        if header.phase != task.phase or header.round != task.round:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, "stale_round",
                           f"result names {header.phase} round {header.round}, but task {task.task_id} "
                           f"is {task.phase} round {task.round}")
        if header.type != task.type:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "wrong_type",
                           f"task {task.task_id} is {pb.TaskType.Name(task.type)}, not "
                           f"{pb.TaskType.Name(header.type) if header.type in pb.TaskType.values() else header.type}")
        if task.type == pb.TASK_TYPE_TRAIN:
            limit, plausible = info.num_train_samples, 0 < header.num_samples <= info.num_train_samples
        else:
            limit, plausible = info.num_heldout_samples, header.num_samples <= info.num_heldout_samples
        if not plausible and not header.error:  # an error report counts no samples
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "bad_sample_count",
                           f"result claims {header.num_samples} samples; the client registered {limit}")
        return task, batch

    def finish(self, result: TaskResult, batch: TaskBatch,
               update: Mapping[str, torch.Tensor] | None) -> None:
        batch.deliver(result, update)
        self._retire(result.task)

    def fail(self, task: Task, batch: TaskBatch, message: str) -> None:
        """The client reported that it cannot execute ``task``: the task is answered (not
        re-delivered), and the batch counts it as failed."""
        batch.fail(task, message)
        self._retire(task)

    def _retire(self, task: Task) -> None:
        with self._cond:
            self._open.pop(task.task_id, None)
            self._finished.add(task.task_id)
            if self._pending.get(task.client_id) is task:
                del self._pending[task.client_id]

    # -- end of run ---------------------------------------------------------------------------
    def shutdown(self, *, failed: bool = False, reason: str = "") -> None:
        config = {"status": "failed" if failed else "completed", "reason": reason}
        with self._cond:
            self._shutdown = pb.TaskHeader(run_id=self.run_id, type=pb.TASK_TYPE_SHUTDOWN,
                                           config_json=json.dumps(config))
            self._cond.notify_all()

    def wait_shutdown_delivered(self, timeout: float) -> bool:
        """Give every registered client the chance to hear that the run is over."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not set(self.clients) <= self.shutdown_delivered:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True
