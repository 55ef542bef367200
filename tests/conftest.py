"""Shared test helpers: real files, real tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.peers import require_test_data


def bundled(name: str) -> Path:
    """A test file inside pydicom's own package (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with this pydicom"
    return Path(path)


@pytest.fixture
def data_dir() -> Path:
    """The shared real-data folder ($DICOM_NODE_TEST_DATA); skips only when unset."""
    return require_test_data()


@pytest.fixture
def ct_series_dir(data_dir: Path) -> Path:
    """The real 28-slice GE head CT."""
    return data_dir / "ct_series" / "ge_head_tilt"


def tool(name: str) -> str:
    """Path of a required external tool; the test fails (not skips) when it is missing."""
    found = shutil.which(name)
    assert found, f"{name} not on PATH: run scripts/setup --test as root to install it"
    return found


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """Run dicom3tools' dciodvfy; return its Error lines and its whole output."""
    result = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``dicom-node`` as a user would (a new process), capturing its output."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (tests take a fresh database each: ``new_database()``)."""
    from tests.postgres import running_postgres

    with running_postgres() as server:
        yield server
