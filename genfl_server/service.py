"""The gRPC face of the server: turns RPCs into Coordinator calls and Rejected into gRPC statuses."""

from __future__ import annotations

import errno
import logging
import socket
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from genfl_shared.codec import (TRANSPORT_OPTIONS, CodecError, PayloadAssembler, check_matches_template,
                                 state_dict_nbytes)
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.security import TokenAuthenticator, bearer_token

from .coordinator import Coordinator, Rejected, Task, TaskResult
from .guard import validated_metrics
from .logsafe import MAX_MESSAGE_CHARS, RateLimitedLog, shown
from .metrics import ServerMetrics

log = logging.getLogger(__name__)

# Weight uploads decoded at once. Each costs one model of memory, so this bounds the server's
# memory however many clients upload together; the rest wait in gRPC flow control (kept small by
# turning off HTTP/2 BDP probing, which would otherwise grow every stream's window to megabytes).
DEFAULT_MAX_CONCURRENT_UPLOADS = 2
# Model downloads streamed at once. Each in-flight download holds gRPC send buffers of about a
# chunk; without a bound, K clients downloading together cost about K models of memory.
DEFAULT_MAX_CONCURRENT_DOWNLOADS = 4
# A stalled downloader must not block everyone: past this wait a download proceeds anyway.
DOWNLOAD_SLOT_WAIT_SECONDS = 30.0
# How often an open presence stream checks whether the run ended (its end is seen at once).
PRESENCE_CHECK_SECONDS = 1.0
# A client's task error is client-controlled text: logged and kept at most this long.
MAX_CLIENT_ERROR_CHARS = 200


def client_error_text(error: str) -> str:
    """A client's error message made safe to log: one printable line of bounded length."""
    text = "".join(c if c.isprintable() else " " for c in error).strip()
    return text if len(text) <= MAX_CLIENT_ERROR_CHARS else text[:MAX_CLIENT_ERROR_CHARS - 1] + "…"


def task_frame(index: int, data: bytes) -> bytes:
    """One chunk as a serialized TaskMessage: built once per broadcast (``encode_state_dict(...,
    wrap=task_frame)``) and sent to every client as is, instead of once per client."""
    return pb.TaskMessage(chunk=pb.Chunk(index=index, data=data)).SerializeToString()


def _serialize_task_message(message: pb.TaskMessage | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


_SERVICE = pb.DESCRIPTOR.services_by_name["FederatedLearning"]
SERVICE_NAME = _SERVICE.full_name  # genfl.v1.FederatedLearning

_CODEC_STATUS = {
    "digest_mismatch": grpc.StatusCode.DATA_LOSS,
    "truncated": grpc.StatusCode.DATA_LOSS,
    "oversized": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


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


def _refuse_unparsable(message) -> None:
    if isinstance(message, Unparsable):
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                       f"a message does not parse as {message.type_name}: {shown(message.error)}")


def _parsed(request_iterator):
    """The messages of a request stream; raises Rejected(malformed) at one that does not parse."""
    for message in request_iterator:
        _refuse_unparsable(message)
        yield message


class FederatedLearningService(pb_grpc.FederatedLearningServicer):
    def __init__(self, coordinator: Coordinator, metrics: ServerMetrics,
                 max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS,
                 authenticator: TokenAuthenticator | None = None,
                 max_concurrent_downloads: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS):
        self.coordinator = coordinator
        self.metrics = metrics
        # With an authenticator, every RPC must carry the token of the client it names.
        self.authenticator = authenticator
        self._uploads = threading.BoundedSemaphore(max_concurrent_uploads)
        self._downloads = threading.BoundedSemaphore(max_concurrent_downloads)
        self._polling: dict[str, int] = {}
        self._polling_lock = threading.Lock()
        self._rejection_log = RateLimitedLog(log)

    def _reject(self, context: grpc.ServicerContext, error: Rejected, client_id: str = ""):
        """Count the rejection, log it (rate-limited per ``client_id``, the id the request named)
        and end the call with its status; the message is bounded, as it may quote the client."""
        self.metrics.updates_rejected.labels(error.reason).inc()
        if error.reason == "late":
            self.metrics.updates_late.inc()
        message = shown(error, MAX_MESSAGE_CHARS)
        self._rejection_log.rejected(shown(client_id, 64) or context.peer(), error.reason, message)
        context.abort(error.code, message)

    def _authenticate(self, context: grpc.ServicerContext, client_id: str | None) -> None:
        """Raise Rejected(UNAUTHENTICATED) unless the call carries ``client_id``'s token (when
        tokens are required). ``client_id=None``: only check that some token was sent."""
        if self.authenticator is None:
            return
        token = bearer_token(context.invocation_metadata())
        if token is None:
            raise Rejected(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                           "this server requires a client token (metadata 'authorization: Bearer <token>'; "
                           "genfl-client --token-file)")
        if client_id is not None and not self.authenticator.check(client_id, token):
            raise Rejected(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                           f"invalid token for client {shown(client_id)!r}")

    # -- RPCs ---------------------------------------------------------------------------------
    def Register(self, request, context):
        try:
            _refuse_unparsable(request)
            self._authenticate(context, request.client_id)
            _info, secret = self.coordinator.register(request)
        except Rejected as error:
            self._reject(context, error, getattr(request, "client_id", ""))
        self.metrics.clients_registered.set(len(self.coordinator.clients))
        return pb.RegisterReply(run_id=self.coordinator.run_id, poll_timeout_seconds=self.coordinator.poll_timeout,
                                session_secret=secret)

    def FetchTask(self, request, context):
        try:
            _refuse_unparsable(request)
            self._authenticate(context, request.client_id)
            self.coordinator.check_run(request.run_id)
            self.coordinator.session(request.client_id, request.session_secret)
        except Rejected as error:
            self._reject(context, error, getattr(request, "client_id", ""))
        context.add_callback(self.coordinator.wake)  # a cancelled poll frees its thread at once
        self._count_poller(request.client_id, +1)
        try:
            item = self.coordinator.next_task(request.client_id, self.coordinator.poll_timeout,
                                              context.is_active)
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
            slot = self._downloads.acquire(timeout=DOWNLOAD_SLOT_WAIT_SECONDS)
            try:
                for index, chunk in enumerate(item.payload.chunks):
                    yield chunk if item.payload.wrapped else pb.TaskMessage(chunk=pb.Chunk(index=index, data=chunk))
            finally:
                if slot:
                    self._downloads.release()
            self.metrics.bytes_sent.inc(item.payload.nbytes)

    def SubmitResult(self, request_iterator, context):
        request_iterator = _parsed(request_iterator)
        header = None
        try:
            self._authenticate(context, None)  # no token at all: refuse before reading anything
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "malformed", "a result must start with its header")
            header = first.header
            self._authenticate(context, header.client_id)
            task, batch = self.coordinator.open_task(header)
            if header.error:
                return self._record_task_error(header, task, batch, request_iterator)
            update = None
            if task.expects_weights:
                if not header.HasField("manifest"):
                    raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                                   "a training result must carry the updated weights")
                with self._uploads:
                    update = self._receive_update(header, request_iterator, batch.template)
            elif next(request_iterator, None) is not None:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                               "an evaluation result carries no weights")
            metrics = validated_metrics(header.metrics)
            result = TaskResult(task, int(header.num_samples), metrics)
            if not context.is_active():
                # gRPC ends the request iterator quietly when the call is cancelled or fails in
                # transport: an apparently complete stream may be a broken one.
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                               "the result stream was aborted before it ended")
            self.coordinator.finish(result, batch, update)
        except Rejected as error:
            self._reject(context, error, header.client_id if header is not None else "")
        self.metrics.updates_accepted.labels(task.phase, pb.TaskType.Name(task.type)).inc()
        return pb.SubmitReply(accepted=True, message=f"result for task {task.task_id} accepted")

    def Presence(self, request, context):
        """Held open by the client; its end (the client gone) is reported to the coordinator."""
        try:
            _refuse_unparsable(request)
            self._authenticate(context, request.client_id)
            self.coordinator.check_run(request.run_id)
            self.coordinator.session(request.client_id, request.session_secret)
        except Rejected as error:
            self._reject(context, error, getattr(request, "client_id", ""))
        client_id = request.client_id
        token = self.coordinator.presence_opened(client_id)
        ended = threading.Event()
        context.add_callback(ended.set)  # the call ended: the client is gone (or reconnecting)
        try:
            yield pb.PresenceReply(present=True)
            while not ended.wait(PRESENCE_CHECK_SECONDS) and not self.coordinator.is_shut_down:
                pass
        finally:
            self.coordinator.presence_closed(client_id, token)

    # -- helpers ------------------------------------------------------------------------------
    def _record_task_error(self, header, task: Task, batch, request_iterator) -> pb.SubmitReply:
        """The client could not execute ``task``: count it as failed for its step, and say why."""
        if header.HasField("manifest") or header.num_samples or next(request_iterator, None) is not None:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                           "an error result carries no weights and no samples")
        message = client_error_text(header.error)
        self.coordinator.fail(task, batch, message)
        self.metrics.updates_rejected.labels("task_error").inc()
        log.warning("client %s could not execute task %s (%s round %d, %s): %s", task.client_id, task.task_id,
                    task.phase, task.round, pb.TaskType.Name(task.type), message)
        return pb.SubmitReply(accepted=False, message=f"error for task {task.task_id} recorded")

    def _receive_update(self, header, request_iterator, template):
        max_bytes = state_dict_nbytes(template)
        try:
            assembler = PayloadAssembler(header.manifest, max_bytes=max_bytes)
            for message in request_iterator:
                if message.WhichOneof("kind") != "chunk":
                    raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                                   "only chunks may follow the result header")
                assembler.add(message.chunk)
            self.metrics.bytes_received.inc(assembler.received_bytes)
            update = assembler.finish()
            check_matches_template(update, template)
        except CodecError as error:
            raise Rejected(_CODEC_STATUS.get(error.reason, grpc.StatusCode.INVALID_ARGUMENT),
                           error.reason, f"update rejected: {error}") from None
        return update

    def _header(self, task: Task) -> pb.TaskHeader:
        header = pb.TaskHeader(run_id=self.coordinator.run_id, task_id=task.task_id, type=task.type,
                               phase=task.phase, round=task.round, config_json=task.config.to_json())
        if task.payload is not None:
            header.manifest.CopyFrom(task.payload.manifest)
        return header

    def _count_poller(self, client_id: str, delta: int) -> None:
        with self._polling_lock:
            self._polling[client_id] = self._polling.get(client_id, 0) + delta
            if self._polling[client_id] <= 0:
                del self._polling[client_id]
            self.metrics.clients_connected.set(len(self._polling))


class ListenError(OSError):
    """The server cannot listen on the address it was given (in use, not this machine's, invalid)."""


_BIND_REASONS = {
    errno.EADDRINUSE: "address in use",
    errno.EADDRNOTAVAIL: "not an address of this machine",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


def _check_listen_address(address: str) -> None:
    """Raise ListenError saying why ``address`` (host:port) cannot be listened on, if it cannot.

    Done with a plain socket before gRPC tries: gRPC only says "failed to bind" (after logging
    the reason in its own format), and falls back to port 443 for an address without a port.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ListenError(f"cannot listen on {address}: not a host:port address (e.g. 0.0.0.0:50051)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:50051
    try:
        candidates = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        raise ListenError(f"cannot listen on {address}: unknown host {host!r} ({error})") from None
    failures = []
    for family, kind, proto, _, sockaddr in candidates:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(sockaddr)
                return  # gRPC listens as long as one resolved address can be bound
            except OSError as error:
                failures.append(error)
    error = failures[0]
    raise ListenError(f"cannot listen on {address}: {_BIND_REASONS.get(error.errno, error.strerror or error)}")


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
            service.SubmitResult, request_deserializer=lenient_parser(pb.ResultMessage),
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


def start_grpc_server(service: FederatedLearningService, address: str, *, max_workers: int,
                      credentials: grpc.ServerCredentials | None = None
                      ) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Start serving on ``address`` (port 0 picks a free port); returns (server, bound port, health).

    Every client holds one long-poll thread, so the pool must exceed the client count. The standard
    gRPC health service (for container probes) answers on the same port and starts NOT_SERVING;
    the caller marks it SERVING once the run is ready. Raises ListenError, saying why, when
    ``address`` cannot be listened on.
    """
    _check_listen_address(address)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[
            *TRANSPORT_OPTIONS,
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.bdp_probe", 0),
            # Without this a second server on the same port binds too, and clients are split between them.
            ("grpc.so_reuseport", 0),
        ],
    )
    handlers = method_handlers(service)
    check_serves_every_method(handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    set_health(health_servicer, serving=False)
    try:
        port = (server.add_secure_port(address, credentials) if credentials
                else server.add_insecure_port(address))
    except RuntimeError as error:  # what grpcio raises when no address could be bound
        raise ListenError(f"cannot listen on {address}: {error}") from None
    if port == 0:  # what older grpcio returns instead
        raise ListenError(f"cannot listen on {address}")
    server.start()
    return server, port, health_servicer


def set_health(health_servicer: health.HealthServicer, *, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):  # "" is the whole server, as probes ask by default
        health_servicer.set(name, status)
