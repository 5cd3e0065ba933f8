"""Bounds on what one peer may hold open on the server: RPCs per connection (and per IP address,
by option) and uploads per client, and the clock of one upload's deadline.

Used by the transport's flow control (flow.py) and the servicer (service.py) on the event-loop
thread only, so no locks.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from genfl_shared.errors import Rejected, RejectReason


def peer_ip(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:127.0.0.1:5000" -> "ipv4:127.0.0.1",
    "ipv6:[::1]:5000" -> "ipv6:[::1]"); a peer without a port (a unix socket) is its own address."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and host not in ("ipv4", "ipv6") else peer


class StreamLimits:
    """Counts the RPCs open per peer connection (``context.peer()``, ip:port) and per IP address,
    and refuses one more past either bound (0: no bound). Loopback clients all share one IP, so
    only the per-connection bound is on by default."""

    def __init__(self, per_connection: int, per_ip: int = 0):
        self.per_connection = per_connection
        self.per_ip = per_ip
        self._open: Counter[str] = Counter()  # peer or "ip " + address -> RPCs open

    def enter(self, peer: str) -> tuple[str, ...]:
        """Count one more RPC of ``peer``; returns the keys to pass to :meth:`leave`. Raises
        Rejected (``too_many_streams``, ``too_many_streams_per_ip``) when the peer already holds its bound."""
        ip_key = "ip " + peer_ip(peer)
        if self.per_connection and self._open[peer] >= self.per_connection:
            raise Rejected(RejectReason.TOO_MANY_STREAMS,
                           f"this connection already has {self._open[peer]} requests open (the server allows "
                           f"{self.per_connection}: --max-streams-per-connection)")
        if self.per_ip and self._open[ip_key] >= self.per_ip:
            raise Rejected(RejectReason.TOO_MANY_STREAMS_PER_IP,
                           f"{peer_ip(peer)} already has {self._open[ip_key]} requests open (the server allows "
                           f"{self.per_ip}: --max-streams-per-ip)")
        keys = (peer, ip_key)
        for key in keys:
            self._open[key] += 1
        return keys

    def leave(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            self._open[key] -= 1
            if self._open[key] <= 0:
                del self._open[key]

    def open_count(self, peer: str) -> int:
        return self._open[peer]


class OpenUploads:
    """The clients with a result upload under way: at most one each, so that one client cannot hold
    several receive buffers (and a retry after a cut does not race its own stale stream)."""

    def __init__(self):
        self._clients: set[str] = set()

    def claim(self, client_id: str) -> None:
        if client_id in self._clients:
            raise Rejected(RejectReason.UPLOAD_IN_PROGRESS,
                           f"client {client_id!r} already has a result upload open; one at a time")
        self._clients.add(client_id)

    def release(self, client_id: str) -> None:
        self._clients.discard(client_id)

    def __len__(self) -> int:
        return len(self._clients)


class UploadClock:
    """How long an upload may still take: ``timeout`` seconds of waiting for the client, not
    counting the time it waits for a receive slot (the server's doing, not the client's)."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + timeout
        self._paused_at: float | None = None

    def pause(self) -> None:
        self._paused_at = self._loop.time()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._deadline += self._loop.time() - self._paused_at
            self._paused_at = None

    def remaining(self) -> float:
        return max(0.0, self._deadline - self._loop.time())

    def expired(self) -> Rejected:
        return Rejected(RejectReason.UPLOAD_TIMEOUT,
                        f"the result did not arrive within {self.timeout:g} s (--upload-timeout); the task stays "
                        f"open: send it again")
