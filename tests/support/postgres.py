"""A real PostgreSQL server for tests (Debian's package), in a temporary folder on 127.0.0.1.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the ``postgres``
user the package creates (``runuser``), in a folder it owns.  :class:`PostgresServer` starts it on a
free port (TCP on 127.0.0.1 only, its Unix socket in the same folder), makes the database, and stops
and removes everything on exit; it can be stopped and started again on the same port and data (a
database outage in the middle of a test).
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.peers import free_port

__all__ = ["PostgresServer", "postgres_bin", "running_postgres"]

USER = "node"
DATABASE = "dicomnode"
_started: list[PostgresServer] = []


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (newest version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """``initdb`` + ``pg_ctl start`` in a fresh folder; :attr:`url` is the database's URL."""

    def __init__(self) -> None:
        binaries = postgres_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL server binaries not found (scripts/setup --test installs postgresql)")
        self.bin = binaries
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.data = self.root / "data"
        self.as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        """``postgresql://node@127.0.0.1:PORT/dicomnode``."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        command = (["runuser", "-u", "postgres", "--"] if self.as_root else []) + list(args)
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def create(self) -> PostgresServer:
        """Make the cluster and its database, and start it."""
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", USER, "--no-sync")
        self.start()
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, DATABASE)
        _started.append(self)
        return self

    def start(self) -> None:
        """Start the server (again) on its port and data."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-l", str(self.root / "log"),
                  "-o", options, "start")

    def stop(self) -> None:
        """Stop the server (fast: connections are closed, the data kept)."""
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        """Stop the server and remove its folder."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if self in _started:
                _started.remove(self)

    def new_database(self) -> str:
        """A new empty database on this server; returns its URL."""
        import psycopg

        self._databases = getattr(self, "_databases", 0) + 1
        name = f"test{self._databases}"
        with psycopg.connect(self.url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def log(self) -> str:
        """The server's log."""
        path = self.root / "log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started PostgreSQL with an empty database, removed afterwards."""
    started = time.monotonic()
    server = PostgresServer().create()
    server.startup_seconds = time.monotonic() - started
    try:
        yield server
    finally:
        server.remove()


@atexit.register
def _remove_leftovers() -> None:  # pragma: no cover - only when a test run is interrupted
    for server in list(_started):
        try:
            server.remove()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
