"""The checkout under test, pydicom's bundled files, external tools and the ``dicom-node`` command.

* :data:`ROOT` - the checkout whose ``node`` package the tests run (child processes get it as
  ``PYTHONPATH``: :func:`node_env`).
* :func:`bundled` - a file of pydicom's own test data (never downloaded).
* :func:`tool` / :func:`dciodvfy_errors` - a required external program; dicom3tools' verdict on a file.
* :func:`chromium_screenshot` - a page as headless Chromium draws it.
* :func:`run_cli` - ``python -m node ARGS`` as a user would run it (a new process); :func:`env_without_config`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from pydicom.data import get_testdata_file

__all__ = ["ROOT", "bundled", "chromium_screenshot", "dciodvfy_errors", "env_without_config", "node_env", "run_cli",
           "tool"]

ROOT = Path(__file__).resolve().parents[2]


def bundled(name: str) -> Path:
    """A test file inside pydicom's own package (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with this pydicom"
    return Path(path)


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


def chromium_screenshot(url: str, shot: Path, size: tuple[int, int], workdir: Path, *,
                        profile: str = "profile") -> subprocess.CompletedProcess:
    """Headless Chromium draws *url* (no JavaScript needed; 5 s of virtual time) into the PNG file *shot*.

    Parameters
    ----------
    size
        The window, (width, height) in pixels: the screenshot's size.
    workdir, profile
        Chromium runs in *workdir* with its own profile folder ``workdir / profile``.
    """
    width, height = size
    return subprocess.run(
        [tool("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--virtual-time-budget=5000",
         f"--user-data-dir={workdir / profile}", f"--screenshot={shot}", f"--window-size={width},{height}", url],
        capture_output=True, text=True, timeout=120, cwd=workdir,
    )


def node_env(base: Mapping[str, str] | None = None, *, code_root: Path = ROOT) -> dict[str, str]:
    """The environment of a ``dicom-node`` child process.

    Parameters
    ----------
    base
        The environment to start from (default: this process's).
    code_root
        The checkout whose ``node`` package the child imports (``PYTHONPATH``).
    """
    return dict(os.environ if base is None else base, PYTHONPATH=str(code_root))


def env_without_config(**more: str) -> dict[str, str]:
    """This process's environment without ``$DICOM_NODE_CONFIG`` (the config a test names is the one used),
    with *more* variables."""
    return {**{k: v for k, v in os.environ.items() if k != "DICOM_NODE_CONFIG"}, **more}


def run_cli(*args: str, timeout: float = 600, env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``dicom-node ARGS`` as a user would (a new process), capturing its output.

    Parameters
    ----------
    args
        The command line after ``dicom-node``.
    timeout
        Seconds before the process is killed (``subprocess.TimeoutExpired``).
    env
        The child's environment (default: this process's); ``PYTHONPATH`` is set to :data:`ROOT`.
    cwd
        The child's working folder (default: this process's).
    """
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=timeout,
                          env=node_env(env), cwd=cwd)
