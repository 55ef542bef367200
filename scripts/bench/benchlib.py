"""Shared helpers for the benchmarks in ``scripts/bench/`` (not part of the test suite).

Everything here talks to 127.0.0.1 only, and every server a benchmark starts is stopped in a
``finally`` (the peers from ``tests/support/peers.py`` also kill their process groups at exit).

Generated inputs are made once and kept in ``$DICOM_NODE_BENCH_CACHE`` (default
``/tmp/dicom-node-bench``): a 300-slice 512x512 CT series built from the real GE head CT slice
``ct_series/ge_head_tilt/01.dcm`` of the shared data (``$DICOM_NODE_TEST_DATA``, default
``../shared/data/dicom`` beside the checkout).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import BRAIN, LOCALHOST, folder_route, free_port, nodelay_env, stop_process_group  # noqa: E402

CACHE = Path(os.environ.get("DICOM_NODE_BENCH_CACHE", "/tmp/dicom-node-bench"))
DATA = Path(os.environ.get("DICOM_NODE_TEST_DATA", ROOT.parent / "shared" / "data" / "dicom"))
CT_SLICE = DATA / "ct_series" / "ge_head_tilt" / "01.dcm"

# dcmtk's tools by absolute path: pynetdicom installs its own "storescu"/"storescp" scripts into
# the venv's bin, which would shadow dcmtk's when the venv is activated.
STORESCU = shutil.which("storescu", path="/usr/bin:/usr/local/bin") or "storescu"
STORESCP = shutil.which("storescp", path="/usr/bin:/usr/local/bin") or "storescp"
ECHOSCU = shutil.which("echoscu", path="/usr/bin:/usr/local/bin") or "echoscu"

__all__ = [
    "CACHE", "ROOT", "LOCALHOST", "free_port", "ct_series", "push", "echo", "Background",
    "machine_info", "print_table", "median", "tempdir", "count_files", "sync_disks", "negotiated_pdu",
    "wait_quiet", "process_group_cpu", "checkout",
]


# --------------------------------------------------------------------------- inputs


#: Pipeline steps of the processing benchmarks: rescale, then fastai's equalisation per image.
RESCALE_EQUALISE = [{"op": "rescale"}, {"op": "equalise", "per": "image"}]


def ct_folder_route(out: Path) -> str:
    """Config tables for the node in the ingest/scale benchmarks: CT through a brain window to folder *out*."""
    return folder_route(out, None, name="ct-brain", steps=BRAIN, output=None, match={"Modality": "CT"})


def ct_series(count: int = 300, *, series: int = 1) -> list[Path]:
    """*count* copies of the real CT slice as *series* new series of one study (new UIDs,
    InstanceNumber 1..count in each), files sorted by series then instance.

    Built once into the cache folder (atomically: a half-built folder is never used) and reused.
    Slices get a z position 1 mm apart so each series is a plausible volume.
    """
    import pydicom
    from pydicom.uid import generate_uid

    folder = CACHE / (f"ct{count}" if series == 1 else f"ct{series}x{count}")
    marker = folder / ".complete"
    if marker.exists():
        return sorted(folder.glob("*.dcm"))
    if not CT_SLICE.is_file():
        sys.exit(f"bench: the real CT slice {CT_SLICE} is missing (set $DICOM_NODE_TEST_DATA)")
    CACHE.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=CACHE))
    try:
        ds = pydicom.dcmread(CT_SLICE)
        ds.StudyInstanceUID = generate_uid()
        x, y, z = (float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0]))
        for series_number in range(1, series + 1):
            ds.SeriesInstanceUID = generate_uid()
            ds.SeriesNumber = series_number
            ds.SeriesDescription = f"bench {count} slices"
            for number in range(1, count + 1):
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.InstanceNumber = number
                ds.ImagePositionPatient = [x, y, z + number - 1]
                ds.SliceLocation = z + number - 1
                name = f"{number:04d}.dcm" if series == 1 else f"s{series_number:02d}-{number:04d}.dcm"
                ds.save_as(building / name, enforce_file_format=True)
        (building / ".complete").touch()
        if folder.exists():
            shutil.rmtree(folder)
        building.rename(folder)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return sorted(folder.glob("*.dcm"))


def warm_cache(paths: Sequence[Path]) -> int:
    """Read the files once so every timed run starts with them in the page cache; returns bytes."""
    return sum(len(p.read_bytes()) for p in paths)


def sync_disks() -> None:
    """Flush dirty pages so one run's writeback does not land inside the next run's timing."""
    os.sync()


# --------------------------------------------------------------------------- dcmtk


def push(port: int, paths: Sequence[Path], *, called_aet: str, calling_aet: str = "BENCHSCU",
         timeout: float = 600) -> float:
    """Send *paths* with dcmtk ``storescu`` over ONE association; returns wall seconds.

    Raises RuntimeError when storescu fails (any C-STORE not Success stops it: no ``-nh``).
    """
    args = [STORESCU, "-aet", calling_aet, "-aec", called_aet, "-to", "60", LOCALHOST, str(port),
            *map(str, paths)]
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env=nodelay_env(), timeout=timeout,
                            stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu to port {port} failed ({result.returncode}): "
                           f"{(result.stdout + result.stderr)[-2000:]}")
    return seconds


def push_started(port: int, paths: Sequence[Path], *, called_aet: str, calling_aet: str) -> subprocess.Popen:
    """Start ``storescu`` without waiting (for parallel pushes); the caller waits and checks."""
    args = [STORESCU, "-aet", calling_aet, "-aec", called_aet, "-to", "60", LOCALHOST, str(port),
            *map(str, paths)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=nodelay_env(), stdin=subprocess.DEVNULL, start_new_session=True)


def negotiated_pdu(port: int, called_aet: str) -> str:
    """What a receiver negotiates with dcmtk, from one C-ECHO (no instance stored).

    Returns e.g. ``"accepts 0 (unlimited); storescu sends PDVs of 131060"``: the maximum PDU length
    the receiver advertises in its A-ASSOCIATE-AC (0 is unlimited), and the largest PDV dcmtk then
    sends it (storescu and echoscu negotiate alike; dcmtk caps what it sends at 128 KiB).
    """
    result = subprocess.run([ECHOSCU, "-d", "-aec", called_aet, "-to", "5", LOCALHOST, str(port)],
                            capture_output=True, text=True, env=nodelay_env(), timeout=30, stdin=subprocess.DEVNULL)
    text = result.stdout + result.stderr
    accepted = re.findall(r"Their Max PDU Receive Size:\s*(\d+)", text)
    sent = re.search(r"Max Send PDV:\s*(\d+)", text)
    if result.returncode != 0 or not accepted or not sent:
        return f"unknown (echoscu exited {result.returncode})"
    advertised = int(accepted[-1])  # the last one is parsed from the A-ASSOCIATE-AC
    return f"accepts {advertised}{' (unlimited)' if advertised == 0 else ''}; storescu sends PDVs of {sent.group(1)}"


def process_group_cpu(pgid: int) -> float:
    """CPU seconds used so far by the live processes of process group *pgid* (from /proc)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ..., utime (11), stime (12)
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_quiet(pgid: int, *, timeout: float = 30.0, window: float = 0.5, busy: float = 0.05) -> float:
    """Wait until process group *pgid* uses less than *busy* of a CPU over *window* s (its worker
    processes done importing, say); returns the seconds waited (at most *timeout*)."""
    started = time.monotonic()
    last = process_group_cpu(pgid)
    while time.monotonic() - started < timeout:
        time.sleep(window)
        now = process_group_cpu(pgid)
        if now - last < busy * window:
            break
        last = now
    return time.monotonic() - started


def echo(port: int, called_aet: str) -> bool:
    """True when a dcmtk C-ECHO to 127.0.0.1:*port* succeeds."""
    result = subprocess.run([ECHOSCU, "-aec", called_aet, "-to", "5", LOCALHOST, str(port)],
                            capture_output=True, env=nodelay_env(), timeout=30, stdin=subprocess.DEVNULL)
    return result.returncode == 0


class Background:
    """A server process in its own process group, stopped (SIGTERM, then SIGKILL) by :meth:`stop`.

    Ready when it answers C-ECHO as *aet* on *port*.
    """

    def __init__(self, args: Sequence[str], *, port: int, aet: str, log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.args, self.port, self.aet, self.log_path = list(args), port, aet, log_path
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Background:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env or nodelay_env(), cwd=self.cwd, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.args[0]} exited with {self.proc.returncode}: "
                                       f"{self.log_path.read_text(errors='replace')[-2000:]}")
                if echo(self.port, self.aet):  # no bare TCP probe: pynetdicom counts it as an association
                    return self
                time.sleep(0.1)
            raise RuntimeError(f"{self.args[0]} not ready in {timeout} s")
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 10) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process_group(proc, grace)

    def __enter__(self) -> Background:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- reporting


@contextlib.contextmanager
def tempdir(prefix: str) -> Iterator[Path]:
    """A fresh folder under the cache folder's ``runs/`` (same disk as the inputs), removed after."""
    (CACHE / "runs").mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=CACHE / "runs"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def count_files(folder: Path, pattern: str = "*") -> int:
    """Regular, non-hidden files below *folder* matching *pattern*."""
    return sum(1 for p in folder.rglob(pattern) if p.is_file() and not p.name.startswith("."))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def checkout(revision: str) -> Path:
    """A ``git worktree`` of *revision* in the cache folder (made once), to run an older node beside this one."""
    path = CACHE / f"checkout-{revision}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), revision], check=True,
                       capture_output=True)
    shadow = path / "node" / "process" / "__init__.py"
    if shadow.exists() and (path / "node" / "process.py").exists() and len(shadow.read_text().splitlines()) <= 1:
        shadow.unlink()  # revisions between issue 13's empty stage folders and its move: the package hid process.py
    return path


def machine_info() -> str:
    """One line: date, CPUs, CPU model, memory, Python, disk of the cache folder."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return (f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; nproc {os.cpu_count()}; CPU {model}; "
            f"RAM {mem}; Python {platform.python_version()}; {load_average()}; node at {git_revision()}")


def load_average() -> str:
    """The 1/5/15-minute load averages: other work on the machine shows up here."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def git_revision() -> str:
    """The checkout's commit, with "+changes" when node/ has uncommitted edits."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "node"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head or '?'}{' +uncommitted node/ changes' if dirty else ''}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None) -> None:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(c) for c in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}\n")
    for index, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)
