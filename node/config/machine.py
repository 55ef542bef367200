"""What only this machine can tell of a configuration (``load_config(path, check_machine=True)``:
``dicom-node serve`` and ``config check``).

Every host name resolves (within :data:`RESOLVE_TIMEOUT_SECONDS`, all at once; a name server is asked,
no peer is contacted); the listeners' hosts are addresses of this machine (bound on an ephemeral
port and closed); listeners on one port do not overlap once names are resolved; ``data_dir`` can be
created and written (tried, then undone); no file stands where a folder destination goes; a TLS
destination without ``ca_file`` has system CA certificates to trust; the environment variables of
``auth`` are set. A refusal is a :class:`~node.config.check.Refusal` at the key it concerns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from node.config.check import Refusal
from node.config.lines import KeyPath, Locator, show
from node.config.model import Config, DicomDestination, DicomWebDestination, FolderDestination
from node.config.schema import ip_of, listeners, listeners_apart

__all__ = ["RESOLVE_TIMEOUT_SECONDS", "check_this_machine", "resolve_hosts"]

RESOLVE_TIMEOUT_SECONDS = 5.0
"""How long the check of this machine waits, at most, for the configured host names to resolve (all at once)."""


def check_this_machine(config: Config, locator: Locator) -> None:
    """Refuse (:class:`~node.config.check.Refusal`) what *config* cannot do on this machine.

    Parameters
    ----------
    config : Config
        A configuration the loader has checked.
    locator : Locator
        Its file (lines of the keys, for the refusal of two listeners on one port).

    Raises
    ------
    Refusal
        At the first key this machine cannot serve; ``ConfigError`` for an unset secret.
    """
    addresses = _resolved_hosts(config)
    sockets = listeners(config.node, config.tls, config.http)
    listeners_apart(sockets, locator, addresses)
    for listener in sockets:
        problem = _bind_problem(addresses[listener.host])
        if problem is not None:
            raise Refusal(listener.host_key, f"{listener.what} cannot listen on {show(listener.host)} "
                          f"({addresses[listener.host]}): {problem}")
    _http_exposure(config, addresses)
    problem = _unwritable(config.node.data_dir)
    if problem is not None:
        raise Refusal(("node", "data_dir"), problem)
    _destinations(config)
    for item in (config.http, *config.destinations.values(), *config.sources.values()):
        auth = getattr(item, "auth", None)
        if auth is not None:
            auth.resolve()  # a ConfigError naming the variable and its line, as serve would give


def _host_keys(config: Config) -> list[tuple[KeyPath, str]]:
    """Every host name of the file with its key: listeners, DICOM destinations, DICOMweb URLs, the store."""
    out = [(listener.host_key, listener.host) for listener in listeners(config.node, config.tls, config.http)]
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


def _resolved_hosts(config: Config) -> dict[str, str]:
    """Resolve every host of the file (RESOLVE_TIMEOUT_SECONDS at most, all at once); refuse the first
    that does not resolve. Returns each host's listening address."""
    keys = _host_keys(config)
    found = resolve_hosts([host for _, host in keys], RESOLVE_TIMEOUT_SECONDS)
    for path, host in keys:
        addresses = found[host]
        if isinstance(addresses, str):
            raise Refusal(path, f"host {show(host)} does not resolve: {addresses}")
    return {host: _bind_address(addresses) for host, addresses in found.items() if not isinstance(addresses, str)}


def _http_exposure(config: Config, addresses: Mapping[str, str]) -> None:
    """Refuse an HTTP listener reachable from other machines without auth, unless allow_anonymous."""
    http = config.http
    address = addresses.get(http.host, http.host)
    ip = ip_of(address)
    if http.auth is not None or http.allow_anonymous or (ip is not None and ip.is_loopback):
        return
    shown = show(http.host) if address == http.host else f"{show(http.host)} ({address})"
    raise Refusal(("http", "host"), f"{shown} is not a loopback address and [http] has no auth: anyone who "
                  "reaches it would see the status page and patient images; give [http] auth = { kind = "
                  '"basic", username = ..., password_env = ... } (or kind = "bearer", token_env = ...), '
                  "or allow_anonymous = true if that is meant")


def _destinations(config: Config) -> None:
    """Refuse a folder destination where a file stands, and a TLS destination with no CA to trust."""
    for index, destination in enumerate(config.destinations.values()):
        path: KeyPath = ("destinations", index)
        if isinstance(destination, FolderDestination):
            blocking = _file_in_the_way(destination.path)
            if blocking is not None:
                raise Refusal(path + ("path",), f"{blocking} is a file, not a folder: nothing can be delivered "
                              "there")
        if isinstance(destination, DicomDestination) and destination.tls and destination.ca_file is None:
            if not _system_trusts_some_ca():
                raise Refusal(path + ("tls",), "without ca_file the peer's certificate is checked against the "
                              "system's CA certificates, and this machine has none (see SSL_CERT_FILE, "
                              "SSL_CERT_DIR): give ca_file, the CA that signed the peer's certificate")


def _addresses(host: str) -> tuple[str, ...]:
    """The addresses of *host* in getaddrinfo's order (an IP address is its own, without a name server)."""
    return tuple(dict.fromkeys(str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)))


def resolve_hosts(hosts: Iterable[str], timeout: float,
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
