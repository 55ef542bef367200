"""Run ``dicom-node serve`` as a real process for tests, build test series from real files, wait for a condition."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.support.peers import echoscu
from tests.support.tools import ROOT, node_env


class NodeProcess:
    """``dicom-node serve --config FILE`` in its own process group, logging to a file."""

    def __init__(self, config_text: str, workdir: Path, *, ae_title: str = "DICOMNODE", port: int,
                 code_root: Path = ROOT, args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.code_root = code_root  # the checkout whose node runs (benchmarks compare two)
        self.config_path = workdir / "node.toml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / "node.log"
        self.ae_title = ae_title
        self.port = port
        self.args = args  # more arguments of serve (--role worker)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> NodeProcess:
        """Start and wait until it answers C-ECHO."""
        return self.start_without_echo(
            lambda: echoscu("127.0.0.1", self.port, called_aet=self.ae_title).returncode == 0, timeout,
            "answer C-ECHO")

    def start_without_echo(self, ready: Callable[[], bool], timeout: float = 30, what: str = "get ready") -> NodeProcess:
        """Start and wait until *ready()* (a node without a DICOM listener: a worker)."""
        # a checkout from before node/__main__.py (benchmarks run older revisions) starts as node.cli
        module = "node" if (Path(self.code_root) / "node" / "__main__.py").exists() else "node.cli"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "serve", "--config", str(self.config_path), *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=node_env(code_root=self.code_root), start_new_session=True,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dicom-node exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if ready():
                return self
            time.sleep(0.2)
        self.kill()  # never leave a node behind that the caller's "with" will not stop
        raise RuntimeError(f"dicom-node did not {what} in {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        """Everything the node logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or an operator's kill -9 would."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, grace: float = 20) -> None:
        """SIGTERM and wait (SIGKILL after *grace* seconds)."""
        if not self.alive():
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def copy_as_series(sources: list[Path], out_dir: Path, *, tweak: Callable[[pydicom.Dataset, int], None] | None = None) -> list[Path]:
    """Copies of real files as one new series (new Study/Series/SOP UIDs), numbered 1..n."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for number, src in enumerate(sources, start=1):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        if tweak:
            tweak(ds, number)
        path = out_dir / f"{number:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def wait_for(condition: Callable[[], object], timeout: float, what: str, log: Callable[[], str] = lambda: "") -> object:
    """Poll *condition* until truthy; fail naming *what* with the node's log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n--- node log ---\n{log()[-4000:]}")
