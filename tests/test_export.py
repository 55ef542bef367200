"""`dicom-node export` (issue 18): a tree of 20 series into a dataset folder with index.csv.

Killed half way (SIGKILL to its process group) and run again, it completes without redoing the
series the first run finished; index.csv is read back with the csv module.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from tests.support import run_cli
from tests.support.volume_series import PLACEMENT_MM, dicom_files, read_index, sidecar_of, slice_errors, write_series

ROOT = Path(__file__).resolve().parents[1]
SERIES, SLICES = 20, 6


def make_tree(root: Path, ct_slice: Path) -> dict[str, int]:
    """20 series of 6 slices in a site-like tree (two studies, a folder per series, odd file names):
    their Series Instance UIDs -> the slice spacing each was given."""
    spacing_of = {}
    studies = [generate_uid(), generate_uid()]
    for number in range(SERIES):
        spacing = 1 + number % 4
        folder = root / f"patient{number % 3}" / f"study{number % 2}" / f"series {number:02d}"
        paths = write_series(folder, [(-125.0, -120.0, 10.0 + spacing * i) for i in range(SLICES)], base=ct_slice,
                             study_uid=studies[number % 2], names=[f"IM{i:05d}" for i in range(SLICES)])
        spacing_of[pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID] = spacing
    (root / "README.txt").write_text("not DICOM\n")
    return spacing_of


def records(out: Path) -> list[Path]:
    return sorted(out.glob("*/*/.export.json"))


def test_export_killed_half_way_resumes_without_redoing_finished_series(ct_series_dir: Path, tmp_path: Path) -> None:
    spacing_of = make_tree(tmp_path / "tree", ct_series_dir / "01.dcm")
    out = tmp_path / "dataset"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log_path = tmp_path / "first.log"
    with log_path.open("wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "node", "export", str(tmp_path / "tree"), "--out", str(out)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(records(out)) < 3 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, log_path.read_text()
    finished = {path.parent: path.stat().st_mtime_ns for path in records(out)}
    assert 3 <= len(finished) < SERIES, f"killed after {len(finished)} of {SERIES} series: not half way"
    volumes_before = {p: p.stat().st_mtime_ns for folder in finished for p in folder.glob("volume*")}
    assert len(volumes_before) == 2 * len(finished)

    second = run_cli("export", str(tmp_path / "tree"), "--out", str(out), "--workers", "2")
    assert second.returncode == 0, second.stderr
    assert f"{SERIES} series ({len(finished)} skipped as already exported)" in second.stderr
    # the finished series were not redone: their volumes, sidecars and records are the same files
    assert {p: p.stat().st_mtime_ns for p in volumes_before} == volumes_before
    assert {f: (f / ".export.json").stat().st_mtime_ns for f in finished} == finished
    assert len(records(out)) == SERIES
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # the killed run's temporaries are gone

    rows = read_index(out / "index.csv")
    assert len(rows) == SERIES
    assert list(rows[0]) == ["volume", "study_uid", "series_uid", "modality", "shape", "spacing", "orientation",
                             "source_files", "pipeline"]
    assert {row["series_uid"] for row in rows} == set(spacing_of)
    sources = dicom_files(tmp_path / "tree")
    for row in rows:
        volume = out / row["volume"]
        assert volume.parent.name == row["series_uid"] and volume.parent.parent.name == row["study_uid"]
        assert row["modality"] == "CT" and row["shape"] == f"512x512x{SLICES}" and row["source_files"] == str(SLICES)
        assert row["orientation"] == "LPS"  # axial: i to the patient's left, j posterior, k to the head
        spacing = [float(v) for v in row["spacing"].split("x")]
        assert np.allclose(spacing, [0.488281, 0.488281, spacing_of[row["series_uid"]]])
        image = nib.load(str(volume))
        assert image.shape == (512, 512, SLICES)
        assert max(slice_errors(image.affine, sidecar_of(volume), sources)) <= PLACEMENT_MM

    # a third run has nothing to do; another pipeline redoes everything
    third = run_cli("export", str(tmp_path / "tree"), "--out", str(out))
    assert third.returncode == 0 and f"({SERIES} skipped as already exported)" in third.stderr
    windowed = run_cli("export", str(tmp_path / "tree"), "--out", str(out), "--window", "brain")
    assert windowed.returncode == 0 and "(0 skipped as already exported)" in windowed.stderr
    rows = read_index(out / "index.csv")
    assert len(rows) == SERIES and all("brain window" in row["pipeline"] for row in rows)


def test_export_npz_index_and_exit_codes(tmp_path: Path) -> None:
    write_series(tmp_path / "tree" / "a", [(0.0, 0.0, 2.0 * i) for i in range(5)])
    write_series(tmp_path / "tree" / "b", [(0.0, 0.0, 2.0 * i) for i in (0, 1, 1, 2)])  # a duplicate: refused
    out = tmp_path / "npz"
    result = run_cli("export", str(tmp_path / "tree"), "--out", str(out), "--format", "npz")
    assert result.returncode == 1  # one series refused
    assert "share a position along the slice normal" in result.stderr
    (row,) = read_index(out / "index.csv")
    assert row["volume"].endswith("/volume.npz") and row["shape"] == "128x128x5"
    with np.load(out / row["volume"]) as arrays:
        assert arrays["volume"].shape == (128, 128, 5)
    missing = run_cli("export", str(tmp_path / "nowhere"), "--out", str(out))
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    wrong = run_cli("export", str(tmp_path / "tree"), "--out", str(out), "--format", "png")
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr


def test_progress_bar_on_a_terminal_log_lines_otherwise(tmp_path: Path) -> None:
    for letter in "ab":
        write_series(tmp_path / "tree" / letter, [(0.0, 0.0, 2.0 * i) for i in range(3)])
    primary, secondary = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-m", "node", "export", str(tmp_path / "tree"), "--out",
                                str(tmp_path / "tty")], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=secondary, env=env)
    os.close(secondary)
    shown = b""
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:  # read as it comes: a full terminal buffer would block the export
            ready, _, _ = select.select([primary], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # the other side is closed: all read
                    break
                if not chunk:
                    break
                shown += chunk
            elif process.poll() is not None:
                break
        process.wait(timeout=30)
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == 0, shown.decode(errors="replace")
    text = shown.decode(errors="replace")
    assert "\rexport [###############...............] 1/2 series" in text
    assert "\rexport [##############################] 2/2 series, 0 skipped, 0 with failures" in text
    assert "series 1/2" not in text  # the bar, not the per-series log lines
    piped = run_cli("export", str(tmp_path / "tree"), "--out", str(tmp_path / "pipe"))
    assert piped.returncode == 0 and "\r" not in piped.stderr
    assert "series 1/2" in piped.stderr and "series 2/2" in piped.stderr
