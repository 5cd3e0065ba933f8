"""Whether the server can listen on an address, and the error that says why not.

Shared by the gRPC service and the metrics endpoint: both refuse an address they cannot bind
with a ListenError, which genfl-server turns into its own exit code.
"""

from __future__ import annotations

import errno
import socket


class ListenError(OSError):
    """The server cannot listen on the address it was given (in use, not this machine's, invalid)."""


_BIND_REASONS = {
    errno.EADDRINUSE: "address in use",
    errno.EADDRNOTAVAIL: "not an address of this machine",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


def check_listen_address(address: str) -> None:
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
