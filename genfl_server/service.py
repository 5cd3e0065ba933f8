"""The gRPC face of the server: turns RPCs into Coordinator calls and Rejected into gRPC statuses.

The handlers are coroutines of a ``grpc.aio`` server running on its own event-loop thread
(transport.py), while the round engine runs synchronously in the main thread: a waiting long poll,
an idle stream or a slow upload holds no thread. Each RPC method translates between proto messages
and plain calls (to the coordinator, and to the transport's flow control, flow.py: upload and
download slots, stream bounds, poll wake-ups, the upload executor) and turns a refusal (Rejected)
into its gRPC status. Requests reach it as plain values (request_messages.py).

Resource bounds (flow.py, limits.py): an upload must arrive within ``upload_timeout`` (else
DEADLINE_EXCEEDED, reason ``upload_timeout``, and its task stays open), one upload per client at a
time (ALREADY_EXISTS, ``upload_in_progress``), at most ``max_streams_per_connection`` RPCs open per
connection and, by option, ``max_streams_per_ip`` per IP address (RESOURCE_EXHAUSTED,
``too_many_streams``/``too_many_streams_per_ip``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from genfl_shared.codec import CodecError, Payload
from genfl_shared.errors import Rejected, RejectReason
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.config import TransportSettings
from genfl_shared.security import TokenAuthenticator, bearer_token
from genfl_shared.tasks import set_settings

from .coordinator import Coordinator, Task, TaskResult
from .guard import check_dp_epsilon, validated_metrics
from .flow import DEFAULT_MAX_CONCURRENT_DOWNLOADS, FlowControl
from .limits import UploadClock
from .logsafe import MAX_MESSAGE_CHARS, RateLimitedLog, shown
from .metrics import ServerMetrics
from .request_messages import ResultStream, lenient_parser, parse_result_message, refuse_unparsable
from .status_codes import status_code
from .upload import ChunkedUpdate
from .transport import AioServer, ThreadsafeHealth, start_aio_server

log = logging.getLogger(__name__)

# How often an open presence stream checks whether the run ended (its end is seen at once).
PRESENCE_CHECK_SECONDS = 1.0


def _serialize_task_message(message: pb.TaskMessage | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


_SERVICE = pb.DESCRIPTOR.services_by_name["FederatedLearning"]
SERVICE_NAME = _SERVICE.full_name  # genfl.v2.FederatedLearning


def task_header(run_id: str, task: Task) -> tuple[pb.TaskHeader, Payload | None]:
    """The header FetchTask sends for ``task``, and the synthetic images' payload whose chunks
    follow the weights' (None without)."""
    header = pb.TaskHeader(run_id=run_id, task_id=task.task_id, type=task.type, phase=task.phase, round=task.round)
    synthetic = set_settings(header, task.config)
    if task.payload is not None:
        header.manifest.CopyFrom(task.payload.manifest)
    return header, synthetic


class FederatedLearningService(pb_grpc.FederatedLearningServicer):
    def __init__(self, coordinator: Coordinator, metrics: ServerMetrics,
                 max_concurrent_uploads: int = TransportSettings.max_concurrent_uploads,
                 authenticator: TokenAuthenticator | None = None,
                 max_concurrent_downloads: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS, *,
                 upload_timeout: float = TransportSettings.upload_timeout,
                 max_streams_per_connection: int = TransportSettings.max_streams_per_connection,
                 max_streams_per_ip: int = TransportSettings.max_streams_per_ip):
        self.coordinator = coordinator
        self.metrics = metrics
        # With an authenticator, every RPC must carry the token of the client it names.
        self.authenticator = authenticator
        self.upload_timeout = upload_timeout
        self.flow = FlowControl(metrics, max_concurrent_uploads=max_concurrent_uploads,
                                max_concurrent_downloads=max_concurrent_downloads,
                                max_streams_per_connection=max_streams_per_connection,
                                max_streams_per_ip=max_streams_per_ip)
        self._rejection_log = RateLimitedLog(log)

    # -- the event loop ------------------------------------------------------------------------
    def serve_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on ``loop`` (the aio server's): the coordinator then wakes its polls."""
        self.flow.serve_on(loop)
        self.coordinator.add_poll_listener(self.flow.wake_polls_threadsafe)

    def close(self) -> None:
        """The server has stopped: no more work for the executor, no polls to wake."""
        self.flow.close()

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
            keys = self.flow.enter_stream(context.peer())
        except Rejected as error:
            await self._reject(context, error)
        try:
            yield
        finally:
            self.flow.leave_stream(keys)

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
                refuse_unparsable(request)
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
            refuse_unparsable(request)
            self._authenticate(context, request.client_id)
            self.coordinator.check_run(request.run_id)
            self.coordinator.session(request.client_id, request.session_secret)
        except Rejected as error:
            await self._reject(context, error, getattr(request, "client_id", ""))

    async def FetchTask(self, request, context):
        async with self._counted_stream(context):
            await self._check_session(request, context)
            with self.flow.polling(request.client_id):
                item = await self.flow.wait_for(lambda: self.coordinator.next_task(request.client_id, timeout=0),
                                                self.coordinator.poll_timeout)
            if item is None:
                yield pb.TaskMessage(header=pb.TaskHeader(run_id=self.coordinator.run_id, type=pb.TASK_TYPE_IDLE))
                return
            if isinstance(item, pb.TaskHeader):  # shutdown
                yield pb.TaskMessage(header=item)
                return
            header, synthetic = task_header(self.coordinator.run_id, item)
            yield pb.TaskMessage(header=header)
            if item.payload is not None:
                async with self.flow.download_slot():
                    for index, chunk in enumerate(item.payload.chunks):
                        yield chunk if item.payload.wrapped else pb.TaskMessage(chunk=pb.Chunk(index=index, data=chunk))
                    for index, chunk in enumerate(synthetic.chunks if synthetic is not None else ()):
                        yield pb.TaskMessage(chunk=pb.Chunk(index=index, data=chunk))
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
        self.flow.open_uploads.claim(header.client_id)
        try:
            if header.error:
                trailing = await stream.next() is not None
                await self.flow.run(self._record_task_error, header, task, batch, trailing)
                return None
            if task.expects_weights:
                if not header.HasField("manifest"):
                    raise Rejected(RejectReason.MALFORMED,
                                   "a training result must carry the updated weights")
                async with self.flow.upload_slot(stream.clock, stream.wait_for_next):  # first chunk read, then a slot
                    update = await self._receive_update(stream, header, task.model)
                    await self._accept(context, header, task, batch, update)
            else:
                if await stream.next() is not None:
                    raise Rejected(RejectReason.MALFORMED,
                                   "an evaluation result carries no weights")
                await self._accept(context, header, task, batch, None)
            return task
        finally:
            self.flow.open_uploads.release(header.client_id)

    async def Presence(self, request, context):
        """Held open by the client for its session; its end (the client gone: the kernel closed a
        killed process's socket, or keepalive caught a cut) is reported to the coordinator. Holds
        no thread while open: it waits on an event the coordinator's wakes set (shutdown among them)."""
        async with self._counted_stream(context):
            await self._check_session(request, context)
            client_id = request.client_id
            # The hooks wake waiting steps (taking batch locks, which a fold may hold): off the loop.
            # An opening is recorded as ended too if the call ends meanwhile (the client renewed or
            # died while the executor was busy): a stream counted open but never closed would keep
            # the client present.
            token = await self.flow.run_to_completion(
                self.coordinator.presence_opened, client_id,
                undo=lambda token: self.flow.run_in_background(self.coordinator.presence_closed, client_id, token))
            try:
                yield pb.PresenceReply(present=True)
                await self.flow.wait_until(lambda: self.coordinator.is_shut_down, PRESENCE_CHECK_SECONDS)
            finally:  # also when the call is cancelled (the client gone)
                self.flow.run_in_background(self.coordinator.presence_closed, client_id, token)

    async def _accept(self, context, header, task: Task, batch, update) -> None:
        metrics = validated_metrics(header.metrics)
        check_dp_epsilon(task.config, metrics)
        result = TaskResult(task, int(header.num_samples), metrics)
        if context.cancelled():
            raise Rejected(RejectReason.MALFORMED,
                           "the result stream was aborted before it ended")
        await self.flow.run(self._finish, result, batch, update)  # folds: off the loop

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
            update = ChunkedUpdate(header.manifest, template)
            message = await stream.next()
            while message is not None:
                if message.WhichOneof("kind") != "chunk":
                    raise Rejected(RejectReason.MALFORMED,
                                   "only chunks may follow the result header")
                await self.flow.run(update.add, message.chunk)
                message = None  # its bytes are the update's now: dropped before the next one arrives
                message = await stream.next()
            self.metrics.bytes_received.inc(update.received_bytes)
            return await self.flow.run(update.finish)
        except CodecError as error:
            raise Rejected(error.reason, f"update rejected: {error}") from None


def method_handlers(service: FederatedLearningService) -> dict[str, grpc.RpcMethodHandler]:
    """The generated registration's handler table, except that FetchTask also passes pre-serialized
    frames (``task_frame``) through, and requests that do not parse reach the handlers as
    :class:`~genfl_server.request_messages.Unparsable` (refused there, without gRPC's traceback); written out, so :func:`check_serves_every_method` guards it."""
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


def start_grpc_server(service: FederatedLearningService, address: str, *,
                      credentials: grpc.ServerCredentials | None = None
                      ) -> tuple[AioServer, int, ThreadsafeHealth]:
    """Start serving on ``address`` (port 0 picks a free port); returns (server, bound port, health).

    A ``grpc.aio`` server on an event-loop thread of its own: a client's long poll or open stream
    holds no thread. The standard gRPC health service (for container probes) answers on the same
    port and starts NOT_SERVING; the caller marks it SERVING once the run is ready. Raises
    ``listening.ListenError``, saying why, when ``address`` cannot be listened on.
    """
    handlers = method_handlers(service)
    check_serves_every_method(handlers)
    return start_aio_server(handlers, SERVICE_NAME, address, credentials=credentials,
                            on_started=service.serve_on, on_stopped=service.close)


def set_health(health: ThreadsafeHealth, *, serving: bool) -> None:
    health.set_serving(serving)
