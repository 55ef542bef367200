"""DICOM over TLS (PS3.15 B.1 "Basic TLS Secure Transport Connection Profile", B.9 BCP 195: TLS 1.2 or later).

* :func:`server_context` - the TLS listener's context (the listener: :mod:`node.receive.tls_listener`). With
  ``[tls] ca_file`` a client must present a certificate that CA signed; without it no client
  certificate is asked for (the connection is encrypted, the peer is not authenticated by TLS).
* :func:`client_context` / :func:`server_hostname` - TLS towards a DICOM destination
  (``tls = true``), used by :class:`node.deliver.dicom.DicomSender`.

The TLS handshake of an incoming connection runs in that connection's own thread, within the
connection's negotiation deadline (``[node] association_timeout_seconds``, handshake and
A-ASSOCIATE-RQ together; pynetdicom does it in its single accept loop, without a limit, and drops
failures silently); the listener has the plain one's protection (:mod:`node.receive.guard`: limits,
A-ABORT and close for what is no A-ASSOCIATE-RQ). Every refused handshake is counted in /metrics
and logged at WARNING with the peer's address and why, at most once a minute per address and kind
of failure.

Peer names: a destination given by DNS name is checked against its certificate's names
(``check_hostname``). A destination given by IP address with its own ``ca_file`` (the usual
hospital PKI: a private CA whose certificates name hosts, not addresses) is checked against that CA
only - any certificate of that CA is accepted. Without ``ca_file`` (the system's public store) an
IP address must be in the certificate (an IP subjectAltName), as anyone can get a publicly trusted
certificate for *some* name.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Mapping
from pathlib import Path

from typing import Protocol

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "EXPIRY_WARNING_DAYS",
    "TlsFileError",
    "certificate_names",
    "certificate_not_after",
    "check_certificate_expiry",
    "client_context",
    "describe_peer_certificate",
    "handshake_failure_reason",
    "https_server_context",
    "record_tls_errors",
    "server_context",
    "server_hostname",
    "tls_failure_is_permanent",
]

log = logging.getLogger(__name__)

#: Seconds an incoming connection has to complete its TLS handshake, at most (the connection's negotiation
#: deadline, ``association_timeout_seconds``, is usually shorter).
HANDSHAKE_TIMEOUT = 30.0


# --------------------------------------------------------------------------- contexts


class ServerFiles(Protocol):
    """What a listener's context is built from (``[tls]``: :class:`node.config.TlsSettings`)."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None


class HttpsFiles(Protocol):
    """What the HTTP listener's context is built from (``[http]``: :class:`node.config.HttpSettings`)."""

    cert_file: Path | None
    key_file: Path | None


class TlsFileError(ValueError):
    """A TLS file that cannot be used; :attr:`key` is its setting (``cert_file``, ``key_file``, ``ca_file``).

    Not a :class:`node.config.ConfigError` (this module is below the config): the config check turns
    it into one at the setting's line, the CLI reports it as it reports those.
    """

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def _refuse_password(*_args) -> bytes:
    # Without a callback OpenSSL would prompt on the terminal of a service: say what is wrong instead.
    raise TlsFileError("the private key is encrypted (a passphrase-protected key cannot be used)", "key_file")


def _load_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path, what: str) -> None:
    """``load_cert_chain``; every failure becomes a :class:`TlsFileError` naming the file at fault."""
    cert_file, key_file = Path(cert_file), Path(key_file)
    texts = {}
    for kind, path, key in (("certificate", cert_file, "cert_file"), ("private key", key_file, "key_file")):
        try:
            texts[kind] = path.read_bytes()
        except OSError as exc:
            raise TlsFileError(f"{what} {kind} file {path}: cannot read: {exc.strerror or exc}", key) from exc
    if b"-----BEGIN CERTIFICATE-----" not in texts["certificate"]:
        raise TlsFileError(f"{what} certificate file {cert_file}: no PEM certificate in it", "cert_file")
    if b"PRIVATE KEY-----" not in texts["private key"]:
        raise TlsFileError(f"{what} private key file {key_file}: no PEM private key in it", "key_file")
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_password)
    except TlsFileError as exc:
        raise TlsFileError(f"{what} private key file {key_file}: {exc}", "key_file") from exc
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError(
                f"{what} private key file {key_file} does not belong to certificate file {cert_file}", "key_file"
            ) from exc
        raise TlsFileError(
            f"{what} certificate file {cert_file} / private key file {key_file}: cannot load: {_ssl_text(exc)}",
            "cert_file",
        ) from exc
    except OSError as exc:
        raise TlsFileError(f"{what} certificate file {cert_file} / key file {key_file}: {exc}", "cert_file") from exc


def _load_ca(context: ssl.SSLContext, ca_file: Path, what: str) -> None:
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except ssl.SSLError as exc:
        raise TlsFileError(f"{what} CA file {ca_file}: no usable PEM certificate: {_ssl_text(exc)}", "ca_file") from exc
    except OSError as exc:
        raise TlsFileError(f"{what} CA file {ca_file}: cannot read: {exc.strerror or exc}", "ca_file") from exc


def server_context(tls: ServerFiles) -> ssl.SSLContext:
    """The TLS context of the listener.

    Parameters
    ----------
    tls : ServerFiles
        ``[tls]``: the node's certificate chain and key; with ``ca_file`` client certificates
        signed by that CA are required, without it none is asked for.

    Returns
    -------
    ssl.SSLContext
        A server context, TLS 1.2 or later.

    Raises
    ------
    TlsFileError
        A file cannot be read or used; the message names it.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, tls.cert_file, tls.key_file, "tls")
    if tls.ca_file is not None:
        _load_ca(context, tls.ca_file, "tls")
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def https_server_context(http: HttpsFiles) -> ssl.SSLContext | None:
    """The TLS context of the HTTP listener (``[http] cert_file``, ``key_file``), TLS 1.2 or later.

    Parameters
    ----------
    http : HttpsFiles
        ``[http]``; no client certificate is asked for (requests carry their credentials).

    Returns
    -------
    ssl.SSLContext or None
        None when ``cert_file`` is not set (plain HTTP).

    Raises
    ------
    TlsFileError
        A file cannot be read or used; the message names it.
    """
    if http.cert_file is None or http.key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, http.cert_file, http.key_file, "http")
    return context


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def client_context(
    *,
    ca_file: Path | str | None = None,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
    host: str | None = None,
) -> ssl.SSLContext:
    """The TLS context towards one DICOM destination.

    Parameters
    ----------
    ca_file : path, optional
        Trust only this CA (PEM) for the peer's certificate; without it the system's default store.
    cert_file, key_file : path, optional
        Our client certificate chain and key (PEM), given together.
    host : str, optional
        The destination's host: decides whether the certificate's names are checked (see the
        module notes). Without it they are.

    Returns
    -------
    ssl.SSLContext
        A client context, TLS 1.2 or later, that always verifies the peer's certificate chain.

    Raises
    ------
    TlsFileError
        A file cannot be read or used, or only one of cert_file/key_file is given.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        _load_ca(context, Path(ca_file), "destination")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if (cert_file is None) != (key_file is None):
        raise TlsFileError("destination: give cert_file and key_file together (client certificate)", "key_file")
    if cert_file is not None and key_file is not None:
        _load_chain(context, Path(cert_file), Path(key_file), "destination client")
    if host is not None and ca_file is not None and _is_ip(host):
        context.check_hostname = False  # the private CA alone vouches for the peer
    return context


def server_hostname(context: ssl.SSLContext, host: str) -> str | None:
    """The ``server_hostname`` to give with *context* (``tls_args=(context, ...)``): *host* when
    its name is checked, else None."""
    return host.strip("[]") if context.check_hostname else None


# --------------------------------------------------------------------------- describing peers


def _name_text(name) -> str:
    """A certificate subject/issuer from :meth:`ssl.SSLSocket.getpeercert` as ``CN=x,O=y``."""
    parts = []
    for rdn in name or ():
        for key, value in rdn:
            short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                     "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}.get(key, key)
            parts.append(f"{short}={value}")
    return ",".join(parts) or "(empty)"


def describe_peer_certificate(sock: ssl.SSLSocket) -> str:
    """The TLS version and the verified peer certificate of a connected socket, for logs.

    Returns e.g. ``"TLSv1.3, certificate CN=modality-1,O=Hospital (issuer CN=Hospital CA, until
    Jan  1 00:00:00 2030 GMT)"`` or ``"TLSv1.3, no client certificate"``.
    """
    version = sock.version() or "TLS"
    cert = sock.getpeercert()
    if not cert:  # nothing asked, or (with CERT_NONE) not verified
        return f"{version}, no client certificate"
    until = cert.get("notAfter", "?")
    return (f"{version}, certificate {_name_text(cert.get('subject'))} "
            f"(issuer {_name_text(cert.get('issuer'))}, until {until})")


def certificate_names(sock: ssl.SSLSocket) -> tuple[str, ...]:
    """The Common Name(s) and subjectAltName DNS names of the peer's verified certificate.

    Empty when the peer sent none (or it was not verified). What ``[tls] match_ae_title`` compares
    the calling AE title with.
    """
    cert = sock.getpeercert() or {}
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    return tuple(dict.fromkeys(names))


#: A certificate this close to the end of its validity is warned about.
EXPIRY_WARNING_DAYS = 30


def certificate_not_after(path: str | os.PathLike) -> float | None:
    """When the first certificate of the PEM file *path* stops being valid (epoch seconds); None if unknown.

    The standard library has no public reader for a certificate file: this uses
    ``ssl._ssl._test_decode_cert`` (CPython's own tests use it; it has been there since Python
    2.7), and without it the expiry checks are simply off.  ``ssl.cert_time_to_seconds`` reads
    its ``notAfter``.
    """
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        return ssl.cert_time_to_seconds(decode(os.fspath(path))["notAfter"])
    except (OSError, ssl.SSLError, KeyError, ValueError, TypeError):
        return None


def check_certificate_expiry(certificates: Mapping[str, Path], *, now: float | None = None) -> dict[str, float]:
    """Log the certificates that have expired (ERROR) or expire within :data:`EXPIRY_WARNING_DAYS` (WARNING).

    Parameters
    ----------
    certificates : mapping of str to Path
        A label naming the setting (``tls.cert_file``, ``destinations.pacs.cert_file``) and its file.
    now : float, optional
        Epoch seconds (default: the current time).

    Returns
    -------
    dict of str to float
        Each label whose expiry could be read, with its end of validity (epoch seconds).
    """
    now = time.time() if now is None else now
    found = {}
    for label, path in certificates.items():
        not_after = certificate_not_after(path)
        if not_after is None:
            continue
        found[label] = not_after
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_after))
        days = (not_after - now) / 86400
        if days < 0:
            log.error("TLS certificate %s (%s) expired on %s: its TLS connections fail", label, path, when)
        elif days < EXPIRY_WARNING_DAYS:
            log.warning("TLS certificate %s (%s) expires on %s, in %.1f days: renew it", label, path, when, days)
    return found


def _ssl_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return exc.verify_message
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    return str(exc) or type(exc).__name__


# OpenSSL reasons that mean "the bytes on this connection are not TLS at all".
NOT_TLS_REASONS = frozenset({
    "WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
    "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "WRONG_SSL_VERSION", "RECORD_LENGTH_MISMATCH",
})


# Alerts a peer sends when it does not accept the other side's certificate (or got none).
CERTIFICATE_ALERTS = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_ACCESS_DENIED", "TLSV1_ALERT_DECRYPT_ERROR",
})


def handshake_failure_reason(exc: BaseException, *, server_side: bool) -> str:
    """Why a TLS handshake failed, in words, with OpenSSL's own reason in brackets."""
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "no TLS handshake in time"
    if isinstance(exc, ssl.SSLCertVerificationError):
        whose = "client" if server_side else "server"
        return f"{whose} certificate rejected: {exc.verify_message or exc.reason}"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError)):
        hint = "" if server_side else "; a port without TLS may answer so too"
        return f"connection closed during the TLS handshake ({_ssl_text(exc)}{hint})"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        text = f"[{reason or exc}]"
        if reason in NOT_TLS_REASONS:
            if server_side:
                return f"client does not speak TLS (plain DICOM on the TLS port?) {text}"
            return f"peer does not speak TLS (a port without TLS?) {text}"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return f"client sent no certificate (one is required) {text}"
        if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"):
            return f"no common TLS version (TLS 1.2 or later required) {text}"
        if reason in ("NO_SHARED_CIPHER", "SSLV3_ALERT_HANDSHAKE_FAILURE"):
            return f"no common cipher suite {text}"
        if reason in CERTIFICATE_ALERTS:
            if server_side:
                return f"client rejected the node's certificate {text}"
            return f"server rejected our client certificate (or sent none it trusts) {text}"
        if "ALERT" in reason:
            who = "client" if server_side else "peer"
            return f"{who} refused the handshake: {_ssl_text(exc)} {text}"
        return f"TLS handshake failed: {_ssl_text(exc)} {text}"
    return f"{type(exc).__name__}: {exc}"


def tls_failure_is_permanent(exc: BaseException) -> bool:
    """Whether a failed TLS connection to a destination can succeed on a later attempt.

    Permanent: the peer's certificate fails verification, the peer refuses our certificate or
    our TLS parameters, or the peer does not speak TLS on that port (a configuration mismatch).
    Transient: the connection closes or times out during the handshake (peer restarting, busy,
    network trouble), and anything not recognised.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or not isinstance(exc, ssl.SSLError):
        return False
    reason = exc.reason or ""
    return (
        reason in NOT_TLS_REASONS or reason in CERTIFICATE_ALERTS
        or reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "SSLV3_ALERT_HANDSHAKE_FAILURE",
                      "NO_SHARED_CIPHER", "TLSV1_ALERT_INSUFFICIENT_SECURITY", "NO_PROTOCOLS_AVAILABLE")
    )


class _RecordingSSLSocket(ssl.SSLSocket):
    """An SSLSocket that notes its TLS errors on its context (pynetdicom logs and swallows them)."""

    def _note(self, exc: BaseException) -> None:
        errors = getattr(self.context, "node_tls_errors", None)
        if errors is not None:
            errors.append(exc)

    def do_handshake(self, *args, **kwargs):
        try:
            return super().do_handshake(*args, **kwargs)
        except (OSError, ValueError) as exc:
            self._note(exc)
            raise

    def recv(self, *args, **kwargs):
        try:
            return super().recv(*args, **kwargs)
        except ssl.SSLError as exc:
            self._note(exc)
            raise

    def send(self, *args, **kwargs):
        try:
            return super().send(*args, **kwargs)
        except ssl.SSLError as exc:
            self._note(exc)
            raise


def record_tls_errors(context: ssl.SSLContext) -> list[BaseException]:
    """Make the sockets *context* wraps append their TLS errors (handshake, and alerts read or
    written later, e.g. a TLS 1.3 server refusing our certificate after the handshake) to the
    returned list. Use one context per connection."""
    errors: list[BaseException] = []
    context.sslsocket_class = _RecordingSSLSocket  # documented: may be overridden on an instance
    context.node_tls_errors = errors
    return errors
