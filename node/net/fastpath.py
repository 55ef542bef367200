"""pynetdicom's per-association hot path, made quicker for the node's own acceptors.

Measured with storescu pushing 512 KB CT slices over loopback (``scripts/bench/ingest_timeline.py``),
a bare pynetdicom 3.0 SCP spends about half of each C-STORE waiting on itself:

- **Polling.** pynetdicom runs two threads per association and both poll. The DUL thread
  (``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms) whenever a pass found
  nothing to do; the association thread (``Association._run_reactor``) sleeps 1 ms before each
  look at its queue of decoded messages. That is up to three sleeps on each C-STORE's critical
  path: the next request's first bytes wait for the DUL's sleep to end, the decoded message for
  the association's, the C-STORE-RSP for the DUL's again.
- **4 KiB reads.** ``AssociationSocket.recv`` reads a PDU 4,096 bytes per ``socket.recv`` into a
  growing ``bytearray``: 32 system calls and Python loops for each 128 KiB PDU.
- **Log records nobody keeps.** pynetdicom's standard event handlers describe every PDU and DIMSE
  message for its DEBUG log (reading the command set, formatting lines) even when the
  ``pynetdicom`` logger drops them.
- **Answers built through pydicom.** Each C-STORE-RSP (seven elements) is made into a pydicom
  Dataset, validated and encoded element by element: 0.3-0.5 ms of every C-STORE.

:func:`enable` (process-wide, once at start-up) replaces the ``time`` name that ``pynetdicom.dul``
and ``pynetdicom.association`` imported with a stand-in whose ``sleep`` still sleeps, except on the
threads of an association :func:`attach` was given (the node's acceptors, from ``EVT_CONN_OPEN``).
Those wait for work instead of polling:

- the DUL thread until the association's socket is readable or one of the queues it reads is given
  an item (``to_provider_queue``: a PDU to send, such as the C-STORE-RSP; ``event_queue``);
  their ``put`` also signals an ``eventfd`` that the wait selects on beside the socket;
- the association thread, in its reactor's 1 ms sleep only, until a decoded message
  (``dimse.msg_queue``) or an A-RELEASE/A-ABORT from the peer (``dul.to_user_queue``) is queued.

With nothing to wake them they wait :data:`IDLE_SECONDS` (10 ms) instead of 1 ms, so ten open
associations no longer wake 20,000 times a second to take turns at the GIL. The loops, their
order and what they check are pynetdicom's; what reaches them without a queue (the ARTIM and idle
timers, the kill flag at shutdown) is noticed at most 10 ms later than before, against timeouts
of seconds. An association not attached (the node's senders, other code) runs exactly as before.

:func:`attach` also gives the association's socket wrapper a ``recv`` that reads each PDU with
``recv_into`` as large as the kernel has it (the same result: *n* bytes, fewer on end of file), and,
unless the ``pynetdicom`` logger is at DEBUG, unbinds pynetdicom's standard logging handlers from
that association (public ``Association.unbind``), and has its plain C-STORE-RSPs encoded directly
(:func:`encoded_store_response`, the same bytes as pynetdicom's; anything else, or an
``EVT_DIMSE_SENT`` handler bound, goes through pynetdicom's ``send_msg``).

Every internal used is checked when :func:`enable` and :func:`attach` run; one missing (a
pynetdicom release the node was not made for: it is pinned to 3.0.x) leaves the association as
pynetdicom made it, with one warning. The wake-ups need ``os.eventfd`` (Linux).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import select
import struct
import threading
import time
import weakref
from typing import Any

from pynetdicom import _handlers
from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

__all__ = ["attach", "enable", "enabled"]

log = logging.getLogger(__name__)

#: The association reactor's sleep (``Association._run_reactor``: ``time.sleep(0.001)``). The other
#: sleeps in pynetdicom.association (0.1, 0.01, 0.0001 s) wait for other things and stay sleeps.
_REACTOR_SLEEP = 0.001
#: How long an idle association's threads wait when nothing wakes them (pynetdicom: 1 ms). What is
#: not queued - the ARTIM and idle timers, the kill flag at shutdown - is noticed at most this late.
IDLE_SECONDS = 0.01
#: The attribute holding a thread's wait, set on the thread objects (``DULServiceProvider`` and
#: ``Association`` are ``threading.Thread`` subclasses).
_WAIT = "_dicom_node_wait"
#: pynetdicom's standard logging handlers (bound to every association unless
#: ``_config.LOG_HANDLER_LEVEL`` is "none").
_STANDARD_HANDLERS = (
    (evt.EVT_PDU_RECV, "standard_pdu_recv_handler"), (evt.EVT_PDU_SENT, "standard_pdu_sent_handler"),
    (evt.EVT_DIMSE_RECV, "standard_dimse_recv_handler"), (evt.EVT_DIMSE_SENT, "standard_dimse_sent_handler"),
)


class _TimeWithWakeups:
    """Stands in for the ``time`` module in one pynetdicom module; only ``sleep`` differs."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        wait = getattr(threading.current_thread(), _WAIT, None)
        if wait is None:
            self._real.sleep(seconds)
        else:
            wait(seconds)


def enabled() -> bool:
    """Whether :func:`enable` is in force."""
    return isinstance(getattr(_dul, "time", None), _TimeWithWakeups) and isinstance(
        getattr(_association, "time", None), _TimeWithWakeups)


def enable() -> bool:
    """Install the stand-ins for ``time`` (process-wide, idempotent); returns whether they are in force."""
    if enabled():
        return True
    if not hasattr(os, "eventfd"):
        log.info("no os.eventfd here: pynetdicom's polling loops left as they are")
        return False
    for module in (_dul, _association):
        if getattr(module, "time", None) is not time:
            log.warning("%s has no module-level 'time' (a pynetdicom release the node was not made for): its "
                        "polling loops left as they are (each C-STORE answered up to ~2 ms later)", module.__name__)
            return False
    _dul.time = _TimeWithWakeups(time)
    _association.time = _TimeWithWakeups(time)
    return True


def disable() -> None:
    """Undo :func:`enable` (tests and benchmarks; associations attached meanwhile poll again)."""
    for module in (_dul, _association):
        if isinstance(getattr(module, "time", None), _TimeWithWakeups):
            module.time = time


def attach(assoc: Any) -> bool:
    """Quicker reads, unbound log handlers and (after :func:`enable`) prompt wake-ups for *assoc*.

    Call it from ``EVT_CONN_OPEN``, before the association's threads run. Returns whether the
    wake-ups were attached; what the association lacks is left as pynetdicom made it.
    """
    dul = getattr(assoc, "dul", None)
    transport = getattr(dul, "socket", None)
    if transport is None or getattr(transport, "socket", None) is None:
        return False
    if callable(getattr(transport, "recv", None)):
        transport.recv = _ExactReader(transport)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG) and hasattr(assoc, "unbind"):
        for event, name in _STANDARD_HANDLERS:
            handler = getattr(_handlers, name, None)
            if handler is not None:
                with contextlib.suppress(Exception):  # not bound: nothing to do
                    assoc.unbind(event, handler)
    dimse = getattr(assoc, "dimse", None)
    if callable(getattr(dimse, "send_msg", None)) and callable(getattr(dul, "send_pdu", None)):
        dimse.send_msg = _StoreResponses(assoc, dimse.send_msg)
    return enabled() and _attach_waits(assoc, dul, transport)


def _attach_waits(assoc: Any, dul: Any, transport: Any) -> bool:
    queues = {name: getattr(owner, name, None) for owner, name in (
        (dul, "to_provider_queue"), (dul, "event_queue"), (dul, "to_user_queue"))}
    queues["msg_queue"] = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    missing = [name for name, found in queues.items() if not isinstance(found, queue.Queue)]
    if missing or not isinstance(dul, threading.Thread) or not isinstance(assoc, threading.Thread):
        log.warning("prompt wake-ups not attached: this pynetdicom association lacks %s (a release the node "
                    "was not made for)", ", ".join(missing) or "its threads")
        return False
    dul_wait = _DulWait(transport)
    weakref.finalize(dul, dul_wait.close)  # once nothing can select on it any more
    association_wait = _AssociationWait()
    _wake_on_put(queues["to_provider_queue"], dul_wait.wake)  # a PDU to send (the C-STORE-RSP)
    _wake_on_put(queues["event_queue"], dul_wait.wake)  # an event for the DUL's state machine
    _wake_on_put(queues["msg_queue"], association_wait.wake)  # a decoded DIMSE message (the C-STORE-RQ)
    _wake_on_put(queues["to_user_queue"], association_wait.wake)  # A-RELEASE, A-ABORT from the peer
    setattr(dul, _WAIT, dul_wait)
    setattr(assoc, _WAIT, association_wait)
    return True


def _wake_on_put(target: queue.Queue, wake: Any) -> None:
    """Make ``target.put`` also call *wake* (after the item is in the queue)."""
    put = target.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    target.put = put_and_wake  # type: ignore[method-assign]


# The C-STORE-RSP command set (PS3.7 9.3.1.2) as pynetdicom's C_STORE_RSP message encodes it: Implicit
# VR Little Endian, tag order, an element left out when the primitive's value is None.
_STORE_RSP_ELEMENTS = (  # (tag, primitive attribute or None for a fixed value, kind)
    (0x00000002, "AffectedSOPClassUID", "UI"), (0x00000100, None, "US"), (0x00000120, "MessageIDBeingRespondedTo", "US"),
    (0x00000800, None, "US"), (0x00000900, "Status", "US"), (0x00000902, "ErrorComment", "LO"),
    (0x00001000, "AffectedSOPInstanceUID", "UI"),
)
_FIXED = {0x00000100: 0x8001, 0x00000800: 0x0101}  # Command Field C-STORE-RSP; no data set
_PLAIN_UID = re.compile(r"^[0-9.]{1,64}$")
_PLAIN_TEXT = re.compile(r"^[ -\[\]-~]{0,64}$")  # printable ASCII without backslash, as one LO value


def encoded_store_response(primitive: Any) -> bytes | None:
    """The command set of the C-STORE-RSP *primitive*, or None when it is not a plain one.

    The same bytes as pynetdicom's ``C_STORE_RSP.primitive_to_message`` then ``encode``
    (tests/test_fastpath.py compares them), without building and encoding a pydicom Dataset for
    every answer (0.3-0.5 ms a C-STORE).  Plain: a ``C_STORE`` response with UIDs of digits and
    dots, a 16-bit Status, no Offending Element, an Error Comment of printable ASCII if any.
    """
    if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.OffendingElement is not None or getattr(primitive, "DataSet", None) is not None:
        return None
    parts = []
    for tag, attribute, kind in _STORE_RSP_ELEMENTS:
        value = _FIXED[tag] if attribute is None else getattr(primitive, attribute)
        if value is None:
            continue
        if kind == "US":
            if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
                return None
            raw = struct.pack("<H", value)
        else:
            text = str(value)
            if not (_PLAIN_UID if kind == "UI" else _PLAIN_TEXT).match(text):
                return None
            raw = text.encode("ascii")
            if len(raw) % 2:
                raw += b"\x00" if kind == "UI" else b" "
        parts.append(struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(raw)) + raw)
    body = b"".join(parts)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body  # (0000,0000) UL, the group length


class _StoreResponses:
    """``DIMSEServiceProvider.send_msg`` with plain C-STORE-RSPs encoded by :func:`encoded_store_response`.

    Anything else, a peer whose maximum PDU is too small for the answer in one PDV, or an
    ``EVT_DIMSE_SENT`` handler bound to the association (pynetdicom's DEBUG log, say), goes to
    pynetdicom's own ``send_msg``.
    """

    def __init__(self, assoc: Any, send_msg: Any) -> None:
        self._assoc = assoc
        self._send_msg = send_msg

    def __call__(self, primitive: Any, context_id: int) -> None:
        encoded = encoded_store_response(primitive)
        dimse = self._assoc.dimse
        limit = dimse.maximum_pdu_size
        if encoded is None or (limit and len(encoded) + 6 > limit) or self._assoc.get_handlers(evt.EVT_DIMSE_SENT):
            self._send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))  # command, last fragment
        dimse.dul.send_pdu(pdata)


class _ExactReader:
    """``AssociationSocket.recv``: *n* bytes (fewer only at end of file), read with ``recv_into``.

    pynetdicom's own reads 4,096 bytes per ``socket.recv`` and appends each to a ``bytearray``;
    this asks the kernel for all that is still missing each time, into one buffer.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def __call__(self, nr_bytes: int) -> bytearray:
        sock = self._transport.socket
        buffer = bytearray(nr_bytes)
        got = 0
        with memoryview(buffer) as view:
            while got < nr_bytes:
                count = sock.recv_into(view[got:], nr_bytes - got)
                if not count:
                    break
                got += count
        if got < nr_bytes:
            del buffer[got:]
        return buffer


class _DulWait:
    """The DUL thread's idle sleep: until its socket is readable or a queue it reads is given an item.

    With nothing to wake it, it waits :data:`IDLE_SECONDS` instead of pynetdicom's 1 ms.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False

    def wake(self) -> None:
        if not self._closed:
            with contextlib.suppress(OSError):
                os.eventfd_write(self.wakeup, 1)

    def close(self) -> None:
        self._closed = True
        os.close(self.wakeup)

    def __call__(self, seconds: float) -> None:
        sock = self._transport.socket
        if self._closed or sock is None or getattr(self._transport, "_is_connected", True) is False:
            time.sleep(seconds)  # closed: pynetdicom's ready() says False whatever select says
            return
        try:
            ready, _, _ = select.select([sock, self.wakeup], [], [], max(seconds, IDLE_SECONDS))
        except (OSError, ValueError):  # the socket closed meanwhile
            time.sleep(seconds)
            return
        if self.wakeup in ready:
            with contextlib.suppress(OSError):
                os.eventfd_read(self.wakeup)  # before the next pass looks at the queues: no wake-up lost


class _AssociationWait:
    """The association reactor's 1 ms sleep: until a message or A-RELEASE/A-ABORT is queued for it.

    With nothing to wake it, it waits :data:`IDLE_SECONDS`.
    """

    def __init__(self) -> None:
        self._work = threading.Event()

    def wake(self) -> None:
        self._work.set()

    def __call__(self, seconds: float) -> None:
        if seconds != _REACTOR_SLEEP:
            time.sleep(seconds)
            return
        if self._work.wait(max(seconds, IDLE_SECONDS)):
            self._work.clear()  # before the next pass looks at the queues: no wake-up lost
