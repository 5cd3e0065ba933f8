"""Shared state between the gRPC threads and the round engine: who is registered, which task each
client holds, and which results are still awaited.

The engine posts a batch of tasks (one per client) and waits; the gRPC service (on its event-loop
thread, and its upload executor) hands tasks to long-polling clients and feeds results back into the
batch. Posting a task wakes waiting pollers at once (so task delivery costs no polling interval):
those blocked on the condition variable, and through the poll listeners the service's asyncio polls;
a condition per batch wakes the engine as its results come in. Each task's life-cycle (pending -> delivered -> done or closed) is kept in
one TaskTable, which alone decides whether a result is a duplicate or late.

Presence (presence.py): the service reports each client's presence stream opening and closing
(``presence_opened`` / ``presence_closed``); a step stops waiting for clients that are away once it
has enough results (``TaskBatch.wait``), and a client's change of presence wakes the waiting step.

Identity: each registration starts a session with a random secret (only its SHA-256 is kept) that
the client's polls and results must carry; task ids are random, so a task cannot be guessed.
Without client tokens a client is who first registered its id: a re-registration (a restarted
client) ends the old session, and is logged as a takeover when the old session was live.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from genfl_shared.codec import Payload
from genfl_shared.data import NUM_CLASSES
from genfl_shared.errors import Rejected, RejectReason
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.tasks import TaskSettings, TrainTask

from .guard import PartitionCounts, check_registered_samples, checked_label_counts
from .logsafe import RateLimitedLog, shown
from .presence import DEFAULT_PRESENCE_GRACE_SECONDS, Presence

log = logging.getLogger(__name__)

# A session that made a request less than this long after its poll timeout is live: a
# re-registration then ends a client that is still working, which the log calls a takeover.
LIVE_SESSION_GRACE_SECONDS = 10.0


def new_secret() -> str:
    """A random 128-bit secret, hex: session secrets and task ids."""
    return secrets.token_hex(16)


def secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class RegistrationTimeout(TimeoutError):
    """Fewer clients than the run needs registered before the registration deadline."""


@dataclass
class ClientInfo:
    client_id: str
    num_train_samples: int
    num_heldout_samples: int
    dataset: str
    session_digest: bytes  # SHA-256 of the session secret: the secret itself is not kept
    # The train part per class as the client reported it (None: not shared); untrusted, checked
    # only for shape and sum (guard.checked_label_counts).
    label_counts: tuple[int, ...] | None = None
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
    # The model the client starts from: a TRAIN result's update is checked against its names and
    # shapes and measured from it.
    model: Mapping[str, torch.Tensor] | None = None

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
ResultListener = Callable[[TaskResult], None]


class TaskState(enum.Enum):
    """Where a task is in its life-cycle: PENDING -> DELIVERED -> DONE or CLOSED."""

    PENDING = "pending"      # posted, not yet handed to its client
    DELIVERED = "delivered"  # handed out at least once (and again on each poll until answered)
    DONE = "done"            # a result was accepted: another one is a duplicate
    CLOSED = "closed"        # withdrawn unanswered (deadline passed): a result now is late

    @property
    def open(self) -> bool:
        return self in (TaskState.PENDING, TaskState.DELIVERED)


class TaskBatch:
    """The tasks of one step (a round's training, or an evaluation) and their accepted results.

    Its tasks' states live in the Coordinator's task table. The batch's own lock makes accepting a
    result and folding its update in one step, and lets closing the batch wait for a fold under way
    (so the engine never reads a half-folded aggregate), without holding up other clients' polls.
    """

    def __init__(self, tasks: list[Task], *, on_update: UpdateHook | None):
        self.tasks = {t.task_id: t for t in tasks}
        self.on_update = on_update
        self.results: dict[str, TaskResult] = {}
        self.failures: dict[str, str] = {}  # task_id -> the client's error: it could not run the task
        self.completed = threading.Condition()  # the batch's lock; notified on every answer

    @property
    def complete(self) -> bool:
        """Every task answered: with a result, or with the client's error."""
        return len(self.results) + len(self.failures) == len(self.tasks)


    def unanswered(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.task_id not in self.results and t.task_id not in self.failures]

    def wait(self, timeout: float | None = None, *, quorum: int | None = None,
             is_away: Callable[[str], bool] | None = None) -> bool:
        """Block until every task is answered, or (given ``quorum`` and ``is_away``) until at least
        ``quorum`` results are in and every unanswered task's client is away: True; False when the
        timeout passes first. Woken by every answer and by every change of a client's presence."""
        def settled() -> bool:
            if self.complete:
                return True
            return (quorum is not None and is_away is not None and len(self.results) >= quorum
                    and all(is_away(t.client_id) for t in self.unanswered()))
        with self.completed:
            return self.completed.wait_for(settled, timeout)


class TaskTable:
    """Every task of the run and its state: the one place that decides whether a result may still
    be accepted (else duplicate, late or unknown). Callers hold the Coordinator's lock.

    An open task is kept with its batch (and so its payload); a finished one only by id and state.
    Lock order: a batch's lock before the Coordinator's.
    """

    def __init__(self):
        self._states: dict[str, TaskState] = {}
        self._open: dict[str, tuple[Task, TaskBatch]] = {}
        self._current: dict[str, Task] = {}  # client_id -> the open task it must do now

    def post(self, batch: TaskBatch) -> None:
        for task in batch.tasks.values():
            self._states[task.task_id] = TaskState.PENDING
            self._open[task.task_id] = (task, batch)
            self._current[task.client_id] = task

    def current(self, client_id: str) -> Task | None:
        """The open task the client must do now, or None."""
        return self._current.get(client_id)

    def hand_out(self, client_id: str) -> Task | None:
        """The client's current task, marked delivered (the caller sends it), or None."""
        task = self._current.get(client_id)
        if task is not None:
            self._states[task.task_id] = TaskState.DELIVERED
        return task

    def accepting(self, task_id: str) -> tuple[Task, TaskBatch]:
        """The open task ``task_id`` and its batch; raises Rejected when a result for it cannot be
        accepted (any more)."""
        state = self._states.get(task_id)
        if state is TaskState.DONE:
            raise Rejected(RejectReason.DUPLICATE,
                           f"a result for task {task_id} was already accepted")
        if state is TaskState.CLOSED:
            raise Rejected(RejectReason.LATE,
                           f"task {task_id} closed before this result arrived")
        if state is None:
            raise Rejected(RejectReason.UNKNOWN_TASK, f"no task {shown(task_id)!r} was handed out")
        return self._open[task_id]

    def settle(self, task: Task, state: TaskState) -> None:
        """End an open task's life: DONE (result accepted) or CLOSED (withdrawn unanswered)."""
        assert not state.open and self._states[task.task_id].open, (task.task_id, state)
        self._states[task.task_id] = state
        del self._open[task.task_id]
        if self._current.get(task.client_id) is task:
            del self._current[task.client_id]

    def state(self, task_id: str) -> TaskState | None:
        return self._states.get(task_id)

    def open_tasks(self) -> list[tuple[Task, TaskBatch]]:
        return list(self._open.values())


class Coordinator:
    def __init__(self, run_id: str, *, expected_clients: int, dataset: str | None,
                 poll_timeout: float = 30.0, max_client_samples: int | None = None,
                 partition: PartitionCounts | None = None,

                 presence_grace: float = DEFAULT_PRESENCE_GRACE_SECONDS):
        self.run_id = run_id
        self.partition = partition  # None: any client id, counts bounded by max_client_samples only
        self.max_client_samples = max_client_samples  # None: any count (guard.check_registered_samples)
        self.expected_clients = expected_clients
        self.dataset = dataset
        self.poll_timeout = poll_timeout
        self.clients: dict[str, ClientInfo] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # registrations, posted tasks, shutdown
        self._tasks = TaskTable()
        self._shutdown: pb.TaskHeader | None = None
        self.shutdown_delivered: set[str] = set()
        self.started = False  # set once the run begins: registrations are then frozen
        # Re-registrations are accepted (a restarted client), so a hostile one could repeat them.
        self._registration_log = RateLimitedLog(log)
        # Called whenever pollers are woken (a task posted, the run shut down), for long polls that
        # do not wait on the condition (the service's asyncio polls); see add_poll_listener.
        self._poll_listeners: list[Callable[[], None]] = []
        # Called with every accepted result before its step can see it (see add_result_listener).
        self._result_listeners: list[ResultListener] = []
        self.presence = Presence(presence_grace)
        self.presence.listeners.append(self._wake_open_batches)

    # -- presence -----------------------------------------------------------------------------
    def presence_opened(self, client_id: str) -> int:
        """The service's hook: a presence stream of (authenticated) ``client_id`` opened."""
        return self.presence.opened(client_id)

    def presence_closed(self, client_id: str, token: int) -> None:
        """The service's hook: the presence stream ``token`` ended (idempotent)."""
        self.presence.closed(client_id, token)

    def present_clients(self) -> int:
        """Registered clients not counted away."""
        away = self.presence.away()
        with self._lock:
            return sum(1 for cid in self.clients if cid not in away)

    def _wake_open_batches(self) -> None:
        """A client's presence changed: every waiting step re-checks whom it still waits for."""
        with self._lock:
            batches = {id(b): b for _task, b in self._tasks.open_tasks()}.values()
        for batch in batches:  # a batch's lock is never taken under the Coordinator's
            with batch.completed:
                batch.completed.notify_all()
        with self._cond:  # and the end of run's wait for the clients to hear it (wait_shutdown_delivered)
            self._cond.notify_all()

    # -- registration -------------------------------------------------------------------------
    def register(self, request: pb.RegisterRequest) -> tuple[ClientInfo, str]:
        """Register (again) ``request.client_id``; returns its info and the new session's secret."""
        cid = request.client_id
        if not cid or len(cid) > 128 or not cid.isprintable():
            raise Rejected(RejectReason.BAD_CLIENT_ID,
                           "client_id must be 1-128 printable characters")
        if request.num_train_samples <= 0:
            raise Rejected(RejectReason.BAD_SAMPLE_COUNT,
                           f"client {cid!r} reports {request.num_train_samples} training samples")
        check_registered_samples(cid, request.num_train_samples, self.max_client_samples)
        label_counts = checked_label_counts(cid, request.label_counts, request.num_train_samples, NUM_CLASSES)
        if self.partition is not None:
            self.partition.check(cid, request.num_train_samples, request.num_heldout_samples, label_counts)
        if self.dataset and request.dataset and request.dataset != self.dataset:
            raise Rejected(RejectReason.WRONG_DATASET,
                           f"client {cid!r} holds {shown(request.dataset)!r} data but this run trains on {self.dataset!r}")
        with self._cond:
            known = self.clients.get(cid)
            if known is None and len(self.clients) >= self.expected_clients:
                raise Rejected(RejectReason.RUN_FULL,
                               f"this run takes {self.expected_clients} clients and all have registered")
            if known is not None and self.started and (
                    known.num_train_samples != request.num_train_samples
                    or known.num_heldout_samples != request.num_heldout_samples
                    or known.label_counts != label_counts):
                raise Rejected(RejectReason.SAMPLE_COUNT_CHANGED,
                               f"client {cid!r} re-registered with different sample or label counts mid-run")
            secret = new_secret()
            info = ClientInfo(cid, request.num_train_samples, request.num_heldout_samples, request.dataset,
                              secret_digest(secret), label_counts=label_counts)
            self.clients[cid] = info
            was_live = known is not None and self._session_live(known)
            self._cond.notify_all()
        if was_live:
            self._registration_log.log(cid, logging.WARNING,
                f"client {cid} registered again while its session was live (last request "
                f"{time.monotonic() - known.last_seen:.0f} s ago): the old session is ended, its requests are "
                f"refused. A restarted client does this; so can anyone who knows the id when the server "
                f"requires no client tokens")
        else:
            self._registration_log.log(cid, logging.INFO,
                f"client {cid} registered ({info.num_train_samples} train / {info.num_heldout_samples} "
                f"held-out samples){' again' if known else ''}")
        return info, secret

    def _session_live(self, info: ClientInfo) -> bool:
        """Whether ``info``'s session is still working: it holds a task, or made a request recently
        (a poll lasts up to poll_timeout). Caller holds the lock."""
        task = self._tasks.current(info.client_id)
        holds_task = task is not None and self._tasks.state(task.task_id) is TaskState.DELIVERED
        return holds_task or time.monotonic() - info.last_seen < self.poll_timeout + LIVE_SESSION_GRACE_SECONDS

    def wait_for_clients(self, timeout: float | None) -> list[ClientInfo]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.clients) >= self.expected_clients, timeout):
                raise RegistrationTimeout(f"only {len(self.clients)} of {self.expected_clients} clients "
                                          f"registered within {timeout:g} s")
            self.started = True
            return sorted(self.clients.values(), key=lambda c: c.client_id)

    def session(self, client_id: str, secret: str) -> ClientInfo:
        """The registered client ``client_id``, if ``secret`` is its current session's; else
        Rejected: ``unknown_client`` for an unknown client (a restarted server: register again),
        ``bad_session`` for a missing or wrong secret (another connection's request, or a session
        ended by a re-registration). Compared as digests, in constant time."""
        info = self.clients.get(client_id)
        if info is None:
            raise Rejected(RejectReason.UNKNOWN_CLIENT,
                           f"client {shown(client_id)!r} is not registered in run {self.run_id}")
        if not secret:
            raise Rejected(RejectReason.BAD_SESSION,
                           f"the request for client {client_id!r} carries no session secret (the one its "
                           f"Register reply returned)")
        if not hmac.compare_digest(secret_digest(secret), info.session_digest):
            raise Rejected(RejectReason.BAD_SESSION,
                           f"the session secret is not client {client_id!r}'s current one (a request from "
                           f"another connection, or from a session ended since: the client registered again)")
        info.last_seen = time.monotonic()
        return info

    def check_run(self, run_id: str) -> None:
        if run_id != self.run_id:
            raise Rejected(RejectReason.WRONG_RUN,
                           f"run {shown(run_id)!r} is not running here (this is run {self.run_id}); register again")

    # -- tasks --------------------------------------------------------------------------------
    def new_task(self, client_id: str, type_: int, phase: str, rnd: int, config: TaskSettings,
                 payload: Payload | None, model: Mapping[str, torch.Tensor] | None = None) -> Task:
        # Random, not sequential: a task id handed to one client says nothing about another's.
        return Task(new_secret(), client_id, type_, phase, rnd, config, payload, model)

    def dispatch(self, tasks: list[Task], *, template: Mapping[str, torch.Tensor] | None = None,
                 on_update: UpdateHook | None = None) -> TaskBatch:
        """Post one task per client and wake their pollers at once; ``template`` is the start model
        of the tasks that name none."""
        for task in tasks:
            if task.model is None:
                task.model = template
            if task.expects_weights and task.model is None:
                raise ValueError(f"TRAIN task {task.task_id} names no start model to check its update against")
        batch = TaskBatch(tasks, on_update=on_update)
        with self._cond:
            self._tasks.post(batch)
            self._wake_pollers()
        return batch

    def close(self, batch: TaskBatch) -> None:
        """Withdraw a batch's unanswered tasks (deadline passed): their results will count as late."""
        with batch.completed, self._lock:
            for task in batch.tasks.values():
                if self._tasks.state(task.task_id).open:
                    self._tasks.settle(task, TaskState.CLOSED)

    def task_state(self, task_id: str) -> TaskState | None:
        """Where task ``task_id`` is in its life-cycle (None: no such task was posted)."""
        with self._lock:
            return self._tasks.state(task_id)

    def next_task(self, client_id: str, timeout: float, is_active: Callable[[], bool] = lambda: True
                  ) -> Task | pb.TaskHeader | None:
        """The client's current task (re-delivered until answered), the shutdown header, or None
        when nothing came within ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: (self._shutdown is not None or self._tasks.current(client_id) is not None
                                         or not is_active()), timeout)
            if self._shutdown is not None:
                self.shutdown_delivered.add(client_id)
                self._cond.notify_all()
                return self._shutdown
            return self._tasks.hand_out(client_id)

    def wake(self) -> None:
        with self._cond:
            self._wake_pollers()

    def add_poll_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a poll may now get an answer (a task was posted, the run shut
        down). It is called with the coordinator's lock held, from the thread that posted: it must
        only schedule work (e.g. ``loop.call_soon_threadsafe``), never block or call back in."""
        with self._lock:
            self._poll_listeners.append(listener)

    def add_result_listener(self, listener: ResultListener) -> None:
        """Call ``listener`` with every result accepted from now on (e.g. a DP run's privacy ledger
        records its spent epsilon), in the thread that accepts it, before the result counts for its
        step: a step that completes has had each of its results seen by every listener. It is called
        with the batch's lock held: it must not block or call back in."""
        with self._lock:
            self._result_listeners.append(listener)

    def _wake_pollers(self) -> None:
        """Wake every waiting poll. Caller holds the lock."""
        self._cond.notify_all()
        for listener in self._poll_listeners:
            listener()

    def open_task(self, header: pb.ResultHeader) -> tuple[Task, TaskBatch]:
        """Match a result header to the task it answers; raise Rejected with the precise reason."""
        self.check_run(header.run_id)
        info = self.session(header.client_id, header.session_secret)
        with self._lock:
            task, batch = self._tasks.accepting(header.task_id)
        if task.client_id != header.client_id:
            raise Rejected(RejectReason.WRONG_CLIENT,
                           f"task {task.task_id} belongs to another client")
        if header.phase != task.phase or header.round != task.round:
            raise Rejected(RejectReason.STALE_ROUND,
                           f"result names {shown(header.phase)} round {header.round}, but task {task.task_id} "
                           f"is {task.phase} round {task.round}")
        if header.type != task.type:
            raise Rejected(RejectReason.WRONG_TYPE,
                           f"task {task.task_id} is {pb.TaskType.Name(task.type)}, not "
                           f"{pb.TaskType.Name(header.type) if header.type in pb.TaskType.values() else header.type}")
        if task.type == pb.TASK_TYPE_TRAIN:
            limit, plausible = info.num_train_samples, 0 < header.num_samples <= info.num_train_samples
        else:
            limit, plausible = info.num_heldout_samples, header.num_samples <= info.num_heldout_samples
        if not plausible and not header.error:  # an error report counts no samples
            raise Rejected(RejectReason.BAD_SAMPLE_COUNT,
                           f"result claims {header.num_samples} samples; the client registered {limit}")
        return task, batch

    def finish(self, result: TaskResult, batch: TaskBatch,
               update: Mapping[str, torch.Tensor] | None) -> None:
        """Accept one result (and fold its update in) exactly once; raises Rejected when the task
        was answered or closed since ``open_task`` (the upload takes a while)."""
        task = result.task
        self._check_first_evaluation(result)
        with batch.completed:
            with self._lock:
                self._tasks.accepting(task.task_id)
            # Folded under the batch's lock only, so other clients' polls do not wait for it; the
            # task cannot be settled meanwhile, as settling a batch's task takes the batch's lock.
            if update is not None and batch.on_update is not None:
                batch.on_update(task, result.num_samples, update)
            batch.results[task.task_id] = result
            with self._lock:
                self._tasks.settle(task, TaskState.DONE)
                listeners = list(self._result_listeners)
            try:
                for listener in listeners:
                    listener(result)
            finally:  # the result is accepted: the step sees it even if a listener failed
                batch.completed.notify_all()

    def _check_first_evaluation(self, result: TaskResult) -> None:
        """A TRAIN task that asked to evaluate first must report that evaluation's sample count,
        a whole number no larger than the client's registered held-out part; any other result
        must not report an evaluation."""
        task, metrics = result.task, result.metrics
        evaluated = isinstance(task.config, TrainTask) and task.config.evaluate_first
        reported = sorted(name for name in metrics if name.startswith("eval_"))
        if not evaluated:
            if reported:
                raise Rejected(RejectReason.BAD_METRICS,
                               f"task {task.task_id} asked for no evaluation, but the result reports {reported}")
            return
        samples = metrics.get("eval_samples")
        info = self.clients.get(task.client_id)
        limit = info.num_heldout_samples if info is not None else 0
        if samples is None or samples != int(samples) or samples > limit:
            raise Rejected(RejectReason.BAD_SAMPLE_COUNT,
                           f"task {task.task_id} evaluated first: its result must report eval_samples, a whole "
                           f"number <= the {limit} held-out samples the client registered (got {samples})")

    def fail(self, task: Task, batch: TaskBatch, message: str) -> None:
        """The client reported that it cannot execute ``task``: the task is answered (not handed
        out again, a second answer is a duplicate), and the batch counts it as failed."""
        with batch.completed:
            with self._lock:
                self._tasks.accepting(task.task_id)
                self._tasks.settle(task, TaskState.DONE)
            batch.failures[task.task_id] = message
            batch.completed.notify_all()

    # -- end of run ---------------------------------------------------------------------------
    @property
    def is_shut_down(self) -> bool:
        return self._shutdown is not None

    def shutdown(self, *, failed: bool = False, reason: str = "") -> None:
        outcome = pb.RUN_OUTCOME_FAILED if failed else pb.RUN_OUTCOME_COMPLETED
        self.presence.close()
        with self._cond:
            self._shutdown = pb.TaskHeader(run_id=self.run_id, type=pb.TASK_TYPE_SHUTDOWN,
                                           shutdown=pb.Shutdown(outcome=outcome, reason=reason))
            self._wake_pollers()

    def wait_shutdown_delivered(self, timeout: float) -> bool:
        """Give every registered client the chance to hear that the run is over: True once each has
        heard it or is disconnected (its presence stream closed: nobody is there to tell, e.g. a
        client stopped by the same Ctrl-C as the server), False when ``timeout`` passes first."""
        with self._cond:
            return self._cond.wait_for(lambda: all(cid in self.shutdown_delivered or self.presence.disconnected(cid)
                                                   for cid in self.clients), timeout)
