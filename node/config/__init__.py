"""The service configuration: one TOML file, checked once at start-up into frozen dataclasses.

Every error names the file, the line and the key, e.g.::

    config/node.toml:23: destinations[1] (name "pacs").port: must be a whole number 1-65535, got "abc"

Items of ``[[pipelines]]``, ``[[destinations]]``, ``[[routes]]`` and of lists are counted from 1, as
they appear in the file. :mod:`tomllib` gives no line numbers, so :class:`_Lines` finds them in the
text; a key that is missing is reported at the line of its table's header.

The settings in ``[node]``, ``[http]`` and ``[delivery]`` are optional, each defaulting to the value in
the embedded default (``node/default.toml``; ``node.app.workers``: the number of CPUs, at most 4). In
``[[pipelines]]``, ``[[destinations]]`` and ``[[routes]]`` every key is required except
``output``, ``calling_ae_title``, ``auth``, ``timeout_seconds``, ``trigger``, the TLS keys of
dicom destinations, ``associations`` and ``ca_file`` (see ``config/node.toml``). A file without routes is
valid: the node then receives and spools, but processes nothing. Unknown keys are errors, so a
typo is never silently ignored.

Every time setting has a range (:data:`_TIME_SPANS`: the refusal says why), two listeners may not
share a port on overlapping addresses, and a route may not send PNG or volume (NIfTI, NumPy) output to a
DICOM or DICOMweb destination. ``load_config(path, check_machine=True)`` (``serve``, ``config check``) also checks
what only the machine can tell: host names, listener addresses, ``data_dir``, secrets.

``[[sources]]`` are DICOMweb archives the node polls (QIDO-RS, then WADO-RS; see
:mod:`node.receive.poller`): ``name``, ``kind = "dicomweb"``, ``url`` and exactly one of ``every_seconds``
and ``cron`` are required; ``level``, ``query``, ``lookback_hours``, ``late_arrival_hours``,
``auth``, ``page_size``, ``timeout_seconds`` and ``ca_file`` (``https://`` only) are optional.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import importlib.resources
import ipaddress
import json
import math
import os
import pwd
import re
import socket
import ssl
import stat
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, NoReturn
from urllib.parse import urlsplit

from apscheduler.triggers.cron import CronTrigger
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword
from pydicom.multival import MultiValue

from node.net.tls import TlsFileError, client_context, https_server_context, server_context
from node.config.file_names import PNG_FIELDS, template_fields, template_problem
from node.config.pipeline import OutputFormat, Pipeline, PipelineError, parse_steps

__all__ = [
    "EMBEDDED_SOURCE",
    "BasicAuth",
    "BearerAuth",
    "Config",
    "ConfigError",
    "DeliverySettings",
    "Destination",
    "DicomDestination",
    "DicomWebDestination",
    "DicomWebSource",
    "FolderDestination",
    "HttpSettings",
    "NodeSettings",
    "StoreSettings",
    "Route",
    "load_config",
]

EMBEDDED_SOURCE = "<embedded default>"
"""The :attr:`Config.source` of the configuration built into the package (``node/default.toml``)."""

RESOLVE_TIMEOUT_SECONDS = 5.0
"""How long the check of this machine waits, at most, for the configured host names to resolve (all at once)."""


class ConfigError(ValueError):
    """A configuration that cannot work; the message starts with ``FILE:LINE: KEY:``."""


def _client_context(destination: DicomDestination) -> object:
    """The TLS context a DICOM destination will use (built here only to check its files)."""
    return client_context(ca_file=destination.ca_file, cert_file=destination.cert_file,
                          key_file=destination.key_file, host=destination.host)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class NodeSettings:
    """The DICOM listener and the node's own storage.

    Attributes
    ----------
    ae_title : str
        The node's AE title (also the default calling AE title towards DICOM destinations).
    host : str
        Address the DICOM listener binds to.
    port : int
        DICOM listener port; 0 means no plain (non-TLS) listener.
    data_dir : Path
        Absolute folder for the spool, the job store and the default output.
    allowed_calling_aets : tuple of str
        Calling AE titles that may associate; empty means any.
    max_associations : int
        Concurrent associations accepted.
    settle_seconds : float
        Quiet time after the last instance of a series before the series is processed.
    workers : int
        Processing worker processes (:mod:`node.app.workers`).
    retention_hours : float
        Delivered, unrouted and discarded series (spool files, outputs, records) are removed this
        long after their last change; 0: kept for ever.
    max_processing_attempts : int
        A series whose processing did not finish this many times (its worker was killed, e.g. out
        of memory, or timed out) is failed instead of being queued again.
    processing_timeout_seconds : float
        A series still being processed after this long has its worker process killed (and is
        given back to the queue, or failed once it has used up its attempts).
    shared_dir : Path or None
        Spool and outputs, mounted by every machine of a scaled-out node (NFS); None: ``data_dir``.
    association_timeout_seconds : float
        A connection that has not sent a complete A-ASSOCIATE-RQ (after its TLS handshake, over TLS)
        this many seconds after it was accepted is closed (see :mod:`node.receive.guard`).
    max_negotiating_connections : int
        Connections still negotiating at once (they do not count against ``max_associations``);
        a connection beyond it is refused at once.
    max_connections_per_address : int
        Connections from one address at once, negotiating or associated; 0: no limit.
    max_decoded_mb, max_frame_mb : int
        Decode limits (MB): an image whose pixels would decode to more, in all or in one frame,
        is refused at C-STORE (0xC000) and fails processing, before anything is decoded
        (:class:`node.imaging.source.DecodeLimits`).
    unrouted : str
        What becomes of a series no route matches: ``keep`` (state ``unrouted``, a WARNING, kept
        until ``retention_hours``) or ``discard`` (state ``discarded``: its spool files removed at
        once, one INFO line, its record kept until ``retention_hours``).
    failed_retention_hours : float
        Failed series (their spool files, outputs and records) are removed this long after they
        failed; 0: kept for ever (``dicom-node retry`` can still run them).
    """

    ae_title: str
    host: str
    port: int
    data_dir: Path
    allowed_calling_aets: tuple[str, ...]
    max_associations: int
    settle_seconds: float
    workers: int
    min_free_disk_mb: int = 512
    retention_hours: float = 72.0
    study_settle_seconds: float = 120.0
    force_complete_seconds: float = 3600.0
    max_processing_attempts: int = 2
    processing_timeout_seconds: float = 3600.0
    shared_dir: Path | None = None
    association_timeout_seconds: float = 5.0
    max_negotiating_connections: int = 64
    max_connections_per_address: int = 0
    max_decoded_mb: int = 2048
    max_frame_mb: int = 256
    unrouted: str = "keep"
    failed_retention_hours: float = 0.0

    @property
    def shared(self) -> Path:
        """The folder of the spool and the outputs: ``shared_dir``, or ``data_dir`` on one machine."""
        return self.shared_dir or self.data_dir


@dataclass(frozen=True)
class TlsSettings:
    """The DICOM TLS listener beside the plain one (PS3.15 B.1: TLS 1.2 or later).

    Attributes
    ----------
    port : int
        TLS listener port.
    cert_file, key_file : Path
        The node's certificate chain and private key (PEM).
    ca_file : Path or None
        When set, a client must present a certificate this CA signed.
    match_ae_title : bool
        When true (needs ``ca_file``), an association over TLS is kept only if its calling AE
        title is its client certificate's Common Name or one of the certificate's DNS names;
        otherwise it is aborted as soon as it is negotiated, before anything can be stored.
        Without it any certificate of the CA may use any AE title (``allowed_calling_aets``
        then trusts the title the peer claims).
    """

    port: int
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    match_ae_title: bool = False


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP (status/API) listener and who may read it.

    Attributes
    ----------
    host : str
        Address to bind to.
    port : int
        Port, 1-65535.
    auth : BasicAuth or BearerAuth or None
        The credentials every request needs, except ``/healthz``, ``/readyz`` (and ``/metrics``
        with *public_metrics*); None: no login (only on a loopback host, or *allow_anonymous*).
    public_metrics : bool
        ``/metrics`` is served without credentials (it holds counts, no patient data).
    allow_anonymous : bool
        A host that is not a loopback address may be served without *auth*, on purpose.
    cert_file, key_file : pathlib.Path or None
        HTTPS (TLS 1.2 or later) with this certificate chain and key; None: plain HTTP.
    """

    host: str
    port: int
    auth: BasicAuth | BearerAuth | None = None
    public_metrics: bool = False
    allow_anonymous: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class StoreSettings:
    """Where the job store lives: SQLite in ``data_dir`` (the default), or a PostgreSQL shared by
    every receiver and worker of a site (:mod:`node.store.database`).

    Attributes
    ----------
    url : str or None
        ``postgresql://USER@HOST:PORT/DATABASE``; None: SQLite in ``data_dir``.
    password_env : str or None
        The environment variable holding the database password (never in the file).
    stalled_seconds : float
        A worker whose heartbeat (every third of this) has stopped this long is taken for dead,
        and its jobs are run again by another worker.
    where : str
        ``FILE:LINE`` of ``[store]``, for messages at run time.
    """

    url: str | None = None
    password_env: str | None = None
    stalled_seconds: float = 30.0
    where: str = ""

    def password(self) -> str | None:
        """The password from the environment (None when ``password_env`` is not set).

        Raises
        ------
        ConfigError
            The variable is named but not set, or empty.
        """
        if self.password_env is None:
            return None
        return _read_env(self.password_env, "the job store's password", self.where)


@dataclass(frozen=True)
class DeliverySettings:
    """Retries of failed deliveries: exponential backoff with a ceiling.

    Attributes
    ----------
    max_attempts : int
        Attempts in all, the first one included (>= 1).
    backoff_seconds : float
        Delay before the first retry; it doubles with each further attempt.
    max_backoff_seconds : float
        The longest delay between two attempts.
    """

    max_attempts: int = 8
    backoff_seconds: float = 2.0
    max_backoff_seconds: float = 300.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number *attempt* (counted from 1).

        Parameters
        ----------
        attempt : int
            The attempt that just failed, 1 for the first.

        Returns
        -------
        float
            ``min(max_backoff_seconds, backoff_seconds * 2 ** (attempt - 1))``.
        """
        exponent = max(0, attempt - 1)
        if exponent > 1000:  # 2.0 ** 1024 overflows; the ceiling has long been reached
            return self.max_backoff_seconds
        return min(self.max_backoff_seconds, self.backoff_seconds * 2.0**exponent)


def _read_env(name: str, what: str, where: str) -> str:
    value = os.environ.get(name)
    prefix = f"{where}: " if where else ""
    if value is None:
        raise ConfigError(f"{prefix}environment variable {name} ({what}) is not set")
    if value == "":
        raise ConfigError(f"{prefix}environment variable {name} ({what}) is empty")
    return value


@dataclass(frozen=True)
class BasicAuth:
    """HTTP basic authentication; the password is read from the environment when used.

    Attributes
    ----------
    username : str
        The user name.
    password_env : str
        Name of the environment variable that holds the password.
    where : str
        ``FILE:LINE: KEY`` of the ``password_env`` key, for messages (not compared).
    """

    username: str
    password_env: str
    where: str = field(default="", compare=False, repr=False)

    def resolve(self) -> tuple[str, str]:
        """Read the password now.

        Returns
        -------
        tuple of str
            ``(username, password)``.

        Raises
        ------
        ConfigError
            The variable is unset or empty; the message names it.
        """
        return self.username, _read_env(self.password_env, "password for basic auth", self.where)


@dataclass(frozen=True)
class BearerAuth:
    """HTTP bearer-token authentication; the token is read from the environment when used.

    Attributes
    ----------
    token_env : str
        Name of the environment variable that holds the token.
    where : str
        ``FILE:LINE: KEY`` of the ``token_env`` key, for messages (not compared).
    """

    token_env: str
    where: str = field(default="", compare=False, repr=False)

    def resolve(self) -> str:
        """Read the token now.

        Returns
        -------
        str
            The bearer token.

        Raises
        ------
        ConfigError
            The variable is unset or empty; the message names it.
        """
        return _read_env(self.token_env, "bearer token", self.where)


@dataclass(frozen=True)
class DicomDestination:
    """A DICOM peer reached with C-STORE.

    Attributes
    ----------
    name : str
        Name used by routes.
    host : str
        Peer host name or address.
    port : int
        Peer port, 1-65535.
    ae_title : str
        The peer's (called) AE title.
    calling_ae_title : str
        Our AE title towards this peer (default: ``node.ae_title``).
    tls, ca_file, cert_file, key_file
        DICOM over TLS towards the peer (see :mod:`node.net.tls`).
    associations : int
        Associations one delivery uses at once (1-16), its files split between them.
    concurrency : int
        Deliveries to this destination in flight at once (1-16; its own lane: see :mod:`node.deliver.lanes`).
    """

    kind: ClassVar[str] = "dicom"
    name: str
    host: str
    port: int
    ae_title: str
    calling_ae_title: str
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    associations: int = 1
    concurrency: int = 1


@dataclass(frozen=True)
class DicomWebDestination:
    """A DICOMweb server reached with STOW-RS.

    Attributes
    ----------
    name : str
        Name used by routes.
    url : str
        The service root, ``http://`` or ``https://``.
    auth : BasicAuth or BearerAuth or None
        How to authenticate, if at all.
    timeout_seconds : float
        Timeout of one HTTP request.
    ca_file : Path or None
        ``https://`` only: trust this CA (PEM) for the server's certificate instead of the
        system's store (a hospital PKI).
    concurrency : int
        Deliveries to this destination in flight at once (1-16).
    """

    kind: ClassVar[str] = "dicomweb"
    name: str
    url: str
    auth: BasicAuth | BearerAuth | None = None
    timeout_seconds: float = 30.0
    ca_file: Path | None = None
    concurrency: int = 1


@dataclass(frozen=True)
class FolderDestination:
    """A folder the output files are copied into.

    Attributes
    ----------
    name : str
        Name used by routes.
    path : Path
        Absolute folder.
    concurrency : int
        Deliveries to this folder in flight at once (1-16).
    file_names : str or None
        Template naming each output from its header (:mod:`node.config.file_names`), or None for the
        outputs' own names.
    """

    kind: ClassVar[str] = "folder"
    name: str
    path: Path
    concurrency: int = 1
    file_names: str | None = None


Destination = DicomDestination | DicomWebDestination | FolderDestination
"""Any destination."""


@dataclass(frozen=True)
class DicomWebSource:
    """A DICOMweb archive polled for new series (QIDO-RS to find them, WADO-RS to fetch them).

    Attributes
    ----------
    name : str
        Name of the source (logs, the job store's ``calling_ae`` ``dicomweb:<name>``, the watermark key).
    url : str
        The service root, ``http://`` or ``https://``.
    every_seconds : float or None
        Poll at this interval (>= 1); None when :attr:`cron` is given.
    cron : str or None
        Poll on this crontab schedule (5 fields, the local time zone); None when :attr:`every_seconds` is given.
    level : str
        ``"series"``: QIDO-RS for series directly; ``"study"``: for studies, then each study's series.
    query : tuple of (keyword, value)
        Further QIDO-RS matching keys (DICOM keywords, text values), sent with every query at
        :attr:`level`; the StudyDate range is the poller's own.
    lookback_hours : float
        How far back (StudyDate) the first poll looks.
    late_arrival_hours : float
        Later polls start this long before the saved watermark, so a study that reaches the
        archive up to this long after its StudyDate (e.g. an outside study imported days later)
        is still found. Larger values make every query return more series.
    auth : BasicAuth or BearerAuth or None
        How to authenticate, if at all.
    page_size : int
        QIDO-RS ``limit``; pages are asked with ``offset`` until a short page.
    timeout_seconds : float
        Timeout of one HTTP request.
    ca_file : Path or None
        ``https://`` only: trust this CA (PEM) for the archive's certificate instead of the
        system's store.
    """

    kind: ClassVar[str] = "dicomweb"
    name: str
    url: str
    every_seconds: float | None = None
    cron: str | None = None
    level: str = "series"
    query: tuple[tuple[str, str], ...] = ()
    lookback_hours: float = 24.0
    late_arrival_hours: float = 24.0
    auth: BasicAuth | BearerAuth | None = None
    page_size: int = 100
    timeout_seconds: float = 30.0
    ca_file: Path | None = None

    def filters(self) -> dict[str, str]:
        """:attr:`query` as a dict (QIDO-RS search filters)."""
        return dict(self.query)

    def schedule_text(self) -> str:
        """``every 60 s`` or ``cron "*/5 * * * *"``, for logs."""
        return f"every {self.every_seconds:g} s" if self.every_seconds is not None else f"cron {self.cron!r}"


def element_text(value: Any) -> str:
    """The text a route's ``match`` patterns are compared with: a data element's value as a string
    (multiple values joined with backslashes, as DICOM writes them; None as empty)."""
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join("" if v is None else str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class Route:
    """Which series go through which pipeline to which destinations.

    Attributes
    ----------
    match : tuple of (keyword, patterns)
        Every keyword must match one of its :func:`fnmatch.fnmatchcase` patterns; empty matches all.
    pipeline : str
        Name of the pipeline.
    destinations : tuple of str
        Names of the destinations (an empty tuple sends nowhere).
    trigger : str
        ``series``: process each series once it settles; ``study``: once the whole study has
        settled (``study_settle_seconds``), every series of it.
    action : str
        ``process`` (through *pipeline* to *destinations*) or ``discard``: a matched series is
        dropped once it settles (its spool files removed, state ``discarded``); a discard route
        has no pipeline (``""``) and no destinations.
    """

    match: tuple[tuple[str, tuple[str, ...]], ...]
    pipeline: str
    destinations: tuple[str, ...]
    trigger: str = "series"
    action: str = "process"

    @property
    def discards(self) -> bool:
        """Whether the series this route matches are dropped instead of processed."""
        return self.action == "discard"

    def matches(self, ds: Dataset) -> bool:
        """Whether *ds* (any instance of the series) is taken by this route.

        Each element's ``str(value)`` (values of a multi-valued element joined with ``\\``) is
        compared case-sensitively with the glob patterns; an attribute that is absent matches
        only the pattern ``""``.

        Parameters
        ----------
        ds : pydicom.Dataset
            The dataset to test.

        Returns
        -------
        bool
            True when every keyword matches one of its patterns.
        """
        for keyword, patterns in self.match:
            if keyword not in ds:
                if "" not in patterns:
                    return False
                continue
            text = element_text(ds[keyword].value)
            if not any(fnmatchcase(text, pattern) for pattern in patterns):
                return False
        return True


@dataclass(frozen=True)
class Config:
    """The whole checked configuration.

    Attributes
    ----------
    node : NodeSettings
        The DICOM listener and storage.
    http : HttpSettings
        The HTTP listener.
    delivery : DeliverySettings
        Retry policy.
    pipelines : Mapping of str to Pipeline
        Pipelines by name (read-only, in file order).
    destinations : Mapping of str to Destination
        Destinations by name (read-only, in file order).
    routes : tuple of Route
        Routes in file order; the first that matches wins.
    source : str
        The file the configuration came from, or ``"<embedded default>"``.
    tls : TlsSettings or None
        The DICOM TLS listener, when configured.
    sources : Mapping of str to DicomWebSource
        DICOMweb archives polled for new series, by name (read-only, in file order; empty by default).
    store : StoreSettings
        Where the job store lives (``[store]``; SQLite in ``data_dir`` by default).
    """

    node: NodeSettings
    http: HttpSettings
    delivery: DeliverySettings
    pipelines: Mapping[str, Pipeline]
    destinations: Mapping[str, Destination]
    routes: tuple[Route, ...]
    source: str
    sources: Mapping[str, DicomWebSource] = field(default_factory=lambda: MappingProxyType({}))
    tls: TlsSettings | None = None
    store: StoreSettings = StoreSettings()

    def __reduce__(self) -> tuple[Callable[..., Config], tuple[dict[str, Any]]]:
        """Pickle support (read-only mappings become dicts and back): worker processes get the config."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _config_from_fields, ({k: dict(v) if isinstance(v, MappingProxyType) else v for k, v in fields.items()},)

    def route_for(self, ds: Dataset) -> Route | None:
        """The first route that matches *ds*, or None.

        Parameters
        ----------
        ds : pydicom.Dataset
            The dataset to route.

        Returns
        -------
        Route or None
            The route, or None when no route matches.
        """
        for route in self.routes:
            if route.matches(ds):
                return route
        return None


def _config_from_fields(fields: dict[str, Any]) -> Config:
    """The :class:`Config` of pickled *fields* (see :meth:`Config.__reduce__`)."""
    return Config(**{k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in fields.items()})


# --------------------------------------------------------------------------- line numbers


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", "e": "\x1b", '"': '"', "\\": "\\"}

_KeyPath = tuple[str | int, ...]


class _Lines:
    """Line numbers of the tables, keys and array items of a TOML text that tomllib accepted.

    Paths are tuples of keys and 0-based array indices, as in the parsed data:
    ``("destinations", 0, "port")``, ``("routes", 1, "match", "Modality", 2)``.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.found: dict[_KeyPath, int] = {}
        self._tables_arrays: dict[_KeyPath, int] = {}  # [[x]] path -> index of its last table
        try:
            self._document()
        except (IndexError, ValueError):  # never expected after tomllib; keep what was found
            pass

    def line_of(self, path: Iterable[str | int]) -> int:
        """The line of *path*, else of its nearest enclosing table or key, else 1."""
        key = tuple(path)
        while key:
            if key in self.found:
                return self.found[key]
            key = key[:-1]
        return 1

    # scanning ---------------------------------------------------------------

    def _peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def _advance(self, n: int = 1) -> None:
        self.line += self.text.count("\n", self.pos, self.pos + n)
        self.pos += n

    def _skip(self, newlines: bool) -> None:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t":
                self._advance()
            elif char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif newlines and char in "\r\n":
                self._advance()
            else:
                return

    def _record(self, path: _KeyPath, line: int) -> None:
        for n in range(1, len(path) + 1):
            self.found.setdefault(path[:n], line)

    def _document(self) -> None:
        table: _KeyPath = ()
        while True:
            self._skip(newlines=True)
            if self.pos >= len(self.text):
                return
            start, line = self.pos, self.line
            if self._peek(2) == "[[":
                self._advance(2)
                keys = self._key()
                self._skip(newlines=False)
                self._advance(2)
                array = self._resolve(keys[:-1]) + (keys[-1],)
                index = self._tables_arrays.get(array, -1) + 1
                self._tables_arrays[array] = index
                table = array + (index,)
                self._record(table, line)
                self.found[table] = line
            elif self._peek() == "[":
                self._advance()
                keys = self._key()
                self._skip(newlines=False)
                self._advance()
                table = self._resolve(keys)
                self._record(table, line)
                self.found[table] = line  # the header, even if [table.sub] came first
            else:
                self._key_value(table)
            if self.pos == start:
                raise ValueError("no progress")

    def _resolve(self, keys: Sequence[str]) -> _KeyPath:
        path: _KeyPath = ()
        for key in keys:
            path = path + (key,)
            if path in self._tables_arrays:
                path = path + (self._tables_arrays[path],)
        return path

    def _key(self) -> list[str]:
        keys = []
        while True:
            self._skip(newlines=False)
            char = self._peek()
            if char in ('"', "'"):
                keys.append(self._string())
            else:
                match = _BARE_KEY.match(self.text, self.pos)
                if not match:
                    raise ValueError("not a key")
                keys.append(match.group())
                self._advance(match.end() - self.pos)
            self._skip(newlines=False)
            if self._peek() != ".":
                return keys
            self._advance()

    def _key_value(self, table: _KeyPath) -> None:
        line = self.line
        path = table + tuple(self._key())
        self._skip(newlines=False)
        if self._peek() != "=":
            raise ValueError("no =")
        self._advance()
        self._skip(newlines=False)
        self._record(path, line)
        self._value(path)

    def _string(self) -> str:
        """Skip a string; return its value (single-line strings only, for keys)."""
        quote = self._peek()
        if self._peek(3) == quote * 3:
            self._advance(3)
            while self.pos < len(self.text):
                if quote == '"' and self._peek() == "\\":
                    self._advance(2)
                elif self._peek(3) == quote * 3:
                    self._advance(3)
                    extra = 0
                    while extra < 2 and self._peek() == quote:
                        self._advance()
                        extra += 1
                    return ""
                else:
                    self._advance()
            return ""
        self._advance()
        out = []
        while self.pos < len(self.text):
            char = self._peek()
            if char == quote:
                self._advance()
                return "".join(out)
            if char == "\\" and quote == '"':
                code = self.text[self.pos + 1]
                if code in "uU":
                    digits = 4 if code == "u" else 8
                    out.append(chr(int(self.text[self.pos + 2 : self.pos + 2 + digits], 16)))
                    self._advance(2 + digits)
                    continue
                out.append(_ESCAPES.get(code, code))
                self._advance(2)
                continue
            out.append(char)
            self._advance()
        return "".join(out)

    def _value(self, path: _KeyPath) -> None:
        char = self._peek()
        if char in ('"', "'"):
            self._string()
        elif char == "[":
            self._advance()
            index = 0
            while True:
                self._skip(newlines=True)
                if self.pos >= len(self.text) or self._peek() == "]":
                    self._advance()
                    return
                start = self.pos
                self._record(path + (index,), self.line)
                self._value(path + (index,))
                index += 1
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._advance()
                elif self.pos == start:
                    raise ValueError("no progress")
        elif char == "{":
            self._advance()
            while True:
                self._skip(newlines=True)
                if self.pos >= len(self.text) or self._peek() == "}":
                    self._advance()
                    return
                start = self.pos
                self._key_value(path)
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._advance()
                elif self.pos == start:
                    raise ValueError("no progress")
        else:  # number, bool, date-time: up to the next delimiter
            end = self.pos
            while end < len(self.text) and self.text[end] not in ",]}#\r\n":
                end += 1
            self._advance(end - self.pos)


# --------------------------------------------------------------------------- checking


_REQUIRED: Any = object()
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOP_KEYS = ("node", "http", "tls", "delivery", "store", "pipelines", "destinations", "routes", "sources")
_NODE_KEYS = (
    "ae_title", "host", "port", "data_dir", "allowed_calling_aets", "max_associations",
    "settle_seconds", "workers", "min_free_disk_mb", "retention_hours", "study_settle_seconds",
    "force_complete_seconds", "max_processing_attempts", "processing_timeout_seconds", "shared_dir",
    "association_timeout_seconds", "max_negotiating_connections", "max_connections_per_address",
    "max_decoded_mb", "max_frame_mb", "unrouted", "failed_retention_hours",
)
_UNROUTED_CHOICES = ("keep", "discard")
_ROUTE_ACTIONS = ("process", "discard")
_DESTINATION_KEYS = {
    "dicom": ("name", "kind", "host", "port", "ae_title", "calling_ae_title", "tls", "ca_file", "cert_file",
              "key_file", "associations", "concurrency"),
    "dicomweb": ("name", "kind", "url", "auth", "timeout_seconds", "ca_file", "concurrency"),
    "folder": ("name", "kind", "path", "concurrency", "file_names"),
}
_AUTH_KEYS = {"basic": ("kind", "username", "password_env"), "bearer": ("kind", "token_env")}
_SOURCE_KEYS = {
    "dicomweb": ("name", "kind", "url", "every_seconds", "cron", "level", "query", "lookback_hours",
                 "late_arrival_hours", "auth", "page_size", "timeout_seconds", "ca_file"),
}
_SOURCE_LEVELS = ("series", "study")
# Matching keys the poller sets itself, and series-level keys a study-level query cannot use.
_SOURCE_OWN_KEYS = ("StudyDate",)
_STUDY_LEVEL_INSTEAD = {"Modality": "ModalitiesInStudy", "SOPClassUID": "SOPClassesInStudy"}
_UNMATCHABLE_VRS = {"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"}


@dataclass(frozen=True)
class _TimeSpan:
    """The values a time setting accepts, and why no others (said in the error message)."""

    low: float
    high: float
    unit: str  # "seconds" or "hours"
    why: str
    zero: str = ""  # what 0 means, when 0 is accepted besides low-high
    low_text: str = ""  # low as written in the message, when {low:g} would not say it well

    def accepts(self, value: Any) -> bool:
        return _is_number(value) and (self.low <= value <= self.high or (bool(self.zero) and value == 0))

    def refusal(self, value: Any) -> str:
        span = f"a number of {self.unit} from {self.low_text or f'{self.low:g}'} to {self.high:g}"
        return f"must be {f'0 ({self.zero}) or ' if self.zero else ''}{span} ({self.why}), got {_show(value)}"


# Every time setting of the file, by key (timeout_seconds: of destinations and sources alike).
_TIME_SPANS = {
    "settle_seconds": _TimeSpan(
        0.1, 86400, "seconds", "under 0.1 s a series is split wherever its sender pauses, and the idle node "
        "spends its CPU looking for quiet series; over a day (86400) a finished series waits that long"),
    "study_settle_seconds": _TimeSpan(
        0.1, 86400, "seconds", "under 0.1 s a study is split wherever its sender pauses; over a day (86400) "
        "a finished study waits that long"),
    "force_complete_seconds": _TimeSpan(
        1, 604800, "seconds", "under 1 s series are processed in pieces while they arrive; over a week "
        "(604800) a series that never goes quiet waits that long"),
    "retention_hours": _TimeSpan(
        1 / 3600, 87600, "hours", "the clean-up runs at most once a second; over 10 years (87600): use 0",
        zero="keep for ever", low_text="0.000278 (1 s)"),
    "failed_retention_hours": _TimeSpan(
        1 / 3600, 87600, "hours", "the clean-up runs at most once a second; over 10 years (87600): use 0",
        zero="keep for ever", low_text="0.000278 (1 s)"),
    "backoff_seconds": _TimeSpan(
        0.1, 3600, "seconds", "under 0.1 s a failing destination is retried in a tight loop; over an hour "
        "(3600) the first retry comes too late"),
    "max_backoff_seconds": _TimeSpan(
        0.1, 86400, "seconds", "under 0.1 s a failing destination is retried in a tight loop; over a day "
        "(86400) a destination that is back waits that long"),
    "timeout_seconds": _TimeSpan(
        1, 3600, "seconds", "under 1 s requests to a working server time out; over an hour (3600) a server "
        "that hangs holds a sender that long"),
    "every_seconds": _TimeSpan(
        1, 604800, "seconds", "more often than every second floods the archive with queries; for less often "
        "than weekly (604800) use cron"),
    "lookback_hours": _TimeSpan(
        1, 876000, "hours", "the query matches StudyDate in whole days, so less than 1 looks back no less; "
        "over 100 years (876000) is no date at all"),
    "late_arrival_hours": _TimeSpan(
        0, 87600, "hours", "over 10 years (87600) every poll asks the archive for a decade of studies"),
    "stalled_seconds": _TimeSpan(
        1, 3600, "seconds", "under 1 s a busy worker is taken for dead; over an hour (3600) the jobs of a dead "
        "worker wait that long"),
    "processing_timeout_seconds": _TimeSpan(
        1, 604800, "seconds", "under 1 s no series finishes; over a week (604800) a stuck worker is never "
        "noticed"),
    "association_timeout_seconds": _TimeSpan(
        1, 300, "seconds", "under 1 s a sender on a slow or lossy network is cut off while it negotiates; "
        "over 300 s a silent connection holds its place that long"),
}


def _show(value: Any) -> str:
    """A value much as TOML would write it (strings in double quotes), for messages."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _ae_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {_show(value)}"
    if not value:
        return "must not be empty"
    if len(value) > 16:
        return f"must be at most 16 characters, got {len(value)}: {_show(value)}"
    if not value.strip(" "):
        return "must not be all spaces"
    if "\\" in value:
        return f"must not contain a backslash, got {_show(value)}"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"must not contain control characters, got {_show(value)}"
    if not value.isascii():
        return f"must be ASCII, got {_show(value)}"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- this machine


def _addresses(host: str) -> tuple[str, ...]:
    """The addresses of *host* in getaddrinfo's order (an IP address is its own, without a name server)."""
    return tuple(dict.fromkeys(str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)))


def _resolve_hosts(hosts: Iterable[str], timeout: float,
                   resolve: Callable[[str], tuple[str, ...]] = _addresses) -> dict[str, tuple[str, ...] | str]:
    """Resolve every host at once, each in a daemon thread, waiting *timeout* seconds in all.

    Parameters
    ----------
    hosts : iterable of str
        Host names or addresses.
    timeout : float
        Seconds to wait for all of them.
    resolve : callable
        Host to its addresses (getaddrinfo by default).

    Returns
    -------
    dict
        Each host's addresses, or why it has none. A lookup still unanswered at the deadline is left
        to end on its own: getaddrinfo cannot be interrupted, and a daemon thread does not keep the
        process alive.
    """
    results: dict[str, tuple[str, ...] | str] = {}

    def lookup(host: str) -> None:
        try:
            results[host] = resolve(host) or "no address"
        except socket.gaierror as exc:
            results[host] = exc.strerror or str(exc)
        except (OSError, ValueError) as exc:  # ValueError: a name the IDNA codec refuses (label too long)
            results[host] = str(exc)

    unique = list(dict.fromkeys(hosts))
    threads = [threading.Thread(target=lookup, args=(host,), name="resolve", daemon=True) for host in unique]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    late = f"no answer within {timeout:g} s (the name server is slow or cannot be reached)"
    return {host: results.get(host, late) for host in unique}


def _bind_address(addresses: Sequence[str]) -> str:
    """The address a listener binds for a host with *addresses*: the first IPv4 one, else the first (as
    pynetdicom does)."""
    return next((a for a in addresses if ":" not in a), addresses[0])


def _bind_problem(address: str) -> str | None:
    """Why a listener could not bind *address* (tried on an ephemeral port, closed at once), or None."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return "not an address of this machine (a listener can bind 0.0.0.0, :: or one of its own)"
            return exc.strerror or str(exc)
    return None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _overlap(a: str, b: str) -> str | None:
    """How two listeners' hosts share an address (then one port cannot serve both), or None.

    ``0.0.0.0`` takes every IPv4 address, ``::`` every address (Linux binds it dual-stack); a host
    name is compared as text unless it was resolved.
    """
    if a.lower() == b.lower() or (_ip(a) is not None and _ip(a) == _ip(b)):
        return f"both on {a}"
    for wild, other in ((a, b), (b, a)):
        address, other_address = _ip(wild), _ip(other)
        if address is None or not address.is_unspecified:
            continue
        if address.version == 6 or other_address is None or other_address.version == 4:
            return f"{wild} takes every address, {other} among them"
    return None


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _why_not(exc: OSError) -> str:
    """An OSError of creating or writing a folder, said for an operator."""
    reasons = {
        errno.EACCES: f"permission denied (the node runs as user {_user()})",
        errno.EPERM: f"not permitted (the node runs as user {_user()})",
        errno.EROFS: "read-only file system",
        errno.ENOSPC: "no space left on the device",
        errno.EEXIST: "a file is in the way",
        errno.ENOTDIR: "a file is in the way",
    }
    return reasons.get(exc.errno or 0, exc.strerror or str(exc))


def _nearest_existing(folder: Path) -> tuple[Path, bool, list[Path]]:
    """The nearest of *folder* and its parents that exists, whether it is a folder, and the missing
    ones below it (deepest first)."""
    missing = []
    for candidate in (folder, *folder.parents):
        try:
            mode = candidate.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            missing.append(candidate)
            continue
        except OSError:  # there, but we may not look: creating or writing in it will say why
            return candidate, True, missing
        return candidate, stat.S_ISDIR(mode), missing
    raise AssertionError(f"{folder} has no existing parent")  # the root always exists


def _file_in_the_way(folder: Path) -> Path | None:
    """The file (not a folder) at *folder* or at its nearest existing parent, if any."""
    existing, is_folder, _ = _nearest_existing(folder)
    return None if is_folder else existing


def _unwritable(folder: Path) -> str | None:
    """Why the node could not create *folder* or write a file in it, or None.

    Tried for real: the missing folders are made, a probe file is written and removed, then the
    folders made are removed again, so the check leaves nothing behind.
    """
    existing, is_folder, missing = _nearest_existing(folder)
    if not is_folder:
        return f"{folder} is a file, not a folder" if existing == folder else \
            f"cannot create {folder}: {existing} is a file, not a folder"
    made: list[Path] = []
    try:
        for candidate in reversed(missing):
            candidate.mkdir()
            made.append(candidate)
        handle, probe = tempfile.mkstemp(prefix=".dicom-node-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        if len(made) < len(missing):
            failed = missing[len(missing) - 1 - len(made)]
            return f"cannot create {failed} (in {failed.parent}): {_why_not(exc)}"
        return f"cannot write in {folder}: {_why_not(exc)}"
    finally:
        for candidate in reversed(made):
            with contextlib.suppress(OSError):
                candidate.rmdir()
    return None


def _system_trusts_some_ca() -> bool:
    """Whether OpenSSL's default store (SSL_CERT_FILE / SSL_CERT_DIR or the system's) holds any CA."""
    if ssl.create_default_context().cert_store_stats()["x509_ca"]:
        return True
    folder = ssl.get_default_verify_paths().capath  # certificates there are loaded when needed, not counted
    return bool(folder) and any(Path(folder).iterdir())


@dataclass(frozen=True)
class _Listener:
    """One listening socket of the node, with the keys that set it."""

    what: str
    host: str
    host_key: _KeyPath
    port: int
    port_key: _KeyPath


class _Checker:
    """Turns the parsed TOML into a :class:`Config`, failing with ``FILE:LINE: KEY: message``.

    With *machine*, what depends on this machine is checked too (see :func:`load_config`).
    """

    def __init__(self, source: str, text: str, data: dict[str, Any], base: Path, machine: bool = False) -> None:
        self.source = source
        self.text = text
        self.data = data
        self.base = base
        self.machine = machine
        self._lines: _Lines | None = None

    # messages ---------------------------------------------------------------

    def line(self, path: _KeyPath) -> int:
        if self._lines is None:
            self._lines = _Lines(self.text)
        return self._lines.line_of(path)

    def where(self, path: _KeyPath) -> str:
        """``destinations[1] (name "pacs").port``: 1-based items, named when they have a name."""
        out = ""
        for n, part in enumerate(path):
            if isinstance(part, int):
                out += f"[{part + 1}]"
                if n == 1 and path[0] in ("pipelines", "destinations", "sources"):
                    item = self.data.get(path[0])
                    item = item[part] if isinstance(item, list) and part < len(item) else None
                    name = item.get("name") if isinstance(item, dict) else None
                    if isinstance(name, str):
                        out += f" (name {_show(name)})"
            else:
                key = part if _BARE_KEY.fullmatch(part) else _show(part)
                out += f".{key}" if out else key
        return out

    def located(self, path: _KeyPath) -> str:
        return f"{self.source}:{self.line(path)}: {self.where(path)}"

    def fail(self, path: _KeyPath, message: str) -> NoReturn:
        raise ConfigError(f"{self.located(path)}: {message}")

    # generic checks ---------------------------------------------------------

    def table(
        self, parent: Mapping[str, Any], path: _KeyPath, key: str, required: bool = True
    ) -> dict[str, Any] | None:
        if key not in parent:
            if required:
                self.fail(path + (key,), f"missing table [{self.where(path + (key,))}]")
            return None
        value = parent[key]
        if not isinstance(value, dict):
            self.fail(path + (key,), f"must be a table, got {_show(value)}")
        return value

    def keys(self, table: Mapping[str, Any], path: _KeyPath, allowed: Sequence[str], required: Sequence[str]) -> None:
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                did = f" (did you mean {hint[0]!r}?)" if hint else ""
                self.fail(path + (key,), f"unknown key{did}; allowed keys: {', '.join(allowed)}")
        for key in required:
            if key not in table:
                self.fail(path + (key,), "missing (required)")

    def value(self, table: Mapping[str, Any], path: _KeyPath, key: str, default: Any = _REQUIRED) -> Any:
        if key in table:
            return table[key]
        if default is _REQUIRED:
            self.fail(path + (key,), "missing (required)")
        return default

    def integer(self, table: Mapping[str, Any], path: _KeyPath, key: str, low: int, high: int | None = None,
                default: Any = _REQUIRED, note: str = "") -> int:
        value = self.value(table, path, key, default)
        if not _is_int(value) or value < low or (high is not None and value > high):
            span = f"{low}-{high}" if high is not None else f">= {low}"
            self.fail(path + (key,), f"must be a whole number {span}{note}, got {_show(value)}")
        return value

    def number(self, table: Mapping[str, Any], path: _KeyPath, key: str, default: Any = _REQUIRED,
               above: float | None = None, at_least: float | None = None) -> float:
        value = self.value(table, path, key, default)
        bad = not _is_number(value)
        if not bad and above is not None and value <= above:
            bad = True
        if not bad and at_least is not None and value < at_least:
            bad = True
        if bad:
            limit = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
            self.fail(path + (key,), f"must be a number{limit}, got {_show(value)}")
        return float(value)

    def duration(self, table: Mapping[str, Any], path: _KeyPath, key: str, default: Any = _REQUIRED) -> float:
        """A time setting, within its :data:`_TIME_SPANS` entry (the refusal says why)."""
        value = self.value(table, path, key, default)
        span = _TIME_SPANS[key]
        if not span.accepts(value):
            self.fail(path + (key,), span.refusal(value))
        return float(value)

    def string(self, table: Mapping[str, Any], path: _KeyPath, key: str, default: Any = _REQUIRED) -> str:
        value = self.value(table, path, key, default)
        if not isinstance(value, str) or not value.strip():
            self.fail(path + (key,), f"must be a non-empty string, got {_show(value)}")
        return value

    def ae_title(self, table: Mapping[str, Any], path: _KeyPath, key: str, default: Any = _REQUIRED) -> str:
        value = self.value(table, path, key, default)
        problem = _ae_problem(value)
        if problem:
            self.fail(path + (key,), f"not a valid AE title: {problem}")
        return value.strip(" ")

    def boolean(self, table: Mapping[str, Any], path: _KeyPath, key: str, default: Any = _REQUIRED) -> bool:
        value = self.value(table, path, key, default)
        if not isinstance(value, bool):
            self.fail(path + (key,), f"must be true or false, got {_show(value)}")
        return value

    def folder(self, table: Mapping[str, Any], path: _KeyPath, key: str, default: Any = _REQUIRED) -> Path:
        text = self.string(table, path, key, default)
        folder = Path(text).expanduser()
        return folder if folder.is_absolute() else self.base / folder

    def name(self, table: Mapping[str, Any], path: _KeyPath, seen: dict[str, _KeyPath]) -> str:
        value = self.value(table, path, "name")
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            self.fail(path + ("name",), "must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                      f"letter or digit, got {_show(value)}")
        if value in seen:
            self.fail(path + ("name",), f"duplicate name {_show(value)} (also at line {self.line(seen[value])})")
        seen[value] = path + ("name",)
        return value

    def tables_array(self, key: str) -> list[dict[str, Any]]:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            self.fail((key,), f"must be an array of tables ([[{key}]]), got {_show(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                self.fail((key, index), f"must be a table, got {_show(item)}")
        return value

    # sections ---------------------------------------------------------------

    def check(self) -> Config:
        self.keys(self.data, (), _TOP_KEYS, ())
        node = self.node_settings()
        tls = self.tls_settings()
        http = self.http_settings()
        delivery = self.delivery_settings()
        pipelines = self.pipelines()
        destinations = self.destinations(node)
        routes = self.routes(pipelines, destinations)
        sources = self.sources()
        store = self.store_settings()
        config = Config(
            node=node,
            http=http,
            delivery=delivery,
            pipelines=MappingProxyType(pipelines),
            destinations=MappingProxyType(destinations),
            routes=routes,
            source=self.source,
            sources=MappingProxyType(sources),
            tls=tls,
            store=store,
        )
        addresses = self.resolved_hosts(config) if self.machine else {}
        self.listener_ports(config, addresses)
        if self.machine:
            self.this_machine(config, addresses)
        return config

    # across sections ----------------------------------------------------------

    @staticmethod
    def listeners(config: Config) -> list[_Listener]:
        """The node's listening sockets: plain DICOM, DICOM TLS (on [node] host), HTTP."""
        node, out = config.node, []
        if node.port:
            out.append(_Listener("the DICOM listener", node.host, ("node", "host"), node.port, ("node", "port")))
        if config.tls is not None:
            out.append(_Listener("the DICOM TLS listener", node.host, ("node", "host"), config.tls.port,
                                 ("tls", "port")))
        out.append(_Listener("the HTTP listener", config.http.host, ("http", "host"), config.http.port,
                             ("http", "port")))
        return out

    def in_file(self, path: _KeyPath) -> bool:
        table: Any = self.data
        for part in path:
            if not isinstance(table, dict) or part not in table:
                return False
            table = table[part]
        return True

    def listener_ports(self, config: Config, addresses: Mapping[str, str]) -> None:
        """Refuse two listeners on one port where their addresses overlap: the second could not bind it.

        *addresses* maps resolved host names to the address a listener binds; other hosts are
        compared as written.
        """
        listeners = self.listeners(config)
        for n, first in enumerate(listeners):
            for second in listeners[n + 1:]:
                how = _overlap(addresses.get(first.host, first.host), addresses.get(second.host, second.host))
                if first.port != second.port or how is None:
                    continue
                # report at the key written last (a port left at its default is not in the file)
                later, other = sorted((first, second), key=lambda x: (self.in_file(x.port_key),
                                                                      self.line(x.port_key)), reverse=True)
                at = f"line {self.line(other.port_key)}" if self.in_file(other.port_key) else "its default"
                self.fail(later.port_key, f"{later.port} is also {self.where(other.port_key)} ({at}, "
                          f"{other.what}), and their hosts overlap ({how}): {later.what} could not bind it; "
                          "give each listener its own port")

    def host_keys(self, config: Config) -> list[tuple[_KeyPath, str]]:
        """Every host name of the file with its key: listeners, DICOM destinations, DICOMweb URLs."""
        out = [(listener.host_key, listener.host) for listener in self.listeners(config)]
        for index, destination in enumerate(config.destinations.values()):
            if isinstance(destination, DicomDestination):
                out.append((("destinations", index, "host"), destination.host))
            elif isinstance(destination, DicomWebDestination):
                out.append((("destinations", index, "url"), urlsplit(destination.url).hostname or ""))
        for index, source in enumerate(config.sources.values()):
            out.append((("sources", index, "url"), urlsplit(source.url).hostname or ""))
        if config.store.url is not None:
            out.append((("store", "url"), urlsplit(config.store.url).hostname or ""))
        return list(dict.fromkeys(out))

    def resolved_hosts(self, config: Config) -> dict[str, str]:
        """Resolve every host of the file (RESOLVE_TIMEOUT_SECONDS at most, all at once); refuse the first
        that does not resolve. Returns each host's listening address."""
        keys = self.host_keys(config)
        found = _resolve_hosts([host for _, host in keys], RESOLVE_TIMEOUT_SECONDS)
        for path, host in keys:
            addresses = found[host]
            if isinstance(addresses, str):
                self.fail(path, f"host {_show(host)} does not resolve: {addresses}")
        return {host: _bind_address(addresses) for host, addresses in found.items() if not isinstance(addresses, str)}

    def this_machine(self, config: Config, addresses: Mapping[str, str]) -> None:
        """What only this machine can tell: listener addresses, data_dir, folders, CA store, secrets."""
        for listener in self.listeners(config):
            problem = _bind_problem(addresses[listener.host])
            if problem is not None:
                self.fail(listener.host_key, f"{listener.what} cannot listen on {_show(listener.host)} "
                          f"({addresses[listener.host]}): {problem}")
        self.http_exposure(config, addresses)
        problem = _unwritable(config.node.data_dir)
        if problem is not None:
            self.fail(("node", "data_dir"), problem)
        for index, destination in enumerate(config.destinations.values()):
            path: _KeyPath = ("destinations", index)
            if isinstance(destination, FolderDestination):
                blocking = _file_in_the_way(destination.path)
                if blocking is not None:
                    self.fail(path + ("path",), f"{blocking} is a file, not a folder: nothing can be delivered "
                              "there")
            if isinstance(destination, DicomDestination) and destination.tls and destination.ca_file is None:
                if not _system_trusts_some_ca():
                    self.fail(path + ("tls",), "without ca_file the peer's certificate is checked against "
                              "the system's CA certificates, and this machine has none (see SSL_CERT_FILE, "
                              "SSL_CERT_DIR): give ca_file, the CA that signed the peer's certificate")
        for item in (config.http, *config.destinations.values(), *config.sources.values()):
            auth = getattr(item, "auth", None)
            if auth is not None:
                auth.resolve()  # a ConfigError naming the variable and its line, as serve would give

    def node_settings(self) -> NodeSettings:
        path: _KeyPath = ("node",)
        table = self.table(self.data, (), "node", required=False) or {}
        self.keys(table, path, _NODE_KEYS, ())
        ae_title = self.ae_title(table, path, "ae_title", "DICOMNODE")
        host = self.string(table, path, "host", "0.0.0.0")
        port = self.integer(table, path, "port", 0, 65535, default=11112, note=" (0: no plain listener)")
        data_dir = self.folder(table, path, "data_dir", "var")
        aets = self.value(table, path, "allowed_calling_aets", [])
        if not isinstance(aets, list):
            self.fail(path + ("allowed_calling_aets",), f"must be a list of AE titles, got {_show(aets)}")
        allowed = []
        for index, aet in enumerate(aets):
            problem = _ae_problem(aet)
            if problem:
                self.fail(path + ("allowed_calling_aets", index), f"not a valid AE title: {problem}")
            allowed.append(aet.strip(" "))
        return NodeSettings(
            ae_title=ae_title,
            host=host,
            port=port,
            data_dir=data_dir,
            allowed_calling_aets=tuple(allowed),
            max_associations=self.integer(table, path, "max_associations", 1, default=10),
            settle_seconds=self.duration(table, path, "settle_seconds", 10.0),
            workers=self.integer(table, path, "workers", 1, default=min(4, os.cpu_count() or 1)),
            min_free_disk_mb=self.integer(table, path, "min_free_disk_mb", 0, default=512),
            retention_hours=self.duration(table, path, "retention_hours", 72.0),
            study_settle_seconds=self.duration(table, path, "study_settle_seconds", 120.0),
            force_complete_seconds=self.duration(table, path, "force_complete_seconds", 3600.0),
            max_processing_attempts=self.integer(table, path, "max_processing_attempts", 1, default=2),
            processing_timeout_seconds=self.duration(table, path, "processing_timeout_seconds", 3600.0),
            shared_dir=self.folder(table, path, "shared_dir") if "shared_dir" in table else None,
            association_timeout_seconds=self.duration(table, path, "association_timeout_seconds", 5.0),
            max_negotiating_connections=self.integer(table, path, "max_negotiating_connections", 1, 1000, default=64),
            max_connections_per_address=self.integer(table, path, "max_connections_per_address", 0, 1000, default=0,
                                                     note=" (0: no limit)"),
            max_decoded_mb=self.integer(table, path, "max_decoded_mb", 1, default=2048),
            max_frame_mb=self.integer(table, path, "max_frame_mb", 1, default=256),
            unrouted=self.choice(table, path, "unrouted", _UNROUTED_CHOICES, "keep"),
            failed_retention_hours=self.duration(table, path, "failed_retention_hours", 0.0),
        )

    def choice(self, table: Mapping[str, Any], path: _KeyPath, key: str, choices: Sequence[str], default: str) -> str:
        """The value of *key*, one of *choices* (*default* when absent)."""
        value = self.value(table, path, key, default)
        if value not in choices:
            self.fail(path + (key,), f"must be one of {', '.join(map(repr, choices))}, got {_show(value)}")
        return value

    def tls_settings(self) -> TlsSettings | None:
        path: _KeyPath = ("tls",)
        table = self.table(self.data, (), "tls", required=False)
        if table is None:
            return None
        self.keys(table, path, ("port", "cert_file", "key_file", "ca_file", "match_ae_title"),
                  ("port", "cert_file", "key_file"))
        settings = TlsSettings(
            port=self.integer(table, path, "port", 1, 65535),
            cert_file=self.existing_file(table, path, "cert_file"),
            key_file=self.existing_file(table, path, "key_file"),
            ca_file=self.existing_file(table, path, "ca_file") if "ca_file" in table else None,
            match_ae_title=self.boolean(table, path, "match_ae_title", False),
        )
        if settings.match_ae_title and settings.ca_file is None:
            self.fail(path + ("match_ae_title",), "needs ca_file: without client certificates there is nothing to match")
        self.usable_tls(path, lambda: server_context(settings))
        return settings

    def usable_tls(self, path: _KeyPath, load: Callable[[], object]) -> None:
        """Load TLS files now (*load* builds the context), so ``config check`` refuses what serve would.

        A file that exists but cannot be used (no PEM in it, a key that does not belong to the
        certificate, an encrypted key) is reported at its own key's line.
        """
        try:
            load()
        except TlsFileError as exc:
            self.fail(path + (exc.key,), str(exc))

    def kind(self, table: Mapping[str, Any], path: _KeyPath, keys_by_kind: Mapping[str, Sequence[str]]) -> str:
        """The table's ``kind``, one of *keys_by_kind*; without it a misspelt ``kind`` is named as such."""
        if "kind" not in table:
            every_key = tuple(dict.fromkeys(k for keys in keys_by_kind.values() for k in keys))
            self.keys(table, path, every_key, ())
        kind = self.value(table, path, "kind")
        if kind not in keys_by_kind:
            self.fail(path + ("kind",), f"must be one of {', '.join(keys_by_kind)}, got {_show(kind)}")
        return kind

    def http_url(self, table: Mapping[str, Any], path: _KeyPath) -> str:
        """The table's ``url``: ``http://`` or ``https://`` with a host."""
        url = self.string(table, path, "url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(path + ("url",), f"must be an http:// or https:// URL, got {_show(url)}")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65535:
            self.fail(path + ("url",), f"the port must be a whole number 1-65535, got {_show(url)}")
        if parts.username is not None or parts.password is not None:
            self.fail(path + ("url",), "must not hold a user name or password (they would be in logs): use auth")
        if parts.query or parts.fragment:
            self.fail(path + ("url",), f"must be the service root, without ?query or #fragment (the paths of "
                      f"the requests are appended to it), got {_show(url)}")
        return url

    def https_ca_file(self, table: Mapping[str, Any], path: _KeyPath, url: str) -> Path | None:
        """The optional ``ca_file`` of an ``https://`` URL (an error for ``http://``)."""
        if "ca_file" not in table:
            return None
        if urlsplit(url).scheme != "https":
            self.fail(path + ("ca_file",), "is for https:// URLs")
        return self.existing_file(table, path, "ca_file")

    def existing_file(self, table: Mapping[str, Any], path: _KeyPath, key: str) -> Path:
        file = self.folder(table, path, key)
        if not file.is_file():
            self.fail(path + (key,), f"no such file: {file}")
        return file

    def http_settings(self) -> HttpSettings:
        path: _KeyPath = ("http",)
        table = self.table(self.data, (), "http", required=False) or {}
        self.keys(table, path, ("host", "port", "auth", "public_metrics", "allow_anonymous", "cert_file",
                                "key_file"), ())
        settings = HttpSettings(
            host=self.string(table, path, "host", "127.0.0.1"),
            port=self.integer(table, path, "port", 1, 65535, default=8080),
            auth=self.auth(table, path),
            public_metrics=self.boolean(table, path, "public_metrics", False),
            allow_anonymous=self.boolean(table, path, "allow_anonymous", False),
            cert_file=self.existing_file(table, path, "cert_file") if "cert_file" in table else None,
            key_file=self.existing_file(table, path, "key_file") if "key_file" in table else None,
        )
        if settings.allow_anonymous and settings.auth is not None:
            self.fail(path + ("allow_anonymous",), "contradicts auth (every request needs credentials): "
                      "remove one of them")
        if (settings.cert_file is None) != (settings.key_file is None):
            given, missing = ("cert_file", "key_file") if settings.key_file is None else ("key_file", "cert_file")
            self.fail(path + (given,), f"HTTPS needs cert_file and key_file together: add {missing}")
        if settings.cert_file is not None:
            self.usable_tls(path, lambda: https_server_context(settings))
        return settings

    def http_exposure(self, config: Config, addresses: Mapping[str, str]) -> None:
        """Refuse an HTTP listener reachable from other machines without auth, unless allow_anonymous."""
        http = config.http
        address = addresses.get(http.host, http.host)
        ip = _ip(address)
        if http.auth is not None or http.allow_anonymous or (ip is not None and ip.is_loopback):
            return
        shown = _show(http.host) if address == http.host else f"{_show(http.host)} ({address})"
        self.fail(("http", "host"), f"{shown} is not a loopback address and [http] has no auth: anyone who "
                  "reaches it would see the status page and patient images; give [http] auth = { kind = "
                  '"basic", username = ..., password_env = ... } (or kind = "bearer", token_env = ...), '
                  "or allow_anonymous = true if that is meant")

    def store_settings(self) -> StoreSettings:
        path: _KeyPath = ("store",)
        table = self.table(self.data, (), "store", required=False)
        if table is None:
            return StoreSettings()
        self.keys(table, path, ("url", "password_env", "stalled_seconds"), ("url",))
        url = self.string(table, path, "url")
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.path.strip("/"):
            self.fail(path + ("url",), "must be postgresql://USER@HOST:PORT/DATABASE (leave [store] out for "
                      f"SQLite in data_dir), got {_show(url)}")
        if parts.password is not None:
            self.fail(path + ("url",), "must not hold a password: name an environment variable in password_env")
        password_env = self.env_name(table, path, "password_env") if "password_env" in table else None
        return StoreSettings(url=url, password_env=password_env,
                             stalled_seconds=self.duration(table, path, "stalled_seconds", 30.0),
                             where=self.located(path + ("password_env",)))

    def delivery_settings(self) -> DeliverySettings:
        path: _KeyPath = ("delivery",)
        table = self.table(self.data, (), "delivery", required=False) or {}
        self.keys(table, path, ("max_attempts", "backoff_seconds", "max_backoff_seconds"), ())
        default = DeliverySettings()
        settings = DeliverySettings(
            max_attempts=self.integer(table, path, "max_attempts", 1, default=default.max_attempts),
            backoff_seconds=self.duration(table, path, "backoff_seconds", default.backoff_seconds),
            max_backoff_seconds=self.duration(table, path, "max_backoff_seconds", default.max_backoff_seconds),
        )
        if settings.max_backoff_seconds < settings.backoff_seconds:
            self.fail(path + ("max_backoff_seconds",), f"must be >= backoff_seconds "
                      f"({settings.backoff_seconds:g}), got {settings.max_backoff_seconds:g}")
        return settings

    def pipelines(self) -> dict[str, Pipeline]:
        out: dict[str, Pipeline] = {}
        seen: dict[str, _KeyPath] = {}
        formats = [f.value for f in OutputFormat]
        for index, table in enumerate(self.tables_array("pipelines")):
            path: _KeyPath = ("pipelines", index)
            self.keys(table, path, ("name", "steps", "output", "keep_patient"), ("name", "steps"))
            name = self.name(table, path, seen)
            steps = table["steps"]
            if not isinstance(steps, list):
                self.fail(path + ("steps",), f"must be a list of steps ({{ op = ... }} tables), got {_show(steps)}")
            output = self.value(table, path, "output", "sc")
            if output not in formats:
                self.fail(path + ("output",), f"must be one of {', '.join(formats)}, got {_show(output)}")
            try:
                out[name] = parse_steps(name, steps, output)
            except PipelineError as exc:  # at the step's key when the error names one (a colour map's name)
                at = ("steps",) if exc.step is None else ("steps", exc.step) + ((exc.key,) if exc.key else ())
                self.fail(path + at, str(exc))
            if self.boolean(table, path, "keep_patient", False):
                if not out[name].output.is_volume:
                    self.fail(path + ("keep_patient",), f"is for volume outputs (nifti, npz) only; pipeline "
                              f"{_show(name)} writes output = {_show(output)}")
                out[name] = dataclasses.replace(out[name], keep_patient=True)
        return out

    def destinations(self, node: NodeSettings) -> dict[str, Destination]:
        out: dict[str, Destination] = {}
        seen: dict[str, _KeyPath] = {}
        for index, table in enumerate(self.tables_array("destinations")):
            path: _KeyPath = ("destinations", index)
            kind = self.kind(table, path, _DESTINATION_KEYS)
            allowed = _DESTINATION_KEYS[kind]
            optional = {"calling_ae_title", "auth", "timeout_seconds", "tls", "ca_file", "cert_file", "key_file",
                        "associations", "concurrency", "file_names"}
            self.keys(table, path, allowed, [k for k in allowed if k not in optional])
            name = self.name(table, path, seen)
            destination: Destination
            if kind == "dicom":
                destination = DicomDestination(
                    name=name,
                    host=self.string(table, path, "host"),
                    port=self.integer(table, path, "port", 1, 65535),
                    ae_title=self.ae_title(table, path, "ae_title"),
                    calling_ae_title=self.ae_title(table, path, "calling_ae_title", node.ae_title),
                    tls=self.boolean(table, path, "tls", False),
                    ca_file=self.existing_file(table, path, "ca_file") if "ca_file" in table else None,
                    cert_file=self.existing_file(table, path, "cert_file") if "cert_file" in table else None,
                    key_file=self.existing_file(table, path, "key_file") if "key_file" in table else None,
                    associations=self.integer(table, path, "associations", 1, 16, default=1),
                )
                if not destination.tls and any(k in table for k in ("ca_file", "cert_file", "key_file")):
                    self.fail(path + ("tls",), "ca_file/cert_file/key_file are for TLS: set tls = true")
                if (destination.cert_file is None) != (destination.key_file is None):
                    self.fail(path + ("cert_file",), "give cert_file and key_file together (client certificate)")
                if destination.tls:
                    self.usable_tls(path, partial(_client_context, destination))
            elif kind == "dicomweb":
                url = self.http_url(table, path)
                destination = DicomWebDestination(
                    name=name,
                    url=url,
                    auth=self.auth(table, path),
                    timeout_seconds=self.duration(table, path, "timeout_seconds", 30.0),
                    ca_file=self.https_ca_file(table, path, url),
                )
            else:
                destination = FolderDestination(name=name, path=self.folder(table, path, "path"),
                                                file_names=self.file_names(table, path))
            concurrency = self.integer(table, path, "concurrency", 1, 16, default=1)
            out[name] = dataclasses.replace(destination, concurrency=concurrency)
        return out

    def file_names(self, table: Mapping[str, Any], path: _KeyPath) -> str | None:
        """The optional ``file_names`` template of a folder destination (:mod:`node.config.file_names`)."""
        if "file_names" not in table:
            return None
        template = self.value(table, path, "file_names")
        if not isinstance(template, str):
            self.fail(path + ("file_names",), f"must be a string, got {_show(template)}")
        problem = template_problem(template)
        if problem is not None:
            self.fail(path + ("file_names",), problem)
        return template

    def sources(self) -> dict[str, DicomWebSource]:
        out: dict[str, DicomWebSource] = {}
        seen: dict[str, _KeyPath] = {}
        for index, table in enumerate(self.tables_array("sources")):
            path: _KeyPath = ("sources", index)
            kind = self.kind(table, path, _SOURCE_KEYS)
            self.keys(table, path, _SOURCE_KEYS[kind], ("name", "kind", "url"))
            name = self.name(table, path, seen)
            url = self.http_url(table, path)
            every_seconds, cron = self.source_schedule(table, path)
            level = self.value(table, path, "level", "series")
            if level not in _SOURCE_LEVELS:
                self.fail(path + ("level",), f"must be one of {', '.join(_SOURCE_LEVELS)}, got {_show(level)}")
            out[name] = DicomWebSource(
                name=name,
                url=url,
                every_seconds=every_seconds,
                cron=cron,
                level=level,
                query=self.source_query(table, path, level),
                lookback_hours=self.duration(table, path, "lookback_hours", 24.0),
                late_arrival_hours=self.duration(table, path, "late_arrival_hours", 24.0),
                auth=self.auth(table, path),
                page_size=self.integer(table, path, "page_size", 1, 10000, default=100),
                timeout_seconds=self.duration(table, path, "timeout_seconds", 30.0),
                ca_file=self.https_ca_file(table, path, url),
            )
        return out

    def source_schedule(self, table: Mapping[str, Any], path: _KeyPath) -> tuple[float | None, str | None]:
        if "every_seconds" in table and "cron" in table:
            later = max(("every_seconds", "cron"), key=lambda k: self.line(path + (k,)))
            self.fail(path + (later,), "give either every_seconds or cron, not both")
        if "every_seconds" in table:
            return self.duration(table, path, "every_seconds"), None
        if "cron" not in table:
            self.fail(path + ("every_seconds",), 'missing (required): give every_seconds (e.g. 60) or cron '
                      '(e.g. "*/5 * * * *")')
        cron = self.string(table, path, "cron")
        fields = cron.split()
        if len(fields) == 5 and any(re.search(r"\d", item.split("/")[0]) for item in fields[4].split(",")):
            self.fail(path + ("cron",), f"{_show(cron)}: write the weekday as a name (sun, mon, ... sat), not a "
                      "number: crontab counts Sunday as 0, the scheduler (APScheduler 3) counts Monday as 0")
        try:
            CronTrigger.from_crontab(cron)
        except (ValueError, TypeError, KeyError) as exc:
            self.fail(path + ("cron",), f"not a valid crontab expression (minute hour day month weekday): "
                      f"{_show(cron)}: {exc}")
        return None, cron

    def source_query(self, parent: Mapping[str, Any], parent_path: _KeyPath, level: str) -> tuple[tuple[str, str], ...]:
        table = self.table(parent, parent_path, "query", required=False)
        if table is None:
            return ()
        path = parent_path + ("query",)
        out = []
        for keyword, value in table.items():
            if tag_for_keyword(keyword) is None:
                hint = difflib.get_close_matches(keyword, keyword_dict, n=1)
                did = f"; did you mean {hint[0]!r}?" if hint else ""
                self.fail(path + (keyword,), f"{_show(keyword)} is not a DICOM keyword{did}")
            if keyword in _SOURCE_OWN_KEYS:
                self.fail(path + (keyword,), f"{keyword} is set by the poller (lookback_hours, then the "
                          "saved watermark); leave it out")
            if level == "study" and keyword in _STUDY_LEVEL_INSTEAD:
                self.fail(path + (keyword,), f'{keyword} is a series attribute; at level = "study" use '
                          f'{_STUDY_LEVEL_INSTEAD[keyword]}, or level = "series"')
            vr = dictionary_VR(tag_for_keyword(keyword))
            if vr in _UNMATCHABLE_VRS:
                self.fail(path + (keyword,), f"cannot query on {keyword}: its VR {vr} has no text value")
            if isinstance(value, str):
                if not value:
                    self.fail(path + (keyword,), "must not be empty (QIDO-RS would match everything)")
                out.append((keyword, value))
            elif _is_int(value):
                out.append((keyword, str(value)))
            else:
                self.fail(path + (keyword,), f"must be a string (QIDO-RS matching value, e.g. \"CT\" or "
                          f"\"*HEAD*\") or a whole number, got {_show(value)}")
        return tuple(out)

    def auth(self, parent: Mapping[str, Any], parent_path: _KeyPath) -> BasicAuth | BearerAuth | None:
        table = self.table(parent, parent_path, "auth", required=False)
        if table is None:
            return None
        path = parent_path + ("auth",)
        if "kind" not in table:
            self.keys(table, path, tuple(dict.fromkeys(k for keys in _AUTH_KEYS.values() for k in keys)), ())
        kind = self.value(table, path, "kind")
        if kind not in _AUTH_KEYS:
            self.fail(path + ("kind",), f"must be one of {', '.join(_AUTH_KEYS)}, got {_show(kind)}")
        self.keys(table, path, _AUTH_KEYS[kind], _AUTH_KEYS[kind])
        if kind == "basic":
            username = self.string(table, path, "username")
            if ":" in username:
                self.fail(path + ("username",), f"must not contain ':' (basic auth), got {_show(username)}")
            env = self.env_name(table, path, "password_env")
            return BasicAuth(username, env, where=self.located(path + ("password_env",)))
        env = self.env_name(table, path, "token_env")
        return BearerAuth(env, where=self.located(path + ("token_env",)))

    def env_name(self, table: Mapping[str, Any], path: _KeyPath, key: str) -> str:
        value = self.value(table, path, key)
        if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
            self.fail(path + (key,), "must name an environment variable (letters, digits, '_', "
                      f"not starting with a digit), got {_show(value)}")
        return value

    def routes(self, pipelines: Mapping[str, Pipeline], destinations: Mapping[str, Destination]) -> tuple[Route, ...]:
        routes = []
        for index, table in enumerate(self.tables_array("routes")):
            path: _KeyPath = ("routes", index)
            self.keys(table, path, ("match", "pipeline", "destinations", "trigger", "action"), ("match",))
            match = self.match(table, path)
            action = self.choice(table, path, "action", _ROUTE_ACTIONS, "process")
            if action == "discard":
                routes.append(self.discard_route(table, path, match))
                continue
            trigger = self.value(table, path, "trigger", "series")
            if trigger not in ("series", "study"):
                self.fail(path + ("trigger",), f"must be \"series\" or \"study\", got {_show(trigger)}")
            pipeline = self.value(table, path, "pipeline")
            if not isinstance(pipeline, str) or pipeline not in pipelines:
                known = ", ".join(pipelines) or "none"
                self.fail(path + ("pipeline",), f"unknown pipeline {_show(pipeline)}; defined: {known}")
            names = self.value(table, path, "destinations")
            if not isinstance(names, list):
                self.fail(path + ("destinations",), f"must be a list of destination names, got {_show(names)}")
            for n, name in enumerate(names):
                if not isinstance(name, str) or name not in destinations:
                    known = ", ".join(destinations) or "none"
                    self.fail(path + ("destinations", n), f"unknown destination {_show(name)}; defined: {known}")
                if name in names[:n]:
                    self.fail(path + ("destinations", n), f"destination {_show(name)} is listed twice")
                self.output_fits(path + ("destinations", n), pipelines[pipeline], destinations[name])
            routes.append(Route(match=match, pipeline=pipeline, destinations=tuple(names), trigger=trigger))
        return tuple(routes)

    def discard_route(self, table: Mapping[str, Any], path: _KeyPath,
                      match: tuple[tuple[str, tuple[str, ...]], ...]) -> Route:
        """A route with ``action = "discard"``: it names no pipeline, destinations or trigger."""
        for key in ("pipeline", "destinations", "trigger"):
            if key in table:
                self.fail(path + (key,), f"a route with action = \"discard\" drops the series it matches: "
                          f"it takes no {key} (remove it, or make the action \"process\")")
        return Route(match=match, pipeline="", destinations=(), action="discard")

    def output_fits(self, path: _KeyPath, pipeline: Pipeline, destination: Destination) -> None:
        """Refuse a route that sends *pipeline*'s output where every delivery would fail for good."""
        if not pipeline.output.is_dicom and destination.kind in ("dicom", "dicomweb"):
            self.fail(path, f"destination {_show(destination.name)} (kind = {_show(destination.kind)}) takes DICOM "
                      f"only, and pipeline {_show(pipeline.name)} writes output = {_show(pipeline.output.value)}: "
                      "send it to a folder destination, or make the pipeline's output \"sc\", \"sc16\" or \"gsps\"")
        if pipeline.output.is_volume and isinstance(destination, FolderDestination) and destination.file_names:
            self.fail(path, f"destination {_show(destination.name)} names files with file_names, and pipeline "
                      f"{_show(pipeline.name)} writes volumes (output = {_show(pipeline.output.value)}), which keep "
                      "their own names (volume.nii.gz and volume.json): remove file_names or send them elsewhere")
        if not pipeline.output.is_dicom and isinstance(destination, FolderDestination) and destination.file_names:
            unknown = [f for f in template_fields(destination.file_names) if f not in PNG_FIELDS]
            if unknown:
                self.fail(path, f"destination {_show(destination.name)} names files with {{{unknown[0]}}}, and "
                          f"pipeline {_show(pipeline.name)} writes PNG, which carries only "
                          f"{', '.join(PNG_FIELDS)} (of its source): use only those in file_names")

    def match(self, parent: Mapping[str, Any], parent_path: _KeyPath) -> tuple[tuple[str, tuple[str, ...]], ...]:
        table = self.table(parent, parent_path, "match")
        assert table is not None
        path = parent_path + ("match",)
        out = []
        for keyword, value in table.items():
            if tag_for_keyword(keyword) is None:
                hint = difflib.get_close_matches(keyword, keyword_dict, n=1)
                did = f"; did you mean {hint[0]!r}?" if hint else ""
                self.fail(path + (keyword,), f"{_show(keyword)} is not a DICOM keyword{did}")
            vr = dictionary_VR(tag_for_keyword(keyword))
            if vr in _UNMATCHABLE_VRS:
                self.fail(path + (keyword,), f"cannot match on {keyword}: its VR {vr} has no text value")
            items = value if isinstance(value, list) else [value]
            if isinstance(value, list) and not value:
                self.fail(path + (keyword,), "an empty list matches nothing; give a pattern or a list of them")
            patterns = []
            for n, item in enumerate(items):
                item_path = path + (keyword, n) if isinstance(value, list) else path + (keyword,)
                if isinstance(item, str):
                    patterns.append(item)
                elif _is_int(item):
                    patterns.append(str(item))
                else:
                    self.fail(item_path, f"must be a string (glob pattern), a whole number or a list of "
                              f"them, got {_show(item)}")
            out.append((keyword, tuple(patterns)))
        return tuple(out)


# --------------------------------------------------------------------------- loading


def _syntax_error(source: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    message = str(exc)
    found = re.search(r"\(at line (\d+), column \d+\)", message)
    if found:
        line = int(found.group(1))
    elif "end of document" in message:
        line = text.count("\n") + 1
    else:
        line = 1
    return ConfigError(f"{source}:{line}: TOML syntax error: {message}")


def load_config(path: str | os.PathLike[str] | None, *, check_machine: bool = False) -> Config:
    """Read and check the configuration.

    Parameters
    ----------
    path : str or os.PathLike or None
        The TOML file; None for the embedded default (``node/default.toml``). Relative paths
        in the file resolve against the file's folder; in the embedded default, against the
        current working directory.
    check_machine : bool
        Also check what depends on this machine (``dicom-node serve`` and ``config check`` do):
        every host name resolves (within RESOLVE_TIMEOUT_SECONDS, all at once; a name server is
        asked, no peer is contacted); the listeners' hosts are addresses of this machine (bound
        on an ephemeral port and closed); listeners on one port do not overlap once names are
        resolved; ``data_dir`` can be created and written (tried, then undone); no file stands
        where a folder destination goes; a TLS destination without ``ca_file`` has system CA
        certificates to trust; the environment variables of ``auth`` are set.

    Returns
    -------
    Config
        The checked configuration.

    Raises
    ------
    ConfigError
        The file cannot be read, is not TOML, or is not a valid configuration. The message
        starts with ``FILE:LINE: KEY:``.
    """
    if path is None:
        source = EMBEDDED_SOURCE
        text = importlib.resources.files("node.config").joinpath("default.toml").read_text(encoding="utf-8")
        base = Path.cwd()
    else:
        source = os.fspath(path)
        try:
            text = Path(source).read_bytes().decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the configuration: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            line = Path(source).read_bytes()[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{source}:{line}: not UTF-8 text: {exc.reason}") from None
        base = Path(os.path.abspath(source)).parent
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(source, text, exc) from None
    return _Checker(source, text, data, base, machine=check_machine).check()
