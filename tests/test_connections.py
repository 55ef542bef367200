"""Connections that never become associations (issue 12, part 1): timeout, invalid PDUs, limits.

Against the running node (``dicom-node serve``): held garbage and silent connections
(:mod:`tests.support.hostile`) while dcmtk ``echoscu`` checks that senders still get in; the timeout, the
A-ABORT and close, /metrics and the rate-limited warning. In this process, on a real
:class:`node.receive.guard.GuardedAssociationServer` (plain and TLS): the limits, an A-ASSOCIATE-RQ that
arrives in pieces, an association longer than the timeout, shutdown. Loopback only.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification

from node.config import TlsSettings
from node.receive.scp import build_application_entity
from node.telemetry.metrics import CONNECTION_REFUSAL_REASONS, Metrics
from node.receive.guard import ConnectionGuard, ConnectionLimits, start_guarded_server
from node.receive.tls_listener import start_tls_server
from tests.support import GARBAGE, NodeProcess, bundled, echoscu, free_port, held, node_config, tool, wait_for

pytestmark = pytest.mark.peers

LOCALHOST = "127.0.0.1"
ECHOSCU = "/usr/bin/echoscu"  # dcmtk's, not pynetdicom's script of the same name in the venv
A_ABORT = 0x07
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03


# --------------------------------------------------------------------------- helpers


def dcmtk_echo(port: int, *extra: str) -> subprocess.CompletedProcess:
    """One C-ECHO with dcmtk's echoscu, every wait bounded."""
    return subprocess.run([ECHOSCU, "-aec", "DICOMNODE", "-to", "10", "-ta", "10", "-td", "10", *extra,
                           LOCALHOST, str(port)], capture_output=True, text=True, timeout=60)


def association_request_bytes(called: str = "DICOMNODE") -> bytes:
    """A real A-ASSOCIATE-RQ (Verification), encoded by pynetdicom."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "RAWSCU", called
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.1"
    primitive.user_information = [max_length, implementation]
    return A_ASSOCIATE_RQ(primitive).encode()


def until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the node sends until it closes, and the seconds that took; fails after *limit* s."""
    started = time.monotonic()
    received = b""
    while time.monotonic() - started < limit:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if not readable:
            continue
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            data = b""
        if not data:
            return received, time.monotonic() - started
        received += data
    raise AssertionError(f"the node did not close the connection within {limit} s (got {received.hex()})")


def is_abort(data: bytes) -> bool:
    """Whether *data* is exactly one A-ABORT PDU from the service provider (source 2)."""
    return len(data) == 10 and data[0] == A_ABORT and data[2:6] == b"\x00\x00\x00\x04" and data[8] == 0x02


def metric_samples(http_port: int) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"http://{LOCALHOST}:{http_port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def refused_counts(samples: dict[tuple[str, tuple], float]) -> dict[str, float]:
    return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
            if name == "dicomnode_connections_refused_total"}


# --------------------------------------------------------------------------- against the running node


def test_echoes_get_through_twelve_garbage_and_twelve_silent_connections(tmp_path: Path) -> None:
    """The issue's measurement: on main 0 of 10 C-ECHOs succeeded under this attack."""
    port, http = free_port(), free_port()
    with NodeProcess(node_config(tmp_path / "var", port, http_port=http), tmp_path, port=port) as node:
        silent, garbage = held(port, silent=12, garbage=12, pause=0.02)
        with silent, garbage:
            wait_for(lambda: silent.opened >= 12 and garbage.opened >= 24, 15, "24 hostile connections", node.log)
            time.sleep(0.5)
            dropped_before = len(garbage.drops)
            results = [dcmtk_echo(port) for _ in range(10)]
            dropped_during = len(garbage.drops) - dropped_before
        succeeded = sum(r.returncode == 0 for r in results)
        assert succeeded >= 9, [r.stderr[-300:] for r in results if r.returncode]
        # the attack went on while the echoes ran: garbage dropped and reopened, silent ones held
        assert dropped_during >= 12, dropped_during
        assert all(d.seconds >= 4.5 for d in silent.drops), [d.seconds for d in silent.drops]  # timeout: 5 s
        assert all(is_abort(d.received) for d in garbage.drops), [d.received.hex() for d in garbage.drops[:5]]
        counts = refused_counts(metric_samples(http))
        assert counts["invalid_pdu"] >= len(garbage.drops) and counts["over_limit"] == 0, counts
        assert node.alive()


@pytest.fixture
def timeout_node(tmp_path: Path) -> Iterator[tuple[NodeProcess, int]]:
    """A node with association_timeout_seconds = 2, and its HTTP port."""
    work = tmp_path
    port, http = free_port(), free_port()
    config = node_config(work / "var", port, http_port=http, association_timeout_seconds=2)
    with NodeProcess(config, work, port=port) as node:
        yield node, http


def test_garbage_is_answered_a_abort_and_closed_at_once_and_counted_and_warned_once(
    timeout_node: tuple[NodeProcess, int]
) -> None:
    node, http = timeout_node
    before = refused_counts(metric_samples(http))
    for garbage in GARBAGE:
        with socket.create_connection((LOCALHOST, node.port), timeout=5) as sock:
            sock.sendall(garbage)
            received, seconds = until_closed(sock, 10)
        assert is_abort(received), (garbage, received.hex())
        assert seconds < 1.0, f"closed after {seconds:.2f} s: at the timeout (2 s), not after the A-ABORT"
    # an A-ASSOCIATE-AC where a request must come is no request either: A-ABORT, unexpected PDU
    with socket.create_connection((LOCALHOST, node.port), timeout=5) as sock:
        sock.sendall(b"\x02" + association_request_bytes()[1:])
        received, seconds = until_closed(sock, 10)
    assert is_abort(received) and received[9] == 0x02 and seconds < 1.0, received.hex()
    after = refused_counts(metric_samples(http))
    assert after["invalid_pdu"] - before["invalid_pdu"] == len(GARBAGE) + 1, (before, after)
    # logged once for 127.0.0.1 (this minute), naming the address and why
    warnings = [line for line in node.log().splitlines() if " WARNING node.receive.guard: " in line]
    assert len(warnings) == 1, warnings
    assert "connection from 127.0.0.1:" in warnings[0] and "answered A-ABORT" in warnings[0], warnings[0]
    assert node.alive() and echoscu(LOCALHOST, node.port, called_aet="DICOMNODE").returncode == 0


def test_silent_and_trickling_connections_are_closed_at_the_timeout(timeout_node: tuple[NodeProcess, int]) -> None:
    node, http = timeout_node
    before = refused_counts(metric_samples(http))
    with socket.create_connection((LOCALHOST, node.port), timeout=5) as sock:
        received, seconds = until_closed(sock, 10)
    assert received == b"" and 1.8 <= seconds <= 4.0, (received, seconds)
    # a request sent a byte at a time: the bytes do not extend the time
    request = association_request_bytes()
    with socket.create_connection((LOCALHOST, node.port), timeout=5) as sock:
        started = time.monotonic()
        for byte in request:
            if select.select([sock], [], [], 0.25)[0]:
                break  # closed by the node (or something to read): stop trickling
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
        received, _ = until_closed(sock, 10)
        seconds = time.monotonic() - started
    assert received == b"" and 1.8 <= seconds <= 4.0, (received, seconds)
    after = refused_counts(metric_samples(http))
    assert after["timeout"] - before["timeout"] == 2, (before, after)
    warnings = [line for line in node.log().splitlines() if " WARNING node.receive.guard: " in line]
    assert len(warnings) == 1, warnings  # the second in the same minute is counted, not logged
    assert "connection from 127.0.0.1:" in warnings[0], warnings[0]
    assert "closed: no complete A-ASSOCIATE-RQ within 2 s (association_timeout_seconds)" in warnings[0], warnings[0]


def test_an_association_is_not_cut_by_the_timeout(timeout_node: tuple[NodeProcess, int]) -> None:
    """Only negotiation is bounded: an association idle longer than the timeout stores on."""
    node, _ = timeout_node
    ae = AE(ae_title="SLOWSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(LOCALHOST, node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        time.sleep(3.0)  # > association_timeout_seconds
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        dataset = pydicom.dcmread(bundled("CT_small.dcm"))
        assert assoc.send_c_store(dataset).Status == 0x0000
        time.sleep(2.5)
        dataset.SOPInstanceUID = generate_uid()
        assert assoc.send_c_store(dataset).Status == 0x0000
    finally:
        assoc.release()
    wait_for(lambda: "association from SLOWSCU released: 2 instances stored" in node.log(), 10,
             "the slow association released with 2 instances", node.log)


# --------------------------------------------------------------------------- in this process


@contextmanager
def guarded_server(limits: ConnectionLimits, *, max_associations: int = 10) -> Iterator[tuple[int, ConnectionGuard]]:
    """The node's plain listener (its AE, a GuardedAssociationServer) on a free port."""
    metrics = Metrics()
    guard = ConnectionGuard(limits, metrics=metrics)
    ae = build_application_entity("DICOMNODE", max_associations=max_associations)
    server = start_guarded_server(ae, (LOCALHOST, 0), [], guard)
    try:
        yield server.server_address[1], guard
    finally:
        server.shutdown()


def connected(port: int) -> socket.socket:
    sock = socket.create_connection((LOCALHOST, port), timeout=5)
    sock.settimeout(5)
    return sock


def test_negotiating_connections_do_not_take_association_slots() -> None:
    with guarded_server(ConnectionLimits(timeout=30), max_associations=1) as (port, guard):
        silent = [connected(port) for _ in range(3)]
        try:
            wait_for(lambda: guard.negotiating() == 3, 5, "3 negotiating connections")
            result = dcmtk_echo(port)
            assert result.returncode == 0, result.stderr
        finally:
            for sock in silent:
                sock.close()


def test_over_the_negotiating_limit_is_rejected_local_limit_exceeded() -> None:
    with guarded_server(ConnectionLimits(timeout=30, max_negotiating=2)) as (port, guard):
        silent = [connected(port) for _ in range(2)]
        try:
            wait_for(lambda: guard.negotiating() == 2, 5, "2 negotiating connections")
            refused = dcmtk_echo(port)
            assert refused.returncode != 0 and "Local Limit Exceeded" in refused.stderr, refused.stderr
            assert guard.metrics.snapshot()["connections_refused"]["over_limit"] == 1
        finally:
            for sock in silent:
                sock.close()
        wait_for(lambda: guard.negotiating() == 0, 5, "the silent connections to be gone")
        assert dcmtk_echo(port).returncode == 0


def test_per_address_limit_counts_associations_and_negotiations(caplog: pytest.LogCaptureFixture) -> None:
    with guarded_server(ConnectionLimits(timeout=30, max_per_address=2)) as (port, guard):
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        assoc = ae.associate(LOCALHOST, port, ae_title="DICOMNODE")
        assert assoc.is_established
        try:
            with connected(port):
                wait_for(lambda: guard.negotiating() == 1, 5, "1 negotiating connection")
                refused = dcmtk_echo(port)
                assert refused.returncode != 0 and "Local Limit Exceeded" in refused.stderr, refused.stderr
        finally:
            assoc.release()
        assert "max_connections_per_address = 2" in caplog.text
        assert "127.0.0.1 has 2 connections open already" in caplog.text
        wait_for(lambda: dcmtk_echo(port).returncode == 0, 10, "an echo once the others are gone")


def test_a_request_in_pieces_within_the_timeout_is_accepted() -> None:
    with guarded_server(ConnectionLimits(timeout=5)) as (port, _):
        request = association_request_bytes()
        with connected(port) as sock:
            for start in range(0, len(request), 50):
                sock.sendall(request[start:start + 50])
                time.sleep(0.1)
            answer = sock.recv(6)
            assert answer[0] == A_ASSOCIATE_AC, answer.hex()
            length = int.from_bytes(answer[2:6], "big")
            while length:
                length -= len(sock.recv(length))
            sock.sendall(bytes.fromhex("05000000000400000000"))  # A-RELEASE-RQ
            assert sock.recv(10)[:1] == b"\x06"  # A-RELEASE-RP


def test_over_long_or_undecodable_requests_are_aborted_and_an_abort_is_not_answered() -> None:
    with guarded_server(ConnectionLimits(timeout=5)) as (port, guard):
        request = bytearray(association_request_bytes())
        request[10:26] = b"\x00" * 16  # a called AE title of NULs: pynetdicom cannot decode it
        for data in (bytes(request), b"\x01\x00\x00\x20\x00\x00" + bytes(16), b"\x01\x00\x00\x00\x00\x10" + bytes(16)):
            with connected(port) as sock:
                sock.sendall(data)
                received, seconds = until_closed(sock, 10)
            assert is_abort(received) and received[9] == 0x06 and seconds < 1.0, (data[:8].hex(), received.hex())
        assert guard.metrics.snapshot()["connections_refused"]["invalid_pdu"] == 3
        with connected(port) as sock:  # a peer's A-ABORT is not answered (PS3.8: Sta2 + Evt16), nor counted
            sock.sendall(bytes.fromhex("07000000000400000000"))
            received, seconds = until_closed(sock, 10)
        assert received == b"" and seconds < 1.0
        assert guard.metrics.snapshot()["connections_refused"]["invalid_pdu"] == 3


def test_shutdown_cuts_negotiating_connections() -> None:
    with guarded_server(ConnectionLimits(timeout=60)) as (port, guard):
        silent = connected(port)
        wait_for(lambda: guard.negotiating() == 1, 5, "1 negotiating connection")
        started = time.monotonic()
    assert time.monotonic() - started < 5
    with silent:
        assert until_closed(silent, 5)[0] == b""


def test_warnings_at_most_once_a_minute_per_address(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    metrics = Metrics()
    guard = ConnectionGuard(metrics=metrics, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="node.receive.guard")
    guard.refused("10.1.2.3", "timeout", "connection from 10.1.2.3:1 closed: first")
    now[0] += 10
    guard.refused("10.1.2.3", "invalid_pdu", "connection from 10.1.2.3:2 closed: second")
    guard.refused("10.9.9.9", "timeout", "connection from 10.9.9.9:3 closed: other address")
    now[0] += 49
    guard.refused("10.1.2.3", "timeout", "connection from 10.1.2.3:4 closed: third")
    assert [r.getMessage() for r in caplog.records] == ["connection from 10.1.2.3:1 closed: first",
                                                        "connection from 10.9.9.9:3 closed: other address"]
    now[0] += 1.5  # 60.5 s after the first
    guard.refused("10.1.2.3", "over_limit", "connection from 10.1.2.3:5 refused: fourth")
    last = caplog.records[-1]
    assert last.levelname == "WARNING" and last.getMessage().startswith("connection from 10.1.2.3:5 refused: fourth; "
                                                                        "2 more from 10.1.2.3 not logged")
    assert "(1 invalid_pdu, 1 timeout)" in last.getMessage()
    assert len(caplog.records) == 3
    assert metrics.snapshot()["connections_refused"] == {"timeout": 3, "invalid_pdu": 1, "over_limit": 1,
                                                         "tls_handshake": 0}


def test_metrics_render_every_reason() -> None:
    metrics = Metrics()
    metrics.connection_refused("timeout")
    families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
    family = families["dicomnode_connections_refused"]
    assert family.type == "counter"
    values = {s.labels["reason"]: s.value for s in family.samples}
    assert values == {reason: (1 if reason == "timeout" else 0) for reason in CONNECTION_REFUSAL_REASONS}


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    result = subprocess.run([tool("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt",
                             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "node.key", "-out", "node.pem",
                             "-days", "1", "-subj", "/CN=node", "-addext", "subjectAltName=IP:127.0.0.1"],
                            cwd=folder, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return folder / "node.pem", folder / "node.key"


@contextmanager
def tls_server(tls_files: tuple[Path, Path], limits: ConnectionLimits) -> Iterator[tuple[int, ConnectionGuard]]:
    guard = ConnectionGuard(limits, metrics=Metrics())
    ae = build_application_entity("DICOMNODE")
    port = free_port()
    server = start_tls_server(ae, LOCALHOST, TlsSettings(port, *tls_files), [], guard=guard)
    try:
        yield port, guard
    finally:
        server.shutdown()


def tls_connected(port: int) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test's own server: what is tested is the node, not the certificate
    sock = context.wrap_socket(socket.create_connection((LOCALHOST, port), timeout=5))
    sock.settimeout(5)
    return sock


def test_tls_listener_has_the_same_protection(tls_files: tuple[Path, Path]) -> None:
    with tls_server(tls_files, ConnectionLimits(timeout=1.5)) as (port, guard):
        # handshake done, then silent: closed at the deadline of the whole negotiation
        with tls_connected(port) as sock:
            started = time.monotonic()
            assert sock.recv(10) == b""
            assert time.monotonic() - started < 3.0
        # handshake done, then garbage: A-ABORT over TLS, then closed
        with tls_connected(port) as sock:
            sock.sendall(GARBAGE[0])
            assert is_abort(sock.recv(10))
            assert sock.recv(10) == b""
        # not TLS at all: refused in the handshake
        with connected(port) as sock:
            sock.sendall(GARBAGE[0])
            until_closed(sock, 5)
        wait_for(lambda: guard.metrics.snapshot()["connections_refused"]["tls_handshake"] == 1, 5, "tls_handshake 1")
        counts = guard.metrics.snapshot()["connections_refused"]
        assert counts == {"timeout": 1, "invalid_pdu": 1, "over_limit": 0, "tls_handshake": 1}, counts


def test_tls_negotiations_do_not_take_association_slots_and_are_limited(tls_files: tuple[Path, Path]) -> None:
    with tls_server(tls_files, ConnectionLimits(timeout=30, max_negotiating=2)) as (port, guard):
        silent = [connected(port) for _ in range(2)]
        try:
            wait_for(lambda: guard.negotiating() == 2, 5, "2 negotiating connections")
            third = connected(port)  # over max_negotiating: closed at once, before any TLS
            silent.append(third)
            assert until_closed(third, 5)[0] == b""
            assert guard.metrics.snapshot()["connections_refused"]["over_limit"] == 1
        finally:
            for sock in silent:
                sock.close()
        wait_for(lambda: guard.negotiating() == 0, 5, "the silent connections to be gone")
        result = dcmtk_echo(port, "+tla", "-ic")
        assert result.returncode == 0, result.stderr
