"""Connections before they are associations, and socket tuning for associations.

What pynetdicom does with a new connection
------------------------------------------
pynetdicom 3.0's ``AssociationServer`` starts an :class:`~pynetdicom.association.Association`
thread and its DUL thread for every accepted TCP connection, before a byte has been read. That
thread counts against ``AE.maximum_associations`` (``[node] max_associations``) from then on:

* a silent connection holds it until the ARTIM timer / ``acse_timeout`` runs out (10 s here);
* a connection that sends something that is no PDU is answered A-ABORT, but the Association
  thread waits out ``acse_timeout`` all the same, and when the bytes look like the header of a
  long PDU (type 1-7 and a large length: a truncated A-ASSOCIATE-RQ, random bytes) the DUL blocks
  in a ``recv`` without a timeout: its timers stop, the socket is never closed, and the thread (and
  slot) is held until the client leaves;
* each DUL thread polls every millisecond while it waits.

Measured on main from 127.0.0.1 (``max_associations = 10``), with 12 garbage connections (an HTTP
request, the start of a TLS ClientHello, an A-ASSOCIATE-RQ header claiming 4 GiB, in turn) and 12
silent ones held open, each reopened as soon as the node dropped it (``tests/support/hostile.py``): 0 of 10
C-ECHOs (dcmtk ``echoscu``) succeeded, all refused "Local Limit Exceeded"; the node used 1.24 s of
CPU in 10 s and ran 47 threads.

What the node does instead
--------------------------
:class:`GuardedAssociationServer` (and :class:`node.net.tls.TlsAssociationServer`, built on it) reads
the first PDU itself, in the connection's own thread, before pynetdicom sees the connection:

* it must be a complete, decodable A-ASSOCIATE-RQ within ``association_timeout_seconds`` of the
  accept (TLS handshake included); otherwise the connection is closed (a trickle of bytes does not
  extend the time: the deadline is fixed at the accept);
* anything else (another PDU type, no PDU at all, a length over :data:`MAX_ASSOCIATE_RQ_BYTES`, an
  undecodable request) is answered A-ABORT (source: service provider, with the PS3.8 reason) and
  the connection is closed at once (an A-ABORT from the peer is not answered);
* the request is then handed to pynetdicom as its own reader would have queued it
  (:func:`_hand_to_dul`), and pynetdicom negotiates as always (AE titles, contexts,
  ``maximum_associations``).

So ``max_associations`` counts only connections that asked for an association, and a connection
still negotiating costs one thread blocked in ``recv`` and one file descriptor, nothing more. Those
are limited on their own (:class:`ConnectionGuard`): ``max_negotiating_connections`` at once over
both listeners, and optionally ``max_connections_per_address`` (negotiating plus associated); a
connection over a limit is closed at once (a plain one after an A-ASSOCIATE-RJ "transient, local
limit exceeded"). Every such connection is counted in ``dicomnode_connections_refused_total{reason}``
and logged at WARNING at most once a minute per address, with the reason and how many were not
logged in between. Once associated, nothing here limits a connection in time: a long C-STORE push
is never cut by the timeout.

Why not pynetdicom's own settings: ``acse_timeout`` and the ARTIM timer do not reach a DUL blocked
in ``recv``; a socket timeout would also apply to established associations and is reset by every
byte of a trickle; ``maximum_associations`` cannot tell a negotiating connection from an
association. Peeking at the first PDU (``MSG_PEEK``) would leave its bytes to pynetdicom, but a TLS
socket cannot peek, and a partial PDU would have to be polled for. Reading the first PDU ourselves
needs one private detail of pynetdicom (the DUL's ``_recv_pdu`` queue, see :func:`_hand_to_dul`),
checked for at each hand-over; nothing process-wide of pynetdicom is changed.

Measured after, the same attack and machine, defaults (5 s timeout): 10 of 10 C-ECHOs succeeded
(0.07-0.13 s each), in two runs each with garbage reopened at once and 20 ms after each drop (on
main: 0 of 10 either way). The node ran 22 threads; it refused 900 garbage connections a second
(reopened at once) at 0.6 ms of CPU each, and logged one warning for all of them. With
socketserver's listen backlog of 5, one C-ECHO in ten took 1.1 s (the time after which a dropped
SYN is sent again); with :attr:`GuardedAssociationServer.request_queue_size` at 128 none did since.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from node.telemetry.metrics import Metrics
from node.net.sockets import close_connection, peer_text

__all__ = [
    "MAX_ASSOCIATE_RQ_BYTES",
    "WARNING_INTERVAL_SECONDS",
    "AssociationRequest",
    "ConnectionGuard",
    "ConnectionLimits",
    "GuardedAssociationServer",
    "Negotiation",
    "NotAnAssociationRequest",
    "read_association_request",
    "serve_in_background",
    "start_guarded_server",
]

log = logging.getLogger(__name__)

#: Seconds between two warnings about refused connections from one address.
WARNING_INTERVAL_SECONDS = 60.0

#: The longest A-ASSOCIATE-RQ read (PDU header included). 128 presentation contexts of a dozen
#: transfer syntaxes each, with user identity, stay far below it; it bounds what a connection can
#: make the node hold in memory before it is an association.
MAX_ASSOCIATE_RQ_BYTES = 1 << 20

_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length of what follows
_A_ASSOCIATE_RQ = 0x01
_A_ABORT = 0x07
# protocol version, reserved, called and calling AE title, reserved: the fixed part of an RQ
_MIN_ASSOCIATE_RQ_LENGTH = 68
_PDU_NAMES = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF", 0x05: "A-RELEASE-RQ",
              0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
# A-ABORT reasons of the service provider (PS3.8 9.3.8)
_UNRECOGNISED_PDU = 0x01
_UNEXPECTED_PDU = 0x02
_INVALID_PARAMETER_VALUE = 0x06
_MAX_TRACKED_WARNINGS = 4096  # addresses remembered by the warning rate limit before old ones are dropped


# --------------------------------------------------------------------------- the first PDU


class NotAnAssociationRequest(Exception):
    """The first bytes of a connection are no acceptable A-ASSOCIATE-RQ.

    :attr:`diagnostic` is the A-ABORT reason (PS3.8 table 9-26, service provider).
    """

    def __init__(self, message: str, diagnostic: int) -> None:
        super().__init__(message)
        self.diagnostic = diagnostic


class _PeerClosed(Exception):
    """The peer closed the connection (or it was cut) before the PDU was complete."""


@dataclass(frozen=True)
class AssociationRequest:
    """A received A-ASSOCIATE-RQ: the decoded PDU and its bytes."""

    pdu: A_ASSOCIATE_RQ
    raw: bytes


def _printable(text: str, limit: int = 160) -> str:
    """*text* with anything unprintable as ``?``, at most *limit* characters (peer bytes go to logs)."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[:limit] + "..."


def _receive(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Exactly *size* bytes, all of them before *deadline* (``time.monotonic``).

    Raises TimeoutError at the deadline, :class:`_PeerClosed` when the connection ends first.
    """
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(size - len(data), 65536))
        except TimeoutError:
            raise
        except OSError as exc:  # reset by the peer, or cut at shutdown
            raise _PeerClosed(str(exc) or type(exc).__name__) from exc
        if not chunk:
            raise _PeerClosed(f"after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def read_association_request(sock: socket.socket, deadline: float, *,
                             max_bytes: int = MAX_ASSOCIATE_RQ_BYTES) -> AssociationRequest:
    """Read and decode the A-ASSOCIATE-RQ a new connection must begin with.

    Parameters
    ----------
    sock : socket.socket
        The accepted connection (an ``ssl.SSLSocket`` after its handshake, over TLS).
    deadline : float
        ``time.monotonic()`` by which the whole request must have arrived.
    max_bytes : int
        The longest request accepted, PDU header included.

    Returns
    -------
    AssociationRequest

    Raises
    ------
    TimeoutError
        The request was not complete at *deadline*.
    NotAnAssociationRequest
        The bytes are no A-ASSOCIATE-RQ (another PDU, no PDU, too long, not decodable).
    OSError
        The peer closed or reset the connection first, or sent an A-ABORT.
    """
    try:
        header = _receive(sock, _HEADER.size, deadline)
        pdu_type, _, length = _HEADER.unpack(header)
        if pdu_type == _A_ABORT:  # PS3.8 Sta2 + Evt16: close, nothing to answer
            raise ConnectionAbortedError("the peer sent A-ABORT")
        if pdu_type != _A_ASSOCIATE_RQ:
            if pdu_type in _PDU_NAMES:
                name = _PDU_NAMES[pdu_type]
                raise NotAnAssociationRequest(f"{'an' if name.startswith('A') else 'a'} {name} PDU instead of an "
                                              "A-ASSOCIATE-RQ", _UNEXPECTED_PDU)
            raise NotAnAssociationRequest(f"not a DICOM PDU (it begins {header.hex(' ')})", _UNRECOGNISED_PDU)
        if not _MIN_ASSOCIATE_RQ_LENGTH <= length <= max_bytes - _HEADER.size:
            raise NotAnAssociationRequest(
                f"an A-ASSOCIATE-RQ of {length + _HEADER.size} bytes (from {_MIN_ASSOCIATE_RQ_LENGTH + _HEADER.size} "
                f"to {max_bytes} accepted)", _INVALID_PARAMETER_VALUE)
        raw = header + _receive(sock, length, deadline)
    except _PeerClosed as exc:
        raise ConnectionAbortedError(f"closed by the peer ({exc})") from exc
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(raw)
        pdu.to_primitive()  # what pynetdicom does next: it must not fail there
    except Exception as exc:  # noqa: BLE001 - any decoding failure of a peer's bytes
        raise NotAnAssociationRequest(f"an A-ASSOCIATE-RQ that cannot be decoded: {_printable(str(exc))}",
                                      _INVALID_PARAMETER_VALUE) from exc
    return AssociationRequest(pdu, raw)


def _abort_pdu(diagnostic: int) -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # the DICOM UL service provider
    pdu.reason_diagnostic = diagnostic
    return pdu.encode()


def _limit_rejection_pdu() -> bytes:
    pdu = A_ASSOCIATE_RJ()
    pdu.result = 0x02  # rejected (transient)
    pdu.source = 0x03  # DICOM UL service provider (presentation related function)
    pdu.reason_diagnostic = 0x02  # local limit exceeded
    return pdu.encode()


# --------------------------------------------------------------------------- limits, counting, warnings


@dataclass(frozen=True)
class ConnectionLimits:
    """What a connection may do before it is an association.

    Attributes
    ----------
    timeout : float
        Seconds from the accept to a complete A-ASSOCIATE-RQ (``association_timeout_seconds``).
    max_negotiating : int
        Connections negotiating at once (``max_negotiating_connections``).
    max_per_address : int
        Connections from one address at once, negotiating or associated; 0: no limit
        (``max_connections_per_address``).
    """

    timeout: float = 5.0
    max_negotiating: int = 64
    max_per_address: int = 0


class _WarningLimit:
    """At most one warning per key every *interval* seconds; counts, by reason, what it held back."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, Counter[str]] = {}

    def admit(self, key: Hashable, reason: str) -> Counter[str] | None:
        """None: hold this warning back (counted); else what was held back for *key* since its last one."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held.setdefault(key, Counter())[reason] += 1
                return None
            self._last[key] = now
            held = self._held.pop(key, Counter())
            if len(self._last) > _MAX_TRACKED_WARNINGS:  # forget quiet addresses (their counts are in /metrics)
                for old in [k for k, t in self._last.items() if now - t >= self.interval]:
                    self._last.pop(old, None)
                    self._held.pop(old, None)
            return held


class ConnectionGuard:
    """Admits, counts and reports the connections of the node's listeners before their association.

    One guard serves the plain and the TLS listener, so the limits are over both.

    Parameters
    ----------
    limits : ConnectionLimits
        Timeout and limits.
    metrics : Metrics, optional
        Counts every refused connection by reason (``connection_refused``).
    warning_interval : float
        Seconds between two warnings for one address.
    clock : callable
        Monotonic seconds (for the warning limit).
    """

    def __init__(self, limits: ConnectionLimits | None = None, *, metrics: Metrics | None = None,
                 warning_interval: float = WARNING_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits if limits is not None else ConnectionLimits()
        self.metrics = metrics
        self._lock = threading.Lock()
        self._negotiating: Counter[str] = Counter()
        self._warnings = _WarningLimit(warning_interval, clock)

    def negotiating(self, host: str | None = None) -> int:
        """Connections negotiating now: all, or those from *host*."""
        with self._lock:
            return self._negotiating[host] if host is not None else sum(self._negotiating.values())

    def admit(self, host: str, associated: int = 0) -> str | None:
        """Count a new connection from *host* as negotiating, or say why it may not be.

        Parameters
        ----------
        host : str
            The peer's address.
        associated : int
            Associations *host* has open now (for ``max_per_address``).

        Returns
        -------
        str or None
            None when admitted (call :meth:`release` when it stops negotiating); else the reason.
        """
        limits = self.limits
        with self._lock:
            total = sum(self._negotiating.values())
            if total >= limits.max_negotiating:
                return (f"{total} connections are negotiating already "
                        f"(max_negotiating_connections = {limits.max_negotiating})")
            mine = self._negotiating[host] + associated
            if limits.max_per_address and mine >= limits.max_per_address:
                return (f"{host} has {mine} connections open already "
                        f"(max_connections_per_address = {limits.max_per_address})")
            self._negotiating[host] += 1
        return None

    def release(self, host: str) -> None:
        """A connection :meth:`admit` counted is no longer negotiating (associated, refused or gone)."""
        with self._lock:
            self._negotiating[host] -= 1
            if self._negotiating[host] <= 0:
                del self._negotiating[host]

    def refused(self, host: str, reason: str, message: str, *, topic: Hashable = "negotiation",
                logger: logging.Logger | None = None) -> None:
        """Count a connection closed for *reason* and warn, at most once a minute per (*host*, *topic*).

        Parameters
        ----------
        host : str
            The peer's address.
        reason : str
            A :data:`node.telemetry.metrics.CONNECTION_REFUSAL_REASONS` entry.
        message : str
            The warning, naming the peer and why.
        topic : hashable
            Warnings of one topic share their rate limit per address (default: all of negotiation).
        logger : logging.Logger, optional
            Where to warn (default: this module's).
        """
        if self.metrics is not None:
            self.metrics.connection_refused(reason)
        held = self._warnings.admit((host, topic), reason)
        if held is None:
            return
        if held:
            counts = ", ".join(f"{count} {why}" for why, count in sorted(held.items()))
            message += (f"; {sum(held.values())} more from {host} not logged since the last warning ({counts}): "
                        f"at most one warning every {self._warnings.interval:g} s per address")
        (logger or log).warning("%s", message)


# --------------------------------------------------------------------------- the server


def _hand_to_dul(assoc: Association, request: AssociationRequest) -> None:
    """Give a new acceptor association the A-ASSOCIATE-RQ read before it existed.

    What pynetdicom's own reader (``DULServiceProvider._read_pdu_data``) does with a PDU from the
    socket: trigger EVT_DATA_RECV and EVT_PDU_RECV, put the PDU on the DUL's ``_recv_pdu`` queue
    and "Evt6" (A-ASSOCIATE-RQ PDU received) on its ``event_queue``, where the
    ``AssociationSocket`` put "Evt5" (transport connection indication). The state machine then goes
    Sta1 -> Sta2 -> Sta3 and the association negotiates as if it had read the request itself.
    """
    dul = assoc.dul
    if not hasattr(dul, "_recv_pdu") or not hasattr(dul, "event_queue"):
        raise RuntimeError("this pynetdicom's DUL has no _recv_pdu/event_queue: node.receive.guard cannot hand it the "
                           "A-ASSOCIATE-RQ (a pynetdicom version the node was not made for)")
    evt.trigger(assoc, evt.EVT_DATA_RECV, {"data": request.raw})
    evt.trigger(assoc, evt.EVT_PDU_RECV, {"pdu": request.pdu})
    dul._recv_pdu.put(request.pdu)
    dul.event_queue.put("Evt6")


class _AcceptingHandler(RequestHandler):
    """pynetdicom's request handler for a connection whose A-ASSOCIATE-RQ was read already."""

    def __init__(self, request: socket.socket, client_address: Any, server: GuardedAssociationServer,
                 association_request: AssociationRequest) -> None:
        self.association_request = association_request
        super().__init__(request, client_address, server)  # calls handle()

    def handle(self) -> None:
        """As ``RequestHandler.handle``, with the request queued before the association starts."""
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        _hand_to_dul(assoc, self.association_request)
        assoc.start()


@dataclass(eq=False)
class Negotiation:
    """A connection while it negotiates, as :meth:`GuardedAssociationServer.secure` gets it.

    Attributes
    ----------
    sock : socket.socket
        Its socket (the TLS socket once :meth:`GuardedAssociationServer.replace_socket` made it so).
    deadline : float
        ``time.monotonic()`` by which its A-ASSOCIATE-RQ must be complete.
    host : str
        The peer's address.
    peer : str
        ``host:port``, for logs.
    """

    sock: socket.socket
    deadline: float
    host: str
    peer: str


class SharedContexts(list):
    """The server's supported presentation contexts, handed to each association as they are.

    pynetdicom deep-copies them for every association (``RequestHandler._create_association``):
    for the node's ~150 storage SOP classes in every transfer syntax that is some 6,000 pydicom UIDs
    made and validated again, 60-70 ms of CPU for each association, measured with storescu - most
    of what ten associations at once cost beyond their instances.  Negotiation only reads them
    (``negotiate_as_acceptor`` builds the accepted contexts anew) and the node never changes them
    once the listener runs, so a copy of the list holding the same contexts does.
    """

    def __deepcopy__(self, memo: dict) -> list:
        return list(self)


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, with each connection's negotiation bounded.

    In the connection's own thread: :class:`ConnectionGuard` admission, then :meth:`secure` (the TLS
    handshake in :class:`node.net.tls.TlsAssociationServer`; nothing here), then the A-ASSOCIATE-RQ,
    all before the deadline; only then the association (see the module notes). Build it with
    ``ae.make_server(address, server_class=GuardedAssociationServer, guard=guard, ...)`` or
    :func:`start_guarded_server`.

    Parameters
    ----------
    *args, **kwargs
        As for ``AssociationServer``.
    guard : ConnectionGuard, optional
        Shared with the node's other listener; default: one of its own with default limits.
    reuse_port : bool
        Bind with ``SO_REUSEPORT``, so that other processes of the node (``[node] receivers``)
        listen on the same address and the kernel shares the connections out among them.
    """

    #: The listen backlog (socketserver's default is 5): under a flood of connections, a sender's
    #: connection waits its turn instead of having its SYN dropped (retried by its kernel after 1 s).
    request_queue_size = 128

    def __init__(self, *args: Any, guard: ConnectionGuard | None = None, reuse_port: bool = False,
                 **kwargs: Any) -> None:
        self.guard = guard if guard is not None else ConnectionGuard()
        self.reuse_port = reuse_port  # before super(): it binds
        self._negotiations: set[Negotiation] = set()  # before super(): a failed bind calls server_close
        self._negotiations_lock = threading.Lock()
        self._closing = False
        super().__init__(*args, **kwargs)
        contexts = getattr(self, "contexts", None)
        if isinstance(contexts, list):
            self.contexts = SharedContexts(contexts)

    def server_bind(self) -> None:
        """pynetdicom's bind, with ``SO_REUSEPORT`` first when asked (it must be set before bind)."""
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    @property
    def closing(self) -> bool:
        """Whether the listener is being shut down."""
        return self._closing

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: everything else happens in the connection's thread."""
        return self.socket.accept()

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        """Admit, negotiate within the deadline, then hand the connection to pynetdicom."""
        host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        peer = peer_text(client_address)
        why = self.guard.admit(host, self._associated_from(host))
        if why is not None:
            self.guard.refused(host, "over_limit", f"connection from {peer} refused: {why}")
            self.refuse_over_limit(request)
            return
        negotiation = Negotiation(request, time.monotonic() + self.guard.limits.timeout, host, peer)
        try:
            with self._negotiations_lock:
                if self._closing:
                    close_connection(request)
                    return
                self._negotiations.add(negotiation)
            self._negotiate(negotiation, client_address)
        except Exception:  # noqa: BLE001 - a bug must not leak the socket or kill the listener
            log.exception("connection from %s: negotiation failed", peer)
            close_connection(negotiation.sock)
        finally:
            self._forget(negotiation)
            self.guard.release(host)

    def _negotiate(self, negotiation: Negotiation, client_address: Any) -> None:
        sock = self.secure(negotiation, client_address)
        if sock is None:
            return
        request = self._association_request(negotiation, sock)
        if request is None:
            return
        sock.settimeout(None)  # as pynetdicom's sockets: blocking, it selects before reading
        self._forget(negotiation)  # an association from here: not cut at shutdown, as pynetdicom's are not
        _AcceptingHandler(sock, client_address, self, request)

    def secure(self, negotiation: Negotiation, client_address: Any) -> socket.socket | None:
        """The socket to read the A-ASSOCIATE-RQ from, or None when the connection was refused (and closed).

        The plain listener uses the accepted socket; :class:`node.net.tls.TlsAssociationServer` does its
        TLS handshake here, within ``negotiation.deadline``.
        """
        return negotiation.sock

    def replace_socket(self, negotiation: Negotiation, sock: socket.socket) -> None:
        """Make *sock* (a TLS socket over the accepted one) the socket shutdown cuts."""
        with self._negotiations_lock:
            negotiation.sock = sock
        if self._closing:
            _cut(sock)

    def refuse_over_limit(self, request: socket.socket) -> None:
        """Close a connection over a limit: A-ASSOCIATE-RJ (transient, local limit exceeded), then close."""
        close_connection(request, _limit_rejection_pdu())

    def _association_request(self, negotiation: Negotiation, sock: socket.socket) -> AssociationRequest | None:
        peer, host = negotiation.peer, negotiation.host
        try:
            return read_association_request(sock, negotiation.deadline)
        except TimeoutError:
            self.guard.refused(host, "timeout", f"connection from {peer} closed: no complete A-ASSOCIATE-RQ "
                                                f"within {self.guard.limits.timeout:g} s (association_timeout_seconds)")
            close_connection(sock)
        except NotAnAssociationRequest as exc:
            self.guard.refused(host, "invalid_pdu", f"connection from {peer} closed: {exc}; answered A-ABORT")
            close_connection(sock, _abort_pdu(exc.diagnostic))
        except OSError as exc:
            if self._closing:
                log.info("connection from %s cut before its association: the listener is stopping", peer)
            else:
                log.debug("connection from %s ended before an A-ASSOCIATE-RQ: %s", peer, exc)
            close_connection(sock)
        return None

    def _associated_from(self, host: str) -> int:
        """Associations *host* has open on this AE (both listeners); 0 when there is no per-address limit."""
        if not self.guard.limits.max_per_address:
            return 0
        count = 0
        for assoc in self.ae.active_associations:
            try:
                if assoc.is_acceptor and assoc.requestor.address == host:
                    count += 1
            except ValueError:  # no address yet
                continue
        return count

    def _forget(self, negotiation: Negotiation) -> None:
        with self._negotiations_lock:
            self._negotiations.discard(negotiation)

    def server_close(self) -> None:
        """Close the listening socket and cut the connections still negotiating (socketserver joins
        their threads on close, which would otherwise wait for their deadlines)."""
        with self._negotiations_lock:
            self._closing = True
            pending = [negotiation.sock for negotiation in self._negotiations]
        for sock in pending:
            _cut(sock)
        super().server_close()


def _cut(sock: socket.socket) -> None:
    """Shut a socket down under a thread blocked in it (its recv returns at once)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP socket, under TLS too
    except OSError:
        pass


def serve_in_background(ae: Any, server: ThreadedAssociationServer, name: str) -> None:
    """Run *server* in a daemon thread, as ``ae.start_server(..., block=False)`` does its own.

    It is registered in ``ae._servers`` as ``start_server`` registers: ``server.shutdown()`` and
    ``ae.shutdown()`` expect it there.
    """
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=make_target(server.serve_forever), name=f"{name}@{stamp}", daemon=True)
    thread.start()
    ae._servers.append(server)


def start_guarded_server(ae: Any, address: tuple[str, int], handlers: Sequence[tuple], guard: ConnectionGuard,
                         *, reuse_port: bool = False) -> GuardedAssociationServer:
    """The plain listener: a :class:`GuardedAssociationServer` on *address*, serving in its own thread.

    Parameters
    ----------
    ae : pynetdicom.AE
        The application entity (AE title, contexts, ``maximum_associations``).
    address : (str, int)
        Host and port to bind.
    handlers : sequence of (event, handler)
        pynetdicom event handlers, as for ``start_server``.
    guard : ConnectionGuard
        Timeout, limits, counting and warnings (shared with the TLS listener).
    reuse_port : bool
        Share the port with the node's other receiving processes (``SO_REUSEPORT``).

    Returns
    -------
    GuardedAssociationServer
        Stop it with ``shutdown()``.
    """
    server = ae.make_server(address, evt_handlers=list(handlers), server_class=GuardedAssociationServer, guard=guard,
                            reuse_port=reuse_port)
    serve_in_background(ae, server, "AcceptorServer")
    return server
