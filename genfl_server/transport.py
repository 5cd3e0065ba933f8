"""A ``grpc.aio`` server on an event-loop thread of its own, driven from synchronous code, with
the standard health service beside the served handlers.

The round engine runs synchronously in the main thread (torch work); the gRPC handlers are
coroutines on this loop, so a waiting long poll, an idle stream or a slow upload holds no thread:
the server's thread count does not grow with its clients. How many uploads, downloads and streams
the handlers take at once is flow.py's business.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, Callable, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from genfl_shared.codec import TRANSPORT_OPTIONS

from .listening import ListenError, check_listen_address

T = TypeVar("T")

# The server's channel options (besides TRANSPORT_OPTIONS, which clients share).
SERVER_OPTIONS = (
    *TRANSPORT_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.bdp_probe", 0),
    # Without this a second server on the same port binds too, and clients are split between them.
    ("grpc.so_reuseport", 0),
)


class EventLoopThread:
    """An asyncio event loop running in a daemon thread until :meth:`stop`."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()
            self.stopped.set()

    def call(self, coroutine: Awaitable[T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and wait for its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop once what it is running now yields; ``stopped`` is set when it has."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)


class AioServer:
    """A started ``grpc.aio.Server`` on its loop thread, with the synchronous ``stop(grace)`` of a
    ``grpc.Server``: it returns an event that is set once the server and its loop have stopped."""

    def __init__(self, server: grpc.aio.Server, loop_thread: EventLoopThread,
                 on_stopped: Callable[[], None] = lambda: None):
        self._server = server
        self._loop_thread = loop_thread
        self._on_stopped = on_stopped

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop_thread.loop

    def stop(self, grace: float | None) -> threading.Event:
        stopped = self._loop_thread.stopped
        if stopped.is_set():
            return stopped

        async def shut_down():
            try:
                await self._server.stop(grace)
            finally:
                self._on_stopped()
                self._loop_thread.stop()

        asyncio.run_coroutine_threadsafe(shut_down(), self.loop)
        return stopped


class ThreadsafeHealth:
    """The standard health service of an aio server (``grpc_health.v1`` aio servicer), set from any thread."""

    def __init__(self, servicer: health.aio.HealthServicer, loop_thread: EventLoopThread, service_name: str):
        self.servicer = servicer
        self._loop_thread = loop_thread
        self.names = ("", service_name)  # "" is the whole server, as probes ask by default

    def set(self, service: str, status) -> None:
        self._loop_thread.call(self.servicer.set(service, status), timeout=10)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.names:
            self.set(name, status)


def start_aio_server(handlers: dict[str, grpc.RpcMethodHandler], service_name: str, address: str, *,
                     credentials: grpc.ServerCredentials | None,
                     on_started: Callable[[asyncio.AbstractEventLoop], None],
                     on_stopped: Callable[[], None]) -> tuple[AioServer, int, ThreadsafeHealth]:
    """Serve ``handlers`` as ``service_name`` on ``address`` from a new event-loop thread; returns
    (server, bound port, health). ``on_started`` is given the loop once the server listens,
    ``on_stopped`` is called once it has stopped. Raises ListenError, saying why, when ``address``
    cannot be listened on."""
    check_listen_address(address)
    loop_thread = EventLoopThread("grpc-loop")
    try:
        server, port, health_servicer = loop_thread.call(_serve(handlers, service_name, address, credentials),
                                                         timeout=60)
    except BaseException:
        loop_thread.stop()
        raise
    on_started(loop_thread.loop)
    return (AioServer(server, loop_thread, on_stopped=on_stopped), port,
            ThreadsafeHealth(health_servicer, loop_thread, service_name))


async def _serve(handlers: dict[str, grpc.RpcMethodHandler], service_name: str, address: str,
                 credentials: grpc.ServerCredentials | None):
    """On the loop: build, bind and start the aio server; returns (server, port, health servicer)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", service_name):
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
