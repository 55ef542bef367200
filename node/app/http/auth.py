"""Who may read the node's HTTP side: ``[http] auth``, checked on every request but the probes.

The status page shows thumbnails of patient images and the job API names studies and series, so
with ``[http] auth`` every request needs credentials, except ``/healthz`` and ``/readyz`` (they
show no data) and, with ``public_metrics = true``, ``/metrics`` (counts only).

* ``kind = "basic"``: ``Authorization: Basic base64(user:password)``, the password read from the
  environment variable ``password_env`` once, when the server is made.
* ``kind = "bearer"``: ``Authorization: Bearer TOKEN``, the token from ``token_env``.

Credentials are compared in constant time (:func:`hmac.compare_digest` of their SHA-256 digests,
so not even their length shows).  A request without credentials is answered 401 with a
``WWW-Authenticate`` challenge (a browser then asks for them) and is not counted; wrong credentials
are counted per client address: :data:`MAX_FAILURES` within :data:`FAILURE_WINDOW_SECONDS` and the
address gets 429 (``Retry-After``) for :data:`BLOCK_SECONDS`, whatever it sends.  Each failure is
logged at WARNING with the client's address and the path, never what was tried, at most one line a
minute per address (the next line says how many were held back).  Behind a reverse proxy every
client has the proxy's address: the proxy's own limits then matter more.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

from node.config import BasicAuth, BearerAuth, HttpSettings
from node.telemetry.logsetup import Throttle

__all__ = ["BLOCK_SECONDS", "FAILURE_WINDOW_SECONDS", "MAX_FAILURES", "OPEN_PATHS", "FailedLogins", "HttpGuard",
           "Refusal"]

log = logging.getLogger(__name__)

#: Paths served to anyone: they tell whether the node runs, nothing else.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
#: Wrong credentials from one address within FAILURE_WINDOW_SECONDS that block it ...
MAX_FAILURES = 10
FAILURE_WINDOW_SECONDS = 60.0
#: ... for this long (429 to every request of that address).
BLOCK_SECONDS = 60.0
REALM = "dicom-node"

_MAX_CLIENTS = 4096  # addresses remembered before the ones without recent failures are forgotten


@dataclass(frozen=True)
class Refusal:
    """A request turned away: the status (401 or 429), a one-line reason and the headers to send."""

    status: int
    reason: str
    headers: Mapping[str, str] = field(default_factory=dict)


class FailedLogins:
    """Wrong credentials counted per client address; too many in a window block the address a while.

    Parameters
    ----------
    limit : int
        Failures within *window* seconds that block an address.
    window, block : float
        Seconds over which failures count; seconds an address stays blocked.
    clock : callable
        Monotonic seconds (tests pass their own).
    """

    def __init__(self, limit: int = MAX_FAILURES, window: float = FAILURE_WINDOW_SECONDS,
                 block: float = BLOCK_SECONDS, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.block = limit, window, block
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def blocked_for(self, client: str) -> float:
        """Seconds *client* stays blocked (0.0: not blocked)."""
        now = self._clock()
        with self._lock:
            until = self._blocked_until.get(client)
            if until is None:
                return 0.0
            if now >= until:
                del self._blocked_until[client]
                return 0.0
            return until - now

    def failed(self, client: str) -> bool:
        """Count a failure of *client*; True when it is the one that blocks the address."""
        now = self._clock()
        with self._lock:
            if len(self._failures) >= _MAX_CLIENTS:
                self._forget_stale(now)
            times = self._failures.setdefault(client, deque())
            times.append(now)
            while times and now - times[0] > self.window:
                times.popleft()
            if len(times) < self.limit:
                return False
            del self._failures[client]
            self._blocked_until[client] = now + self.block
            return True

    def succeeded(self, client: str) -> None:
        """Right credentials: the failures of *client* so far no longer count."""
        with self._lock:
            self._failures.pop(client, None)

    def _forget_stale(self, now: float) -> None:
        for client in [c for c, times in self._failures.items() if not times or now - times[-1] > self.window]:
            del self._failures[client]
        for client in [c for c, until in self._blocked_until.items() if now >= until]:
            del self._blocked_until[client]


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class HttpGuard:
    """Decides, per request, whether it may be served (see the module's text).

    Parameters
    ----------
    auth : BasicAuth or BearerAuth
        The credentials required; the secret is read from the environment now.
    public_metrics : bool
        ``/metrics`` needs no credentials.
    failures : FailedLogins, optional
        The failure count (default: :data:`MAX_FAILURES` in :data:`FAILURE_WINDOW_SECONDS`).

    Raises
    ------
    ConfigError
        The environment variable holding the secret is not set, or empty.
    """

    def __init__(self, auth: BasicAuth | BearerAuth, *, public_metrics: bool = False,
                 failures: FailedLogins | None = None) -> None:
        self.kind = "basic" if isinstance(auth, BasicAuth) else "bearer"
        if isinstance(auth, BasicAuth):
            username, password = auth.resolve()
            secret = f"{username}:{password}"
            self.challenge = f'Basic realm="{REALM}", charset="UTF-8"'
        else:
            secret = auth.resolve()
            self.challenge = f'Bearer realm="{REALM}"'
        self._expected = _digest(secret.encode("utf-8"))
        self.open_paths = OPEN_PATHS | ({"/metrics"} if public_metrics else set())
        self.failures = failures or FailedLogins()
        self._log_throttle = Throttle(60.0)

    @classmethod
    def for_settings(cls, http: HttpSettings) -> HttpGuard | None:
        """The guard ``[http]`` asks for; None when it has no ``auth`` (every request is served)."""
        if http.auth is None:
            return None
        return cls(http.auth, public_metrics=http.public_metrics)

    def refusal(self, path: str, authorization: str | None, client: str) -> Refusal | None:
        """Why a request for *path* with this ``Authorization`` header from *client* is refused, or None.

        Parameters
        ----------
        path : str
            The request's path, without the query (as routed).
        authorization : str or None
            The ``Authorization`` header, None when there is none.
        client : str
            The client's address.
        """
        if path in self.open_paths:
            return None
        blocked = self.failures.blocked_for(client)
        if blocked > 0:
            seconds = max(1, round(blocked))
            return Refusal(HTTPStatus.TOO_MANY_REQUESTS, f"too many failed logins from this address: try again "
                           f"in {seconds} s", {"Retry-After": str(seconds)})
        if authorization is None:
            log.debug("HTTP %r from %s: no credentials (401, challenge sent)", path[:200], client)
            return Refusal(HTTPStatus.UNAUTHORIZED, "credentials required", {"WWW-Authenticate": self.challenge})
        if self._matches(authorization):
            self.failures.succeeded(client)
            return None
        self._failed(path, client)
        challenge = self.challenge + (', error="invalid_token"' if self.kind == "bearer" else "")
        return Refusal(HTTPStatus.UNAUTHORIZED, "wrong credentials", {"WWW-Authenticate": challenge})

    def _matches(self, authorization: str) -> bool:
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        given = b""
        if scheme.lower() == self.kind == "basic":
            try:
                given = base64.b64decode(value.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                given = b""
        elif scheme.lower() == self.kind == "bearer":
            given = value.encode("utf-8", "replace")
        # digests of equal length, compared in constant time: neither content nor length shows
        return hmac.compare_digest(_digest(given), self._expected) and bool(given)

    def _failed(self, path: str, client: str) -> None:
        blocks = self.failures.failed(client)
        held = self._log_throttle.ready(client)
        if held is not None:
            more = f" ({held} more from it since the last such line)" if held else ""
            log.warning("HTTP %r from %s: wrong credentials (401)%s", path[:200], client, more)
        if blocks:
            log.warning("HTTP: %d failed logins from %s within %g s: every request from it refused (429) for %g s",
                        self.failures.limit, client, self.failures.window, self.failures.block)
