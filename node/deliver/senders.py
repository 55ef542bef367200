"""Delivery of a series' output files to a destination.

Three senders, one per destination kind, all with the same two methods:

* ``send(files, *, study_uid, series_uid)`` delivers every file or raises
  :class:`DeliveryError`;
* ``describe()`` names the destination for logs and job records.

:class:`DeliveryError` says whether a failure is *permanent* (retrying will
not help: the peer refuses this data or the configuration is wrong) or
*transient* (the peer is down, busy or out of resources: retry later with
backoff).  The delivery loop decides what to do; senders never retry.

* :class:`DicomSender` - DIMSE C-STORE (pynetdicom SCU), one association per
  ``send()``, optionally over TLS (:mod:`node.net.tls`).
* :class:`DicomWebSender` - DICOMweb STOW-RS (dicomweb-client), in batches.
* :class:`FolderSender` - copies into ``<root>/<study>/<series>/`` and marks
  the series whole with a ``.complete`` file.

C-STORE status classification (PS3.4 B.2.3, PS3.7 C):

===================================  ==========================================
status                               outcome
===================================  ==========================================
0x0000, warnings (0x0001, 0x0107,    delivered (warnings are counted and logged)
0x0116, 0xBxxx e.g. 0xB000, 0xB006,
0xB007)
0xA7xx Refused: Out of Resources     transient
no response (timeout, abort)         transient
0xA9xx, 0xCxxx, 0x01xx/0x02xx        permanent
failures, anything else
===================================  ==========================================

Nothing here logs patient-identifying data: messages name destinations, file
names and UIDs only.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pydicom
import requests
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.config import DicomDestination, DicomWebDestination, Destination, FolderDestination
from node.config.file_names import delivered_names
from node.store.fsutil import atomic_output, fsync_dir
from node.net.sockets import no_delay

_T = TypeVar("_T")

__all__ = [
    "COMPLETE_MARKER",
    "DeliveryError",
    "DicomSender",
    "DicomWebSender",
    "FolderSender",
    "Sender",
    "classify_http_status",
    "classify_store_status",
    "sender_for",
]

log = logging.getLogger(__name__)

#: Name of the marker file FolderSender writes last into a delivered series folder.
COMPLETE_MARKER = ".complete"

PNG_TO_DICOM = "PNG output cannot go to a DICOM destination"

# A DICOM association can carry at most 128 presentation contexts (PS3.8 9.3.2.2:
# context IDs are the odd numbers 1-255).
_MAX_CONTEXTS = 128

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class DeliveryError(Exception):
    """A delivery failed.

    Attributes
    ----------
    permanent:
        ``True`` when retrying cannot help (fail the job now), ``False`` for
        a transient failure (retry with backoff).
    reason:
        Human-readable cause naming the destination, the file or SOP Instance
        UID at fault and the peer's status (``0xA700``, ``HTTP 503``) if any.
    status:
        The peer's DIMSE status or HTTP status code, when there was one.
    """

    def __init__(self, reason: str, *, permanent: bool, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.status = status

    @property
    def transient(self) -> bool:
        return not self.permanent

    def __repr__(self) -> str:
        kind = "permanent" if self.permanent else "transient"
        return f"DeliveryError({kind}: {self.reason!r})"


# --------------------------------------------------------------------------
# Classification helpers
# --------------------------------------------------------------------------


def classify_store_status(status: int) -> str:
    """Classify a C-STORE response status: ``"ok"``, ``"warning"``, ``"transient"`` or ``"permanent"``.

    ``"warning"`` means the instance was stored (e.g. 0xB000 coercion of data elements).
    """
    if status == 0x0000:
        return "ok"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    if 0xA700 <= status <= 0xA7FF:
        return "transient"
    return "permanent"


def classify_http_status(code: int) -> bool:
    """``True`` if an HTTP error status is permanent (4xx except 408 and 429), ``False`` if transient."""
    if code >= 500 or code in (408, 429):
        return False
    return True


def _hex(status: int) -> str:
    return f"0x{status:04X}"


def _check_uid(kind: str, uid: str) -> None:
    if not isinstance(uid, str) or not _UID_RE.match(uid) or len(uid) > 64:
        raise DeliveryError(f"invalid {kind} UID {uid!r}", permanent=True)


def _reject_non_dicom(files: Sequence[Path], destination: str) -> None:
    for path in files:
        if path.suffix.lower() != ".dcm":
            raise DeliveryError(f"{destination}: {path.name}: {PNG_TO_DICOM}", permanent=True)


#: Seconds between two progress lines of one delivery (a 1,000-instance series takes minutes).
PROGRESS_SECONDS = 10.0


class _Progress:
    """Counts the files one delivery has sent and logs a line at most every PROGRESS_SECONDS.

    Thread-safe: the associations of one delivery count into the same total.
    """

    def __init__(self, destination: str, total: int) -> None:
        self._destination = destination
        self._total = total
        self._sent = 0
        self._lock = threading.Lock()
        self._started = self._last = time.monotonic()

    def sent(self, count: int = 1) -> None:
        """*count* more files were accepted by the peer."""
        with self._lock:
            now = time.monotonic()
            self._sent += count
            if now - self._last < PROGRESS_SECONDS or self._sent >= self._total:
                return
            self._last = now
            sent = self._sent
        log.info("delivery to %s: %d of %d file(s) sent in %.0f s", self._destination, sent, self._total,
                 now - self._started)


def _timed_delivery(sender, files: Sequence[Path], deliver) -> None:
    """Run ``deliver()``; log one INFO line on success (failures: the caller logs what it decides)."""
    started = time.monotonic()
    try:
        note = deliver()
    except DeliveryError as exc:
        kind = "permanent" if exc.permanent else "transient"
        log.debug(
            "delivery of %d file(s) to %s failed (%s) after %.2f s: %s",
            len(files), sender.describe(), kind, time.monotonic() - started, exc.reason,
        )
        raise
    log.info(
        "delivered %d file(s) to %s in %.2f s%s",
        len(files), sender.describe(), time.monotonic() - started, note or "",
    )


# --------------------------------------------------------------------------
# DIMSE C-STORE
# --------------------------------------------------------------------------


class _Header:
    """What the DIMSE sender needs to know about one file (read without pixel data)."""

    __slots__ = ("path", "sop_class", "sop_instance", "transfer_syntax", "has_file_meta")

    def __init__(self, path: Path) -> None:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError as exc:
            raise DeliveryError(f"{path.name}: not a DICOM file ({exc})", permanent=True) from exc
        except OSError as exc:
            raise DeliveryError(f"{path.name}: cannot read: {exc}", permanent=True) from exc
        meta = getattr(ds, "file_meta", None)
        self.path = path
        self.sop_class = UID(ds.get("SOPClassUID") or (meta or {}).get("MediaStorageSOPClassUID", "") or "")
        self.sop_instance = str(ds.get("SOPInstanceUID") or "")
        self.transfer_syntax = UID((meta.get("TransferSyntaxUID", "") if meta else "") or "")
        # what pynetdicom needs to send the file's bytes as they are (see DicomSender._store)
        self.has_file_meta = meta is not None and all(
            keyword in meta for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
        )
        missing = [
            name
            for name, value in (
                ("SOP Class UID", self.sop_class),
                ("SOP Instance UID", self.sop_instance),
                ("Transfer Syntax UID", self.transfer_syntax),
            )
            if not value
        ]
        if missing:
            raise DeliveryError(f"{path.name}: no {', '.join(missing)}", permanent=True)


def _transfer_syntaxes(ts: UID) -> list[UID]:
    """The file's own transfer syntax first, then the uncompressed little-endian alternatives.

    Compressed (and big-endian) data cannot be converted by pynetdicom without decoding,
    so those are proposed on their own.
    """
    if ts.is_compressed or not ts.is_little_endian:
        return [ts]
    return list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))


def _context_usable(assoc, sop_class: UID, ts: UID) -> bool:
    """Whether pynetdicom can send (sop_class, ts) over one of the accepted contexts."""
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax != sop_class or not cx.as_scu:
            continue
        accepted = UID(cx.transfer_syntax[0])
        if accepted == ts:
            return True
        if (
            not accepted.is_compressed
            and not ts.is_compressed
            and accepted.is_little_endian == ts.is_little_endian
        ):
            return True
    return False


_CONTEXT_RESULTS = {
    0x01: "user rejection",
    0x02: "no reason",
    0x03: "abstract syntax not supported",
    0x04: "transfer syntaxes not supported",
}


class DicomSender:
    """C-STORE SCU: delivers the files over ``associations`` associations per :meth:`send` (default 1).

    With more than one, the files are split into that many runs in their order, each sent over
    its own association at the same time.  One association waits for each C-STORE response
    before the next request, so several help where the round trip to the peer (a PACS across
    the network, a peer slow to answer) is the limit.  Measured against a local Orthanc on 2
    cores (scripts/bench/e2e.py, 300 CT-sized SC files): 2 associations 1.3-1.4x, 4 1.4-1.6x
    faster than one.
    When one run fails, the delivery fails as a whole and is retried whole (the peer sees the
    instances already stored again, as after any interrupted delivery).

    Presentation contexts are built from the files' own SOP Class and Transfer
    Syntax UIDs (headers only are read), with Explicit and Implicit VR Little
    Endian as alternatives for uncompressed data.  A file whose own transfer syntax
    the peer accepted is sent as its bytes, read in chunks (pynetdicom's
    ``_config.STORE_SEND_CHUNKED_DATASET``, which this class sets: process-wide,
    and it only changes how pynetdicom sends a file given by path): nothing is
    decoded or encoded again and memory stays one PDU whatever the file's size.
    Without that flag pynetdicom reads the whole file with pydicom and encodes it
    again: 17% slower for 300 CT slices, and a 300 MB multi-frame file held in
    memory.  Only a file the peer wants in the other uncompressed transfer syntax
    is read whole and converted by pynetdicom.

    With ``tls=True`` the association runs over TLS 1.2 or later (PS3.15 B.1), the peer's
    certificate verified against ``ca_file`` (else the system's store), with our client
    certificate ``cert_file``/``key_file`` when given (see :mod:`node.net.tls`). The files are
    loaded here once to report a problem at start-up (:class:`~node.net.tls.TlsFileError`), and
    again for every association, so renewed certificates are used without a restart. A failed
    handshake is a :class:`DeliveryError`: permanent when a certificate is refused or the peer
    does not speak TLS, transient when the connection is refused, closed or times out.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        called_ae: str,
        calling_ae: str,
        timeout: float = 30.0,
        tls: bool = False,
        ca_file: Path | str | None = None,
        cert_file: Path | str | None = None,
        key_file: Path | str | None = None,
        associations: int = 1,
    ) -> None:
        self.host = host
        self.port = int(port)
        self.associations = int(associations)
        if self.associations < 1:
            raise ValueError(f"associations must be at least 1, got {associations}")
        self.called_ae = called_ae
        self.calling_ae = calling_ae
        self.timeout = float(timeout)
        self.tls = bool(tls)
        self.ca_file = Path(ca_file) if ca_file is not None else None
        self.cert_file = Path(cert_file) if cert_file is not None else None
        self.key_file = Path(key_file) if key_file is not None else None
        if self.tls:
            self._tls_context()  # TlsFileError now, naming the file, rather than at the first send
        elif any(f is not None for f in (ca_file, cert_file, key_file)):
            raise ValueError("ca_file/cert_file/key_file are for TLS: pass tls=True")

    def describe(self) -> str:
        return f"dicom{'+tls' if self.tls else ''} {self.called_ae}@{self.host}:{self.port}"

    def _tls_context(self):
        from node.net.tls import client_context

        return client_context(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file, host=self.host)

    def __repr__(self) -> str:
        return f"<DicomSender {self.describe()} as {self.calling_ae}>"

    def send(self, files: Sequence[Path], *, study_uid: str, series_uid: str) -> None:
        files = [Path(f) for f in files]
        _timed_delivery(self, files, lambda: self._send(files, study_uid, series_uid))

    # ---- internals -----------------------------------------------------

    def _fail(self, reason: str, *, permanent: bool, status: int | None = None) -> DeliveryError:
        return DeliveryError(f"{self.describe()}: {reason}", permanent=permanent, status=status)

    def _send(self, files: list[Path], study_uid: str, series_uid: str) -> str | None:
        _reject_non_dicom(files, self.describe())
        if not files:
            return None
        try:
            headers = [_Header(path) for path in files]
        except DeliveryError as exc:
            raise self._fail(exc.reason, permanent=True) from exc
        runs = _split_runs(headers, self.associations)
        progress = _Progress(self.describe(), len(headers))
        if len(runs) == 1:
            warnings = self._send_run(headers, progress)
        else:
            with ThreadPoolExecutor(len(runs), thread_name_prefix="c-store") as pool:
                futures = [pool.submit(self._send_run, run, progress) for run in runs]
            errors = [exc for exc in (f.exception() for f in futures) if exc is not None]
            if errors:
                # a permanent failure says more than a transient one caused by it (or by nothing)
                raise next((e for e in errors if getattr(e, "permanent", False)), errors[0])
            warnings = {}
            for future in futures:
                for status, count in future.result().items():
                    warnings[status] = warnings.get(status, 0) + count
        if warnings:
            parts = ", ".join(f"{n} x {_hex(s)}" for s, n in sorted(warnings.items()))
            return f" (warning statuses: {parts})"
        return None

    def _send_run(self, headers: list[_Header], progress: _Progress) -> dict[int, int]:
        """Send *headers*' files over one association; returns the warning statuses counted."""
        from pynetdicom import AE, _config  # imported here: pynetdicom is only needed for DICOM destinations

        # One requested presentation context per (SOP class, transfer syntax) pair.
        wanted = list(dict.fromkeys((h.sop_class, h.transfer_syntax) for h in headers))
        if len(wanted) > _MAX_CONTEXTS:
            raise self._fail(
                f"{len(wanted)} SOP class / transfer syntax combinations exceed the "
                f"{_MAX_CONTEXTS} presentation contexts of one association",
                permanent=True,
            )
        _config.STORE_SEND_CHUNKED_DATASET = True  # files go as their bytes (see the class notes)
        try:
            ae = AE(ae_title=self.calling_ae)
        except ValueError as exc:
            raise self._fail(f"invalid calling AE title {self.calling_ae!r}: {exc}", permanent=True) from exc
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        for sop_class, ts in wanted:
            ae.add_requested_context(sop_class, _transfer_syntaxes(ts))

        tls_args = None
        tls_errors: list[BaseException] = []
        if self.tls:
            from node.net.tls import TlsFileError, record_tls_errors, server_hostname

            try:
                context = self._tls_context()
            except TlsFileError as exc:
                raise self._fail(f"TLS: {exc}", permanent=True) from exc
            tls_errors = record_tls_errors(context)
            tls_args = (context, server_hostname(context, self.host))

        started = time.monotonic()
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=tls_args)
        except ValueError as exc:  # e.g. an invalid called AE title
            raise self._fail(f"cannot request association: {exc}", permanent=True) from exc

        try:
            if not assoc.is_established:
                if tls_errors:
                    raise self._tls_failure(tls_errors)
                raise self._association_failure(assoc, time.monotonic() - started)
            no_delay(assoc)
            for sop_class, ts in wanted:
                if not _context_usable(assoc, sop_class, ts):
                    first = next(h for h in headers if (h.sop_class, h.transfer_syntax) == (sop_class, ts))
                    raise self._fail(
                        f"peer accepts no presentation context for {sop_class.name} ({sop_class}) "
                        f"with {ts.name}{self._rejection_detail(assoc, sop_class)} - cannot send "
                        f"{first.path.name} (SOP Instance {first.sop_instance})",
                        permanent=True,
                    )
            warnings: dict[int, int] = {}
            for header in headers:
                status = self._store(assoc, header)
                progress.sent()
                if classify_store_status(status) == "warning":
                    warnings[status] = warnings.get(status, 0) + 1
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
        return warnings

    def _association_failure(self, assoc, elapsed: float) -> DeliveryError:
        primitive = assoc.acceptor.primitive
        if assoc.is_rejected and primitive is not None:
            permanent = primitive.result == 0x01
            return self._fail(
                f"association rejected ({primitive.result_str.lower()}): source "
                f"{primitive.source_str}, reason {primitive.reason_str}",
                permanent=permanent,
            )
        if primitive is not None and primitive.result == 0x00 and not assoc.accepted_contexts:
            # pynetdicom aborts an accepted association with no accepted contexts.
            detail = "; ".join(
                f"{UID(cx.abstract_syntax).name}: {_CONTEXT_RESULTS.get(cx.result, cx.result)}"
                for cx in assoc.rejected_contexts
            )
            return self._fail(f"peer accepted none of the presentation contexts ({detail})", permanent=True)
        if primitive is None:
            if elapsed >= self.timeout * 0.95:
                reason = f"no association: no answer within {self.timeout:g} s"
            else:
                reason = "no association: cannot connect (connection refused or closed)"
            return self._fail(reason, permanent=False)
        return self._fail("association aborted during negotiation", permanent=False)

    def _tls_failure(self, errors: list[BaseException]) -> DeliveryError:
        from node.net.tls import handshake_failure_reason, tls_failure_is_permanent

        # The telling error may come second: a TLS 1.3 server refusing our certificate closes
        # the connection (our write fails with EOF) before its alert is read.
        exc = next((e for e in errors if tls_failure_is_permanent(e)), errors[0])
        return self._fail(
            f"no association: {handshake_failure_reason(exc, server_side=False)}",
            permanent=tls_failure_is_permanent(exc),
        )

    @staticmethod
    def _rejection_detail(assoc, sop_class: UID) -> str:
        for cx in assoc.rejected_contexts:
            if cx.abstract_syntax == sop_class:
                return f" ({_CONTEXT_RESULTS.get(cx.result, cx.result)})"
        return ""

    @staticmethod
    def _what_to_send(assoc, header: _Header) -> Path | pydicom.Dataset:
        """The file's path (its bytes are sent as they are) when the peer accepted its own transfer
        syntax, else the file read whole, for pynetdicom to convert to the one accepted."""
        if header.has_file_meta and any(
            cx.abstract_syntax == header.sop_class and cx.as_scu and cx.transfer_syntax[0] == header.transfer_syntax
            for cx in assoc.accepted_contexts
        ):
            return header.path
        return pydicom.dcmread(header.path)

    def _store(self, assoc, header: _Header) -> int:
        what = f"{header.path.name} (SOP Instance {header.sop_instance})"
        if not assoc.is_established:
            state = "aborted" if assoc.is_aborted else "closed"
            raise self._fail(f"association {state} before {what} was sent", permanent=False)
        started = time.monotonic()
        try:
            rsp = assoc.send_c_store(self._what_to_send(assoc, header))
        except RuntimeError as exc:  # association gone between the check and the send
            raise self._fail(f"association lost while sending {what}: {exc}", permanent=False) from exc
        except (ValueError, AttributeError) as exc:  # no usable context / cannot encode
            raise self._fail(f"cannot send {what}: {exc}", permanent=True) from exc
        except (OSError, InvalidDicomError) as exc:
            raise self._fail(f"cannot read {what}: {exc}", permanent=True) from exc
        status = rsp.get("Status") if rsp is not None else None
        if status is None:
            # pynetdicom returns an empty response both when its DIMSE timeout expired (it then
            # aborts the association itself) and when the peer aborted or closed the connection.
            if time.monotonic() - started >= self.timeout * 0.95:
                reason = f"no C-STORE response within {self.timeout:g} s (association aborted)"
            else:
                reason = "peer aborted the association or closed the connection"
            raise self._fail(f"{reason} while sending {what}", permanent=False)
        status = int(status)
        outcome = classify_store_status(status)
        if outcome in ("ok", "warning"):
            return status
        comment = rsp.get("ErrorComment")
        detail = f" ({comment})" if comment else ""
        raise self._fail(
            f"C-STORE of {what} failed with status {_hex(status)}{detail}",
            permanent=outcome == "permanent",
            status=status,
        )


# --------------------------------------------------------------------------
# DICOMweb STOW-RS
# --------------------------------------------------------------------------

_TRANSIENT_REQUEST_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)
_PERMANENT_REQUEST_ERRORS = (
    requests.exceptions.URLRequired,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidHeader,
)


class DicomWebSender:
    """STOW-RS: stores the files of one study with ``POST {url}/studies/{study_uid}``.

    Files are sent in batches of at most ``batch_size`` instances (and roughly
    ``max_batch_bytes`` of files), so a large series is never in memory at once.
    dicomweb-client's own retrying is switched off: the delivery loop retries.
    The HTTP session ignores the environment (``HTTP(S)_PROXY``, ``NO_PROXY``, netrc), as the
    poller's does: the node talks to the addresses configured and no others.
    """

    def __init__(
        self,
        *,
        url: str,
        auth: tuple[str, str] | str | None = None,
        timeout: float = 30.0,
        batch_size: int = 20,
        max_batch_bytes: int = 32 * 1024 * 1024,
        ca_file: Path | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.url = url.rstrip("/")
        self.auth = auth
        self.timeout = float(timeout)
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.ca_file = Path(ca_file) if ca_file is not None else None

    def describe(self) -> str:
        return f"dicomweb {self.url}"

    def __repr__(self) -> str:
        return f"<DicomWebSender {self.url}>"

    def send(self, files: Sequence[Path], *, study_uid: str, series_uid: str) -> None:
        files = [Path(f) for f in files]
        _timed_delivery(self, files, lambda: self._send(files, study_uid, series_uid))

    # ---- internals -----------------------------------------------------

    def _fail(self, reason: str, *, permanent: bool, status: int | None = None) -> DeliveryError:
        return DeliveryError(f"{self.describe()}: {reason}", permanent=permanent, status=status)

    def _client(self, session: requests.Session):
        from dicomweb_client import DICOMwebClient  # only needed for DICOMweb destinations

        headers = None
        if isinstance(self.auth, tuple):
            session.auth = requests.auth.HTTPBasicAuth(*self.auth)
        elif isinstance(self.auth, str):
            headers = {"Authorization": f"Bearer {self.auth}"}
        try:
            client = DICOMwebClient(self.url, session=session, headers=headers, timeout=self.timeout)
        except ValueError as exc:
            raise self._fail(f"invalid URL: {exc}", permanent=True) from exc
        client.set_http_retry_params(retry=False)
        return client

    def _batches(self, files: list[Path]) -> Iterator[list[Path]]:
        batch: list[Path] = []
        size = 0
        for path in files:
            try:
                file_size = path.stat().st_size
            except OSError as exc:
                raise self._fail(f"{path.name}: cannot read: {exc}", permanent=True) from exc
            if batch and (len(batch) >= self.batch_size or size + file_size > self.max_batch_bytes):
                yield batch
                batch, size = [], 0
            batch.append(path)
            size += file_size
        if batch:
            yield batch

    def _read(self, path: Path, study_uid: str) -> pydicom.Dataset:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError as exc:
            raise self._fail(f"{path.name}: not a DICOM file ({exc})", permanent=True) from exc
        except OSError as exc:
            raise self._fail(f"{path.name}: cannot read: {exc}", permanent=True) from exc
        if not ds.get("SOPInstanceUID"):
            raise self._fail(f"{path.name}: no SOP Instance UID", permanent=True)
        if ds.get("StudyInstanceUID") != study_uid:
            raise self._fail(
                f"{path.name} (SOP Instance {ds.SOPInstanceUID}) belongs to study "
                f"{ds.get('StudyInstanceUID')}, not {study_uid}",
                permanent=True,
            )
        return ds

    def _send(self, files: list[Path], study_uid: str, series_uid: str) -> str | None:
        _reject_non_dicom(files, self.describe())
        _check_uid("study", study_uid)
        if not files:
            return None
        progress = _Progress(self.describe(), len(files))
        with requests.Session() as session:
            session.trust_env = False  # no proxy or netrc from the environment (see the class notes)
            if self.ca_file is not None:
                session.verify = str(self.ca_file)  # the hospital's CA instead of the system's store
            client = self._client(session)
            for batch in self._batches(files):
                datasets = [self._read(path, study_uid) for path in batch]
                self._store_batch(client, datasets, batch, study_uid)
                progress.sent(len(batch))
                del datasets
        return None

    def _store_batch(self, client, datasets: list, paths: list[Path], study_uid: str) -> None:
        sent = {str(ds.SOPInstanceUID): path for ds, path in zip(datasets, paths)}
        first = f"{paths[0].name} (SOP Instance {datasets[0].SOPInstanceUID})"
        batch_desc = first if len(paths) == 1 else f"{len(paths)} instances from {first}"
        try:
            result = client.store_instances(datasets, study_instance_uid=study_uid)
        except requests.exceptions.HTTPError as exc:
            response = exc.response
            code = response.status_code if response is not None else None
            if code is None:
                raise self._fail(f"STOW-RS of {batch_desc} failed: {exc}", permanent=False) from exc
            detail = self._failure_details(response)
            text = f"STOW-RS of {batch_desc} failed: HTTP {code} {response.reason or ''}".rstrip()
            raise self._fail(
                text + (f"; {detail}" if detail else ""),
                permanent=classify_http_status(code),
                status=code,
            ) from exc
        except requests.exceptions.SSLError as exc:
            # a certificate refused (untrusted, expired, wrong name) stays refused until someone acts
            raise self._fail(f"STOW-RS of {batch_desc} failed: TLS: {exc}", permanent=True) from exc
        except _TRANSIENT_REQUEST_ERRORS as exc:
            raise self._fail(
                f"STOW-RS of {batch_desc} failed: {type(exc).__name__}: {exc}", permanent=False
            ) from exc
        except _PERMANENT_REQUEST_ERRORS as exc:
            raise self._fail(
                f"STOW-RS of {batch_desc} failed: {type(exc).__name__}: {exc}", permanent=True
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise self._fail(
                f"STOW-RS of {batch_desc} failed: {type(exc).__name__}: {exc}", permanent=False
            ) from exc
        except ValueError as exc:  # an answer dicomweb-client cannot parse
            raise self._fail(f"STOW-RS of {batch_desc}: unreadable response: {exc}", permanent=False) from exc

        failed = list(result.get("FailedSOPSequence", None) or [])
        if failed:
            reasons = "; ".join(self._failure_text(item) for item in failed[:5])
            more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
            raise self._fail(
                f"STOW-RS of {batch_desc}: {len(failed)} instance(s) failed: {reasons}{more}",
                permanent=True,
                status=self._first_reason(failed),
            )
        referenced = {
            str(item.get("ReferencedSOPInstanceUID", ""))
            for item in (result.get("ReferencedSOPSequence", None) or [])
        }
        missing = [uid for uid in sent if uid not in referenced]
        if missing:
            first_missing = f"{sent[missing[0]].name} (SOP Instance {missing[0]})"
            raise self._fail(
                f"STOW-RS answered HTTP 200 but does not reference {len(missing)} of "
                f"{len(sent)} instance(s) sent, first {first_missing}",
                permanent=False,
            )

    @staticmethod
    def _failure_text(item) -> str:
        uid = item.get("ReferencedSOPInstanceUID", "?")
        reason = item.get("FailureReason")
        return f"SOP Instance {uid}: " + (f"failure reason {_hex(int(reason))}" if reason is not None else "no reason")

    @staticmethod
    def _first_reason(failed: list) -> int | None:
        for item in failed:
            reason = item.get("FailureReason")
            if reason is not None:
                return int(reason)
        return None

    @classmethod
    def _failure_details(cls, response: requests.Response) -> str:
        """Failed SOP Sequence (if the error body is a DICOM JSON response) or the start of the body."""
        content_type = response.headers.get("Content-Type", "")
        if "json" in content_type:
            try:
                ds = pydicom.Dataset.from_json(response.json())
                failed = list(ds.get("FailedSOPSequence", None) or [])
                if failed:
                    return "; ".join(cls._failure_text(item) for item in failed[:5])
            except Exception:  # noqa: BLE001 - a body that is not DICOM JSON: show it as text
                pass
        text = " ".join(response.text.split())[:200] if response.text else ""
        return text


# --------------------------------------------------------------------------
# Folder
# --------------------------------------------------------------------------


class FolderSender:
    """Copies the files into ``<path>/<study_uid>/<series_uid>/`` and then writes ``.complete``.

    Every file is written atomically (temporary file, fsync, rename), so a
    watcher never sees a partial file; the ``.complete`` marker comes last and
    tells it the series is whole.  A ``.complete`` left by an earlier delivery
    of the same series is removed before any file is written.

    The root folder must exist (a missing root usually means an unmounted
    disk: transient); the study and series folders are created.

    With a ``file_names`` template each file is named from its header
    (:func:`node.config.file_names.delivered_names`: distinct names, the same on a
    re-delivery); without one, each keeps its own name.
    """

    def __init__(self, *, path: Path, file_names: str | None = None) -> None:
        self.path = Path(path)
        self.file_names = file_names

    def describe(self) -> str:
        return f"folder {self.path}"

    def __repr__(self) -> str:
        return f"<FolderSender {self.path}>"

    def send(self, files: Sequence[Path], *, study_uid: str, series_uid: str) -> None:
        files = [Path(f) for f in files]
        _timed_delivery(self, files, lambda: self._send(files, study_uid, series_uid))

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        return self.path / study_uid / series_uid

    def _fail(self, reason: str, *, permanent: bool) -> DeliveryError:
        return DeliveryError(f"{self.describe()}: {reason}", permanent=permanent)

    def _ensure_dir(self, folder: Path, *, create: bool) -> None:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise self._fail(f"{folder} exists and is not a folder", permanent=True)
            return
        if not create:
            raise self._fail(f"{folder} does not exist", permanent=False)
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise self._fail(f"{folder} exists and is not a folder", permanent=True) from None
        except OSError as exc:
            raise self._fail(f"cannot create {folder}: {exc}", permanent=False) from exc

    def _send(self, files: list[Path], study_uid: str, series_uid: str) -> str | None:
        _check_uid("study", study_uid)
        _check_uid("series", series_uid)
        names = delivered_names(self.file_names, files)
        if len(set(names)) != len(names):
            raise self._fail("two files have the same name", permanent=True)

        self._ensure_dir(self.path, create=False)
        study_dir = self.path / study_uid
        self._ensure_dir(study_dir, create=True)
        series_dir = study_dir / series_uid
        self._ensure_dir(series_dir, create=True)

        marker = series_dir / COMPLETE_MARKER
        try:
            if marker.is_dir():
                raise self._fail(f"{marker} is a folder", permanent=True)
            if marker.exists():
                marker.unlink()
                fsync_dir(series_dir)
        except OSError as exc:
            raise self._fail(f"cannot remove old {marker}: {exc}", permanent=False) from exc

        for source, name in zip(files, names):
            target = series_dir / name
            if target.is_dir():
                raise self._fail(f"{target} exists and is a folder", permanent=True)
            try:
                src = open(source, "rb")
            except FileNotFoundError as exc:
                raise self._fail(f"{source.name}: source file missing: {exc}", permanent=True) from exc
            except OSError as exc:
                raise self._fail(f"{source.name}: cannot read: {exc}", permanent=False) from exc
            try:
                with src, atomic_output(target) as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)
            except OSError as exc:
                raise self._fail(f"cannot write {target}: {exc}", permanent=False) from exc

        try:
            with atomic_output(marker):
                pass
        except OSError as exc:
            raise self._fail(f"cannot write {marker}: {exc}", permanent=False) from exc
        return None



Sender = DicomSender | DicomWebSender | FolderSender


def _split_runs(items: list[_T], count: int) -> list[list[_T]]:
    """*items* in at most *count* consecutive runs of nearly equal length (none empty)."""
    count = max(1, min(count, len(items)))
    size, extra = divmod(len(items), count)
    runs, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        runs.append(items[start:end])
        start = end
    return runs


def sender_for(destination: Destination) -> Sender:
    """The sender for a configured destination.

    Credentials of a DICOMweb destination are read from their environment variables here, once,
    when the node starts (a missing variable is a :class:`~node.config.ConfigError` naming it).
    """
    if isinstance(destination, DicomDestination):
        return DicomSender(
            host=destination.host, port=destination.port, called_ae=destination.ae_title,
            calling_ae=destination.calling_ae_title, tls=destination.tls, ca_file=destination.ca_file,
            cert_file=destination.cert_file, key_file=destination.key_file, associations=destination.associations,
        )
    if isinstance(destination, DicomWebDestination):
        auth = destination.auth.resolve() if destination.auth is not None else None
        return DicomWebSender(url=destination.url, auth=auth, timeout=destination.timeout_seconds,
                              ca_file=destination.ca_file)
    if isinstance(destination, FolderDestination):
        return FolderSender(path=destination.path, file_names=destination.file_names)
    raise TypeError(f"no sender for destination {destination!r}")
