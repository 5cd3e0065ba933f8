"""Which clients are there: each client holds one Presence stream open for its session, and the
server counts it away once its last stream has been closed for ``grace`` seconds without being
reopened.

The kernel closes the sockets of a killed process, so the server sees its stream end within
moments whether the client died while polling or while training; a cut link is caught by the
transport's keepalive pings. A client that never opened a stream (an older client) is never
counted away: the round engine then waits for it as it always did. The grace covers a client's
own reconnect (it reopens the stream at once), so a blip is not reported as an absence.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_PRESENCE_GRACE_SECONDS = 5.0


class Presence:
    def __init__(self, grace: float = DEFAULT_PRESENCE_GRACE_SECONDS):
        if grace < 0:
            raise ValueError(f"presence grace must be >= 0 s, got {grace}")
        self.grace = grace
        self._lock = threading.Lock()
        self._streams: dict[str, set[int]] = {}  # client_id -> tokens of its open streams
        self._closed_at: dict[str, float] = {}  # client_id -> when its last stream closed
        self._timers: dict[str, threading.Timer] = {}  # pending "away after the grace" checks
        self._away: set[str] = set()
        self._tokens = itertools.count()
        self._closed = False  # the run is over: the clients leaving now are not absences
        # Called (without any lock of this object held) after a client turned away or present.
        self.listeners: list[Callable[[], None]] = []

    def opened(self, client_id: str) -> int:
        """A presence stream of ``client_id`` opened; returns its token for ``closed``."""
        with self._lock:
            token = next(self._tokens)
            self._streams.setdefault(client_id, set()).add(token)
            timer = self._timers.pop(client_id, None)
            returned = client_id in self._away
            self._away.discard(client_id)
        if timer is not None:
            timer.cancel()
        if returned:
            log.info("client %s is present again (presence stream reopened)", client_id)
            self._notify()
        return token

    def closed(self, client_id: str, token: int) -> None:
        """The stream ``token`` of ``client_id`` ended (idempotent: a second call is a no-op)."""
        timer = None
        with self._lock:
            streams = self._streams.get(client_id)
            if streams is None or token not in streams:
                return
            streams.discard(token)
            disconnected = not streams
            if disconnected and not self._closed and client_id not in self._timers:
                self._closed_at[client_id] = time.monotonic()
                timer = threading.Timer(self.grace, self._expire, args=(client_id,))
                timer.daemon = True
                self._timers[client_id] = timer
        if timer is not None:
            timer.start()
        elif disconnected and self._closed:
            self._notify()  # after the run: the wait to tell every client it ended need not wait for this one

    def _expire(self, client_id: str) -> None:
        with self._lock:
            if self._timers.get(client_id) is not threading.current_thread():
                return  # reopened (and maybe closed again) since this timer was set
            del self._timers[client_id]
            if self._streams.get(client_id):
                return
            self._away.add(client_id)
            closed_for = time.monotonic() - self._closed_at[client_id]
        log.warning("client %s is away: its presence stream closed %.1f s ago and was not reopened; "
                    "rounds no longer wait for it once enough clients have answered", client_id, closed_for)
        self._notify()

    def is_away(self, client_id: str) -> bool:
        with self._lock:
            return client_id in self._away

    def away(self) -> set[str]:
        with self._lock:
            return set(self._away)

    def disconnected(self, client_id: str) -> bool:
        """Whether ``client_id`` had a presence stream and has none open now (gone, or reconnecting).
        A client that never opened one is not: nothing says it is gone."""
        with self._lock:
            return client_id in self._streams and not self._streams[client_id]

    def close(self) -> None:
        """End of run: cancel pending checks, and count nobody away from now on."""
        with self._lock:
            self._closed = True
            timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()
