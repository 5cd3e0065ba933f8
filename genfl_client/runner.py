"""The client's connection loop: register, long-poll for tasks, execute, submit; reconnect with
exponential backoff and jitter whenever the server is unreachable or restarted.

While registered, a background thread holds the server's Presence stream open (reopened after it
ends, with the current session): the server sees it close the moment this process dies, and stops
waiting for this client once enough others have answered.

A task the client cannot execute (settings it refuses, weights that do not fit the model) is
reported back as a result carrying only ``error``; the client then keeps polling, because the
next task may well be fine and the server decides whether the run can go on without this one."""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from genfl_shared import __version__
from genfl_shared.cli import set_thread_log_context
from genfl_shared.codec import TRANSPORT_OPTIONS, CodecError, PayloadAssembler, encode_state_dict
from genfl_shared.data import NUM_CLASSES
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.security import bearer_metadata
from genfl_shared.tasks import MAX_SYNTHETIC_BYTES, TaskSettingsError, check_synthetic_manifest

from .executor import TaskError, TaskExecutor
from .metrics import ClientMetrics

log = logging.getLogger(__name__)

# Weights a client accepts from the server: far above these models, far below a memory exhaustion.
MAX_MODEL_BYTES = 1 << 30
TRANSFER_SECONDS = 300.0  # allowance for moving a model, on top of the long-poll time

# Errors that mean "the server is not there right now" (RETRYABLE) or, once registered, "the server
# forgot us" (REREGISTER: it restarted): the client backs off and registers again. Any other refusal
# of a registration is fatal (wrong dataset, run full, bad sample counts).
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
REREGISTER = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
# Refusals of this client's credentials: fatal at any step (retrying cannot fix a token or a
# certificate, and re-registering would only be refused again). PERMISSION_DENIED also means that
# this client's session was ended by a newer registration of its id: re-registering would end
# that one in turn, and two processes would take the id from each other for ever.
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# While the server is unreachable, every WARN_EVERY-th failed attempt (and the first) is logged at
# WARNING, the others at DEBUG: the user sees why the client waits, without a line per attempt.
WARN_EVERY = 5


def shard_label_counts(shard) -> list[int]:
    """The shard's train images per class (index = label), as registration reports them."""
    return np.bincount(shard.train_labels, minlength=NUM_CLASSES).tolist()


def receive_synthetic(header: pb.TaskHeader, stream) -> dict | None:
    """The tensors of a training task's synthetic images, whose chunks follow the weights' in
    ``stream`` (None without them). A manifest the task may not carry is not received: the
    executor refuses the task, naming why; CodecError for chunks that do not make the payload,
    or for chunks after the last payload."""
    synthetic = None
    if header.WhichOneof("settings") == "train" and header.train.HasField("synthetic"):
        try:
            check_synthetic_manifest(header.train.synthetic)
        except TaskSettingsError:
            return None
        assembler = PayloadAssembler(header.train.synthetic, max_bytes=MAX_SYNTHETIC_BYTES)
        for message in itertools.islice(stream, header.train.synthetic.num_chunks):
            assembler.add(message.chunk)
        synthetic = assembler.finish()
    if next(stream, None) is not None:
        raise CodecError("bad_chunk", "more chunks than the task's payloads announce")
    return synthetic


class FatalClientError(RuntimeError):
    """The run cannot go on for this client (e.g. the server refuses it)."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter (sleep ~ U(0, min(cap, base * 2^attempt)))."""

    base: float = 0.2
    cap: float = 5.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * 2 ** self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class PresenceStream:
    """Holds the Presence RPC open on the client's channel from ``start`` to ``stop``: reopened
    (after a short backoff) whenever it ends, and at once with the new session after ``renew``."""

    def __init__(self, stub: pb_grpc.FederatedLearningStub, request: Callable[[], pb.PresenceRequest],
                 metadata=None):
        self.stub = stub
        self.request = request  # the current session's request (read at each opening)
        self.metadata = metadata
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._call = None
        self._thread: threading.Thread | None = None

    def open_for_session(self) -> None:
        """After a registration: the first opens the stream, a later one renews it with its secret."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._hold, name="presence", daemon=True)
            self._thread.start()
        else:
            self.renew()

    def renew(self) -> None:
        """A new session: end the current stream so that it is reopened with the new secret."""
        with self._lock:
            if self._call is not None:
                self._call.cancel()

    def stop(self) -> None:
        self._stopped.set()
        self.renew()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _hold(self) -> None:
        backoff = Backoff(base=0.2, cap=2.0)
        while not self._stopped.is_set():
            call = self.stub.Presence(self.request(), metadata=self.metadata)
            with self._lock:
                self._call = call
            try:
                for _reply in call:
                    backoff.reset()  # counted present
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("server has no Presence RPC: it cannot tell when this client is gone")
                    return
                if error.code() != grpc.StatusCode.CANCELLED:
                    log.debug("presence stream ended: %s (%s)", error.code().name, error.details())
            with self._lock:
                self._call = None
            if self._stopped.wait(backoff.next_delay()):
                return


class ClientRunner:
    def __init__(self, server: str, client_id: str, executor: TaskExecutor, metrics: ClientMetrics, *,
                 dataset: str, max_reconnect_seconds: float = 0.0,
                 credentials: grpc.ChannelCredentials | None = None, tls_server_name: str | None = None,
                 token: str | None = None, share_label_counts: bool = False):
        self.server = server
        # Whether registration tells the server how many train images of each class the shard
        # holds (README, "Synthetic data for missing classes": what that reveals).
        self.share_label_counts = share_label_counts
        self.client_id = client_id
        self.executor = executor
        self.metrics = metrics
        self.dataset = dataset
        self.max_reconnect_seconds = max_reconnect_seconds
        # A local subchannel pool: each client of a host gets its own TCP connection, as a client
        # process has (with gRPC's global pool a host's channels share one, and the server's
        # --max-streams-per-connection refuses the streams of more than ~30 clients).
        options = [*TRANSPORT_OPTIONS,
                   ("grpc.max_reconnect_backoff_ms", 5_000),
                   ("grpc.use_local_subchannel_pool", 1)]
        if credentials is not None and tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        self.tls = credentials is not None
        # Sent with every RPC; the server checks it against the client id the request names.
        self.metadata = bearer_metadata(token) if token else None
        self.channel = (grpc.secure_channel(server, credentials, options) if credentials
                        else grpc.insecure_channel(server, options))
        self.stub = pb_grpc.FederatedLearningStub(self.channel)
        self.run_id = ""
        self.session_secret = ""  # from the last Register reply; every later request carries it
        self.poll_timeout = 30.0
        self.presence = PresenceStream(self.stub, lambda: pb.PresenceRequest(
            run_id=self.run_id, client_id=self.client_id, session_secret=self.session_secret), self.metadata)

    def run(self) -> int:
        """Serve tasks until the server ends the run; returns the process exit code."""
        backoff = Backoff()
        unreachable_since = None
        failures = 0
        while True:
            try:
                try:
                    self._register()
                except grpc.RpcError as error:
                    if error.code() not in RETRYABLE:
                        raise FatalClientError(f"server {self.server} refused this client: {error.code().name}: "
                                               f"{error.details()}{self._hint(error)}") from None
                    raise
                backoff.reset()
                unreachable_since = None
                failures = 0
                self.presence.open_for_session()
                status = self._serve_tasks()
                return 0 if status == "completed" else 1
            except grpc.RpcError as error:
                code = error.code()
                if code not in RETRYABLE | REREGISTER or code in DENIED:
                    raise FatalClientError(f"server {self.server} rejected a request: "
                                           f"{code.name}: {error.details()}{self._hint(error)}") from None
                unreachable_since = unreachable_since or time.monotonic()
                waited = time.monotonic() - unreachable_since
                if self.max_reconnect_seconds and waited > self.max_reconnect_seconds:
                    raise FatalClientError(f"server {self.server} unreachable for {waited:.0f} s: "
                                           f"{code.name}: {error.details()}{self._hint(error)}") from None
                failures += 1
                delay = backoff.next_delay()
                quiet = code == grpc.StatusCode.UNAVAILABLE and failures > 1 and failures % WARN_EVERY
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "server %s: %s (%s); retrying in %.2f s (attempt %d)", self.server, code.name,
                        error.details(), delay, failures)
                time.sleep(delay)

    def close(self) -> None:
        self.presence.stop()
        self.channel.close()

    def _hint(self, error: grpc.RpcError) -> str:
        """What the user can do about a refusal or an unreachable server, appended to the message."""
        code = error.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return " (check this client's --token-file against the server's --tokens-file)"
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return (" (another process registered with this client id since: a second copy of this client, "
                    "or, on a server without --tokens-file, anyone who knows the id)")
        if code == grpc.StatusCode.UNAVAILABLE:
            if self.tls:
                return (" (is the server up? Does --ca hold the CA of the server's certificate, does that "
                    "certificate name the host dialled (else --tls-server-name), and, for a mutual-TLS server, "
                    "is --tls-cert signed by its --client-ca?)")
            return " (is the server up? If it serves TLS, connect with --ca)"
        return ""

    # -- protocol steps -----------------------------------------------------------------------
    def _register(self) -> None:
        shard = self.executor.shard
        reply = self.stub.Register(pb.RegisterRequest(
            client_id=self.client_id, num_train_samples=shard.num_train, num_heldout_samples=shard.num_heldout,
            dataset=self.dataset, client_version=__version__,
            label_counts=shard_label_counts(shard) if self.share_label_counts else ()),
            timeout=30, metadata=self.metadata)
        self.run_id, self.poll_timeout = reply.run_id, reply.poll_timeout_seconds or 30.0
        self.session_secret = reply.session_secret
        log.info("client %s registered with %s in run %s", self.client_id, self.server, self.run_id)

    def _serve_tasks(self) -> str:
        while True:
            header, weights, synthetic = self._fetch()
            if header.type == pb.TASK_TYPE_IDLE:
                continue
            if header.type == pb.TASK_TYPE_SHUTDOWN:
                status = "failed" if header.shutdown.outcome == pb.RUN_OUTCOME_FAILED else "completed"
                log.info("server ended run %s: %s %s", header.run_id, status, header.shutdown.reason)
                return status
            self._execute(header, weights, synthetic)

    def _fetch(self):
        stream = self.stub.FetchTask(pb.FetchTaskRequest(run_id=self.run_id, client_id=self.client_id,
                                                         session_secret=self.session_secret),
                                     timeout=self.poll_timeout + TRANSFER_SECONDS, metadata=self.metadata)
        first = next(stream, None)
        if first is None or first.WhichOneof("kind") != "header":
            raise FatalClientError("server sent a task without a header")
        header = first.header
        if not header.HasField("manifest") or header.type not in (pb.TASK_TYPE_TRAIN, pb.TASK_TYPE_EVALUATE):
            return header, None, None
        try:
            assembler = PayloadAssembler(header.manifest, max_bytes=MAX_MODEL_BYTES)
            for message in itertools.islice(stream, header.manifest.num_chunks):
                assembler.add(message.chunk)
            weights = assembler.finish()
            synthetic = receive_synthetic(header, stream)
        except CodecError as error:
            # A corrupted download: drop it; the task is re-delivered on the next poll.
            log.warning("task %s: discarded corrupt weights (%s)", header.task_id, error)
            return pb.TaskHeader(type=pb.TASK_TYPE_IDLE), None, None
        self.metrics.bytes_received.inc(header.manifest.total_bytes)
        return header, weights, synthetic

    def _execute(self, header: pb.TaskHeader, weights, synthetic) -> None:
        kind = pb.TaskType.Name(header.type).removeprefix("TASK_TYPE_").lower()
        set_thread_log_context(phase=header.phase, round=header.round)
        log.info("%s task %s", kind, header.task_id)
        result = pb.ResultHeader(run_id=header.run_id, task_id=header.task_id, client_id=self.client_id,
                                 phase=header.phase, round=header.round, type=header.type,
                                 session_secret=self.session_secret)
        try:
            outcome = self.executor.run(header, weights, synthetic)
        except TaskError as error:
            log.error("cannot execute %s task %s, reporting it to the server: %s", kind, header.task_id, error)
            result.error = str(error)
            self._submit(result, None)
            return
        if header.type == pb.TASK_TYPE_TRAIN:
            self.metrics.train_seconds.inc(outcome.metrics.get("train_seconds", 0.0))
            self.metrics.samples_trained.inc(outcome.num_samples)
            if "loss" in outcome.metrics:
                self.metrics.last_loss.set(outcome.metrics["loss"])
        result.num_samples = outcome.num_samples
        result.metrics.update(outcome.metrics)
        payload = None
        if outcome.state is not None:
            payload = encode_state_dict(outcome.state)
            result.manifest.CopyFrom(payload.manifest)
        if self._submit(result, payload) and payload is not None:
            self.metrics.bytes_sent.inc(payload.nbytes)

    def _submit(self, result: pb.ResultHeader, payload) -> bool:
        """Send a result (and its update's chunks); False when the server no longer wanted it."""
        def messages():
            yield pb.ResultMessage(header=result)
            for index, data in enumerate(payload.chunks if payload else ()):
                yield pb.ResultMessage(chunk=pb.Chunk(index=index, data=data))

        try:
            self.stub.SubmitResult(messages(), timeout=TRANSFER_SECONDS, metadata=self.metadata)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION):
                # Duplicate or late: the server has moved on; the next poll says what to do now.
                log.warning("result for task %s not used: %s", result.task_id, error.details())
                return False
            raise
        return True
