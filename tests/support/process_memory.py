"""Peak memory of a process together with all its descendants, read from ``/proc`` while it runs.

The node may do its work in child processes (processing workers), so the peak of the node's own
process is not enough: :class:`TreePeakMemory` samples, every few tens of milliseconds, the sum
over the process and every descendant of ``VmHWM`` (each process's own peak resident set size so
far, kept by the kernel, so a spike between two samples is not missed for a process still alive)
and keeps the largest sum seen.  That sum is at least the true peak of the tree's resident memory
(the processes' peaks need not have been at the same moment): an upper bound, which is what a
"stays under" assertion needs.  A child that lives and dies between two samples is not seen.
"""

from __future__ import annotations

import threading
from pathlib import Path

__all__ = ["TreePeakMemory", "peak_rss", "process_tree", "tree_hwm"]

_PROC = Path("/proc")


def _parents() -> dict[int, int]:
    """Parent pid of every process now running."""
    parents = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ")"
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def process_tree(root: int) -> list[int]:
    """*root* and every process descending from it (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_hwm(root: int) -> int:
    """Sum of ``VmHWM`` (bytes) over *root* and its descendants, now."""
    return sum(_status_kb(pid, "VmHWM") for pid in process_tree(root)) * 1024


class TreePeakMemory:
    """Samples :func:`tree_hwm` of *root* in a background thread; :attr:`peak` is the largest sum.

    Use as a context manager around the work measured; read :attr:`peak` (bytes) after it, or
    :meth:`sample` for the value so far.
    """

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
        self.processes_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Take one sample now; returns the peak so far (bytes)."""
        pids = process_tree(self.root)
        self.processes_seen.update(pids)
        total = sum(_status_kb(pid, "VmHWM") for pid in pids) * 1024
        self.peak = max(self.peak, total)
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreePeakMemory:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()


def peak_rss(pid: int) -> int:
    """Peak resident set size (``VmHWM``) of process *pid*, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")
