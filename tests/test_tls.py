"""DICOM TLS in and out, against real peers: dcmtk storescu/echoscu over TLS into the node, the node's
DicomSender into pynetdicom TLS SCPs. Certificates are made with ``openssl`` for 127.0.0.1.

Observed (dcmtk 3.6.7, pynetdicom 3.0.4, OpenSSL 3.0, TLS 1.3 negotiated):

* storescu ``+tla`` (no client certificate) against a listener with ``ca_file``: the node logs
  "client sent no certificate (one is required) [PEER_DID_NOT_RETURN_A_CERTIFICATE]"; storescu
  says "Association Request Failed: 0006:0317 Peer aborted Association (or never connected)".
* plain storescu on the TLS port: the node logs "client does not speak TLS ... [WRONG_VERSION_NUMBER]";
  storescu says "0006:031d TCP I/O Error (Connection reset by peer) occurred in routine:
  sendAssociationRQTCP" or "Peer aborted Association".
* pynetdicom's own TLS server logs nothing for either (socketserver drops the handshake's
  exception) and does the handshake in its accept loop: node.receive.tls_listener moves it into the connection's
  thread, with a time limit, and logs it.
* DicomSender with a client certificate from another CA: TLS 1.3 completes the client's side of
  the handshake; the server's "unknown ca" alert arrives on the first read -> permanent.
* DicomSender with ``tls=True`` to a plain pynetdicom SCP: the SCP takes the ClientHello for an
  unknown PDU type, answers with an A-ABORT and closes; OpenSSL reads that as a non-TLS record
  [WRONG_VERSION_NUMBER] -> permanent (a configuration mismatch: no retry can fix it).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from node.config import ConfigError, TlsSettings
from node.deliver.dicom import DicomSender
from node.deliver.failures import DeliveryError
from node.deliver.senders import sender_for
from node.net.pynetdicom_setup import configure_pynetdicom
from node.net.tls import TlsFileError, check_certificate_expiry, client_context, server_context
from node.receive.tls_listener import start_tls_server
from tests.support import (
    NodeProcess, OrthancServer, Pki, StoreSCP, TlsFront, bundled, copy_as_series, echoscu, folder_route, free_port,
    node_config, openssl, storescu, table, wait_for,
)

pytestmark = pytest.mark.peers


@pytest.fixture(autouse=True, scope="module")
def pynetdicom_as_the_node_sets_it() -> None:
    """pynetdicom's process-wide switches as ``dicom-node serve`` sets them at start-up."""
    configure_pynetdicom()

LOCALHOST = "127.0.0.1"


# --------------------------------------------------------------------------- certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


# --------------------------------------------------------------------------- contexts


def test_contexts_are_tls12_or_later_and_verify(pki: Pki) -> None:
    server = server_context(pki.settings(1))
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2 and server.verify_mode == ssl.CERT_REQUIRED
    assert server_context(pki.settings(1, ca=None)).verify_mode == ssl.CERT_NONE
    by_ip = client_context(ca_file=pki.cert("ca"), host=LOCALHOST)
    assert by_ip.minimum_version == ssl.TLSVersion.TLSv1_2 and by_ip.verify_mode == ssl.CERT_REQUIRED
    assert not by_ip.check_hostname  # an IP with a private CA: the CA vouches
    assert client_context(ca_file=pki.cert("ca"), host="pacs.example.org").check_hostname
    assert client_context(host=LOCALHOST).check_hostname  # public store: the IP must be in the certificate


def test_unusable_files_are_tls_file_errors_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsFileError, match=f"private key file {pki.key('client')} does not belong to "
                                          f"certificate file {pki.cert('server')}"):
        server_context(TlsSettings(port=1, cert_file=pki.cert("server"), key_file=pki.key("client")))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsFileError, match=f"certificate file {garbage}: no PEM certificate"):
        server_context(TlsSettings(port=1, cert_file=garbage, key_file=pki.key("server")))
    with pytest.raises(TlsFileError, match=f"CA file {garbage}"):
        client_context(ca_file=garbage)
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsFileError, match=f"CA file {missing}: cannot read"):
        server_context(dataclasses.replace(pki.settings(1), ca_file=missing))
    locked = tmp_path / "encrypted.key"
    openssl("pkey", "-in", str(pki.key("client")), "-aes256", "-passout", "pass:secret", "-out", str(locked),
             cwd=tmp_path)
    with pytest.raises(TlsFileError, match=f"private key file {locked}: the private key is encrypted"):
        client_context(ca_file=pki.cert("ca"), cert_file=pki.cert("client"), key_file=locked)


def test_config_check_reports_unusable_tls_files_at_their_line(pki: Pki, tmp_path: Path) -> None:
    """Files that exist but cannot be used fail at load (so ``config check``), naming the key's line."""
    from node.config import load_config

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config = tmp_path / "node.toml"
    lines = [
        "[node]", f'data_dir = "{tmp_path / "var"}"',
        "[tls]", "port = 2762", f'cert_file = "{pki.cert("server")}"', f'key_file = "{pki.key("client")}"',
    ]
    config.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"^{config}:6: tls\.key_file: .*does not belong to certificate file"):
        load_config(config)
    lines[5] = f'key_file = "{pki.key("server")}"'
    lines += ["[[destinations]]", 'name = "pacs"', 'kind = "dicom"', 'host = "127.0.0.1"', "port = 11112",
              'ae_title = "PACS"', "tls = true", f'ca_file = "{garbage}"']
    config.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf'^{config}:14: destinations\[1\] \(name "pacs"\)\.ca_file: destination CA file {garbage}: no usable PEM'):
        load_config(config)
    lines[-1] = f'ca_file = "{pki.cert("ca")}"'
    config.write_text("\n".join(lines) + "\n")
    assert load_config(config).tls is not None
    lines.insert(6, "match_ae_title = true")  # in [tls], which has no ca_file
    config.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"^{config}:7: tls\.match_ae_title: needs ca_file"):
        load_config(config)


def test_certificate_expiry_is_warned_about_and_an_expired_one_is_an_error(
        pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="node.net.tls")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    found = check_certificate_expiry({"tls.cert_file": pki.cert("server"), "destinations.x.cert_file": garbage})
    assert list(found) == ["tls.cert_file"]  # an unreadable file is left out, never an exception
    assert 1 < (found["tls.cert_file"] - time.time()) / 86400 <= 2  # the test PKI is valid two days
    assert re.search(r"TLS certificate tls\.cert_file \(.*\) expires on .* UTC, in [12]\.\d days: renew it",
                     caplog.text), caplog.text
    caplog.clear()
    check_certificate_expiry({"tls.cert_file": pki.cert("server")}, now=found["tls.cert_file"] + 1)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and "expired on" in record.getMessage()
    caplog.clear()
    check_certificate_expiry({"tls.cert_file": pki.cert("server")}, now=found["tls.cert_file"] - 31 * 86400)
    assert not caplog.records  # far from its end: nothing to say


# --------------------------------------------------------------------------- the node's listener


def tls_node_config(data: Path, port: int, tls_port: int, out: Path, pki: Pki, *, ca: bool = True,
                    match_ae_title: bool = False) -> str:
    tls = table("tls", {"port": tls_port, "cert_file": pki.cert("server"), "key_file": pki.key("server"),
                        "ca_file": pki.cert("ca") if ca else None, "match_ae_title": match_ae_title})
    return node_config(data, port, extra=tls + folder_route(out))


def tls_echo(port: int, args: list[str]) -> subprocess.CompletedProcess:
    return echoscu(LOCALHOST, port, called_aet="DICOMNODE", extra_args=["-v", *args], timeout=60)


def wait_tls_listener(node: NodeProcess, port: int, args: list[str]) -> None:
    wait_for(lambda: tls_echo(port, args).returncode == 0, 30,
             f"the TLS listener on {port} (is start_tls_server wired into NodeService.start()?)", node.log)


def outputs(out: Path, study_uid: str) -> list[Path]:
    return sorted((out / study_uid).rglob("*.dcm")) if (out / study_uid).exists() else []


class TlsNode:
    def __init__(self, node: NodeProcess, port: int, tls_port: int, out: Path) -> None:
        self.node, self.port, self.tls_port, self.out = node, port, tls_port, out


@pytest.fixture(scope="module")
def tls_node(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    """The node with its plain listener (NodeProcess waits on it) and a TLS listener requiring
    client certificates of ``ca``."""
    work = tmp_path_factory.mktemp("tls-node")
    port, tls_port, out = free_port(), free_port(), work / "out"
    with NodeProcess(tls_node_config(work / "var", port, tls_port, out, pki), work, port=port) as node:
        wait_tls_listener(node, tls_port, pki.tls_args("client"))
        yield TlsNode(node, port, tls_port, out)


def test_listener_logs_that_client_certificates_are_required(tls_node: TlsNode, pki: Pki) -> None:
    assert f"TLS listener on 127.0.0.1:{tls_node.tls_port}, client certificates required" in tls_node.node.log()
    assert "TLS connection from 127.0.0.1:" in tls_node.node.log()
    assert "certificate CN=MODALITY (issuer CN=Test Hospital CA" in tls_node.node.log()
    assert f"TLS certificate tls.cert_file ({pki.cert('server')}) expires on " in tls_node.node.log()


def test_storescu_over_tls_is_received_and_processed(tls_node: TlsNode, pki: Pki, tmp_path: Path) -> None:
    sources = copy_as_series([bundled("CT_small.dcm")] * 3, tmp_path / "in")
    study = pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
    result = storescu(LOCALHOST, tls_node.tls_port, sources, called_aet="DICOMNODE",
                      extra_args=pki.tls_args("client"))
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: len(outputs(tls_node.out, study)) == 3, 60, "3 outputs of the TLS series", tls_node.node.log)


def test_match_ae_title_keeps_only_the_ae_title_the_certificate_names(
        pki: Pki, tmp_path: Path) -> None:
    """The client certificate is CN=MODALITY: as MODALITY it stores; claiming another title it is aborted."""
    port, tls_port, out = free_port(), free_port(), tmp_path / "out"
    config = tls_node_config(tmp_path / "var", port, tls_port, out, pki, match_ae_title=True)
    with NodeProcess(config, tmp_path, port=port) as node:
        wait_tls_listener(node, tls_port, ["-aet", "MODALITY", *pki.tls_args("client")])
        impostor = copy_as_series([bundled("CT_small.dcm")], tmp_path / "impostor")
        refused = storescu(LOCALHOST, tls_port, impostor, called_aet="DICOMNODE", calling_aet="PACS_ADMIN",
                           extra_args=pki.tls_args("client"))
        assert refused.returncode != 0, refused.stdout + refused.stderr
        wait_for(lambda: "association from PACS_ADMIN at 127.0.0.1 aborted: its TLS client certificate names "
                 "MODALITY, not that AE title" in node.log(), 10, "the refusal in the log", node.log)
        genuine = copy_as_series([bundled("CT_small.dcm")] * 2, tmp_path / "genuine")
        accepted = storescu(LOCALHOST, tls_port, genuine, called_aet="DICOMNODE", calling_aet="MODALITY",
                            extra_args=pki.tls_args("client"))
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        spooled = sorted((tmp_path / "var" / "spool").rglob("*.dcm"))
        assert len(spooled) == 2 and not any(impostor_uid(impostor) in str(p) for p in spooled)
        # the plain listener is not concerned: it has no certificate to match
        plain = storescu(LOCALHOST, port, impostor, called_aet="DICOMNODE", calling_aet="PACS_ADMIN")
        assert plain.returncode == 0, plain.stdout + plain.stderr


def impostor_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)


def test_refused_handshakes_are_logged_and_the_node_goes_on(tls_node: TlsNode, pki: Pki, tmp_path: Path) -> None:
    node = tls_node.node
    sources = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")

    anonymous = storescu(LOCALHOST, tls_node.tls_port, sources, called_aet="DICOMNODE",
                         extra_args=["+tla", "+cf", str(pki.cert("ca"))])
    assert anonymous.returncode != 0 and "Association Request Failed" in anonymous.stderr, anonymous.stderr
    wait_for(lambda: "client sent no certificate (one is required) [PEER_DID_NOT_RETURN_A_CERTIFICATE]" in node.log(),
             10, "the refusal of a client without certificate in the log", node.log)

    plain = storescu(LOCALHOST, tls_node.tls_port, sources, called_aet="DICOMNODE")
    assert plain.returncode != 0 and "Association Request Failed" in plain.stderr, plain.stderr
    wait_for(lambda: "client does not speak TLS (plain DICOM on the TLS port?) [WRONG_VERSION_NUMBER]" in node.log(),
             10, "the refusal of a plain client in the log", node.log)

    rogue = storescu(LOCALHOST, tls_node.tls_port, sources, called_aet="DICOMNODE", extra_args=pki.tls_args("rogue"))
    assert rogue.returncode != 0, rogue.stderr
    wait_for(lambda: "client certificate rejected: unable to get local issuer certificate" in node.log(),
             10, "the refusal of a foreign client certificate in the log", node.log)

    untrusting = storescu(LOCALHOST, tls_node.tls_port, sources, called_aet="DICOMNODE",
                          extra_args=pki.tls_args("client", trust="other"))
    assert untrusting.returncode != 0 and "certificate verify failed" in untrusting.stderr, untrusting.stderr
    wait_for(lambda: "client rejected the node's certificate [TLSV1_ALERT_UNKNOWN_CA]" in node.log(),
             10, "a client refusing the node's certificate in the log", node.log)

    refusals = [line for line in node.log().splitlines() if "TLS connection from 127.0.0.1:" in line and "refused" in line]
    assert len(refusals) >= 4 and all(" WARNING node.receive.tls_listener: " in line for line in refusals), refusals
    assert node.alive()
    assert not any(path.parent.name == sources[0].parent.name for path in tls_node.out.rglob("*.dcm"))

    study = pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
    good = storescu(LOCALHOST, tls_node.tls_port, sources, called_aet="DICOMNODE", extra_args=pki.tls_args("client"))
    assert good.returncode == 0, good.stderr
    assert echoscu(LOCALHOST, tls_node.port, called_aet="DICOMNODE").returncode == 0  # plain listener too
    wait_for(lambda: outputs(tls_node.out, study), 60, "the series sent after the refusals", node.log)


def test_a_silent_client_does_not_hold_up_the_others(tls_node: TlsNode, pki: Pki) -> None:
    with socket.create_connection((LOCALHOST, tls_node.tls_port), timeout=5):  # connects, never says hello
        time.sleep(0.2)
        started = time.monotonic()
        result = tls_echo(tls_node.tls_port, pki.tls_args("client"))
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 5


class TlsOnlyNode(NodeProcess):
    """A node without a plain listener (``port = 0``): waits for C-ECHO over anonymous TLS."""

    def __init__(self, config_text: str, workdir: Path, *, tls_port: int, ca: Path) -> None:
        super().__init__(config_text, workdir, port=tls_port)
        self.ca = ca

    def start(self, timeout: float = 30) -> TlsOnlyNode:
        return self.start_without_echo(lambda: tls_echo(self.port, ["+tla", "+cf", str(self.ca)]).returncode == 0,
                                       timeout, "answer C-ECHO over anonymous TLS")


def test_tls_only_node_without_client_certificates(pki: Pki, tmp_path: Path) -> None:
    tls_port, out = free_port(), tmp_path / "out"
    config = tls_node_config(tmp_path / "var", 0, tls_port, out, pki, ca=False)
    sources = copy_as_series([bundled("CT_small.dcm")] * 2, tmp_path / "in")
    study = pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
    with TlsOnlyNode(config, tmp_path, tls_port=tls_port, ca=pki.cert("ca")) as node:
        assert f"TLS listener on 127.0.0.1:{tls_port}, client certificates not asked" in node.log()
        assert "listening as" not in node.log()  # no plain listener
        # No client certificate needed; the client still verifies the node's certificate.
        result = storescu(LOCALHOST, tls_port, sources, called_aet="DICOMNODE",
                          extra_args=["+tla", "+cf", str(pki.cert("ca"))])
        assert result.returncode == 0, result.stderr
        wait_for(lambda: len(outputs(out, study)) == 2, 60, "2 outputs over anonymous TLS", node.log)
        assert "TLSv1.3, no client certificate" in node.log() or "TLSv1.2, no client certificate" in node.log()


# --------------------------------------------------------------------------- DicomSender over TLS


def ct_files(folder: Path, count: int = 2) -> tuple[list[Path], dict[str, str]]:
    files = copy_as_series([bundled("CT_small.dcm")] * count, folder)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return files, {"study_uid": ds.StudyInstanceUID, "series_uid": ds.SeriesInstanceUID}


class Received:
    def __init__(self) -> None:
        self.sop_uids: list[str] = []
        self.client_certificates: list[dict] = []
        self.lock = threading.Lock()

    def on_store(self, event: evt.Event) -> int:
        sock = event.assoc.dul.socket.socket
        with self.lock:
            self.sop_uids.append(event.request.AffectedSOPInstanceUID)
            self.client_certificates.append(sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None)
        return 0x0000


def pynetdicom_scp(context: ssl.SSLContext | None) -> tuple[AE, int, Received]:
    ae = AE(ae_title="TLSSCP")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage)
    received = Received()
    port = free_port()
    ae.start_server((LOCALHOST, port), block=False, ssl_context=context,
                    evt_handlers=[(evt.EVT_C_STORE, received.on_store)])
    return ae, port, received


@pytest.fixture
def tls_scp(pki: Pki) -> Iterator[tuple[int, Received]]:
    """pynetdicom's own TLS server (not node.receive.tls_listener's) requiring client certificates of ``ca``."""
    ae, port, received = pynetdicom_scp(server_context(pki.settings(0)))
    try:
        yield port, received
    finally:
        ae.shutdown()


def tls_sender(pki: Pki, port: int, *, client: str | None = "client", trust: str = "ca",
               host: str = LOCALHOST) -> DicomSender:
    return DicomSender(host=host, port=port, called_ae="TLSSCP", calling_ae="NODE", timeout=10, tls=True,
                       ca_file=pki.cert(trust), cert_file=pki.cert(client) if client else None,
                       key_file=pki.key(client) if client else None)


def send_error(sender: DicomSender, files: list[Path], uids: dict[str, str]) -> DeliveryError:
    with pytest.raises(DeliveryError) as info:
        sender.send(files, **uids)
    return info.value


def test_sender_delivers_over_tls_with_its_client_certificate(pki: Pki, tls_scp, tmp_path: Path) -> None:
    port, received = tls_scp
    files, uids = ct_files(tmp_path / "out")
    sender = tls_sender(pki, port)
    assert sender.describe() == f"dicom+tls TLSSCP@127.0.0.1:{port}"
    sender.send(files, **uids)
    assert sorted(received.sop_uids) == sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
    subjects = {dict(rdn[0] for rdn in cert["subject"])["commonName"] for cert in received.client_certificates}
    assert subjects == {"MODALITY"}


def test_sender_from_config_uses_the_destination_tls_fields(pki: Pki, tls_scp, tmp_path: Path) -> None:
    from node.config import DicomDestination

    port, received = tls_scp
    destination = DicomDestination(name="pacs", host=LOCALHOST, port=port, ae_title="TLSSCP", calling_ae_title="NODE",
                                   tls=True, ca_file=pki.cert("ca"), cert_file=pki.cert("client"),
                                   key_file=pki.key("client"))
    files, uids = ct_files(tmp_path / "out", 1)
    sender_for(destination).send(files, **uids)
    assert len(received.sop_uids) == 1


def test_client_certificate_of_another_ca_is_a_permanent_failure(pki: Pki, tls_scp, tmp_path: Path) -> None:
    port, received = tls_scp
    files, uids = ct_files(tmp_path / "out")
    error = send_error(tls_sender(pki, port, client="rogue"), files, uids)
    assert error.permanent, error
    assert "server rejected our client certificate" in error.reason and "UNKNOWN_CA" in error.reason, error.reason
    assert received.sop_uids == []


def test_no_client_certificate_where_one_is_required_is_a_permanent_failure(pki: Pki, tls_scp, tmp_path: Path) -> None:
    port, _ = tls_scp
    files, uids = ct_files(tmp_path / "out", 1)
    error = send_error(tls_sender(pki, port, client=None), files, uids)
    assert error.permanent and "server rejected our client certificate" in error.reason, error.reason


def test_untrusted_server_certificate_is_a_permanent_failure(pki: Pki, tls_scp, tmp_path: Path) -> None:
    port, received = tls_scp
    files, uids = ct_files(tmp_path / "out", 1)
    error = send_error(tls_sender(pki, port, trust="other"), files, uids)
    assert error.permanent, error
    assert "server certificate rejected: " in error.reason, error.reason
    assert received.sop_uids == []


def test_names_are_checked_addresses_with_a_private_ca_are_not(pki: Pki, tmp_path: Path) -> None:
    # "named" has DNS:localhost and no IP address: fine by name, and by IP with the hospital CA.
    ae, port, received = pynetdicom_scp(server_context(pki.settings(0, cert="named")))
    try:
        files, uids = ct_files(tmp_path / "out", 1)
        tls_sender(pki, port, host="localhost").send(files, **uids)
        tls_sender(pki, port, host=LOCALHOST).send(files, **uids)
        assert len(received.sop_uids) == 2
    finally:
        ae.shutdown()
    # "server" has IP:127.0.0.1 only: by the name localhost it is the wrong certificate.
    ae, port, received = pynetdicom_scp(server_context(pki.settings(0)))
    try:
        error = send_error(tls_sender(pki, port, host="localhost"), files, uids)
        assert error.permanent and "Hostname mismatch" in error.reason, error.reason
    finally:
        ae.shutdown()


def test_tls_to_a_plain_port_is_a_permanent_failure(pki: Pki, tmp_path: Path) -> None:
    ae, port, received = pynetdicom_scp(None)
    try:
        files, uids = ct_files(tmp_path / "out", 1)
        error = send_error(tls_sender(pki, port), files, uids)
        assert error.permanent, error  # a configuration mismatch: retrying cannot help
        assert "peer does not speak TLS (a port without TLS?) [WRONG_VERSION_NUMBER]" in error.reason, error.reason
        assert received.sop_uids == []
    finally:
        ae.shutdown()


def test_tls_to_a_plain_dcmtk_port_looks_like_a_closed_connection(pki: Pki, tmp_path: Path) -> None:
    # dcmtk's storescp resets the connection on a ClientHello: indistinguishable from a peer
    # going away mid-handshake, so transient (retried until max_attempts), with a hint.
    with StoreSCP(tmp_path / "scp", aet="TLSSCP") as scp:
        files, uids = ct_files(tmp_path / "out", 1)
        error = send_error(tls_sender(pki, scp.port), files, uids)
        assert not error.permanent, error
        assert "connection closed during the TLS handshake" in error.reason, error.reason
        assert "a port without TLS may answer so too" in error.reason
        assert scp.files() == []


def test_tls_to_a_closed_port_is_transient(pki: Pki, tmp_path: Path) -> None:
    port = free_port()
    files, uids = ct_files(tmp_path / "out", 1)
    error = send_error(tls_sender(pki, port), files, uids)
    assert not error.permanent and "connection refused" in error.reason, error.reason


def test_peer_closing_during_the_handshake_is_transient(pki: Pki, tmp_path: Path) -> None:
    listener = socket.create_server((LOCALHOST, 0))
    port = listener.getsockname()[1]

    def close_at_once() -> None:
        connection, _ = listener.accept()
        connection.recv(1)
        connection.close()

    thread = threading.Thread(target=close_at_once, daemon=True)
    thread.start()
    try:
        files, uids = ct_files(tmp_path / "out", 1)
        error = send_error(tls_sender(pki, port), files, uids)
        assert not error.permanent and "connection closed during the TLS handshake" in error.reason, error.reason
    finally:
        thread.join(timeout=10)
        listener.close()


def test_start_tls_server_in_process(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """start_tls_server as the service calls it: one INFO line, refusals at WARNING, shutdown."""
    ae = AE(ae_title="DICOMNODE")
    ae.add_supported_context(Verification)
    port = free_port()
    with caplog.at_level(logging.INFO, logger="node.receive.tls_listener"):
        server = start_tls_server(ae, LOCALHOST, pki.settings(port), [], handshake_timeout=1.0)
        try:
            assert tls_echo(port, pki.tls_args("client")).returncode == 0
            with socket.create_connection((LOCALHOST, port), timeout=5) as silent:
                silent.settimeout(5)
                assert silent.recv(1) == b""  # closed by the node after handshake_timeout
        finally:
            server.shutdown()
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", f"TLS listener on 127.0.0.1:{port}, client certificates required (CA {pki.cert('ca')})") in messages
    assert any(level == "WARNING" and "refused: no TLS handshake in time" in text for level, text in messages), messages
    assert ae._servers == []

    # A handshake still waiting does not hold up shutdown (socketserver joins request threads).
    server = start_tls_server(ae, LOCALHOST, pki.settings(port), [], handshake_timeout=60.0)
    with socket.create_connection((LOCALHOST, port), timeout=5):
        time.sleep(0.3)
        started = time.monotonic()
        server.shutdown()
        assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- DICOMweb over https with a private CA


class HttpsOrthanc:
    """Orthanc behind an HTTPS front whose certificate the test hospital CA signed."""

    def __init__(self, orthanc: OrthancServer, front: TlsFront) -> None:
        self.orthanc, self.front = orthanc, front
        self.dicomweb_url = f"https://{LOCALHOST}:{front.port}/dicom-web"


@pytest.fixture(scope="module")
def https_orthanc(pki: Pki) -> Iterator[HttpsOrthanc]:
    with OrthancServer(aet="HTTPSORTHANC") as orthanc, \
            TlsFront(orthanc.http_port, pki.cert("server"), pki.key("server")) as front:
        yield HttpsOrthanc(orthanc, front)


def test_stow_over_https_trusts_the_destination_ca_file(https_orthanc: HttpsOrthanc, pki: Pki,
                                                        tmp_path: Path) -> None:
    from node.config import DicomWebDestination

    assert https_orthanc.dicomweb_url.startswith("https://")
    files, uids = ct_files(tmp_path / "out", 2)
    destination = DicomWebDestination(name="archive", url=https_orthanc.dicomweb_url, ca_file=pki.cert("ca"))
    sender_for(destination).send(files, **uids)
    found = https_orthanc.orthanc.post("/tools/find", json={"Level": "Instance", "Query": {}, "Expand": True})
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert sent <= {item["MainDicomTags"]["SOPInstanceUID"] for item in found}
    # without the CA the system's store does not know the hospital's certificate: refused for good
    with pytest.raises(DeliveryError) as info:
        sender_for(DicomWebDestination(name="archive", url=https_orthanc.dicomweb_url)).send(files, **uids)
    assert info.value.permanent and "TLS" in info.value.reason and "certificate verify failed" in info.value.reason


def test_poller_over_https_trusts_the_source_ca_file(https_orthanc: HttpsOrthanc, pki: Pki, tmp_path: Path) -> None:
    from node.config import DicomWebSource
    from node.store.jobstore import JobStore
    from node.receive.poller import DicomWebPoller
    from node.store.spool import Spool

    (path,) = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")
    https_orthanc.orthanc.upload(path)
    jobs = JobStore(tmp_path / "jobs.sqlite")
    try:
        def poll(ca_file: Path | None):
            source = DicomWebSource(name="archive", url=https_orthanc.dicomweb_url, every_seconds=60.0,
                                    lookback_hours=24 * 365 * 50, ca_file=ca_file)
            return DicomWebPoller(source, spool=Spool(tmp_path / "spool"), jobs=jobs, retry_delays=()).poll_once()

        refused = poll(None)
        assert not refused.ok and any("certificate verify failed" in e for e in refused.errors), refused
        trusted = poll(pki.cert("ca"))
        assert trusted.ok and trusted.instances_fetched >= 1, trusted
    finally:
        jobs.close()
    sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert any(p.name == f"{sop}.dcm" for p in (tmp_path / "spool").rglob("*.dcm"))
