"""A ``grpc.aio`` server on an event-loop thread of its own, driven from synchronous code.

The round engine runs synchronously in the main thread (torch work); the gRPC handlers are
coroutines on this loop, so a waiting long poll, an idle stream or a slow upload holds no thread:
the server's thread count does not grow with its clients.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, Callable, TypeVar

import grpc
from grpc_health.v1 import health

T = TypeVar("T")


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

    def __init__(self, servicer: health.aio.HealthServicer, loop_thread: EventLoopThread):
        self.servicer = servicer
        self._loop_thread = loop_thread

    def set(self, service: str, status) -> None:
        self._loop_thread.call(self.servicer.set(service, status), timeout=10)
