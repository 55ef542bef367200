"""Socket options and plain-socket helpers every networked stage shares (no pynetdicom state here)."""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["close_connection", "no_delay", "peer_text"]


def no_delay(assoc: Any) -> None:
    """Turn Nagle's algorithm off on an association's socket.

    DIMSE is request/response with small messages (C-STORE-RSP, the last PDU of a dataset); with
    Nagle on, each one can wait for the peer's delayed ACK (about 40 ms on Linux), which caps a
    C-STORE stream at a few dozen instances a second.  pynetdicom does not set it; dcmtk only when
    ``TCP_NODELAY`` is in its environment.  Best effort: a socket that refuses is left as it is.
    """
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def peer_text(address: Any) -> str:
    """``host:port`` of a peer address tuple (``[host]:port`` for IPv6), for logs."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return str(address)


def close_connection(sock: socket.socket, last_words: bytes = b"") -> None:
    """Send *last_words* (an A-ABORT or A-ASSOCIATE-RJ PDU), end the connection and close the socket.

    After what was sent comes a FIN, then what the peer had already sent is read without waiting:
    closing a socket with unread data sends a reset, which can make the peer lose the PDU.
    Never raises.
    """
    try:
        if last_words:
            sock.settimeout(1.0)
            sock.sendall(last_words)
    except OSError:
        pass
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)  # the TCP socket (under TLS too)
        sock.settimeout(0)
        for _ in range(16):
            if not socket.socket.recv(sock, 65536):
                break
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
