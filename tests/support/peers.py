"""Reusable real-peer helpers for integration tests.

Everything here talks to 127.0.0.1 only.  Every server started here is
stopped again by its context manager / fixture, also when a test fails, and
an ``atexit`` safety net kills any Orthanc process group still alive when the
interpreter exits.

Contents:

* :func:`free_port` - an unused TCP port on 127.0.0.1.
* :func:`nodelay_env`, :func:`kill_group`, :func:`stop_process_group` - the
  environment of dcmtk processes; signalling and stopping a process group.
* :class:`OrthancServer` - Debian's Orthanc 1.10 (+ DICOMweb plugin) in a
  temporary directory; :func:`running_orthanc` and :func:`orthanc_fixture`
  wrap it for ``with`` blocks and pytest fixtures.
* :func:`storescu` / :func:`echoscu` - dcmtk command-line SCUs, and
  :func:`store_responses` to read per-file C-STORE statuses.
* :class:`StoreSCP` - dcmtk ``storescp`` as a plain C-STORE destination.
* :func:`test_data_dir` / :func:`require_test_data` - the optional external
  data set named by ``$DICOM_NODE_TEST_DATA``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import select
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests

LOCALHOST = "127.0.0.1"

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
STORESCU_BIN = "storescu"
ECHOSCU_BIN = "echoscu"
STORESCP_BIN = "storescp"

TEST_DATA_ENV = "DICOM_NODE_TEST_DATA"

# C-STORE status Orthanc 1.10 answers for instances of a rejected SOP class
# (see OrthancServer's ``rejected_sop_classes``): "Refused: Out of Resources".
REJECTED_SOP_CLASS_STATUS = 0xA700


# --------------------------------------------------------------------------
# Generic helpers
# --------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port that is currently unused on 127.0.0.1.

    The port is found by binding to ``127.0.0.1:0``; there is an unavoidable
    small race until the caller binds it (OrthancServer retries on clashes).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def _port_open(port: int, host: str = LOCALHOST, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def nodelay_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for dcmtk-based processes.

    ``TCP_NODELAY=1`` makes dcmtk disable Nagle's algorithm; without it dcmtk
    peers stall ~40 ms per instance (delayed-ACK interplay).  Proxy variables
    are removed so nothing can be routed off the machine.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    }
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group led by ``proc`` (started with
    ``start_new_session=True``), ignoring already-gone groups."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the group, wait up to ``grace`` seconds, then SIGKILL it
    (``grace <= 0``: SIGKILL at once)."""
    if proc.poll() is None and grace > 0:
        kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Kill whatever is left of the group (also children of an exited leader).
    kill_group(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - should not happen
        pass


# Safety net: process groups still running at interpreter exit get killed.
_LIVE_PROCS: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - only on abnormal exits
    with _LIVE_LOCK:
        procs = list(_LIVE_PROCS)
        _LIVE_PROCS.clear()
    for proc in procs:
        stop_process_group(proc, grace=2.0)


class _PeerProcess:
    """A peer server run as its own process group, its output appended to a log file; the group is
    killed at interpreter exit if the peer was not stopped."""

    _proc: subprocess.Popen | None = None
    _log_handle: Any = None

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _spawn(self, args: list[str], log_path: Path, *, cwd: Path | None = None, banner: str = "") -> None:
        """Start *args* (environment of :func:`nodelay_env`), *banner* then its output appended to *log_path*."""
        self._log_handle = open(log_path, "ab")
        if banner:
            self._log_handle.write(banner.encode())
            self._log_handle.flush()
        self._proc = subprocess.Popen(
            args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log_handle, stderr=subprocess.STDOUT,
            env=nodelay_env(), start_new_session=True,  # own process group -> killpg
        )
        with _LIVE_LOCK:
            _LIVE_PROCS.add(self._proc)

    def _stop_group(self, grace: float) -> None:
        """Stop the process group (:func:`stop_process_group`) and close the log."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                stop_process_group(proc, grace)
            finally:
                with _LIVE_LOCK:
                    _LIVE_PROCS.discard(proc)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None


# --------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------


class OrthancError(RuntimeError):
    """Orthanc failed to start, or a REST call failed."""


class OrthancServer(_PeerProcess):
    """Debian's Orthanc 1.10 with the DICOMweb plugin, used via 127.0.0.1.

    Orthanc 1.10 has no bind-address option: both ports listen on 0.0.0.0.
    ``RemoteAccessAllowed: false`` makes the HTTP server refuse non-loopback
    clients; the DICOM port cannot be restricted (tests only use 127.0.0.1).

    Use as a context manager (``with OrthancServer() as orthanc: ...``), via
    :func:`running_orthanc`, or via :func:`orthanc_fixture`.  The constructor
    does not start anything; :meth:`start` does.  :meth:`stop` followed by
    :meth:`start` restarts it with the same ports, storage and index (for
    "destination down, then up again" tests).

    Parameters
    ----------
    aet:
        Orthanc's own AE title (``DicomAet``).  Called-AET checking is off.
    modalities:
        ``name -> (aet, port)`` or ``name -> (aet, host, port)``; written to
        ``DicomModalities`` so Orthanc can push to them (host must be local).
    users:
        ``{username: password}``; when given, HTTP basic auth is enabled and
        this object's own REST session authenticates as the first user.
    rejected_sop_classes:
        SOP Class UIDs whose instances Orthanc refuses.  Orthanc 1.10 has no
        option to reject a (known) SOP class during association negotiation,
        so a Lua ``ReceivedInstanceFilter`` raises an error for them: the
        association is accepted, each such C-STORE gets status 0xA700
        ("Refused: Out of Resources", :data:`REJECTED_SOP_CLASS_STATUS`), and
        REST ``POST /instances`` fails with HTTP 500.  STOW-RS (DICOMweb
        plugin 1.7) stops at the first rejected instance and answers HTTP 200
        with *empty* Referenced/FailedSOPSequence (later instances of the
        same request are not stored either).  Rejected data is never stored.
        (Returning ``false`` from the filter, or using 1.10's
        ``ReceivedCStoreInstanceFilter``, drops the instance but still answers
        *Success* - a bug in 1.10.x - so it is not used.)
    workdir:
        Directory for config, storage, index and log.  Default: a fresh temp
        directory that is deleted by :meth:`close`; a given directory is kept.
    extra_config:
        Further Orthanc configuration keys (override the defaults), e.g.
        ``{"AcceptedTransferSyntaxes": ["1.2.840.10008.1.2"]}`` to reject
        other transfer syntaxes at negotiation, ``{"UnknownSopClassAccepted":
        True}``, ``{"DicomAssociationCloseDelay": 5}``.
    """

    def __init__(
        self,
        *,
        name: str = "test-orthanc",
        aet: str = "ORTHANC",
        modalities: Mapping[str, Sequence[Any]] | None = None,
        users: Mapping[str, str] | None = None,
        rejected_sop_classes: Iterable[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        if len(aet) > 16:
            raise ValueError(f"AE title too long: {aet!r}")
        self.name = name
        self.aet = aet
        self.users = dict(users or {})
        self.rejected_sop_classes = list(rejected_sop_classes or [])
        self.modalities = {k: self._modality(v) for k, v in (modalities or {}).items()}
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.startup_seconds: float | None = None  # duration of the last start

        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.http_port: int | None = None
        self._dicom_port: int | None = None

        self.session = requests.Session()
        self.session.trust_env = False  # never use proxies / netrc
        if self.users:
            self.session.auth = next(iter(self.users.items()))

    # ---- configuration -------------------------------------------------

    @staticmethod
    def _modality(spec: Sequence[Any]) -> list[Any]:
        spec = list(spec)
        if len(spec) == 2:
            aet, port = spec
            host = LOCALHOST
        elif len(spec) == 3:
            aet, host, port = spec
        else:
            raise ValueError(f"modality must be (aet, port) or (aet, host, port): {spec!r}")
        if host not in (LOCALHOST, "localhost"):
            raise ValueError(f"test modalities must be local, got host {host!r}")
        return [str(aet), LOCALHOST, int(port)]

    def add_modality(self, name: str, aet: str, port: int) -> None:
        """Declare (or replace) a modality at runtime through the REST API
        (``PUT /modalities/{name}``); also remembered for restarts."""
        self.modalities[name] = self._modality((aet, port))
        self._request(
            "PUT", f"/modalities/{name}",
            json={"AET": aet, "Host": LOCALHOST, "Port": int(port)},
        )

    @property
    def config_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "orthanc.log"

    def _config(self) -> dict[str, Any]:
        assert self.workdir is not None
        cfg: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            # Orthanc 1.10 has no bind-address option (it listens on 0.0.0.0);
            # this makes the HTTP server refuse non-loopback clients.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self._dicom_port,
            "DicomCheckCalledAet": False,
            "DicomModalities": self.modalities,
            # Close Orthanc's SCU associations right after a store job, so the
            # receiver sees the association release promptly (default 5 s).
            "DicomAssociationCloseDelay": 0,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            # Do not persist/resume jobs across stop()/start().
            "SaveJobs": False,
        }
        if self.users:
            cfg["RegisteredUsers"] = self.users
        if self.rejected_sop_classes:
            lua = self.workdir / "reject.lua"
            lua.write_text(self._reject_lua())
            cfg["LuaScripts"] = [str(lua)]
        cfg.update(self.extra_config)
        return cfg

    def _reject_lua(self) -> str:
        uids = ", ".join(f'["{u}"] = true' for u in self.rejected_sop_classes)
        return (
            f"local rejected = {{ {uids} }}\n"
            "\n"
            "function ReceivedInstanceFilter(dicom, origin, info)\n"
            "  if rejected[dicom.SOPClassUID] then\n"
            "    error('SOP class ' .. dicom.SOPClassUID .. ' rejected by test config')\n"
            "  end\n"
            "  return true\n"
            "end\n"
        )

    # ---- lifecycle -----------------------------------------------------

    def start(self) -> OrthancServer:
        """Start Orthanc and wait until REST (``/system``) and the DICOM port
        answer.  The first start picks free ports (retrying on a port clash);
        later starts reuse ports, storage and index."""
        if self.running:
            return self
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="orthanc-peer-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

        first_start = self.http_port is None
        attempts = 3 if first_start else 1
        for attempt in range(attempts):
            if first_start:
                self.http_port, self._dicom_port = free_port(), free_port()
                while self._dicom_port == self.http_port:
                    self._dicom_port = free_port()
            try:
                self._launch()
                return self
            except OrthancError as exc:
                # Orthanc logs "The TCP port of the HTTP|DICOM server is
                # privileged or already in use" and exits with 255.
                clash = "already in use" in str(exc)
                if not (first_start and clash and attempt + 1 < attempts):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self) -> None:
        assert self.workdir is not None
        self.config_path.write_text(json.dumps(self._config(), indent=2))
        self._spawn([ORTHANC_BIN, str(self.config_path)], self.log_path, cwd=self.workdir,
                    banner=f"\n===== start {time.strftime('%H:%M:%S')} =====\n")
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        t0 = time.monotonic()
        deadline = t0 + self.startup_timeout
        http_ok = False
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with code {self._proc.returncode} during startup; "
                    f"log tail:\n{_tail(self.log_path)}"
                )
            if not http_ok:
                try:
                    r = self.session.get(f"{self.http_url}/system", timeout=1)
                    http_ok = r.status_code == 200
                except requests.RequestException:
                    pass
            if http_ok and _port_open(self.dicom_port):
                self.startup_seconds = time.monotonic() - t0
                return
            time.sleep(0.05)
        raise OrthancError(
            f"Orthanc not ready after {self.startup_timeout:.0f}s "
            f"(http {self.http_port}, dicom {self._dicom_port}); log tail:\n"
            f"{_tail(self.log_path)}"
        )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM Orthanc's process group, wait up to ``grace`` s (a clean
        shutdown takes ~3 s), then SIGKILL; ``grace=0`` kills at once.
        Ports, storage and index are kept so :meth:`start` can resume."""
        self._stop_group(grace)

    def close(self) -> None:
        """Stop, and delete the working directory if this object created it.
        A throw-away directory means the data does not matter, so Orthanc is
        killed at once instead of waiting ~3 s for a clean shutdown."""
        try:
            self.stop(grace=0 if self._own_workdir else 10.0)
        finally:
            self.session.close()
            if self._own_workdir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> OrthancServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- addresses -----------------------------------------------------

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:{port}`` (no trailing slash)."""
        return f"http://{LOCALHOST}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb root, ``{http_url}/dicom-web`` (no trailing slash)."""
        return f"{self.http_url}/dicom-web"

    @property
    def dicom_port(self) -> int:
        assert self._dicom_port is not None, "Orthanc has not been started"
        return self._dicom_port

    # ---- REST ----------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 60)
        r = self.session.request(method, f"{self.http_url}/{path.lstrip('/')}", **kw)
        if not r.ok:
            raise OrthancError(f"{method} {path} -> HTTP {r.status_code}: {r.text[:2000]}")
        return r

    def get(self, path: str, **kw: Any) -> Any:
        """GET ``path`` (relative to :attr:`http_url`); returns parsed JSON,
        or the raw bytes when the answer is not JSON."""
        r = self._request("GET", path, **kw)
        if "json" in r.headers.get("Content-Type", ""):
            return r.json()
        return r.content

    def post(self, path: str, **kw: Any) -> Any:
        """POST to ``path``; returns parsed JSON (or the raw bytes)."""
        r = self._request("POST", path, **kw)
        if "json" in r.headers.get("Content-Type", ""):
            return r.json()
        return r.content

    def delete(self, path: str) -> None:
        self._request("DELETE", path)

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances."""
        return self.get("/instances")

    def studies(self) -> list[str]:
        """Orthanc IDs of all stored studies."""
        return self.get("/studies")

    def series(self) -> list[dict]:
        """All series, expanded (``/series?expand``): dicts with
        ``MainDicomTags``, ``Instances``, ``ParentStudy``, ``ID`` ..."""
        return self.get("/series", params={"expand": ""})

    def instance_tags(self, instance_id: str) -> dict:
        """Simplified tags (``/instances/{id}/simplified-tags``)."""
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def upload(self, path: str | os.PathLike[str]) -> dict:
        """POST one DICOM file to ``/instances``; returns Orthanc's answer
        (``{"ID": ..., "Status": "Success" | "AlreadyStored" | ...}``)."""
        data = Path(path).read_bytes()
        return self.post(
            "/instances", data=data, headers={"Content-Type": "application/dicom"}
        )

    def store_to_modality(
        self, modality_name: str, resource_ids: Sequence[str], *, timeout: float = 300
    ) -> dict:
        """Synchronous C-STORE of Orthanc resources (patients/studies/series/
        instances IDs) to a declared modality; raises OrthancError on failure."""
        return self.post(
            f"/modalities/{modality_name}/store",
            json={"Resources": list(resource_ids), "Synchronous": True},
            timeout=timeout,
        )

    def clear(self) -> None:
        """Delete all patients (and thus all stored data)."""
        for pid in self.get("/patients"):
            self.delete(f"/patients/{pid}")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<OrthancServer {self.aet} http={self.http_port} "
            f"dicom={self._dicom_port} {state}>"
        )


@contextlib.contextmanager
def running_orthanc(**kwargs: Any) -> Iterator[OrthancServer]:
    """``with running_orthanc(aet="PACS") as orthanc: ...`` - always stopped
    (and its temp directory removed) on exit, also on exceptions."""
    server = OrthancServer(**kwargs)
    with server:
        yield server


def orthanc_fixture(*, scope: str = "function", name: str | None = None, **kwargs: Any):
    """Build a pytest fixture yielding a running :class:`OrthancServer`.

    Example (module level in a test file or conftest)::

        orthanc = orthanc_fixture(aet="PACS")
        pacs_with_node = orthanc_fixture(
            name="pacs_with_node", modalities={"node": ("NODE", 11112)})

    kwargs are passed to :class:`OrthancServer`.  For values that depend on
    other fixtures, write the fixture by hand around :func:`running_orthanc`.
    """

    @pytest.fixture(scope=scope, name=name)
    def _orthanc() -> Iterator[OrthancServer]:
        with running_orthanc(**kwargs) as server:
            yield server

    return _orthanc


# --------------------------------------------------------------------------
# dcmtk SCUs
# --------------------------------------------------------------------------


def storescu(
    host: str,
    port: int,
    paths: Sequence[str | os.PathLike[str]],
    *,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "STORESCU",
    no_halt: bool = False,
    verbose: bool = True,
    extra_args: Sequence[str] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Send files with dcmtk ``storescu`` (env ``TCP_NODELAY=1``).

    Directories are scanned recursively (``+sd +r``).  Never raises for a
    failed transfer - inspect ``returncode``/``stdout``/``stderr`` (text);
    a timeout kills it and raises ``subprocess.TimeoutExpired``.

    dcmtk 3.6.7 exit codes: 0 = all stores succeeded; non-zero on
    association failure (1 = connection refused) or, without ``no_halt``,
    on the first failed store / unreadable file (storescu stops there).
    With ``no_halt`` (``-nh``) it goes on after failures **and exits 0
    anyway**, so use :func:`store_responses` to see per-file statuses
    (needs ``verbose``, the default: ``-v`` logs each response to stderr).
    """
    _check_local(host)
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("storescu needs at least one path")
    args = [STORESCU_BIN, "-aet", calling_aet, "-aec", called_aet, "-to", "30"]
    if any(p.is_dir() for p in paths):
        args += ["+sd", "+r"]
    if no_halt:
        args.append("-nh")
    if verbose:
        args.append("-v")
    args += [*extra_args, host, str(port), *map(str, paths)]
    return _run(args, timeout)


_STORE_RESPONSE = re.compile(r"Received Store Response \((.*)\)")


def store_responses(result: subprocess.CompletedProcess) -> list[str]:
    """Status texts of the C-STORE responses logged by a verbose
    :func:`storescu` run, in order, e.g. ``["Success", "Refused:
    OutOfResources"]``."""
    return _STORE_RESPONSE.findall(result.stderr or "")


def echoscu(
    host: str,
    port: int,
    *,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "ECHOSCU",
    extra_args: Sequence[str] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess:
    """C-ECHO with dcmtk ``echoscu``; returncode 0 means success."""
    _check_local(host)
    args = [ECHOSCU_BIN, "-aet", calling_aet, "-aec", called_aet, "-to", "30",
            *extra_args, host, str(port)]
    return _run(args, timeout)


def _check_local(host: str) -> None:
    if host not in (LOCALHOST, "localhost"):
        raise ValueError(f"test peers may only talk to 127.0.0.1/localhost, not {host!r}")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the group."""
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=nodelay_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_group(proc, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


class StoreSCP(_PeerProcess):
    """dcmtk ``storescp`` as a simple C-STORE destination on 127.0.0.1.

    ``with StoreSCP(tmp_path / "in", aet="DEST") as scp: ...`` - files land
    in ``output_dir`` (``scp.files()``).  Accepts all transfer syntaxes dcmtk
    knows (``+xa``) unless ``accept_all=False``; host lookups are disabled
    (``-dhl``).  ``stop()``/``start()`` restart it on the same port.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        accept_all: bool = True,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 15.0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.aet = aet
        self.port = port if port is not None else free_port()
        self.accept_all = accept_all
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = self.output_dir.parent / f"storescp-{self.port}.log"

    def start(self) -> StoreSCP:
        if self.running:
            return self
        self.output_dir.mkdir(parents=True, exist_ok=True)
        args = [STORESCP_BIN, "-aet", self.aet, "-od", str(self.output_dir), "-dhl", "-v"]
        if self.accept_all:
            args.append("+xa")
        args += [*self.extra_args, str(self.port)]
        self._spawn(args, self.log_path)
        try:
            deadline = time.monotonic() + self.startup_timeout
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"storescp exited with {self._proc.returncode}:\n{_tail(self.log_path)}")
                if _port_open(self.port) and echoscu(
                        LOCALHOST, self.port, called_aet=self.aet, timeout=10).returncode == 0:
                    return self
                if time.monotonic() > deadline:
                    raise RuntimeError(f"storescp not ready:\n{_tail(self.log_path)}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._stop_group(grace=5.0)

    def files(self) -> list[Path]:
        """Received files, sorted by name."""
        if not self.output_dir.is_dir():
            return []
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------
# External test data
# --------------------------------------------------------------------------


def test_data_dir() -> Path | None:
    """``Path($DICOM_NODE_TEST_DATA)`` if the variable is set and the
    directory exists, else None."""
    value = os.environ.get(TEST_DATA_ENV)
    if not value:
        return None
    path = Path(value)
    return path if path.is_dir() else None


# Not a test, despite the name (pytest would otherwise try to collect it when
# this module is imported into a test module's namespace).
test_data_dir.__test__ = False  # type: ignore[attr-defined]


def require_test_data() -> Path:
    """Return the external test-data directory.

    Skips the calling test when ``$DICOM_NODE_TEST_DATA`` is unset.  If it is
    set but does not point to a directory, that is a configuration error and
    the test fails instead of silently skipping.
    """
    value = os.environ.get(TEST_DATA_ENV)
    if not value:
        pytest.skip(f"external DICOM test data not available (set ${TEST_DATA_ENV})")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"${TEST_DATA_ENV}={value!r} is not a directory")
    return path


# --------------------------------------------------------------------------- an HTTPS front for Orthanc


class TlsFront:
    """A TLS-terminating relay on 127.0.0.1 in front of a plain TCP service (here Orthanc's HTTP).

    Debian's Orthanc 1.10 crashes (SIGSEGV) on its first HTTPS request with ``SslEnabled``, so the
    tests put it behind this, as hospitals often put a reverse proxy: clients speak HTTPS to
    :attr:`port`, each connection is relayed as plain TCP to ``127.0.0.1:target_port``.
    """

    def __init__(self, target_port: int, cert_file: Path, key_file: Path) -> None:
        self.target_port = target_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file, key_file)
        self._listener = socket.create_server((LOCALHOST, 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tls-front", daemon=True)

    def __enter__(self) -> TlsFront:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):  # a client that does not trust us: its error is the test's point
            client.close()
            return
        with tls, socket.create_connection((LOCALHOST, self.target_port)) as upstream:
            with contextlib.suppress(OSError):
                self._relay(tls, upstream)

    @staticmethod
    def _relay(tls: ssl.SSLSocket, upstream: socket.socket) -> None:
        """Copy bytes both ways in one thread (an SSL socket must not be read and written at once)."""
        while True:
            readable = [tls] if tls.pending() else select.select([tls, upstream], [], [], 30)[0]
            if not readable:
                return  # idle for 30 s
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                (upstream if sock is tls else tls).sendall(data)
