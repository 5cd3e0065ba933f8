"""Client-controlled text in the server's log and error messages, kept harmless.

A hostile client chooses its ids, metric names and error texts, and how often it is refused. Two
defences: :func:`shown` makes any such string one printable line of bounded length before it goes
into a log line or a gRPC error message, and :class:`RateLimitedLog` rate-limits the log lines of
repeated rejections and re-registrations (per client, and overall), counting what it leaves out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

# Client-controlled strings are cut to this many characters in logs and error messages.
MAX_SHOWN_CHARS = 200
# A whole rejection message (a few client strings and our text) is cut to this.
MAX_MESSAGE_CHARS = 1000


def shown(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` as one printable line of at most about ``limit`` characters: non-printable
    characters are escaped (``\\n``, ``\\x00``), and a longer text is cut, saying how much was cut."""
    text = str(text)
    out, length = [], 0
    for index, char in enumerate(text):
        piece = char if char.isprintable() else repr(char)[1:-1]
        if length + len(piece) > limit:
            return "".join(out) + f"…(+{len(text) - index} chars)"
        out.append(piece)
        length += len(piece)
    return "".join(out)


class RateLimitedLog:
    """Log lines about clients (rejections, re-registrations) without letting one client, or many,
    flood the log.

    Per client: the first ``first`` lines are logged, then at most one per ``every`` seconds, which
    says how many were left out since. Overall: at most ``max_lines`` lines per ``every`` seconds;
    past that one line per window says how many were left out. Metrics still count every event;
    only log lines are limited.
    """

    MAX_TRACKED_CLIENTS = 4096  # a hostile client can invent ids: the oldest are forgotten

    def __init__(self, logger: logging.Logger, *, first: int = 5, every: float = 10.0, max_lines: int = 100,
                 clock: Callable[[], float] = time.monotonic):
        self._log = logger
        self.first, self.every, self.max_lines = first, every, max_lines
        self._clock = clock
        self._lock = threading.Lock()
        # client key -> [lines logged, lines left out since the last one, time of the last line]
        self._clients: OrderedDict[str, list] = OrderedDict()
        self._window_start = clock()
        self._window_lines = 0
        self._window_dropped = 0

    def log(self, client_key: str, level: int, message: str) -> None:
        """Log ``message`` (already safe to log: see :func:`shown`) about ``client_key``, unless
        the limits say to leave it out (counted, and said in a later line)."""
        now = self._clock()
        with self._lock:
            if now - self._window_start >= self.every:
                if self._window_dropped:
                    self._log.warning("%d lines about clients not logged in the last %.0f s (log rate limit; "
                                      "the metrics count every event)", self._window_dropped, now - self._window_start)
                self._window_start, self._window_lines, self._window_dropped = now, 0, 0
            state = self._clients.get(client_key)
            if state is None:
                state = self._clients[client_key] = [0, 0, -float("inf")]
                if len(self._clients) > self.MAX_TRACKED_CLIENTS:
                    self._clients.popitem(last=False)
            if not (state[0] < self.first or now - state[2] >= self.every):
                state[1] += 1  # said in this client's next line
                return
            if self._window_lines >= self.max_lines:
                self._window_dropped += 1  # said in the next window's first line
                return
            left_out = state[1]
            state[0] += 1
            state[1] = 0
            state[2] = now
            self._window_lines += 1
        suffix = f" ({left_out} more about {shown(client_key, 64)!r} not logged since)" if left_out else ""
        self._log.log(level, "%s%s", message, suffix)

    def rejected(self, client_key: str, reason: str, message: str) -> None:
        """A rejection of a request that named ``client_key``, at WARNING."""
        self.log(client_key, logging.WARNING, f"rejected ({reason}): {shown(message, MAX_MESSAGE_CHARS)}")
