"""Durable writes: atomic replacement, and the writeback head start the spool uses while receiving."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from node.store import fsutil
from node.store.fsutil import atomic_output, start_writeback


def test_atomic_output_replaces_in_one_step_and_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out" / "a.bin"
    with atomic_output(target) as handle:
        handle.write(b"first")
    with pytest.raises(RuntimeError), atomic_output(target) as handle:
        handle.write(b"half of the second")
        raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]  # no temporary file left
    assert target.stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_sync_file_range_is_found_on_linux() -> None:
    """Without it the receive path still works, but every fsync before Success waits for all the data."""
    assert fsutil._SYNC_FILE_RANGE is not None


def test_start_writeback_is_advice_and_never_fails(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    data = os.urandom(256 << 10)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, data)
        start_writeback(fd, 0, len(data))
        start_writeback(fd, len(data), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    start_writeback(fd, 0, len(data))  # a closed descriptor: ignored, as any error is
    start_writeback(-1, 0, 1)
    assert path.read_bytes() == data


class RecordedFsyncs:
    """fsutil.fsync_dir, still run, with when each began and ended (and a little slower, so callers overlap)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, float, float]] = []
        real = fsutil.fsync_dir

        def recorded(folder) -> None:
            began = time.perf_counter()
            real(folder)
            time.sleep(0.005)
            self.calls.append((os.fspath(folder), began, time.perf_counter()))

        monkeypatch.setattr(fsutil, "fsync_dir", recorded)


def test_folder_syncs_share_one_fsync_that_began_after_each_caller_asked(tmp_path: Path, monkeypatch) -> None:
    fsyncs = RecordedFsyncs(monkeypatch)
    syncs = fsutil.FolderSyncs()
    start = threading.Barrier(20)
    asked: list[tuple[float, float]] = []

    def caller(n: int) -> None:
        (tmp_path / f"{n}.dcm").write_bytes(b"x")  # the change the fsync must cover
        start.wait(timeout=10)
        began = time.perf_counter()
        syncs.sync(tmp_path)
        asked.append((began, time.perf_counter()))

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(asked) == 20
    for began, returned in asked:  # each returned after an fsync that started after it asked
        assert any(began <= fsync_began and fsync_ended <= returned for _, fsync_began, fsync_ended in fsyncs.calls)
    assert 1 <= len(fsyncs.calls) < 20  # shared
    assert not syncs._folders  # nothing kept once nobody waits


def test_adopt_fsyncs_the_new_series_and_study_folders_into_their_parents(tmp_path: Path, monkeypatch) -> None:
    from node.store.spool import Spool

    fsyncs = RecordedFsyncs(monkeypatch)
    spool = Spool(tmp_path / "spool")
    for sop in ("1.1", "1.2"):
        incoming = tmp_path / f"{sop}.tmp"
        incoming.write_bytes(b"data")
        spool.adopt(incoming, "1.2.3", "1.2.3.4", sop)
    study, series = spool.root / "1.2.3", spool.root / "1.2.3" / "1.2.3.4"
    assert [folder for folder, _, _ in fsyncs.calls] == [str(series), str(study), str(spool.root), str(series)]


def test_a_folder_that_cannot_be_fsynced_is_an_error_naming_it(tmp_path: Path) -> None:
    """A failed folder fsync is not swallowed: what was renamed into it may not survive a crash."""
    fsutil.fsync_dir(tmp_path)  # a real folder: fine
    missing = tmp_path / "gone"
    with pytest.raises(OSError, match=f"cannot open folder {missing} to fsync it"):
        fsutil.fsync_dir(missing)
