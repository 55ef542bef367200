"""DICOM destinations: C-STORE (pynetdicom SCU), optionally over TLS.

Each :meth:`DicomSender.send` opens its own associations (``associations`` of them, default 1, each
from a new pynetdicom AE) and releases them before it returns: no association is kept between two
deliveries.  How the statuses and failures are classified: :mod:`node.deliver.failures`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.config import DicomDestination
from node.deliver.failures import DeliveryError, StoreOutcome, classify_store_status, hex_status
from node.deliver.sender import DeliveryProgress, Sender, reject_non_dicom
from node.net.sockets import no_delay

__all__ = ["DicomSender"]

_T = TypeVar("_T")

# A DICOM association can carry at most 128 presentation contexts (PS3.8 9.3.2.2:
# context IDs are the odd numbers 1-255).
_MAX_CONTEXTS = 128

_CONTEXT_RESULTS = {
    0x01: "user rejection",
    0x02: "no reason",
    0x03: "abstract syntax not supported",
    0x04: "transfer syntaxes not supported",
}

#: Warning statuses and how many responses carried each.
WarningCounts = dict[int, int]


class DicomSender(Sender):
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
    the peer accepted is given to pynetdicom by its path; with pynetdicom's
    ``_config.STORE_SEND_CHUNKED_DATASET``, which the node sets once at start-up
    (:func:`node.net.pynetdicom_setup.configure_pynetdicom`), its bytes are sent as
    they are, read in chunks: nothing is decoded or encoded again and memory stays one
    PDU whatever the file's size.  Without that switch pynetdicom reads the whole file
    with pydicom and encodes it again: 17% slower for 300 CT slices, and a 300 MB
    multi-frame file held in memory.  Only a file the peer wants in the other
    uncompressed transfer syntax is read whole and converted by pynetdicom.

    With ``tls=True`` the association runs over TLS 1.2 or later (PS3.15 B.1), the peer's
    certificate verified against ``ca_file`` (else the system's store), with our client
    certificate ``cert_file``/``key_file`` when given (see :mod:`node.net.tls`). The files are
    loaded here once to report a problem at start-up (:class:`~node.net.tls.TlsFileError`), and
    again for every association, so renewed certificates are used without a restart. A failed
    handshake is a :class:`DeliveryError`: permanent when a certificate is refused or the peer
    does not speak TLS, transient when the connection is refused, closed or times out.
    """

    kind = DicomDestination.kind

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

    @classmethod
    def from_destination(cls, destination: DicomDestination) -> DicomSender:
        """The sender of a ``kind = "dicom"`` destination."""
        return cls(
            host=destination.host, port=destination.port, called_ae=destination.ae_title,
            calling_ae=destination.calling_ae_title, tls=destination.tls, ca_file=destination.ca_file,
            cert_file=destination.cert_file, key_file=destination.key_file, associations=destination.associations,
        )

    def describe(self) -> str:
        return f"dicom{'+tls' if self.tls else ''} {self.called_ae}@{self.host}:{self.port}"

    def _tls_context(self):
        from node.net.tls import client_context

        return client_context(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file, host=self.host)

    # ---- one delivery: its files split into runs, one association each -------

    def _deliver(self, files: list[Path], study_uid: str, series_uid: str) -> str | None:
        reject_non_dicom(files, self.describe())
        if not files:
            return None
        try:
            headers = [_FileHeader(path) for path in files]
        except DeliveryError as exc:
            raise self._fail(exc.reason, permanent=True) from exc
        progress = DeliveryProgress(self.describe(), len(headers))
        warnings = self._send_runs(_split_runs(headers, self.associations), progress)
        if warnings:
            parts = ", ".join(f"{n} x {hex_status(s)}" for s, n in sorted(warnings.items()))
            return f" (warning statuses: {parts})"
        return None

    def _send_runs(self, runs: list[list[_FileHeader]], progress: DeliveryProgress) -> WarningCounts:
        """Send every run over its own association, at the same time; the warning statuses counted."""
        if len(runs) == 1:
            return self._send_run(runs[0], progress)
        with ThreadPoolExecutor(len(runs), thread_name_prefix="c-store") as pool:
            futures = [pool.submit(self._send_run, run, progress) for run in runs]
        errors = [exc for exc in (f.exception() for f in futures) if exc is not None]
        if errors:
            # a permanent failure says more than a transient one caused by it (or by nothing)
            raise next((e for e in errors if getattr(e, "permanent", False)), errors[0])
        warnings: WarningCounts = {}
        for future in futures:
            for status, count in future.result().items():
                warnings[status] = warnings.get(status, 0) + count
        return warnings

    def _send_run(self, headers: list[_FileHeader], progress: DeliveryProgress) -> WarningCounts:
        """Send *headers*' files over one association; returns the warning statuses counted."""
        wanted = _presentation_contexts(headers)
        if len(wanted) > _MAX_CONTEXTS:
            raise self._fail(
                f"{len(wanted)} SOP class / transfer syntax combinations exceed the "
                f"{_MAX_CONTEXTS} presentation contexts of one association",
                permanent=True,
            )
        ae = self._application_entity(wanted)
        try:
            assoc = self._associate(ae)
            try:
                self._check_contexts(assoc, wanted, headers)
                return self._store_all(assoc, headers, progress)
            finally:
                if assoc.is_established:
                    assoc.release()
        finally:
            ae.shutdown()

    def _application_entity(self, wanted: list[tuple[UID, UID]]):
        """A pynetdicom AE with our AE title, the timeouts and one requested context per pair."""
        from pynetdicom import AE  # imported here: pynetdicom is only needed for DICOM destinations

        try:
            ae = AE(ae_title=self.calling_ae)
        except ValueError as exc:
            raise self._fail(f"invalid calling AE title {self.calling_ae!r}: {exc}", permanent=True) from exc
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        for sop_class, ts in wanted:
            ae.add_requested_context(sop_class, _transfer_syntaxes(ts))
        return ae

    # ---- the association ------------------------------------------------------

    def _associate(self, ae):
        """An established association with the peer, or the DeliveryError that says why not."""
        tls_args, tls_errors = self._tls_args()
        started = time.monotonic()
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=tls_args)
        except ValueError as exc:  # e.g. an invalid called AE title
            raise self._fail(f"cannot request association: {exc}", permanent=True) from exc
        if not assoc.is_established:
            if tls_errors:
                raise self._tls_failure(tls_errors)
            raise self._association_failure(assoc, time.monotonic() - started)
        no_delay(assoc)
        return assoc

    def _tls_args(self) -> tuple[tuple | None, list[BaseException]]:
        """pynetdicom's ``tls_args`` (None without TLS), and where the handshake's errors will be."""
        if not self.tls:
            return None, []
        from node.net.tls import TlsFileError, record_tls_errors, server_hostname

        try:
            context = self._tls_context()
        except TlsFileError as exc:
            raise self._fail(f"TLS: {exc}", permanent=True) from exc
        return (context, server_hostname(context, self.host)), record_tls_errors(context)

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

    def _check_contexts(self, assoc, wanted: list[tuple[UID, UID]], headers: list[_FileHeader]) -> None:
        """Refuse (permanently) the run when a file has no accepted context to go over."""
        for sop_class, ts in wanted:
            if not _context_usable(assoc, sop_class, ts):
                first = next(h for h in headers if (h.sop_class, h.transfer_syntax) == (sop_class, ts))
                raise self._fail(
                    f"peer accepts no presentation context for {sop_class.name} ({sop_class}) "
                    f"with {ts.name}{_rejection_detail(assoc, sop_class)} - cannot send "
                    f"{first.path.name} (SOP Instance {first.sop_instance})",
                    permanent=True,
                )

    # ---- the C-STOREs ----------------------------------------------------------

    def _store_all(self, assoc, headers: list[_FileHeader], progress: DeliveryProgress) -> WarningCounts:
        warnings: WarningCounts = {}
        for header in headers:
            status = self._store(assoc, header)
            progress.sent()
            if classify_store_status(status) is StoreOutcome.WARNING:
                warnings[status] = warnings.get(status, 0) + 1
        return warnings

    def _store(self, assoc, header: _FileHeader) -> int:
        """C-STORE one file; its status when the peer stored it, else DeliveryError."""
        what = f"{header.path.name} (SOP Instance {header.sop_instance})"
        if not assoc.is_established:
            state = "aborted" if assoc.is_aborted else "closed"
            raise self._fail(f"association {state} before {what} was sent", permanent=False)
        started = time.monotonic()
        try:
            rsp = assoc.send_c_store(_what_to_send(assoc, header))
        except RuntimeError as exc:  # association gone between the check and the send
            raise self._fail(f"association lost while sending {what}: {exc}", permanent=False) from exc
        except (ValueError, AttributeError) as exc:  # no usable context / cannot encode
            raise self._fail(f"cannot send {what}: {exc}", permanent=True) from exc
        except (OSError, InvalidDicomError) as exc:
            raise self._fail(f"cannot read {what}: {exc}", permanent=True) from exc
        status = rsp.get("Status") if rsp is not None else None
        if status is None:
            raise self._no_response(what, time.monotonic() - started)
        status = int(status)
        outcome = classify_store_status(status)
        if outcome.stored:
            return status
        comment = rsp.get("ErrorComment")
        detail = f" ({comment})" if comment else ""
        raise self._fail(
            f"C-STORE of {what} failed with status {hex_status(status)}{detail}",
            permanent=outcome is StoreOutcome.PERMANENT,
            status=status,
        )

    def _no_response(self, what: str, elapsed: float) -> DeliveryError:
        # pynetdicom returns an empty response both when its DIMSE timeout expired (it then
        # aborts the association itself) and when the peer aborted or closed the connection.
        if elapsed >= self.timeout * 0.95:
            reason = f"no C-STORE response within {self.timeout:g} s (association aborted)"
        else:
            reason = "peer aborted the association or closed the connection"
        return self._fail(f"{reason} while sending {what}", permanent=False)


class _FileHeader:
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
        # what pynetdicom needs to send the file's bytes as they are (see _what_to_send)
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


def _presentation_contexts(headers: list[_FileHeader]) -> list[tuple[UID, UID]]:
    """One requested presentation context per (SOP class, transfer syntax) pair, in file order."""
    return list(dict.fromkeys((h.sop_class, h.transfer_syntax) for h in headers))


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


def _rejection_detail(assoc, sop_class: UID) -> str:
    """Why the peer rejected the context of *sop_class*, as `` (reason)``; empty if it did not say."""
    for cx in assoc.rejected_contexts:
        if cx.abstract_syntax == sop_class:
            return f" ({_CONTEXT_RESULTS.get(cx.result, cx.result)})"
    return ""


def _what_to_send(assoc, header: _FileHeader) -> Path | pydicom.Dataset:
    """The file's path (its bytes are sent as they are) when the peer accepted its own transfer
    syntax, else the file read whole, for pynetdicom to convert to the one accepted."""
    if header.has_file_meta and any(
        cx.abstract_syntax == header.sop_class and cx.as_scu and cx.transfer_syntax[0] == header.transfer_syntax
        for cx in assoc.accepted_contexts
    ):
        return header.path
    return pydicom.dcmread(header.path)


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
