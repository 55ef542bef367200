"""Durable writes: atomic replacement, and the writeback head start the spool uses while receiving."""

from __future__ import annotations

import os
import sys
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
