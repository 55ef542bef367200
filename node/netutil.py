"""Socket tuning for DICOM associations."""

from __future__ import annotations

import socket

from pynetdicom.association import Association

__all__ = ["no_delay"]


def no_delay(assoc: Association) -> None:
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
