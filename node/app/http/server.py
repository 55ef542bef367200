"""The node's HTTP server: health, readiness, metrics, the job API, thumbnails and the status pages.

Standard library only (:class:`http.server.ThreadingHTTPServer`), one thread per request, all of
it read-only: nothing here changes a job.  Endpoints:

``/healthz``
    200 ``ok`` while the node's threads are alive, else 503.
``/readyz``
    200 ``ready`` when the node takes work (store open, listener up), else 503.
``/metrics``
    Prometheus text format 0.0.4 (:mod:`node.telemetry.metrics`), queue depth read from the job store.
``/api/jobs`` and ``/api/jobs/{id}``
    Recent series as JSON (``?limit=``, ``?state=``); one series with deliveries and events.
``/``
    A server-rendered HTML page (no JavaScript, :mod:`node.app.http.pages`): counts by state,
    recent series each with a before/after thumbnail from ``/thumbs/{id}/source.png`` and
    ``/thumbs/{id}/output.png`` (:mod:`node.app.http.thumbnails`), each linked to its own page.
``/series/{id}``
    One series as HTML (the facts ``dicom-node status JOB`` prints, :mod:`node.app.seriesview`):
    UTC times, calling AE, route, pipeline, each delivery with attempts ``n/m`` and the peer's
    last reason, the outputs with their thumbnails, and the series' events.

With ``[http] auth`` every request but ``/healthz`` and ``/readyz`` (and ``/metrics`` with
``public_metrics``) needs credentials (:mod:`node.app.http.auth`); with ``cert_file``/``key_file`` the
listener speaks HTTPS only (TLS 1.2 or later, the handshake in the request's own thread).

No patient name or ID is ever shown: the job store holds none, and thumbnails are pixels only.
A thumbnail that cannot be made is a 404 with a placeholder image, never an error page.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from node.app.http.pages import Pages
from node.app.http.thumbnails import Thumbnails, placeholder_png
from node.config.pipeline import Pipeline
from node.app.http.auth import HttpGuard
from node.imaging.source import DecodeLimits
from node.outputs.histogram import series_histogram_view
from node.telemetry.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from node.telemetry.metrics import Metrics
from node.store.jobstore import JobStore, SeriesState

__all__ = ["API_LIMIT", "MAX_LIMIT", "PAGE_LIMIT", "StatusServer"]

log = logging.getLogger(__name__)

#: Series shown on the page unless ``?limit=`` says otherwise.
PAGE_LIMIT = 50
#: Series listed by ``/api/jobs`` unless ``?limit=`` says otherwise.
API_LIMIT = 100
MAX_LIMIT = 1000

_HANDSHAKE_SECONDS = 10.0  # a TLS client has this long to complete its handshake

_STATES = [state.value for state in SeriesState]
_ID = re.compile(r"[0-9]{1,18}")
_THUMB = re.compile(r"/thumbs/([^/]*)/(source|output)\.png")
_SERIES_PAGE = re.compile(r"/series/([^/]*)")

_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_HTML = "text/html; charset=utf-8"
_PNG = "image/png"
_PAGE_POLICY = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'self'"


class _BadRequest(Exception):
    """A request the client got wrong (400), with a message for it."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], status: StatusServer, tls: ssl.SSLContext | None = None) -> None:
        self.status = status
        self.tls = tls
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's full name, which can hang: not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        request, client = super().get_request()
        if self.tls is not None:  # the handshake waits for the request's thread (finish_request)
            request = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        return request, client

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(_HANDSHAKE_SECONDS)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:  # plain HTTP, an untrusting client, a port scan
                log.debug("HTTPS handshake with %s failed: %s", client_address[0], exc)
                return
        super().finish_request(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "dicom-node"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection gives its thread back after this long

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it so
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _not_allowed(self) -> None:
        if self._refused(head=False):
            return
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, _json_bytes({"error": "read-only: GET or HEAD"}), _JSON,
                   head=False, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815

    def _refused(self, *, head: bool) -> bool:
        """Answer 401 or 429 when ``[http] auth`` turns the request away; True when it did."""
        guard = self.server.status.guard
        if guard is None:
            return False
        refusal = guard.refusal(urlsplit(self.path).path, self.headers.get("Authorization"), self.client_address[0])
        if refusal is None:
            return False
        body = _json_bytes({"error": refusal.reason})
        self._send(refusal.status, body, _JSON, head=head, extra=refusal.headers)
        return True

    def _serve(self, *, head: bool) -> None:
        status = self.server.status
        if self._refused(head=head):
            return
        try:
            code, body, ctype, extra = status.respond(self.path)
        except _BadRequest as exc:
            code, body, ctype, extra = HTTPStatus.BAD_REQUEST, _json_bytes({"error": str(exc)}), _JSON, {}
        except Exception:
            log.exception("HTTP %s failed", self.path[:200])
            code, body, ctype, extra = (HTTPStatus.INTERNAL_SERVER_ERROR, _json_bytes({"error": "internal error"}),
                                        _JSON, {})
        self._send(code, body, ctype, head=head, extra=extra)

    def _send(self, code: int, body: bytes, ctype: str, *, head: bool, extra: Mapping[str, str]) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            if "Cache-Control" not in extra:
                self.send_header("Cache-Control", "no-store")
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _limit(query: Mapping[str, list[str]], default: int) -> int:
    values = query.get("limit")
    if not values:
        return default
    text = values[-1].strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise _BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def _state(query: Mapping[str, list[str]]) -> str | None:
    values = query.get("state")
    if not values or not values[-1]:
        return None
    if values[-1] not in _STATES:
        raise _BadRequest(f"state must be one of {', '.join(_STATES)}")
    return values[-1]


_Response = tuple[int, bytes, str, dict[str, str]]


class StatusServer:
    """The node's HTTP endpoints, served from a background thread.

    Parameters
    ----------
    host, port : str, int
        Where to listen; port 0 picks a free port (see :attr:`port` after :meth:`start`).
    jobs : JobStore
        The job store (read only here).
    metrics : Metrics
        The node's metrics, rendered by ``/metrics``.
    outputs_dir, spool_dir : pathlib.Path
        The node's outputs and spool folders: the only places files are read from.
    is_alive, is_ready : callable
        Liveness and readiness of the node; an exception counts as False.
    pipelines : mapping of str to Pipeline, optional
        The configured pipelines (``config.pipelines``): with them the "after" thumbnail is
        exactly the output of the "before" instance.
    decode_limits : DecodeLimits, optional
        The node's decode limits: thumbnails of a file above them are never decoded.
    guard : HttpGuard, optional
        ``[http] auth``: who may read what (:meth:`HttpGuard.for_settings`); None: everyone.
    tls : ssl.SSLContext, optional
        HTTPS with this server context (:func:`node.net.tls.https_server_context`); None: plain HTTP.
    max_delivery_attempts : int, optional
        ``[delivery] max_attempts``: the *m* of a delivery's attempts ``n/m`` on ``/series/{id}``;
        None shows *n* alone.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        jobs: JobStore,
        metrics: Metrics,
        outputs_dir: Path,
        spool_dir: Path,
        is_alive: Callable[[], bool],
        is_ready: Callable[[], bool],
        pipelines: Mapping[str, Pipeline] | None = None,
        decode_limits: DecodeLimits | None = None,
        guard: HttpGuard | None = None,
        tls: ssl.SSLContext | None = None,
        max_delivery_attempts: int | None = None,
    ) -> None:
        self.host = host
        self.max_delivery_attempts = max_delivery_attempts
        self.guard = guard
        self.tls = tls
        self.port = port
        self.jobs = jobs
        self.metrics = metrics
        self.outputs_dir = Path(outputs_dir)
        self.spool_dir = Path(spool_dir)
        self.is_alive = is_alive
        self.is_ready = is_ready
        self.thumbnails = Thumbnails(jobs, self.outputs_dir, self.spool_dir, pipelines, decode_limits)
        self.pages = Pages()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL (``http://host:port``, ``https://`` with TLS)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}"

    def start(self) -> None:
        """Listen and serve in a background thread; returns once the socket listens.

        Raises
        ------
        OSError
            The address cannot be bound (port in use, unknown host).
        """
        if self._server is not None:
            raise RuntimeError("StatusServer already started")
        self._server = _Server((self.host, self.port), self, self.tls)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="http", daemon=True)
        self._thread.start()
        who = "no login" if self.guard is None else f"{self.guard.kind} auth"
        log.info("HTTP status on %s/ (metrics on /metrics; %s)", self.url, who)
        self._warn_if_exposed(str(self._server.server_address[0]))

    def _warn_if_exposed(self, address: str) -> None:
        """A WARNING when other machines can reach the listener without a login, or read credentials."""
        if ipaddress.ip_address(address.split("%", 1)[0]).is_loopback:
            return
        if self.guard is None:
            log.warning("HTTP on %s without a login ([http] allow_anonymous = true): whoever reaches it sees the "
                        "status page and thumbnails of patient images", self.url)
        elif self.tls is None:
            log.warning("HTTP %s auth over plain HTTP on %s: the credentials cross the network readable unless a "
                        "reverse proxy terminates TLS in front; give [http] cert_file and key_file for HTTPS",
                        self.guard.kind, self.url)

    def stop(self) -> None:
        """Stop serving and close the socket (requests under way finish in their own threads)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- routing --------------------------------------------------------------------------------

    def respond(self, target: str) -> _Response:
        """The response to ``GET target``: (status, body, content type, extra headers)."""
        parts = urlsplit(target)
        path = parts.path
        try:
            query = parse_qs(parts.query, keep_blank_values=True, max_num_fields=20)
        except ValueError:
            raise _BadRequest("too many query parameters") from None
        if path == "/":
            return self._page(query)
        if path == "/healthz":
            return self._probe(self.is_alive, "ok", "not alive")
        if path == "/readyz":
            return self._probe(self.is_ready, "ready", "not ready")
        if path == "/metrics":
            body = self.metrics.render(self._queue_depth()).encode("utf-8")
            return HTTPStatus.OK, body, METRICS_CONTENT_TYPE, {}
        if path in ("/api/jobs", "/api/jobs/"):
            rows = self.jobs.list_series(limit=_limit(query, API_LIMIT), state=_state(query))
            return HTTPStatus.OK, _json_bytes(rows), _JSON, {}
        if path.startswith("/api/jobs/"):
            series_id = self._series_id(path[len("/api/jobs/"):])
            row = self.jobs.series(series_id)
            if row is None:
                return HTTPStatus.NOT_FOUND, _json_bytes({"error": f"no series {series_id}"}), _JSON, {}
            return HTTPStatus.OK, _json_bytes(row), _JSON, {}
        found = _THUMB.fullmatch(path)
        if found:
            return self._thumbnail(self._series_id(found.group(1)), found.group(2))
        found = _SERIES_PAGE.fullmatch(path)
        if found:
            return self._series_page(found.group(1))
        return HTTPStatus.NOT_FOUND, _json_bytes({"error": "not found"}), _JSON, {}

    def _queue_depth(self) -> dict[str, int]:
        """Series per state for ``/metrics``: every state of the job store (0 when none), then any other it counts."""
        return {**dict.fromkeys(_STATES, 0), **self.jobs.counts()}

    @staticmethod
    def _series_id(text: str) -> int:
        if not _ID.fullmatch(text):
            raise _BadRequest("a series id is a whole number")
        return int(text)

    @staticmethod
    def _probe(check: Callable[[], bool], good: str, bad: str) -> _Response:
        try:
            ok = bool(check())
        except Exception:
            log.debug("probe raised", exc_info=True)
            ok = False
        if ok:
            return HTTPStatus.OK, f"{good}\n".encode(), _TEXT, {}
        return HTTPStatus.SERVICE_UNAVAILABLE, f"{bad}\n".encode(), _TEXT, {}

    def _thumbnail(self, series_id: int, kind: str) -> _Response:
        try:
            data = self.thumbnails.get(series_id, kind)
        except Exception:  # never an error page for a picture
            log.debug("thumbnail %s of series %d failed", kind, series_id, exc_info=True)
            data = None
        if data is None:
            return HTTPStatus.NOT_FOUND, placeholder_png(), _PNG, {"Cache-Control": "private, max-age=10"}
        return HTTPStatus.OK, data, _PNG, {"Cache-Control": "private, max-age=3600"}

    def _series_page(self, text: str) -> _Response:
        if not _ID.fullmatch(text):
            return self._html(HTTPStatus.BAD_REQUEST, self.pages.message_page("bad request",
                                                                               "a series id is a whole number"))
        row = self.jobs.series(int(text))
        if row is None:
            return self._html(HTTPStatus.NOT_FOUND, self.pages.message_page("not found", f"no series {text}"))
        histogram = series_histogram_view(self.thumbnails.output_folder(row))  # kept when it was processed
        page = self.pages.series_page(row, max_attempts=self.max_delivery_attempts, now=time.time(),
                                      histogram=histogram)
        return self._html(HTTPStatus.OK, page)

    def _page(self, query: Mapping[str, list[str]]) -> _Response:
        try:
            limit, state = _limit(query, PAGE_LIMIT), _state(query)
        except _BadRequest as exc:
            return self._html(HTTPStatus.BAD_REQUEST, self.pages.message_page("bad request", str(exc)))
        rows = self.jobs.list_series(limit=limit, state=state)
        page = self.pages.status_page(self.jobs.counts(), rows, state=state, limit=limit, now=time.time())
        return self._html(HTTPStatus.OK, page)

    @staticmethod
    def _html(code: int, page: str) -> _Response:
        """An HTML page with the pages' Content-Security-Policy (no script, images and forms from here only)."""
        return code, page.encode("utf-8"), _HTML, {"Content-Security-Policy": _PAGE_POLICY}
