"""The node's C-STORE handler on a real pynetdicom SCP in the test's own process, and a one-instance sender.

:func:`running_scp` serves :class:`node.receive.scp.StoreHandler` on 127.0.0.1 (a free port) over a
spool and a job store in a folder, receiving data sets in memory or streamed to the spool's
``.incoming`` folder; :class:`Scp` says what it holds.  :func:`c_store` sends one data set on its own
association, as a modality would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE

from node.imaging.source import DecodeLimits
from node.receive.scp import StoreHandler, build_application_entity, disable_streamed_receive, enable_streamed_receive
from node.store.jobstore import JobStore
from node.store.spool import INCOMING, Spool
from node.telemetry.metrics import Metrics
from tests.support.peers import LOCALHOST, free_port

__all__ = ["Scp", "c_store", "running_scp"]


@dataclass
class Scp:
    """A running in-process SCP: its port, spool, job store and handler."""

    port: int
    spool: Spool
    jobs: JobStore
    handler: StoreHandler
    streamed: bool

    @property
    def incoming(self) -> list[Path]:
        """Files in the spool's ``.incoming`` folder (data sets still arriving, or left behind)."""
        folder = self.spool.root / INCOMING
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def spooled(self) -> list[Path]:
        """Every ``.dcm`` file under the spool."""
        return sorted(self.spool.root.rglob("*.dcm"))

    def stored(self) -> list[Path]:
        """The ``.dcm`` files stored in the spool (outside ``.incoming``)."""
        return [p for p in self.spooled() if INCOMING not in p.parts]


def running_scp(folder: Path, *, streamed: bool, min_free_while_receiving: int = 0,
                decode_limits: DecodeLimits | None = None) -> Iterator[Scp]:
    """Yield an :class:`Scp` (AE title DICOMNODE) over ``folder/spool`` and ``folder/jobs.sqlite``, then stop it.

    Parameters
    ----------
    streamed
        Receive streamed to the spool (pynetdicom's process-wide switch, set back afterwards).
    min_free_while_receiving
        Streamed: bytes that must stay free while a data set arrives.
    decode_limits
        The handler's decode limits (default: none).
    """
    spool, jobs = Spool(folder / "spool"), JobStore(folder / "jobs.sqlite")
    if streamed:
        enable_streamed_receive(spool.root, min_free_bytes=min_free_while_receiving)
    try:
        handler = StoreHandler(spool, jobs, metrics=Metrics(), decode_limits=decode_limits)
        port = free_port()
        server = build_application_entity("DICOMNODE").start_server(
            (LOCALHOST, port), block=False, evt_handlers=handler.handlers())
        try:
            yield Scp(port, spool, jobs, handler, streamed)
        finally:
            server.shutdown()
    finally:
        disable_streamed_receive()
        jobs.close()


def c_store(port: int, ds: pydicom.Dataset, syntax: str, *, calling_ae: str = "SENDER") -> pydicom.Dataset:
    """C-STORE *ds* in transfer syntax *syntax* to DICOMNODE at 127.0.0.1:*port* on a new association;
    returns the response (Status, Error Comment)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, syntax)
    assoc = ae.associate(LOCALHOST, port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()
