"""DICOM ingest: a pynetdicom SCP that spools every instance durably before answering Success.

The received bytes are written as they came (no decoding, no transcoding) behind a Part 10
preamble and file meta; only the few header attributes needed to place the file are parsed.
Each failure has its own status so the sender's log says what happened:

========  ==========================================================
0x0000    stored (on disk, fsync'd) and recorded in the job store
0xA700    out of resources: the spool could not be written
0xA701    written, but the job store refused it (the file is kept and re-recorded at start-up)
0xC210    the dataset cannot be parsed
0xC211    a UID is not valid (it would have become a file name)
========  ==========================================================
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, UID
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.presentation import AllStoragePresentationContexts
from pydicom.uid import AllTransferSyntaxes
from pynetdicom.sop_class import Verification

from node.jobstore import JobStore
from node.metrics import Metrics
from node.spool import InvalidUID, Spool

__all__ = ["STATUS", "StoreHandler", "build_application_entity"]

log = logging.getLogger(__name__)

STATUS = {
    "success": 0x0000,
    "out_of_resources": 0xA700,
    "not_recorded": 0xA701,
    "cannot_parse": 0xC210,
    "invalid_uid": 0xC211,
}

_LAST_HEADER_TAG = 0x0020000E  # Series Instance UID: everything needed to place the file


@dataclass(frozen=True)
class _Header:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str | None


def _read_header(event: evt.Event, raw: bytes) -> _Header:
    """The placing attributes, parsed from the raw dataset *raw* up to Series Instance UID."""
    ts = UID(event.context.transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        ds: Dataset = event.dataset  # pynetdicom inflates it
    else:
        stream = io.BytesIO(raw)
        ds = read_dataset(
            stream, ts.is_implicit_VR, ts.is_little_endian,
            stop_when=lambda tag, vr, length: tag > _LAST_HEADER_TAG,
        )
    request = event.request
    sop_uid = str(ds.get("SOPInstanceUID") or request.AffectedSOPInstanceUID or "")
    sop_class = str(ds.get("SOPClassUID") or request.AffectedSOPClassUID or "")
    modality = ds.get("Modality")
    return _Header(
        study_uid=str(ds.get("StudyInstanceUID") or ""),
        series_uid=str(ds.get("SeriesInstanceUID") or ""),
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        modality=str(modality) if modality else None,
    )


def _failure(status: int, comment: str) -> Dataset:
    reply = Dataset()
    reply.Status = status
    reply.ErrorComment = comment[:64]
    return reply


class StoreHandler:
    """C-STORE and association event handlers bound to one spool and one job store."""

    def __init__(self, spool: Spool, jobs: JobStore, *, metrics: Metrics | None = None) -> None:
        self.spool = spool
        self.jobs = jobs
        self.metrics = metrics
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple]:
        """The (event, handler) pairs to give ``AE.start_server``."""
        return [
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
            (evt.EVT_REJECTED, self.on_rejected),
        ]

    def on_echo(self, event: evt.Event) -> int:
        """C-ECHO: always Success."""
        return STATUS["success"]

    def on_store(self, event: evt.Event) -> int | Dataset:
        """Spool one instance durably, record it, and only then answer Success."""
        calling = event.assoc.requestor.ae_title
        raw = event.encoded_dataset(include_meta=False)  # the bytes as sent: never decoded, never transcoded
        try:
            header = _read_header(event, raw)
        except Exception as exc:  # any parse failure of a peer's bytes is that peer's problem
            log.error("C-STORE from %s: cannot parse the dataset: %s", calling, exc)
            return _failure(STATUS["cannot_parse"], f"cannot parse dataset: {exc}")
        chunks = (b"\x00" * 128, b"DICM", encode_file_meta(event.file_meta), raw)
        try:
            if self.spool.holds(header.study_uid, header.series_uid, header.sop_uid, chunks):
                log.info("C-STORE from %s: %s already spooled with identical bytes: acknowledged, nothing changed",
                         calling, header.sop_uid)
                return STATUS["success"]
            replacing = self.spool.path_for(header.study_uid, header.series_uid, header.sop_uid).exists()
            stored = self.spool.store(header.study_uid, header.series_uid, header.sop_uid, chunks)
        except InvalidUID as exc:
            log.error("C-STORE from %s refused: %s", calling, exc)
            return _failure(STATUS["invalid_uid"], str(exc))
        except OSError as exc:
            log.error("C-STORE from %s: spool write failed for %s: %s", calling, header.sop_uid, exc)
            return _failure(STATUS["out_of_resources"], f"spool write failed: {exc.strerror or exc}")
        try:
            self.jobs.record_instance(
                study_uid=header.study_uid, series_uid=header.series_uid, sop_uid=header.sop_uid,
                sop_class_uid=header.sop_class_uid, path=stored.path, size=stored.size,
                modality=header.modality, calling_ae=calling,
            )
        except Exception as exc:  # the file is safe on disk; start-up reconciles it
            log.error("C-STORE from %s: job store failed for %s: %s", calling, header.sop_uid, exc)
            return _failure(STATUS["not_recorded"], "job store error")
        if self.metrics is not None:
            self.metrics.instance_received()
        if replacing:
            log.warning("C-STORE from %s: %s received again with different bytes: replaced, series %s reprocessed",
                        calling, header.sop_uid, header.series_uid)
        with self._lock:
            key = id(event.assoc)
            self._counts[key] = self._counts.get(key, 0) + 1
        log.debug("stored %s (series %s) from %s", header.sop_uid, header.series_uid, calling)
        return STATUS["success"]

    def on_established(self, event: evt.Event) -> None:
        """Log the new association."""
        peer = event.assoc.requestor
        log.info("association from %s at %s:%s", peer.ae_title, peer.address, peer.port)

    def on_closed(self, event: evt.Event) -> None:
        """Log the end of an association with how many instances it stored."""
        peer = event.assoc.requestor
        with self._lock:
            count = self._counts.pop(id(event.assoc), 0)
        how = "released" if event.event == evt.EVT_RELEASED else "aborted"
        log.info("association from %s %s: %d instances stored", peer.ae_title, how, count)

    def on_rejected(self, event: evt.Event) -> None:
        """Log a refused association (unknown calling AE, too many associations)."""
        peer = event.assoc.requestor
        log.warning("association from %s at %s refused", peer.ae_title, peer.address)


def build_application_entity(
    ae_title: str, *, allowed_calling_aets: tuple[str, ...] = (), max_associations: int = 10
) -> AE:
    """An AE that accepts C-ECHO and C-STORE of every storage SOP class in every transfer syntax.

    Every transfer syntax pydicom knows is accepted as proposed: the node never transcodes on
    receipt (decoding happens later, in the pipeline, where a failure costs nothing but that file).
    """
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = max_associations
    ae.require_calling_aet = list(allowed_calling_aets)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, AllTransferSyntaxes)
    return ae
