"""The gRPC face of the server: turns RPCs into Coordinator calls and Rejected into gRPC statuses.

The handlers are coroutines of a ``grpc.aio`` server running on its own event-loop thread
(transport.py), while the round engine runs synchronously in the main thread: a waiting long poll,
an idle stream or a slow upload holds no thread. A poll waits on an ``asyncio.Event`` that the
coordinator's poll listener sets (through ``loop.call_soon_threadsafe``) when a task is posted or the
run shuts down. What costs CPU per upload (decoding, validating and folding the update) runs in a
small executor of ``max_concurrent_uploads`` threads, so health checks and polls keep answering
while it runs.

Resource bounds (limits.py): an upload must arrive within ``upload_timeout`` (else
DEADLINE_EXCEEDED, reason ``upload_timeout``, and its task stays open), one upload per client at a
time (ALREADY_EXISTS, ``upload_in_progress``), at most ``max_streams_per_connection`` RPCs open per
connection and, by option, ``max_streams_per_ip`` per IP address (RESOURCE_EXHAUSTED,
``too_many_streams``/``too_many_streams_per_ip``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from genfl_shared.codec import TRANSPORT_OPTIONS, CodecError, state_dict_nbytes, task_frame  # noqa: F401 (re-exported)
from genfl_shared.errors import Rejected, RejectReason
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.config import TransportSettings
from genfl_shared.security import TokenAuthenticator, bearer_token

from .chunk_parser import read_chunk_in_place
from .coordinator import Coordinator, Task, TaskResult
from .guard import check_dp_epsilon, validated_metrics
from .limits import OpenUploads, StreamLimits, UploadClock
from .privacy import PrivacyLedger
from .logsafe import MAX_MESSAGE_CHARS, RateLimitedLog, shown
from .listening import ListenError, check_listen_address
from .metrics import ServerMetrics
from .status_codes import status_code
from .upload import ChunkedUpdate
from .transport import AioServer, EventLoopThread, ThreadsafeHealth

log = logging.getLogger(__name__)

# Weight uploads are received and checked max_concurrent_uploads at a time (--max-concurrent-uploads,
# default 2; each holds a receive slot from its first chunk to its fold). Each costs about one model
# of memory (its received chunks, which are folded in as they are: upload.ChunkedUpdate), so this
# bounds the server's memory however many clients upload together; the rest wait in gRPC flow
# control, holding no thread (kept small by turning off HTTP/2 BDP probing, which would otherwise
# grow every stream's window to megabytes). A stalled upload holds a slot only once it has sent a
# chunk, and then for at most --upload-timeout; before that, a place in the upload queue.
# Uploads that may hold their first chunk while they wait for a receive slot. Reading the first
# chunk before a slot is taken keeps a stalled upload (a header, then nothing) from holding a slot;
# bounding how many may do so keeps the waiting uploads from holding a chunk (1 MiB) each: with 50
# clients uploading at once, 48 waiting first chunks were about 11 models of memory. A stall holds
# one of these places for at most --upload-timeout, so it takes this many stalls together to hold
# every upload up, as it takes max_concurrent_uploads stalls that sent one chunk to hold the slots.
UPLOAD_QUEUE_PER_SLOT = 2
# Model downloads streamed at once. Each in-flight download holds gRPC send buffers of about a
# chunk; without a bound, K clients downloading together cost about K models of memory.
DEFAULT_MAX_CONCURRENT_DOWNLOADS = 4
# A stalled downloader must not block everyone: past this wait a download proceeds anyway.
DOWNLOAD_SLOT_WAIT_SECONDS = 30.0
# How often an open presence stream checks whether the run ended (its end is seen at once).
PRESENCE_CHECK_SECONDS = 1.0


def _serialize_task_message(message: pb.TaskMessage | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


_SERVICE = pb.DESCRIPTOR.services_by_name["FederatedLearning"]
SERVICE_NAME = _SERVICE.full_name  # genfl.v1.FederatedLearning


@dataclass(frozen=True)
class Unparsable:
    """A request message whose bytes do not parse: what :func:`lenient_parser` hands the handler
    instead of raising, so that the handler refuses it (INVALID_ARGUMENT, "malformed", counted)
    where gRPC itself would log a traceback per message and answer a bare INTERNAL."""

    type_name: str
    error: str


def lenient_parser(message_type):
    """A request deserializer for ``message_type`` that returns :class:`Unparsable` for bytes
    that are not such a message."""
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            return Unparsable(message_type.DESCRIPTOR.name, str(error))
    return parse


_parse_result_protobuf = lenient_parser(pb.ResultMessage)


def parse_result_message(data: bytes):
    """SubmitResult's request deserializer: an upload's chunk read in place (a view of ``data``,
    chunk_parser) when canonically encoded, as almost all are; else as :func:`lenient_parser`."""
    return read_chunk_in_place(data) or _parse_result_protobuf(data)


def _refuse_unparsable(message) -> None:
    if isinstance(message, Unparsable):
        raise Rejected(RejectReason.MALFORMED,
                       f"a message does not parse as {message.type_name}: {shown(message.error)}")


class ResultStream:
    """The request stream of one SubmitResult call, read against the upload's clock."""

    def __init__(self, request_iterator, clock: UploadClock):
        self._messages = request_iterator.__aiter__()
        self.clock = clock
        self.header: pb.ResultHeader | None = None  # once read
        self._peeked: list[pb.ResultMessage | None] = []  # a message read by wait_for_next, not yet taken

    @property
    def client_id(self) -> str:
        return self.header.client_id if self.header is not None else ""

    async def wait_for_next(self) -> None:
        """Wait until the next message has arrived (or the stream ended); ``next`` returns it."""
        if not self._peeked:
            self._peeked.append(await self.next())

    async def next(self) -> pb.ResultMessage | None:
        """The next message (None at the end of the stream). Raises Rejected: ``malformed`` for
        one that does not parse, ``upload_timeout`` once the clock has run out."""
        if self._peeked:
            return self._peeked.pop()
        try:
            async with asyncio.timeout(self.clock.remaining()):
                message = await anext(self._messages, None)
        except TimeoutError:
            raise self.clock.expired() from None
        if message is not None:
            _refuse_unparsable(message)
        return message


class FederatedLearningService(pb_grpc.FederatedLearningServicer):
    def __init__(self, coordinator: Coordinator, metrics: ServerMetrics,
                 max_concurrent_uploads: int = TransportSettings.max_concurrent_uploads,
                 authenticator: TokenAuthenticator | None = None,
                 max_concurrent_downloads: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS, *,
                 upload_timeout: float = TransportSettings.upload_timeout,
                 max_streams_per_connection: int = TransportSettings.max_streams_per_connection,
                 max_streams_per_ip: int = TransportSettings.max_streams_per_ip,
                 privacy: PrivacyLedger | None = None):
        self.coordinator = coordinator
        self.metrics = metrics
        self.privacy = privacy  # DP runs: every accepted result's spent epsilon is recorded
        # With an authenticator, every RPC must carry the token of the client it names.
        self.authenticator = authenticator
        self.upload_timeout = upload_timeout
        # Everything below is used on the event loop's thread only (no locks), except the executor.
        self._upload_slots = asyncio.Semaphore(max_concurrent_uploads)
        # Places for uploads waiting for a slot with their first chunk read (UPLOAD_QUEUE_PER_SLOT).
        self._upload_queue = asyncio.Semaphore(max_concurrent_uploads * UPLOAD_QUEUE_PER_SLOT)
        self._downloads = asyncio.Semaphore(max_concurrent_downloads)
        # Decoding, validating and folding an update, off the event loop so health and polls answer
        # meanwhile: with 8 CVAE uploads at once (2 busy cores) health checks took a median 20-30 ms
        # this way, 100-130 ms with the same work done inline on the loop.
        self._executor = futures.ThreadPoolExecutor(max_workers=max_concurrent_uploads, thread_name_prefix="upload")
        self._streams = StreamLimits(max_streams_per_connection, max_streams_per_ip)
        self._open_uploads = OpenUploads()
        self._poll_events: set[asyncio.Event] = set()  # one per waiting poll: set when it may have an answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._polling: dict[str, int] = {}
        self._rejection_log = RateLimitedLog(log)

    # -- the event loop ------------------------------------------------------------------------
    def serve_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on ``loop`` (the aio server's): the coordinator then wakes its polls."""
        self._loop = loop
        self.coordinator.add_poll_listener(self._on_poll_wake)

    def close(self) -> None:
        """The server has stopped: no more work for the executor, no polls to wake."""
        self._loop = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _on_poll_wake(self) -> None:
        """The coordinator's poll listener (any thread, its lock held): wake the polls on the loop."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._wake_polls)
        except RuntimeError:  # the loop closed since: the server stopped, no poll is left to wake
            pass

    def _wake_polls(self) -> None:
        for event in self._poll_events:
            event.set()

    async def _in_executor(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # -- refusals ------------------------------------------------------------------------------
    async def _reject(self, context: grpc.aio.ServicerContext, error: Rejected, client_id: str = ""):
        """Count the rejection, log it (rate-limited per ``client_id``, the id the request named, or
        else per peer) and end the call with its status; the message is bounded, as it may quote the client."""
        self.metrics.updates_rejected.labels(error.reason).inc()
        if error.reason == "late":
            self.metrics.updates_late.inc()
        message = shown(error, MAX_MESSAGE_CHARS)
        self._rejection_log.rejected(shown(client_id, 64) or context.peer(), error.reason, message)
        await context.abort(status_code(error.reason), message)

    @contextlib.asynccontextmanager
    async def _counted_stream(self, context: grpc.aio.ServicerContext):
        """Count the RPC against its peer's bounds for as long as it is open (refused past them)."""
        try:
            keys = self._streams.enter(context.peer())
        except Rejected as error:
            await self._reject(context, error)
        self.metrics.rpcs_open.inc()
        try:
            yield
        finally:
            self._streams.leave(keys)
            self.metrics.rpcs_open.dec()

    def _authenticate(self, context: grpc.aio.ServicerContext, client_id: str | None) -> None:
        """Raise Rejected (``unauthenticated``) unless the call carries ``client_id``'s token (when
        tokens are required). ``client_id=None``: only check that some token was sent."""
        if self.authenticator is None:
            return
        token = bearer_token(context.invocation_metadata())
        if token is None:
            raise Rejected(RejectReason.UNAUTHENTICATED,
                           "this server requires a client token (metadata 'authorization: Bearer <token>'; "
                           "genfl-client --token-file)")
        if client_id is not None and not self.authenticator.check(client_id, token):
            raise Rejected(RejectReason.UNAUTHENTICATED,
                           f"invalid token for client {shown(client_id)!r}")

    # -- RPCs ---------------------------------------------------------------------------------
    async def Register(self, request, context):
        async with self._counted_stream(context):
            try:
                _refuse_unparsable(request)
                self._authenticate(context, request.client_id)
                _info, secret = self.coordinator.register(request)
            except Rejected as error:
                await self._reject(context, error, getattr(request, "client_id", ""))
            self.metrics.clients_registered.set(len(self.coordinator.clients))
            return pb.RegisterReply(run_id=self.coordinator.run_id, poll_timeout_seconds=self.coordinator.poll_timeout,
                                    session_secret=secret)

    async def _check_session(self, request, context) -> None:
        """A poll or presence request must parse, carry its client's token, name this run and the
        client's live session; otherwise the call ends with the refusal's status."""
        try:
            _refuse_unparsable(request)
            self._authenticate(context, request.client_id)
            self.coordinator.check_run(request.run_id)
            self.coordinator.session(request.client_id, request.session_secret)
        except Rejected as error:
            await self._reject(context, error, getattr(request, "client_id", ""))

    async def FetchTask(self, request, context):
        async with self._counted_stream(context):
            await self._check_session(request, context)
            self._count_poller(request.client_id, +1)
            try:
                item = await self._next_task(request.client_id, self.coordinator.poll_timeout)
            finally:
                self._count_poller(request.client_id, -1)
            if item is None:
                yield pb.TaskMessage(header=pb.TaskHeader(run_id=self.coordinator.run_id, type=pb.TASK_TYPE_IDLE))
                return
            if isinstance(item, pb.TaskHeader):  # shutdown
                yield pb.TaskMessage(header=item)
                return
            yield pb.TaskMessage(header=self._header(item))
            if item.payload is not None:
                slot = await self._download_slot()
                try:
                    for index, chunk in enumerate(item.payload.chunks):
                        yield chunk if item.payload.wrapped else pb.TaskMessage(chunk=pb.Chunk(index=index, data=chunk))
                finally:
                    if slot:
                        self._downloads.release()
                self.metrics.bytes_sent.inc(item.payload.nbytes)

    async def SubmitResult(self, request_iterator, context):
        stream = ResultStream(request_iterator, UploadClock(self.upload_timeout))
        async with self._counted_stream(context):
            try:
                task = await self._submit(stream, context)
            except Rejected as error:
                await self._reject(context, error, stream.client_id)
            if task is None:  # the client's error report, recorded
                return pb.SubmitReply(accepted=False, message=f"error for task {stream.header.task_id} recorded")
            return pb.SubmitReply(accepted=True, message=f"result for task {task.task_id} accepted")

    # -- helpers ------------------------------------------------------------------------------
    async def _submit(self, stream: ResultStream, context) -> Task | None:
        """Receive one result and hand it to the coordinator; returns its task (None for an error
        report). Raises Rejected."""
        self._authenticate(context, None)  # no token at all: refuse before reading anything
        first = await stream.next()
        if first is None or first.WhichOneof("kind") != "header":
            raise Rejected(RejectReason.MALFORMED, "a result must start with its header")
        header = stream.header = first.header
        self._authenticate(context, header.client_id)
        task, batch = self.coordinator.open_task(header)
        self._open_uploads.claim(header.client_id)
        try:
            if header.error:
                trailing = await stream.next() is not None
                await self._in_executor(self._record_task_error, header, task, batch, trailing)
                return None
            if task.expects_weights:
                if not header.HasField("manifest"):
                    raise Rejected(RejectReason.MALFORMED,
                                   "a training result must carry the updated weights")
                await self._receive_in_slot(stream, context, header, task, batch)
            else:
                if await stream.next() is not None:
                    raise Rejected(RejectReason.MALFORMED,
                                   "an evaluation result carries no weights")
                await self._accept(context, header, task, batch, None)
            return task
        finally:
            self._open_uploads.release(header.client_id)

    async def _receive_in_slot(self, stream: ResultStream, context, header, task: Task, batch) -> None:
        """Read a TRAIN result's chunks, check them and fold the update in, in a receive slot (see
        UPLOAD_QUEUE_PER_SLOT): a place in the upload queue first (no chunk held while waiting for
        one), then the first chunk, then a slot. Waiting for either is the server's doing: the
        upload's clock is paused."""
        stream.clock.pause()
        await self._upload_queue.acquire()
        queued = True
        try:
            stream.clock.resume()
            await stream.wait_for_next()  # the first chunk
            stream.clock.pause()
            async with self._upload_slots:
                self._upload_queue.release()
                queued = False
                stream.clock.resume()
                update = await self._receive_update(stream, header, task.model)
                await self._accept(context, header, task, batch, update)
        finally:
            if queued:
                self._upload_queue.release()

    async def Presence(self, request, context):
        """Held open by the client for its session; its end (the client gone: the kernel closed a
        killed process's socket, or keepalive caught a cut) is reported to the coordinator. Holds
        no thread while open: it waits on an event the coordinator's wakes set (shutdown among them)."""
        async with self._counted_stream(context):
            await self._check_session(request, context)
            client_id = request.client_id
            # The hooks wake waiting steps (taking batch locks, which a fold may hold): off the loop.
            token = await self._presence_opened(client_id)
            wake = asyncio.Event()
            self._poll_events.add(wake)
            try:
                yield pb.PresenceReply(present=True)
                while not self.coordinator.is_shut_down:
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), PRESENCE_CHECK_SECONDS)
                    except asyncio.TimeoutError:
                        pass
            finally:  # also when the call is cancelled (the client gone)
                self._poll_events.discard(wake)
                self._presence_closed(client_id, token)

    async def _presence_opened(self, client_id: str) -> int:
        """Records a presence stream's opening off the loop. If the call ends meanwhile (the client
        renewed or died while the executor was busy), the opening still completes and its end is
        recorded as well: a stream counted open but never closed would keep the client present."""
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(self._executor, self.coordinator.presence_opened, client_id)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            def close_when_recorded(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._presence_closed(client_id, done.result())
            opening.add_done_callback(close_when_recorded)
            raise

    def _presence_closed(self, client_id: str, token: int) -> None:
        """Records a presence stream's end off the loop, not awaited (the loop moves on)."""
        try:
            asyncio.get_running_loop().run_in_executor(self._executor, self.coordinator.presence_closed,
                                                       client_id, token)
        except RuntimeError:  # the server is stopping (its executor shut down): no step waits
            self.coordinator.presence_closed(client_id, token)

    async def _accept(self, context, header, task: Task, batch, update) -> None:
        metrics = validated_metrics(header.metrics)
        check_dp_epsilon(task.config, metrics)
        result = TaskResult(task, int(header.num_samples), metrics)
        if context.cancelled():
            raise Rejected(RejectReason.MALFORMED,
                           "the result stream was aborted before it ended")
        await self._in_executor(self._finish, result, batch, update)  # folds: off the loop
        if self.privacy is not None and "dp_epsilon" in metrics:
            self.privacy.record(task.client_id, metrics["dp_epsilon"])
            epsilon, delta = self.privacy.guarantee()
            self.metrics.dp_epsilon.set(epsilon)
            self.metrics.dp_delta.set(delta)

    def _finish(self, result: TaskResult, batch, update) -> None:
        """Hand an accepted result to its step (in the upload executor). Counted here, in the thread
        that hands it over, so that the count is up to date by the time the step can end."""
        self.coordinator.finish(result, batch, update)
        task = result.task
        self.metrics.updates_accepted.labels(task.phase, pb.TaskType.Name(task.type)).inc()

    def _record_task_error(self, header, task: Task, batch, trailing: bool) -> None:
        """The client could not execute ``task``: count it as failed for its step. ``trailing``:
        something followed the header (refused: an error report carries nothing)."""
        if header.HasField("manifest") or header.num_samples or trailing:
            raise Rejected(RejectReason.MALFORMED,
                           "an error result carries no weights and no samples")
        message = shown(header.error.strip())
        self.coordinator.fail(task, batch, message)
        self.metrics.updates_rejected.labels("task_error").inc()
        log.warning("client %s could not execute task %s (%s round %d, %s): %s", task.client_id, task.task_id,
                    task.phase, task.round, pb.TaskType.Name(task.type), message)

    async def _receive_update(self, stream: ResultStream, header, template) -> ChunkedUpdate:
        """The update of the rest of ``stream``'s messages, chunks each checked,
        hashed and measured (in the executor) as soon as it is read, so that the next one arrives
        meanwhile and the upload is held once, as its chunks: a chunk too many, too large or out of
        order is refused at once, so a hostile stream cannot make the server hold more than one
        model's bytes. Raises Rejected before anything is folded in."""
        try:
            update = ChunkedUpdate(header.manifest, template, max_bytes=state_dict_nbytes(template))
            message = await stream.next()
            while message is not None:
                if message.WhichOneof("kind") != "chunk":
                    raise Rejected(RejectReason.MALFORMED,
                                   "only chunks may follow the result header")
                await self._in_executor(update.add, message.chunk)
                message = None  # its bytes are the update's now: dropped before the next one arrives
                message = await stream.next()
            self.metrics.bytes_received.inc(update.received_bytes)
            return await self._in_executor(update.finish)
        except CodecError as error:
            raise Rejected(error.reason, f"update rejected: {error}") from None

    async def _next_task(self, client_id: str, timeout: float) -> Task | pb.TaskHeader | None:
        """The client's current task, the shutdown header, or None when neither came within
        ``timeout``: waits on an event (no thread), set whenever the coordinator posts."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            woken = asyncio.Event()
            self._poll_events.add(woken)  # before looking: a post from now on sets it
            try:
                item = self.coordinator.next_task(client_id, timeout=0)
                remaining = deadline - loop.time()
                if item is not None or remaining <= 0:
                    return item
                try:
                    async with asyncio.timeout(remaining):
                        await woken.wait()
                except TimeoutError:
                    pass  # one last look, then None
            finally:
                self._poll_events.discard(woken)

    async def _download_slot(self) -> bool:
        """Wait for a download slot (True), or past DOWNLOAD_SLOT_WAIT_SECONDS go on without (False)."""
        try:
            async with asyncio.timeout(DOWNLOAD_SLOT_WAIT_SECONDS):
                await self._downloads.acquire()
            return True
        except TimeoutError:
            return False

    def _header(self, task: Task) -> pb.TaskHeader:
        header = pb.TaskHeader(run_id=self.coordinator.run_id, task_id=task.task_id, type=task.type,
                               phase=task.phase, round=task.round, config_json=task.config.to_json())
        if task.payload is not None:
            header.manifest.CopyFrom(task.payload.manifest)
        return header

    def _count_poller(self, client_id: str, delta: int) -> None:
        self._polling[client_id] = self._polling.get(client_id, 0) + delta
        if self._polling[client_id] <= 0:
            del self._polling[client_id]
        self.metrics.clients_connected.set(len(self._polling))


def method_handlers(service: FederatedLearningService) -> dict[str, grpc.RpcMethodHandler]:
    """The generated registration's handler table, except that FetchTask also passes pre-serialized
    frames (``task_frame``) through, and requests that do not parse reach the handlers as
    :class:`Unparsable` (refused there, without gRPC's traceback); written out, so :func:`check_serves_every_method` guards it."""
    return {
        "Register": grpc.unary_unary_rpc_method_handler(
            service.Register, request_deserializer=lenient_parser(pb.RegisterRequest),
            response_serializer=pb.RegisterReply.SerializeToString),
        "FetchTask": grpc.unary_stream_rpc_method_handler(
            service.FetchTask, request_deserializer=lenient_parser(pb.FetchTaskRequest),
            response_serializer=_serialize_task_message),
        "SubmitResult": grpc.stream_unary_rpc_method_handler(
            service.SubmitResult, request_deserializer=parse_result_message,
            response_serializer=pb.SubmitReply.SerializeToString),
        "Presence": grpc.unary_stream_rpc_method_handler(
            service.Presence, request_deserializer=lenient_parser(pb.PresenceRequest),
            response_serializer=pb.PresenceReply.SerializeToString),
    }


class UnservedMethodError(RuntimeError):
    """The handler table and the proto's service disagree: an RPC would go unserved (UNIMPLEMENTED)."""


def check_serves_every_method(handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    """Raise UnservedMethodError unless ``handlers`` serves exactly the methods of the proto's
    service, each with the proto's streaming kind."""
    methods = {m.name: m for m in _SERVICE.methods}
    problems = [f"{name} is not served" for name in sorted(methods.keys() - handlers.keys())]
    problems += [f"{name} is not in the proto" for name in sorted(handlers.keys() - methods.keys())]
    for name in sorted(methods.keys() & handlers.keys()):
        method, handler = methods[name], handlers[name]
        if (handler.request_streaming, handler.response_streaming) != (method.client_streaming,
                                                                       method.server_streaming):
            problems.append(f"{name} is served with other streaming than the proto declares")
    if problems:
        raise UnservedMethodError(f"the handlers of {SERVICE_NAME} do not match proto/genfl.proto: "
                                  + "; ".join(problems))


# The server's channel options (besides TRANSPORT_OPTIONS, which clients share).
SERVER_OPTIONS = (
    *TRANSPORT_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.bdp_probe", 0),
    # Without this a second server on the same port binds too, and clients are split between them.
    ("grpc.so_reuseport", 0),
)


def start_grpc_server(service: FederatedLearningService, address: str, *,
                      credentials: grpc.ServerCredentials | None = None
                      ) -> tuple[AioServer, int, ThreadsafeHealth]:
    """Start serving on ``address`` (port 0 picks a free port); returns (server, bound port, health).

    A ``grpc.aio`` server on an event-loop thread of its own: a client's long poll or open stream
    holds no thread. The standard gRPC health service (for container probes) answers on the same
    port and starts NOT_SERVING; the caller marks it SERVING once the run is ready. Raises
    ListenError, saying why, when ``address`` cannot be listened on.
    """
    check_listen_address(address)
    handlers = method_handlers(service)
    check_serves_every_method(handlers)
    loop_thread = EventLoopThread("grpc-loop")
    try:
        server, port, health_servicer = loop_thread.call(_serve(handlers, address, credentials), timeout=60)
    except BaseException:
        loop_thread.stop()
        raise
    service.serve_on(loop_thread.loop)
    return AioServer(server, loop_thread, on_stopped=service.close), port, ThreadsafeHealth(health_servicer, loop_thread)


async def _serve(handlers: dict[str, grpc.RpcMethodHandler], address: str,
                 credentials: grpc.ServerCredentials | None):
    """On the loop: build, bind and start the aio server; returns (server, port, health servicer)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        port = (server.add_secure_port(address, credentials) if credentials
                else server.add_insecure_port(address))
    except RuntimeError as error:  # what grpcio raises when no address could be bound
        raise ListenError(f"cannot listen on {address}: {error}") from None
    if port == 0:  # what older grpcio returns instead
        raise ListenError(f"cannot listen on {address}")
    await server.start()
    return server, port, health_servicer


def set_health(health_servicer: ThreadsafeHealth, *, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):  # "" is the whole server, as probes ask by default
        health_servicer.set(name, status)
