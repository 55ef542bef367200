"""Hostile TCP clients for tests: connections that never become associations, held open by the test.

:class:`HeldConnections` keeps *count* connections of one kind open to 127.0.0.1:port, opening a
new one as soon as the node drops one, until stopped:

* ``"silent"``: connects and sends nothing (a port scanner, a stuck client);
* ``"garbage"``: connects and sends bytes that are no DICOM PDU, in turn an HTTP request, a TLS
  ClientHello (TLS on the plain port) and an A-ASSOCIATE-RQ header that claims 4 GiB - then
  keeps the connection open without sending more.

It records how long the node took to drop each connection and what the node sent before it did.
Loopback only; every thread is joined by :meth:`HeldConnections.stop` (the ``with`` block).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass, field

__all__ = ["GARBAGE", "Drop", "HeldConnections", "held"]

LOCALHOST = "127.0.0.1"

#: What a "garbage" connection sends, in turn: no valid PDU among them.
GARBAGE = (
    b"GET / HTTP/1.1\r\nHost: node\r\n\r\n",
    bytes.fromhex("16030100a5010000a10303") + bytes(32),  # the start of a TLS ClientHello
    b"\x01\x00\xff\xff\xff\xff" + b"\x00\x01\x00\x00",  # A-ASSOCIATE-RQ of 4 GiB (4 bytes of it sent)
)


@dataclass
class Drop:
    """One connection the node closed: after how many seconds, and the bytes it sent first."""

    seconds: float
    received: bytes


@dataclass
class HeldConnections:
    """*count* connections of *kind* ("silent" or "garbage") to 127.0.0.1:*port*, reopened as they drop."""

    port: int
    kind: str
    count: int
    pause: float = 0.0  # seconds before a dropped connection is opened again
    opened: int = 0
    drops: list[Drop] = field(default_factory=list)
    refused: int = 0  # connect() failed
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> HeldConnections:
        if self.kind not in ("silent", "garbage"):
            raise ValueError(f"unknown kind {self.kind!r}")
        for number in range(self.count):
            thread = threading.Thread(target=self._hold, args=(number,), name=f"{self.kind}-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        assert not any(t.is_alive() for t in self._threads), "a hostile client thread did not stop"

    def __enter__(self) -> HeldConnections:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _hold(self, number: int) -> None:
        turn = number
        while not self._stop.is_set():
            try:
                sock = socket.create_connection((LOCALHOST, self.port), timeout=5)
            except OSError:
                with self._lock:
                    self.refused += 1
                self._stop.wait(0.05)
                continue
            with sock:
                with self._lock:
                    self.opened += 1
                started = time.monotonic()
                try:
                    if self.kind == "garbage":
                        sock.sendall(GARBAGE[turn % len(GARBAGE)])
                        turn += 1
                    received = self._until_closed(sock)
                except OSError:
                    received = b""
                if received is None:  # stopped by the test, not dropped by the node
                    return
                with self._lock:
                    self.drops.append(Drop(time.monotonic() - started, received))
            self._stop.wait(self.pause)

    def _until_closed(self, sock: socket.socket) -> bytes | None:
        """What the node sends until it closes the connection; None when the test stops first."""
        received = b""
        while not self._stop.is_set():
            readable, _, _ = select.select([sock], [], [], 0.1)
            if not readable:
                continue
            try:
                data = sock.recv(4096)
            except OSError:  # reset by the node: dropped too
                return received
            if not data:
                return received
            received += data
        return None


def held(port: int, *, silent: int, garbage: int, pause: float = 0.0) -> tuple[HeldConnections, HeldConnections]:
    """A silent and a garbage :class:`HeldConnections` (not started)."""
    return HeldConnections(port, "silent", silent, pause), HeldConnections(port, "garbage", garbage, pause)
