"""The checked configuration: frozen settings classes, one per table of the file.

Each class is a frozen dataclass whose fields are the keys of its table, in the order refusals
list them, each annotated with its rule (:mod:`node.config.check`); pydantic validates a file into
these classes (:mod:`node.config.load`), running the rules and the classes' model validators
(how the keys of one table go together). Made in code, a class takes its values as given, as any
dataclass: tests and tools build settings pydantic would refuse in a file (``TlsSettings(port=0)``
listens on an ephemeral port; TLS files that do not match, to see the listener refuse them), and
the routing builds routes in its inner loop. They pickle (worker processes get the
:class:`Config`) and, but for :class:`Config`, hash.

Defaults: the values of ``[node]``, ``[http]`` and ``[delivery]`` come from the embedded default
configuration, ``node/config/default.toml`` (read once, here), and nowhere else;
``node.workers`` defaults to the number of CPUs, at most 4, and the optional keys whose absence
means "not set" (``node.shared_dir``, ``http.auth``, ``http.cert_file``, ``http.key_file``) to None. Keys of the items of
``[[destinations]]``, ``[[sources]]``, ``[[routes]]`` and of ``[tls]``, ``[store]`` and ``auth``
default to the values written in their class.

States are :class:`enum.StrEnum` members: the file's strings, compared and printed as such.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import ConfigDict, model_validator

from node.config.check import (
    AE_TITLE, AE_TITLES, ENV_NAME, EXISTING_FILE, FLAG, FOLDER, HTTP_URL, ITEM_NAME, TEXT, TIME_SPANS, Cron,
    FileNames, HttpsCaFile, Kinds, MatchPatterns, OneOf, QueryValues, Reference, References, Table, Whole,
    internal, refuse,
)
from node.config.lines import show
from node.config.pipeline import Pipeline
from node.net.tls import TlsFileError, client_context, https_server_context, server_context

__all__ = [
    "AUTH", "DEFAULT_TOML", "DESTINATION", "SOURCE", "BasicAuth", "BearerAuth", "Config", "ConfigError",
    "DeliverySettings", "Destination", "DicomDestination", "DicomWebDestination", "DicomWebSource", "FolderDestination", "HttpSettings",
    "NodeSettings", "Route", "RouteAction", "SourceLevel", "StoreSettings", "TlsSettings", "Trigger",
    "Unrouted", "embedded_default",
]


class ConfigError(ValueError):
    """A configuration that cannot work; the message starts with ``FILE:LINE: KEY:``."""


DEFAULT_TOML = importlib.resources.files("node.config").joinpath("default.toml").read_text(encoding="utf-8")
"""The embedded default configuration (``node/config/default.toml``): the file used without one,
and the defaults of ``[node]``, ``[http]`` and ``[delivery]``."""

_DEFAULTS = tomllib.loads(DEFAULT_TOML)


def embedded_default(table: str, key: str) -> Any:
    """The embedded default of ``[table] key``, as the file writes it (a list as a tuple)."""
    value = _DEFAULTS[table][key]
    return tuple(value) if isinstance(value, list) else value


# A key left out takes the embedded default as written ("var"), checked as a written value is (made
# into an absolute Path, an Unrouted...).
_DEFAULTS_CHECKED = ConfigDict(validate_default=True)


def _usable_tls(load: Callable[[], object]) -> None:
    """Load TLS files now (*load* builds the context), so ``config check`` refuses what serve would:
    a file that exists but cannot be used is refused at its own key."""
    try:
        load()
    except TlsFileError as exc:
        refuse(str(exc), exc.key)


class Trigger(StrEnum):
    """When a route's series are processed."""

    SERIES = "series"  # each series once it settles
    STUDY = "study"  # every series of a study once the whole study has settled


class RouteAction(StrEnum):
    """What a route does with the series it matches."""

    PROCESS = "process"
    DISCARD = "discard"


class Unrouted(StrEnum):
    """What becomes of a series no route matches."""

    KEEP = "keep"
    DISCARD = "discard"


class SourceLevel(StrEnum):
    """What a DICOMweb source's QIDO-RS queries ask for."""

    SERIES = "series"
    STUDY = "study"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class NodeSettings(Table):
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
    unrouted : Unrouted
        What becomes of a series no route matches: ``keep`` (state ``unrouted``, a WARNING, kept
        until ``retention_hours``) or ``discard`` (state ``discarded``: its spool files removed at
        once, one INFO line, its record kept until ``retention_hours``).
    failed_retention_hours : float
        Failed series (their spool files, outputs and records) are removed this long after they
        failed; 0: kept for ever (``dicom-node retry`` can still run them).
    receivers : int
        Processes receiving on ``port`` (``SO_REUSEPORT``, :mod:`node.app.receivers`): 1 is the
        service alone; each process has its own ``max_associations`` and connection limits.
    """

    __pydantic_config__ = _DEFAULTS_CHECKED
    ae_title: Annotated[str, AE_TITLE] = embedded_default("node", "ae_title")
    host: Annotated[str, TEXT] = embedded_default("node", "host")
    port: Annotated[int, Whole(0, 65535, " (0: no plain listener)")] = embedded_default("node", "port")
    data_dir: Annotated[Path, FOLDER] = embedded_default("node", "data_dir")
    allowed_calling_aets: Annotated[tuple[str, ...], AE_TITLES] = embedded_default("node", "allowed_calling_aets")
    max_associations: Annotated[int, Whole(1)] = embedded_default("node", "max_associations")
    settle_seconds: Annotated[float, TIME_SPANS["settle_seconds"]] = embedded_default("node", "settle_seconds")
    workers: Annotated[int, Whole(1)] = dataclasses.field(default_factory=lambda: min(4, os.cpu_count() or 1))
    min_free_disk_mb: Annotated[int, Whole(0)] = embedded_default("node", "min_free_disk_mb")
    retention_hours: Annotated[float, TIME_SPANS["retention_hours"]] = embedded_default("node", "retention_hours")
    study_settle_seconds: Annotated[float, TIME_SPANS["study_settle_seconds"]] = embedded_default(
        "node", "study_settle_seconds")
    force_complete_seconds: Annotated[float, TIME_SPANS["force_complete_seconds"]] = embedded_default(
        "node", "force_complete_seconds")
    max_processing_attempts: Annotated[int, Whole(1)] = embedded_default("node", "max_processing_attempts")
    processing_timeout_seconds: Annotated[float, TIME_SPANS["processing_timeout_seconds"]] = embedded_default(
        "node", "processing_timeout_seconds")
    shared_dir: Annotated[Path | None, FOLDER] = None
    association_timeout_seconds: Annotated[float, TIME_SPANS["association_timeout_seconds"]] = embedded_default(
        "node", "association_timeout_seconds")
    max_negotiating_connections: Annotated[int, Whole(1, 1000)] = embedded_default("node", "max_negotiating_connections")
    max_connections_per_address: Annotated[int, Whole(0, 1000, " (0: no limit)")] = embedded_default(
        "node", "max_connections_per_address")
    max_decoded_mb: Annotated[int, Whole(1)] = embedded_default("node", "max_decoded_mb")
    max_frame_mb: Annotated[int, Whole(1)] = embedded_default("node", "max_frame_mb")
    unrouted: Annotated[Unrouted, OneOf(Unrouted, quoted=True)] = embedded_default("node", "unrouted")
    failed_retention_hours: Annotated[float, TIME_SPANS["failed_retention_hours"]] = embedded_default(
        "node", "failed_retention_hours")
    receivers: Annotated[int, Whole(1, 16)] = embedded_default("node", "receivers")

    @property
    def shared(self) -> Path:
        """The folder of the spool and the outputs: ``shared_dir``, or ``data_dir`` on one machine."""
        return self.shared_dir or self.data_dir


@dataclass(frozen=True)
class TlsSettings(Table):
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

    port: Annotated[int, Whole(1, 65535)]
    cert_file: Annotated[Path, EXISTING_FILE]
    key_file: Annotated[Path, EXISTING_FILE]
    ca_file: Annotated[Path | None, EXISTING_FILE] = None
    match_ae_title: Annotated[bool, FLAG] = False

    @model_validator(mode="after")
    def _usable(self) -> TlsSettings:
        if self.match_ae_title and self.ca_file is None:
            refuse("needs ca_file: without client certificates there is nothing to match", "match_ae_title")
        _usable_tls(lambda: server_context(self))
        return self


def _read_env(name: str, what: str, where: str) -> str:
    value = os.environ.get(name)
    prefix = f"{where}: " if where else ""
    if value is None:
        raise ConfigError(f"{prefix}environment variable {name} ({what}) is not set")
    if value == "":
        raise ConfigError(f"{prefix}environment variable {name} ({what}) is empty")
    return value


@dataclass(frozen=True)
class BasicAuth(Table):
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

    kind: ClassVar[str] = "basic"
    username: Annotated[str, TEXT]
    password_env: Annotated[str, ENV_NAME]
    where: str = internal("")

    @model_validator(mode="after")
    def _no_colon(self) -> BasicAuth:
        if ":" in self.username:
            refuse(f"must not contain ':' (basic auth), got {show(self.username)}", "username")
        return self

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
class BearerAuth(Table):
    """HTTP bearer-token authentication; the token is read from the environment when used.

    Attributes
    ----------
    token_env : str
        Name of the environment variable that holds the token.
    where : str
        ``FILE:LINE: KEY`` of the ``token_env`` key, for messages (not compared).
    """

    kind: ClassVar[str] = "bearer"
    token_env: Annotated[str, ENV_NAME]
    where: str = internal("")

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


AUTH = Kinds(BasicAuth, BearerAuth)
"""An ``auth`` table: ``kind = "basic"`` or ``"bearer"``."""


@dataclass(frozen=True)
class HttpSettings(Table):
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

    __pydantic_config__ = _DEFAULTS_CHECKED
    host: Annotated[str, TEXT] = embedded_default("http", "host")
    port: Annotated[int, Whole(1, 65535)] = embedded_default("http", "port")
    auth: Annotated[BasicAuth | BearerAuth | None, AUTH] = None
    public_metrics: Annotated[bool, FLAG] = embedded_default("http", "public_metrics")
    allow_anonymous: Annotated[bool, FLAG] = embedded_default("http", "allow_anonymous")
    cert_file: Annotated[Path | None, EXISTING_FILE] = None
    key_file: Annotated[Path | None, EXISTING_FILE] = None

    @model_validator(mode="after")
    def _consistent(self) -> HttpSettings:
        if self.allow_anonymous and self.auth is not None:
            refuse("contradicts auth (every request needs credentials): remove one of them", "allow_anonymous")
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            refuse(f"HTTPS needs cert_file and key_file together: add {missing}", given)
        if self.cert_file is not None:
            _usable_tls(lambda: https_server_context(self))
        return self


@dataclass(frozen=True)
class StoreSettings(Table):
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

    file_requires: ClassVar[tuple[str, ...]] = ("url",)
    url: Annotated[str | None, TEXT] = None
    password_env: Annotated[str | None, ENV_NAME] = None
    stalled_seconds: Annotated[float, TIME_SPANS["stalled_seconds"]] = 30.0
    where: str = internal("")

    @model_validator(mode="after")
    def _postgresql(self) -> StoreSettings:
        if self.url is None:
            return self
        parts = urlsplit(self.url)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.path.strip("/"):
            refuse("must be postgresql://USER@HOST:PORT/DATABASE (leave [store] out for SQLite in data_dir), "
                   f"got {show(self.url)}", "url")
        if parts.password is not None:
            refuse("must not hold a password: name an environment variable in password_env", "url")
        return self

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
class DeliverySettings(Table):
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

    __pydantic_config__ = _DEFAULTS_CHECKED
    max_attempts: Annotated[int, Whole(1)] = embedded_default("delivery", "max_attempts")
    backoff_seconds: Annotated[float, TIME_SPANS["backoff_seconds"]] = embedded_default("delivery", "backoff_seconds")
    max_backoff_seconds: Annotated[float, TIME_SPANS["max_backoff_seconds"]] = embedded_default(
        "delivery", "max_backoff_seconds")

    @model_validator(mode="after")
    def _ceiling(self) -> DeliverySettings:
        if self.max_backoff_seconds < self.backoff_seconds:
            refuse(f"must be >= backoff_seconds ({self.backoff_seconds:g}), got {self.max_backoff_seconds:g}",
                   "max_backoff_seconds")
        return self

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


# --------------------------------------------------------------------------- destinations


_CONCURRENCY = Whole(1, 16)


@dataclass(frozen=True)
class DicomDestination(Table):
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
        Our AE title towards this peer (in the file, default: ``node.ae_title``).
    tls, ca_file, cert_file, key_file
        DICOM over TLS towards the peer (see :mod:`node.net.tls`).
    associations : int
        Associations one delivery uses at once (1-16), its files split between them.
    concurrency : int
        Deliveries to this destination in flight at once (1-16; its own lane: see :mod:`node.deliver.lanes`).
    """

    kind: ClassVar[str] = "dicom"
    name: Annotated[str, ITEM_NAME]
    host: Annotated[str, TEXT]
    port: Annotated[int, Whole(1, 65535)]
    ae_title: Annotated[str, AE_TITLE]
    calling_ae_title: Annotated[str, AE_TITLE]
    tls: Annotated[bool, FLAG] = False
    ca_file: Annotated[Path | None, EXISTING_FILE] = None
    cert_file: Annotated[Path | None, EXISTING_FILE] = None
    key_file: Annotated[Path | None, EXISTING_FILE] = None
    associations: Annotated[int, Whole(1, 16)] = 1
    concurrency: Annotated[int, _CONCURRENCY] = 1

    @model_validator(mode="after")
    def _tls_files(self) -> DicomDestination:
        if not self.tls and any(f is not None for f in (self.ca_file, self.cert_file, self.key_file)):
            refuse("ca_file/cert_file/key_file are for TLS: set tls = true", "tls")
        if (self.cert_file is None) != (self.key_file is None):
            refuse("give cert_file and key_file together (client certificate)", "cert_file")
        if self.tls:
            _usable_tls(lambda: client_context(ca_file=self.ca_file, cert_file=self.cert_file,
                                               key_file=self.key_file, host=self.host))
        return self


@dataclass(frozen=True)
class DicomWebDestination(Table):
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
    name: Annotated[str, ITEM_NAME]
    url: Annotated[str, HTTP_URL]
    auth: Annotated[BasicAuth | BearerAuth | None, AUTH] = None
    timeout_seconds: Annotated[float, TIME_SPANS["timeout_seconds"]] = 30.0
    ca_file: Annotated[Path | None, HttpsCaFile()] = None
    concurrency: Annotated[int, _CONCURRENCY] = 1


@dataclass(frozen=True)
class FolderDestination(Table):
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
    name: Annotated[str, ITEM_NAME]
    path: Annotated[Path, FOLDER]
    concurrency: Annotated[int, _CONCURRENCY] = 1
    file_names: Annotated[str | None, FileNames()] = None


Destination = DicomDestination | DicomWebDestination | FolderDestination
"""Any destination."""

DESTINATION = Kinds(DicomDestination, DicomWebDestination, FolderDestination)
"""A ``[[destinations]]`` table, by its ``kind``."""


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class DicomWebSource(Table):
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
    level : SourceLevel
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
    name: Annotated[str, ITEM_NAME]
    url: Annotated[str, HTTP_URL]
    every_seconds: Annotated[float | None, TIME_SPANS["every_seconds"]] = None
    cron: Annotated[str | None, Cron()] = None
    level: Annotated[SourceLevel, OneOf(SourceLevel)] = SourceLevel.SERIES
    query: Annotated[tuple[tuple[str, str], ...], QueryValues()] = ()
    lookback_hours: Annotated[float, TIME_SPANS["lookback_hours"]] = 24.0
    late_arrival_hours: Annotated[float, TIME_SPANS["late_arrival_hours"]] = 24.0
    auth: Annotated[BasicAuth | BearerAuth | None, AUTH] = None
    page_size: Annotated[int, Whole(1, 10000)] = 100
    timeout_seconds: Annotated[float, TIME_SPANS["timeout_seconds"]] = 30.0
    ca_file: Annotated[Path | None, HttpsCaFile()] = None

    @classmethod
    def file_form(cls, table: dict[str, Any]) -> dict[str, Any]:
        """Exactly one of ``every_seconds`` and ``cron``; both refused at the one written later."""
        given = [key for key in table if key in ("every_seconds", "cron")]
        if len(given) == 2:
            refuse("give either every_seconds or cron, not both", given[1])
        if not given:
            refuse('missing (required): give every_seconds (e.g. 60) or cron (e.g. "*/5 * * * *")', "every_seconds")
        return table

    def filters(self) -> dict[str, str]:
        """:attr:`query` as a dict (QIDO-RS search filters)."""
        return dict(self.query)

    def schedule_text(self) -> str:
        """``every 60 s`` or ``cron "*/5 * * * *"``, for logs."""
        return f"every {self.every_seconds:g} s" if self.every_seconds is not None else f"cron {self.cron!r}"


SOURCE = Kinds(DicomWebSource)
"""A ``[[sources]]`` table, by its ``kind`` (one kind so far)."""


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route(Table):
    """Which series go through which pipeline to which destinations (the routing itself:
    :mod:`node.process.routing`).

    Attributes
    ----------
    match : tuple of (keyword, patterns)
        Every keyword must match one of its :func:`fnmatch.fnmatchcase` patterns; empty matches all.
    pipeline : str
        Name of the pipeline.
    destinations : tuple of str
        Names of the destinations (an empty tuple sends nowhere).
    trigger : Trigger
        ``series``: process each series once it settles; ``study``: once the whole study has
        settled (``study_settle_seconds``), every series of it.
    action : RouteAction
        ``process`` (through *pipeline* to *destinations*) or ``discard``: a matched series is
        dropped once it settles (its spool files removed, state ``discarded``); a discard route
        has no pipeline (``""``) and no destinations.
    """

    match: Annotated[tuple[tuple[str, tuple[str, ...]], ...], MatchPatterns()]
    pipeline: Annotated[str, Reference("pipelines", "pipeline")] = ""
    destinations: Annotated[tuple[str, ...], References("destinations", "destination")] = ()
    trigger: Annotated[Trigger, OneOf(Trigger, said='must be "series" or "study"')] = Trigger.SERIES
    action: Annotated[RouteAction, OneOf(RouteAction, quoted=True)] = RouteAction.PROCESS

    @classmethod
    def file_form(cls, table: dict[str, Any]) -> dict[str, Any]:
        """A process route names its pipeline and destinations; a discard route none, nor a trigger."""
        action = table.get("action", RouteAction.PROCESS)
        if action == RouteAction.DISCARD:
            for key in ("pipeline", "destinations", "trigger"):
                if key in table:
                    refuse(f'a route with action = "discard" drops the series it matches: it takes no {key} '
                           '(remove it, or make the action "process")', key)
        elif action == RouteAction.PROCESS:
            for key in ("pipeline", "destinations"):
                if key not in table:
                    refuse("missing (required)", key)
        return table

    @property
    def discards(self) -> bool:
        """Whether the series this route matches are dropped instead of processed."""
        return self.action == RouteAction.DISCARD


# --------------------------------------------------------------------------- the whole


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole checked configuration (built by :func:`node.config.load.load_config` from checked parts).

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
    sources: Mapping[str, DicomWebSource] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    tls: TlsSettings | None = None
    store: StoreSettings = StoreSettings()

    def __reduce__(self) -> tuple[Callable[..., Config], tuple[dict[str, Any]]]:
        """Pickle support (read-only mappings become dicts and back): worker processes get the config."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _config_from_fields, ({k: dict(v) if isinstance(v, MappingProxyType) else v for k, v in fields.items()},)


def _config_from_fields(fields: dict[str, Any]) -> Config:
    """The :class:`Config` of pickled *fields* (see :meth:`Config.__reduce__`)."""
    return Config(**{k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in fields.items()})
