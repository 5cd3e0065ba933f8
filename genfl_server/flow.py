"""Flow control of the server's transport: how many uploads are received at once and how many wait
for a turn, how many downloads stream at once, how many RPCs a connection (and an IP address) holds
open, one upload per client, the waking of waiting polls, and the executor that does an upload's
CPU work off the event loop.

The servicer (service.py) asks for these around its plain calls; none of it speaks gRPC, so it is
the same for any transport that runs its handlers as coroutines on one event loop. Everything here
is used on that loop's thread only (no locks), except :meth:`FlowControl.wake_polls_threadsafe`
and the executor.

What costs CPU per upload (decoding, validating and folding the update) runs in a small executor
of ``max_concurrent_uploads`` threads, so health checks and polls keep answering while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent import futures
from typing import AsyncIterator, Awaitable, Callable, Iterator, TypeVar

from .limits import OpenUploads, StreamLimits, UploadClock
from .metrics import ServerMetrics

T = TypeVar("T")

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


class FlowControl:
    """The transport's bounds and wake-ups for one server, shared by all its RPCs."""

    def __init__(self, metrics: ServerMetrics, *, max_concurrent_uploads: int, max_concurrent_downloads: int,
                 max_streams_per_connection: int, max_streams_per_ip: int):
        self.metrics = metrics
        self._upload_slots = asyncio.Semaphore(max_concurrent_uploads)
        # Places for uploads waiting for a slot with their first chunk read (UPLOAD_QUEUE_PER_SLOT).
        self._upload_queue = asyncio.Semaphore(max_concurrent_uploads * UPLOAD_QUEUE_PER_SLOT)
        self._downloads = asyncio.Semaphore(max_concurrent_downloads)
        # Decoding, validating and folding an update, off the event loop so health and polls answer
        # meanwhile: with 8 CVAE uploads at once (2 busy cores) health checks took a median 20-30 ms
        # this way, 100-130 ms with the same work done inline on the loop.
        self._executor = futures.ThreadPoolExecutor(max_workers=max_concurrent_uploads, thread_name_prefix="upload")
        self._streams = StreamLimits(max_streams_per_connection, max_streams_per_ip)
        self.open_uploads = OpenUploads()
        self._poll_events: set[asyncio.Event] = set()  # one per waiting poll: set when it may have an answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._polling: dict[str, int] = {}

    # -- the event loop and its executor ------------------------------------------------------
    def serve_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """The RPCs run on ``loop`` (the aio server's): wake-ups are scheduled there."""
        self._loop = loop

    def close(self) -> None:
        """The server has stopped: no more work for the executor, no polls to wake."""
        self._loop = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, function: Callable[..., T], *args) -> T:
        """``function(*args)`` in the upload executor, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def run_to_completion(self, function: Callable[..., T], *args, undo: Callable[[T], None]) -> T:
        """``function(*args)`` in the executor, awaited. If the awaiting call is cancelled meanwhile,
        the function still completes and ``undo`` is then called with its result: something recorded
        as begun is also recorded as ended."""
        opening = asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            def undo_when_done(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    undo(done.result())
            opening.add_done_callback(undo_when_done)
            raise

    def run_in_background(self, function: Callable[..., object], *args) -> None:
        """``function(*args)`` in the executor, not awaited (the loop moves on); once the executor
        has shut down (the server is stopping), here and now."""
        try:
            asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        except RuntimeError:  # the server is stopping (its executor shut down): no step waits
            function(*args)

    # -- RPCs open per peer -------------------------------------------------------------------
    def enter_stream(self, peer: str) -> tuple[str, ...]:
        """Count one more RPC of ``peer`` (``context.peer()``); returns the keys for :meth:`leave_stream`.
        Raises Rejected (``too_many_streams``, ``too_many_streams_per_ip``) past its bounds."""
        keys = self._streams.enter(peer)
        self.metrics.rpcs_open.inc()
        return keys

    def leave_stream(self, keys: tuple[str, ...]) -> None:
        self._streams.leave(keys)
        self.metrics.rpcs_open.dec()

    # -- uploads and downloads ----------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def upload_slot(self, clock: UploadClock, first_message: Callable[[], Awaitable[None]]
                          ) -> AsyncIterator[None]:
        """Hold a receive slot (see UPLOAD_QUEUE_PER_SLOT): a place in the upload queue first (no
        chunk held while waiting for one), then ``first_message()`` (the first chunk read), then a
        slot. Waiting for either is the server's doing: the upload's ``clock`` is paused."""
        clock.pause()
        await self._upload_queue.acquire()
        queued = True
        try:
            clock.resume()
            await first_message()
            clock.pause()
            async with self._upload_slots:
                self._upload_queue.release()
                queued = False
                clock.resume()
                yield
        finally:
            if queued:
                self._upload_queue.release()

    @contextlib.asynccontextmanager
    async def download_slot(self) -> AsyncIterator[None]:
        """Hold a download slot while streaming a model, or past DOWNLOAD_SLOT_WAIT_SECONDS of
        waiting for one go on without."""
        try:
            async with asyncio.timeout(DOWNLOAD_SLOT_WAIT_SECONDS):
                await self._downloads.acquire()
            slot = True
        except TimeoutError:
            slot = False
        try:
            yield
        finally:
            if slot:
                self._downloads.release()

    # -- polls --------------------------------------------------------------------------------
    def wake_polls_threadsafe(self) -> None:
        """Wake the waiting polls (from any thread; a coordinator's poll listener: it only schedules)."""
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

    @contextlib.contextmanager
    def _wake_event(self) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._poll_events.add(event)  # before looking: a wake-up from now on sets it
        try:
            yield event
        finally:
            self._poll_events.discard(event)

    async def wait_for(self, look: Callable[[], T | None], timeout: float) -> T | None:
        """What ``look()`` finds (not None), looking again at each wake-up; None when it found
        nothing within ``timeout``. Waits on an event (no thread)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self._wake_event() as woken:
                item = look()
                remaining = deadline - loop.time()
                if item is not None or remaining <= 0:
                    return item
                try:
                    async with asyncio.timeout(remaining):
                        await woken.wait()
                except TimeoutError:
                    pass  # one last look, then None

    async def wait_until(self, done: Callable[[], bool], check_seconds: float) -> None:
        """Return once ``done()``, checked at each wake-up and at least every ``check_seconds``."""
        with self._wake_event() as wake:
            while not done():
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), check_seconds)
                except asyncio.TimeoutError:
                    pass

    @contextlib.contextmanager
    def polling(self, client_id: str) -> Iterator[None]:
        """Count ``client_id`` as connected (holding an open poll) meanwhile."""
        self._count_poller(client_id, +1)
        try:
            yield
        finally:
            self._count_poller(client_id, -1)

    def _count_poller(self, client_id: str, delta: int) -> None:
        self._polling[client_id] = self._polling.get(client_id, 0) + delta
        if self._polling[client_id] <= 0:
            del self._polling[client_id]
        self.metrics.clients_connected.set(len(self._polling))
