"""node.net.fastpath: pynetdicom's hot path for the node's acceptors, against real peers in this process.

A pynetdicom SCP with the node's StoreHandler (which attaches the fast path from EVT_CONN_OPEN),
dcmtk storescu as the sender, and pynetdicom's own requestor for associations that must not change.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, _handlers, evt
from pynetdicom.sop_class import Verification

from node.receive.scp import StoreHandler, build_application_entity, disable_streamed_receive, enable_streamed_receive
from node.store.jobstore import JobStore
from node.net import fastpath
from node.store.spool import Spool
from tests.support import bundled, copy_as_series, free_port, nodelay_env, storescu, wait_for

pytestmark = pytest.mark.peers


def test_reads_are_exact_across_sends_and_short_only_at_end_of_file() -> None:
    left, right = socket.socketpair()
    with left, right:
        transport = type("Transport", (), {})()
        transport.socket = left
        read = fastpath._ExactReader(transport)
        payload = bytes(range(256)) * 1000  # 256,000 bytes in several sends
        sender = threading.Thread(target=lambda: [right.sendall(payload[i:i + 70_000]) or time.sleep(0.01)
                                                  for i in range(0, len(payload), 70_000)])
        sender.start()
        assert read(6) == payload[:6]
        assert read(len(payload) - 6) == payload[6:]
        sender.join(timeout=10)
        right.sendall(b"abc")
        right.shutdown(socket.SHUT_WR)
        got = read(10)
        assert got == b"abc" and isinstance(got, bytearray)  # what pynetdicom's recv returns at end of file


class Scp:
    def __init__(self, folder: Path) -> None:
        self.spool, self.jobs = Spool(folder / "spool"), JobStore(folder / "jobs.sqlite")
        self.port = free_port()
        self.seen: list[dict] = []
        self.handler = StoreHandler(self.spool, self.jobs)
        self.also_when_established: list = []  # more to do in EVT_ESTABLISHED (a test's own bindings)

    def established(self, event: evt.Event) -> None:
        assoc = event.assoc
        for extra in self.also_when_established:
            extra(event)
        self.seen.append({
            "waits": getattr(assoc, fastpath._WAIT, None) is not None and getattr(assoc.dul, fastpath._WAIT, None)
            is not None,
            "reader": isinstance(assoc.dul.socket.recv, fastpath._ExactReader),
            "standard logging": any(h[0] is _handlers.standard_pdu_recv_handler
                                    for h in assoc.get_handlers(evt.EVT_PDU_RECV)),
            "threads": (assoc, assoc.dul),
        })


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Scp]:
    assert fastpath.enable()
    enable_streamed_receive(tmp_path / "spool")
    scp = Scp(tmp_path)
    server = build_application_entity("DICOMNODE").start_server(
        ("127.0.0.1", scp.port), block=False,
        evt_handlers=[*scp.handler.handlers(), (evt.EVT_ESTABLISHED, scp.established)])
    try:
        yield scp
    finally:
        server.shutdown()
        disable_streamed_receive()
        fastpath.disable()
        scp.jobs.close()


def test_the_node_acceptors_get_the_fast_path_and_end_as_before(scp: Scp, tmp_path: Path) -> None:
    sources = copy_as_series([bundled("CT_small.dcm")] * 5, tmp_path / "in")
    assert storescu("127.0.0.1", scp.port, sources, called_aet="DICOMNODE").returncode == 0
    assert len(scp.jobs.known_paths()) == 5
    (seen,) = scp.seen
    assert seen["waits"] and seen["reader"] and not seen["standard logging"]
    for thread in seen["threads"]:  # released: both threads end (the kill flag is seen within 10 ms waits)
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_a_sender_killed_mid_transfer_ends_the_association(scp: Scp, tmp_path: Path) -> None:
    big = copy_as_series([bundled("CT_small.dcm")] * 200, tmp_path / "in")
    push = subprocess.Popen(["/usr/bin/storescu", "-aec", "DICOMNODE", "127.0.0.1", str(scp.port), *map(str, big)],
                            env=nodelay_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(list(scp.spool.root.rglob("*.dcm"))) >= 5, 60, "5 instances spooled")
    finally:
        push.kill()
        push.wait(timeout=10)
    (seen,) = scp.seen
    for thread in seen["threads"]:
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert storescu("127.0.0.1", scp.port, big[:3], called_aet="DICOMNODE").returncode == 0  # still serving


def test_pynetdicom_debug_logging_keeps_its_standard_handlers(scp: Scp, tmp_path: Path) -> None:
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        sources = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")
        assert storescu("127.0.0.1", scp.port, sources, called_aet="DICOMNODE").returncode == 0
    finally:
        logger.setLevel(level)
    assert scp.seen[0]["standard logging"] and scp.seen[0]["waits"]


def test_associations_not_attached_run_as_pynetdicom_made_them(scp: Scp) -> None:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
    try:
        assert assoc.is_established and getattr(assoc, fastpath._WAIT, None) is None
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert scp.seen[0]["waits"]  # the acceptor side is the node's: attached


def test_store_responses_are_pynetdicoms_bytes() -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    cases = 0
    for status in (0x0000, 0xB000, 0xA700, 0xC000, 0xC210, 0xC211, 0x0124):
        for comment in (None, "", "x", "disk low: 10 MB free, min 16 MB", "A" * 64):
            for length in (20, 21, 63, 64):
                rsp = C_STORE()
                rsp.MessageID = rsp.MessageIDBeingRespondedTo = 7
                rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                rsp.AffectedSOPInstanceUID = ("1.2.826.0.1." + "4" * 64)[:length]
                rsp.Status = status
                if comment is not None:
                    rsp.ErrorComment = comment
                message = C_STORE_RSP()
                message.primitive_to_message(rsp)
                assert fastpath.encoded_store_response(rsp) == encode(message.command_set, True, True)
                cases += 1
    assert cases == 140
    odd = C_STORE()
    odd.MessageIDBeingRespondedTo, odd.Status, odd.ErrorComment = 1, 0xA700, "d\u00e9j\u00e0 vu"
    assert fastpath.encoded_store_response(odd) is None  # not plain ASCII: pynetdicom encodes it
    request = C_STORE()
    request.MessageID = 1
    assert fastpath.encoded_store_response(request) is None  # a request, not an answer


def test_a_bound_dimse_sent_handler_still_sees_every_answer(scp: Scp, tmp_path: Path) -> None:
    sent = []
    scp.also_when_established.append(
        lambda event: event.assoc.bind(evt.EVT_DIMSE_SENT, lambda e: sent.append(type(e.message).__name__)))
    sources = copy_as_series([bundled("CT_small.dcm")] * 3, tmp_path / "in")
    assert storescu("127.0.0.1", scp.port, sources, called_aet="DICOMNODE").returncode == 0
    assert sent == ["C_STORE_RSP"] * 3


def test_each_association_gets_the_listeners_contexts_without_a_deep_copy(tmp_path: Path) -> None:
    """pynetdicom deep-copies the supported contexts per association (60-70 ms for the node's); the
    node's listener hands them over as they are, and negotiation still accepts what it should."""
    import copy

    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    from node.receive.guard import ConnectionGuard, SharedContexts, start_guarded_server

    ae = build_application_entity("DICOMNODE")
    accepted: list[list[tuple[str, str]]] = []

    def established(event: evt.Event) -> None:
        accepted.append(sorted((cx.abstract_syntax, cx.transfer_syntax[0]) for cx in event.assoc.accepted_contexts))

    port = free_port()
    server = start_guarded_server(ae, ("127.0.0.1", port), [(evt.EVT_ESTABLISHED, established)], ConnectionGuard())
    try:
        assert isinstance(server.contexts, SharedContexts)
        copied = copy.deepcopy(server.contexts)
        assert copied == server.contexts and all(a is b for a, b in zip(copied, server.contexts))
        scu = AE(ae_title="SCU")
        scu.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        scu.add_requested_context(MRImageStorage, ["1.2.840.10008.1.2.4.50"])
        scu.add_requested_context("1.2.3.4.5.6")  # not a storage class: rejected
        for _ in range(2):
            assoc = scu.associate("127.0.0.1", port, ae_title="DICOMNODE")
            assert assoc.is_established
            assoc.release()
        wait_for(lambda: len(accepted) == 2, 10, "two associations")
        assert accepted[0] == accepted[1]  # the second association negotiated as the first
        assert [abstract for abstract, _ in accepted[0]] == sorted([CTImageStorage, MRImageStorage])
        assert dict(accepted[0])[MRImageStorage] == "1.2.840.10008.1.2.4.50"
    finally:
        server.shutdown()
