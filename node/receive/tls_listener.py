"""The TLS listener beside the plain one: the guarded association server with the handshake in each
connection's own thread (contexts, peer certificates and failure reasons: :mod:`node.net.tls`)."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Sequence

from node.config import TlsSettings
from node.net.sockets import close_connection
from node.net.tls import HANDSHAKE_TIMEOUT, describe_peer_certificate, handshake_failure_reason, server_context
from node.receive.guard import ConnectionGuard, GuardedAssociationServer, Negotiation, serve_in_background

__all__ = ["TlsAssociationServer", "start_tls_server"]

log = logging.getLogger(__name__)


class TlsAssociationServer(GuardedAssociationServer):
    """The node's guarded association server (:class:`node.receive.guard.GuardedAssociationServer`) with the
    TLS handshake done in the connection's own thread, before the A-ASSOCIATE-RQ and within the same
    deadline (``association_timeout_seconds``; at most :attr:`handshake_timeout`), every refusal
    counted and logged.

    pynetdicom's own server wraps the accepted socket inside its single accept loop (a client that
    connects and stays silent stops all further connections) and socketserver drops the handshake's
    exception without a word.
    """

    handshake_timeout: float = HANDSHAKE_TIMEOUT

    def secure(self, negotiation: Negotiation, client_address: tuple) -> ssl.SSLSocket | None:
        """The TLS handshake; None (connection closed) when it fails or does not end in time."""
        tls_socket = None
        try:
            limit = min(self.handshake_timeout, negotiation.deadline - time.monotonic())
            negotiation.sock.settimeout(max(limit, 0.001))
            tls_socket = self.ssl_context.wrap_socket(negotiation.sock, server_side=True, do_handshake_on_connect=False)
            self.replace_socket(negotiation, tls_socket)
            tls_socket.do_handshake()
        except Exception as exc:  # noqa: BLE001 - any failure refuses this one connection
            reason = handshake_failure_reason(exc, server_side=True)
            if self.closing:
                log.info("TLS handshake with %s cut: the listener is stopping", negotiation.peer)
            elif isinstance(exc, (TimeoutError, socket.timeout)):
                self.guard.refused(negotiation.host, "timeout", f"TLS connection from {negotiation.peer} refused: "
                                   f"{reason}", logger=log)
            else:  # rate-limited per address and reason: each kind of failure is seen
                self.guard.refused(negotiation.host, "tls_handshake", f"TLS connection from {negotiation.peer} "
                                   f"refused: {reason}", topic=("tls", reason), logger=log)
            close_connection(tls_socket or negotiation.sock)
            return None
        log.info("TLS connection from %s: %s", negotiation.peer, describe_peer_certificate(tls_socket))
        return tls_socket

    def refuse_over_limit(self, request: socket.socket) -> None:
        """Close a connection over a limit (before any TLS: no A-ASSOCIATE-RJ can be read by the client)."""
        close_connection(request)


def start_tls_server(
    ae,
    host: str,
    tls: TlsSettings,
    handlers: Sequence[tuple],
    *,
    context: ssl.SSLContext | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    guard: ConnectionGuard | None = None,
) -> TlsAssociationServer:
    """Start the TLS listener on ``host:tls.port`` in its own thread (as ``ae.start_server(...,
    block=False)`` does) and log it.

    Parameters
    ----------
    ae : pynetdicom.AE
        The application entity (the same as the plain listener's, so AE titles, contexts and the
        association limit are shared).
    host : str
        Address to bind to.
    tls : TlsSettings
        ``[tls]``.
    handlers : sequence of (event, handler)
        pynetdicom event handlers, as for ``start_server``.
    context : ssl.SSLContext, optional
        Defaults to :func:`server_context` of *tls*.
    handshake_timeout : float
        Seconds a client has for its handshake, at most (the guard's timeout bounds handshake and
        A-ASSOCIATE-RQ together).
    guard : ConnectionGuard, optional
        Timeout, limits, counting and warnings, shared with the plain listener; default: one of its
        own with default limits.

    Returns
    -------
    TlsAssociationServer
        Stop it with ``shutdown()``.

    Raises
    ------
    TlsFileError
        The certificate, key or CA file cannot be used.
    OSError
        The port cannot be bound.
    """
    context = context if context is not None else server_context(tls)
    server = ae.make_server(
        (host, tls.port), ssl_context=context, evt_handlers=list(handlers), server_class=TlsAssociationServer,
        guard=guard,
    )
    server.handshake_timeout = handshake_timeout
    serve_in_background(ae, server, "TlsAcceptor")
    log.info(
        "TLS listener on %s:%d, client certificates %s", host, server.server_address[1],
        f"required (CA {tls.ca_file})" if context.verify_mode == ssl.CERT_REQUIRED else "not asked",
    )
    return server
