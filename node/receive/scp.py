"""DICOM ingest: a pynetdicom SCP that spools every instance durably before answering Success.

The received bytes are written as they came (no decoding, no transcoding) behind a Part 10
preamble and file meta; only the few header attributes needed to place the file are parsed.

Two ways to receive, the same files in the spool (byte for byte):

- in memory (pynetdicom's default): the data set arrives as bytes, is written to a temporary file
  beside its spool path, fsync'd and renamed;
- streamed, after :func:`enable_streamed_receive` (process-wide, once at start-up): pynetdicom
  writes the data set to a file in ``<spool>/.incoming`` as its PDUs arrive, so a 1 GB multi-frame
  object never sits in memory; :meth:`StoreHandler.on_store` reads only its header and moves the
  file into place (:meth:`node.store.spool.Spool.adopt`).

Each failure has its own status so the sender's log says what happened:

========  ==========================================================
0x0000    stored (on disk, fsync'd); recorded in the job store, or kept to be recorded as soon as
          the store answers again (:mod:`node.store.pending`: the spool file is the record)
0x0124    not authorised: over TLS with ``[tls] match_ae_title``, a calling AE title its client
          certificate does not name (the association is also aborted at once)
0xA700    out of resources: free disk below ``min_free_disk_mb``, or the spool could not be written
0xC000    cannot understand: the header asks for more decoded pixel data than ``[node] max_decoded_mb``
          (all frames) or ``max_frame_mb`` (one frame) allow; nothing is stored
0xC210    the data set header cannot be parsed, or has no Study or Series Instance UID
0xC211    a UID is not valid (it would have become a file name)
========  ==========================================================
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pynetdicom
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_partial
from pydicom.filewriter import write_file_meta_info as pydicom_write_file_meta_info
from pydicom.uid import AllTransferSyntaxes, UID
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from node.store.fsutil import start_writeback
from node.imaging.source import DecodeLimits, OverLimit
from node.store.jobstore import JobStore
from node.telemetry.metrics import Metrics
from node.net import fastpath
from node.store.pending import PendingRecords
from node.net.sockets import no_delay
from node.store.spool import INCOMING, InvalidUID, Spool
from node.net.tls import certificate_names

__all__ = [
    "STATUS", "StoreHandler", "build_application_entity", "disable_streamed_receive", "enable_streamed_receive",
]

log = logging.getLogger(__name__)

STATUS = {
    "success": 0x0000,
    "not_authorised": 0x0124,
    "out_of_resources": 0xA700,
    "too_large": 0xC000,
    "cannot_parse": 0xC210,
    "invalid_uid": 0xC211,
}

#: The status answered for each reason a C-STORE is refused (the reasons the metrics count).
_REFUSAL_STATUS = {
    "disk_low": STATUS["out_of_resources"],
    "spool_write_failed": STATUS["out_of_resources"],
    "cannot_parse": STATUS["cannot_parse"],
    "invalid_uid": STATUS["invalid_uid"],
    "not_authorised": STATUS["not_authorised"],
    "too_large": STATUS["too_large"],
}

# Bits Allocated: past it, everything needed to place the file (up to (0020,000E)) and to know its
# decoded size (group 0028) has been read; Pixel Data and the big functional groups come later.
_LAST_HEADER_TAG = 0x00280100

#: Seconds between two "disk low" warnings; the refusals in between are counted, not logged.
LOW_DISK_WARNING_SECONDS = 30.0


# -- streamed receive (process-wide) ------------------------------------------------------------


_SPACE_CHECK_BYTES = 4 << 20  # while a data set streams in, free space is checked every 4 MiB
# PDUs are gathered into writes of at least 64 KiB (pynetdicom writes each PDU at once, and some
# senders send 16 KiB PDUs); each write is handed to the kernel's writeback straight away.
_WRITE_BYTES = 64 << 10
_HEAD_BYTES = 64 << 10  # the first bytes of each file, kept in memory for the header parse



class _IncomingFile:
    """One data set being received into ``.incoming``, as pynetdicom uses it (write, flush, close, name).

    Writes are gathered into pieces of at least 64 KiB, each written and its writeback started at
    once (:func:`node.store.fsutil.start_writeback`): the data set goes to disk while the rest of it
    arrives, so the fsync before Success has little left to wait for.  :meth:`finish` writes the
    rest (the C-STORE handler calls it before it reads the file).  A write the disk refuses
    (ENOSPC, EFBIG), or free space falling below the guard while the data set arrives, does not
    kill the association (an exception in pynetdicom's reader thread would, and leave the file
    behind): the file is emptied at once, the rest of the data set is received and dropped, and
    :attr:`failure` says why, so the C-STORE is answered 0xA700.
    """

    def __init__(self, fd: int, name: str, min_free_bytes: int) -> None:
        self._fd: int | None = fd  # a plain descriptor: nothing of a failed write is left in a buffer
        self.name = name
        self.file = self  # pynetdicom calls .file.flush() after each write
        self.failure: str | None = None
        self.low_disk_free: int | None = None  # free bytes when the guard stopped the write
        self._min_free_bytes = min_free_bytes
        self._pending = bytearray()
        self._written = 0
        self._unchecked = 0
        #: The file's first bytes (preamble, file meta and the start of the data set), kept so the
        #: C-STORE handler can parse the header without reading the file back.
        self.head = b""

    def write(self, data: bytes) -> int:
        if self.failure is None:
            if self._pending or len(data) < _WRITE_BYTES:
                self._pending += data
                if len(self._pending) >= _WRITE_BYTES:
                    self._write_pending()
            else:
                self._write(data)  # a whole PDU of 64 KiB or more: written as it is, not copied
        return len(data)

    def flush(self) -> None:
        """Called by pynetdicom after every PDU: gathered writes wait for 64 KiB or :meth:`finish`."""

    def finish(self) -> None:
        """Write what is gathered: the whole data set is in the file (unless :attr:`failure`)."""
        if self.failure is None and self._pending:
            self._write_pending()

    def close(self) -> None:
        self._pending = bytearray()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _write_pending(self) -> None:
        self._write(self._pending)
        self._pending.clear()

    def _write(self, data: bytes | bytearray) -> None:
        length = len(data)
        try:
            with memoryview(data) as view:
                done = 0
                while done < length:
                    done += os.write(self._fd, view[done:])
        except OSError as exc:
            self._stop(f"spool write failed: {exc.strerror or exc}")
            return
        if not self._written:
            self.head = bytes(data[:_HEAD_BYTES])
        start_writeback(self._fd, self._written, length)
        self._written += length
        self._unchecked += length
        if self._min_free_bytes and self._unchecked >= _SPACE_CHECK_BYTES:
            self._unchecked = 0
            self._check_space()

    def _check_space(self) -> None:
        try:
            st = os.statvfs(self._fd)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free < self._min_free_bytes:
            self.low_disk_free = free
            self._stop(f"disk low: {free >> 20} MB free while receiving")

    def _stop(self, reason: str) -> None:
        self.failure = reason
        self._pending = bytearray()
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # give the space back now, not after the transfer


# Every file being received, with the thread that made it (the association's DUL thread), kept
# apart from the factory so that enabling again never loses track of a transfer under way.
_receiving: dict[str, tuple[_IncomingFile, threading.Thread]] = {}
_receiving_lock = threading.Lock()


class _IncomingFiles:
    """Stands in for ``tempfile.NamedTemporaryFile`` inside pynetdicom's C-STORE receive.

    Every file goes into one folder, named ``.recv-*.tmp`` (the spool's temporary-file pattern:
    never counted as an instance, removed at start-up), and is remembered with the thread that made
    it, so the files of an association that died mid-transfer can be removed when its connection
    closes (pynetdicom deletes only the files of complete messages).
    """

    def __init__(self, folder: Path, min_free_bytes: int) -> None:
        self.folder = folder
        self.min_free_bytes = min_free_bytes

    def __call__(self, *args, **kwargs) -> _IncomingFile:
        """A new file, whatever pynetdicom asks for (it asks for a binary file it deletes itself)."""
        fd, name = tempfile.mkstemp(dir=self.folder, prefix=".recv-", suffix=".tmp")
        incoming = _IncomingFile(fd, name, self.min_free_bytes)
        with _receiving_lock:
            _receiving[incoming.name] = (incoming, threading.current_thread())
        return incoming


def _incoming_file(path: str | os.PathLike) -> _IncomingFile | None:
    """The file being received under *path*, if :class:`_IncomingFiles` made it."""
    with _receiving_lock:
        entry = _receiving.get(os.fspath(path))
    return entry[0] if entry else None


def _forget(path: str | os.PathLike) -> None:
    with _receiving_lock:
        _receiving.pop(os.fspath(path), None)


def _remove_left_by(thread: object) -> int:
    """Delete the files *thread* made that still exist (a transfer cut short); returns how many."""
    with _receiving_lock:
        names = [name for name, (_, maker) in _receiving.items() if maker is thread]
        for name in names:
            del _receiving[name]
    removed = 0
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
            removed += 1
    return removed


# -- the file meta of each streamed file ---------------------------------------------------------

# What pynetdicom's create_file_meta puts in the file meta of a streamed data set (PS3.10 7.1), in
# tag order, with each value's VR and padding; (0002,0000) goes first with the length of the rest.
_FILE_META = ((0x00020001, b"OB", None), (0x00020002, b"UI", b"\x00"), (0x00020003, b"UI", b"\x00"),
              (0x00020010, b"UI", b"\x00"), (0x00020012, b"UI", b"\x00"), (0x00020013, b"SH", b" "))
_FILE_META_TAGS = {0x00020000, *(tag for tag, _, _ in _FILE_META)}
_PLAIN_UID = re.compile(rb"^[0-9.]{1,64}$")
_PLAIN_SH = re.compile(rb"^[ -~]{0,16}$")  # printable ASCII, no backslash issue for one value


def _encoded_file_meta(file_meta: Dataset) -> bytes | None:
    """*file_meta* (as pynetdicom's ``create_file_meta`` makes it) in Explicit VR Little Endian, or
    None when it holds anything else (then pydicom writes it).

    The same bytes as ``pydicom.filewriter.write_file_meta_info`` (tests/test_ingest.py compares
    them), 50 times faster: pydicom validates and encodes a Dataset element by element, 0.25 ms
    for every instance received (0.6 ms on a busy machine), in the association's reader thread.
    """
    if set(file_meta.keys()) != _FILE_META_TAGS:
        return None
    parts = []
    for tag, vr, pad in _FILE_META:
        value = file_meta[tag].value
        if pad is None:  # (0002,0001) OB, the version: two bytes
            if value != b"\x00\x01":
                return None
            parts.append(struct.pack("<HH2sHL", 0x0002, tag & 0xFFFF, vr, 0, 2) + value)
            continue
        raw = value.encode("ascii") if isinstance(value, str) else None
        if raw is None or not (_PLAIN_UID if vr == b"UI" else _PLAIN_SH).match(raw):
            return None
        if len(raw) % 2:
            raw += pad
        parts.append(struct.pack("<HH2sH", 0x0002, tag & 0xFFFF, vr, len(raw)) + raw)
    rest = b"".join(parts)
    return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(rest)) + rest


def _write_file_meta_info(fp, file_meta: Dataset, enforce_standard: bool = True) -> None:
    """Stands in for ``write_file_meta_info`` inside pynetdicom's streamed receive (see
    :func:`_encoded_file_meta`); anything unusual goes to pydicom's."""
    encoded = _encoded_file_meta(file_meta) if enforce_standard else None
    if encoded is None:
        pydicom_write_file_meta_info(fp, file_meta, enforce_standard=enforce_standard)
    else:
        fp.write(encoded)


def enable_streamed_receive(spool_root: str | os.PathLike, *, min_free_bytes: int = 0) -> Path:
    """Receive every C-STORE data set straight into a file in ``<spool_root>/.incoming``.

    **Process-wide**: it sets pynetdicom's module-level ``_config.STORE_RECV_CHUNKED_DATASET``, so
    every pynetdicom SCP in this process streams (:class:`StoreHandler` works either way).  Call it
    once at start-up, after :meth:`Spool.remove_temporaries` and before the server starts; calling
    it again changes the folder.  Returns the folder.

    With the flag, pynetdicom writes each incoming data set, PDU by PDU, to a
    ``tempfile.NamedTemporaryFile(delete=False)`` in the Part 10 format (preamble, the file meta it
    builds from the C-STORE request and the accepted transfer syntax, then the data set bytes as
    received), gives its path to the handler as ``event.dataset_path`` and, after the handler
    returns, closes and deletes it (a file the handler moved away is simply gone).  A transfer cut
    short leaves its file behind: :class:`StoreHandler` deletes it when the connection closes.

    pynetdicom has no setting for *where* that file goes: it calls ``NamedTemporaryFile`` without
    ``dir``, i.e. in ``tempfile.gettempdir()``.  To put the files on the spool's filesystem (so the
    last step is one rename, and the disk guard sees what arrives) there were two ways, both
    process-wide: set ``tempfile.tempdir``, which would move *every* temporary file of every library
    in the node into the spool, or replace the ``NamedTemporaryFile`` name that pynetdicom imported
    into ``pynetdicom.dimse_messages``, whose only use there is this C-STORE receive.  This does the
    second, the narrower one, with a stand-in that also gathers PDUs into 64 KiB writes, turns a
    write the disk refuses into 0xA700 instead of a dead association, and checks *min_free_bytes*
    (give the :class:`StoreHandler` disk guard's value) every 4 MiB while a data set arrives, so a
    huge object cannot fill the disk before its C-STORE is refused.  If a pynetdicom release no
    longer has that name, the files stay in the default temporary folder (a warning says so) and
    :meth:`Spool.adopt` copies them instead of renaming: slower, still correct.

    It also replaces ``dimse_messages.write_file_meta_info`` (pydicom's, whose only use there is
    the file meta of these files) with :func:`_write_file_meta_info`: the same bytes without
    building them element by element through pydicom (0.25 ms of every C-STORE).
    """
    folder = Path(spool_root).absolute() / INCOMING
    folder.mkdir(parents=True, exist_ok=True)
    current = getattr(dimse_messages, "NamedTemporaryFile", None)
    if current is tempfile.NamedTemporaryFile or isinstance(current, _IncomingFiles):
        dimse_messages.NamedTemporaryFile = _IncomingFiles(folder, max(0, int(min_free_bytes)))
    else:
        log.warning("this pynetdicom (%s) does not create its receive files through "
                    "dimse_messages.NamedTemporaryFile: they go to %s and are copied into the spool",
                    getattr(pynetdicom, "__version__", "?"), tempfile.gettempdir())
    if getattr(dimse_messages, "write_file_meta_info", None) in (pydicom_write_file_meta_info, _write_file_meta_info):
        dimse_messages.write_file_meta_info = _write_file_meta_info
    _config.STORE_RECV_CHUNKED_DATASET = True
    return folder


def disable_streamed_receive() -> None:
    """Undo :func:`enable_streamed_receive` (pynetdicom's defaults again; process-wide)."""
    _config.STORE_RECV_CHUNKED_DATASET = False
    if isinstance(getattr(dimse_messages, "NamedTemporaryFile", None), _IncomingFiles):
        dimse_messages.NamedTemporaryFile = tempfile.NamedTemporaryFile
    if getattr(dimse_messages, "write_file_meta_info", None) is _write_file_meta_info:
        dimse_messages.write_file_meta_info = pydicom_write_file_meta_info


@dataclass(frozen=True)
class _Header:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str | None
    #: Image Pixel attributes found (rows, columns, frames, samples, bits: int; photometric: str)
    pixels: Mapping[str, int | str] = field(default_factory=dict)


# The attributes that place an instance in the spool and the job store, by tag.
_PLACING = {
    0x00080016: "sop_class_uid", 0x00080018: "sop_uid", 0x00080060: "modality",
    0x0020000D: "study_uid", 0x0020000E: "series_uid",
}
# The Image Pixel attributes that give the decoded size (checked against the decode limits).
_PIXEL_SIZE = {
    0x00280002: "samples", 0x00280004: "photometric", 0x00280008: "frames", 0x00280010: "rows",
    0x00280011: "columns", 0x00280100: "bits",
}
_PLACING_TAGS = [*_PLACING, *_PIXEL_SIZE]


def _pixel_value(name: str, raw: bytes, little_endian: bool) -> int | str | None:
    """One Image Pixel attribute from its raw bytes (US, IS or CS), or None when it is not readable."""
    if name == "photometric":
        return raw.decode("ascii", "replace").strip(" \x00")
    if name == "frames":
        try:
            return int(raw.decode("ascii").strip(" \x00"))
        except (UnicodeDecodeError, ValueError):
            return None
    return int.from_bytes(raw, "little" if little_endian else "big") if len(raw) == 2 else None


def _past_header(tag: int, vr: object, length: int) -> bool:
    # int's own comparison: pydicom's BaseTag.__gt__ is Python (== then <), called for every element
    return int.__gt__(tag, _LAST_HEADER_TAG)


def _header(values: dict[str, str], request, pixels: Mapping[str, int | str] | None = None) -> _Header:
    """A header from the placing values found; the SOP UIDs fall back to the C-STORE request's."""
    return _Header(
        study_uid=values.get("study_uid", ""),
        series_uid=values.get("series_uid", ""),
        sop_uid=values.get("sop_uid") or str(request.AffectedSOPInstanceUID or ""),
        sop_class_uid=values.get("sop_class_uid") or str(request.AffectedSOPClassUID or ""),
        modality=values.get("modality") or None,
        pixels=pixels or {},
    )


def _header_of(ds: Dataset, request) -> _Header:
    """The placing attributes (and Image Pixel attributes) of a pydicom data set."""
    pixels: dict[str, int | str] = {}
    for tag, name in _PIXEL_SIZE.items():
        with contextlib.suppress(Exception):  # a value pydicom cannot convert: not checked here
            value = ds[tag].value if tag in ds else None
            if value not in (None, ""):
                pixels[name] = str(value).strip() if name == "photometric" else int(value)
    return _header({name: str(ds[tag].value) for tag, name in _PLACING.items() if tag in ds and ds[tag].value},
                   request, pixels)


def _read_placing(fp, ts: UID, request) -> _Header:
    """The placing and Image Pixel attributes of the data set in *fp* (read from where it stands,
    up to Bits Allocated (0028,0100)).

    Read with pydicom's element generator rather than into a ``Dataset`` (``read_dataset``): the
    node needs eleven values and building a Dataset of the whole header costs three times as much
    (0.6 ms against 0.2 ms for a CT slice's header, on every C-STORE).  The five placing values are
    of VR UI and CS, plain ASCII padded with NUL or space, so their raw bytes need no character
    set; the six Image Pixel values (US, IS, CS) are read by :func:`_pixel_value`.  Reading on
    from (0020,000E) to (0028,0100) took the header of a real CT slice from 0.06 to 0.12 ms.
    """
    values = {}
    pixels: dict[str, int | str] = {}
    for element in data_element_generator(fp, ts.is_implicit_VR, ts.is_little_endian,
                                          stop_when=_past_header, specific_tags=_PLACING_TAGS):
        name = _PLACING.get(element.tag)
        if name is not None and element.value:
            values[name] = bytes(element.value).decode("ascii", "replace").strip(" \x00")
        elif element.tag in _PIXEL_SIZE and element.value:
            pixel = _pixel_value(_PIXEL_SIZE[element.tag], bytes(element.value), ts.is_little_endian)
            if pixel is not None:
                pixels[_PIXEL_SIZE[element.tag]] = pixel
    return _header(values, request, pixels)


def _read_header(event: evt.Event, raw: bytes) -> _Header:
    """The placing and Image Pixel attributes, parsed from the raw dataset *raw* up to Bits Allocated."""
    ts = UID(event.context.transfer_syntax)
    if ts.is_deflated:
        return _header_of(event.dataset, event.request)  # pynetdicom inflates it
    return _read_placing(io.BytesIO(raw), ts, event.request)


def _data_set_start(head: bytes) -> int | None:
    """Where the data set begins in a Part 10 file whose first bytes are *head*, or None if unsure.

    After the preamble, ``DICM`` and the file meta, whose first element, (0002,0000) UL, gives the
    length of the rest of it (pynetdicom writes it; PS3.10 7.1 requires it).
    """
    if head[128:140] == b"DICM\x02\x00\x00\x00UL\x04\x00" and len(head) >= 144:
        return 144 + int.from_bytes(head[140:144], "little")
    return None


def _read_file_header(event: evt.Event, path: Path, head: bytes = b"") -> _Header:
    """The placing and Image Pixel attributes of the streamed file *path*, read up to Bits Allocated.

    The same reading as for a data set in memory (so both ways accept and refuse the same data
    sets): it ends at the first element past (0028,0100), long before any pixel data.  *head*, the
    file's first bytes as they were written, is read first, without reading the file: the header of
    an image is a few KB.  Only when the reading runs to the end of *head* (a header longer than
    it, or a file no longer than it) is the file itself read.  A deflated data set, or a file meta
    without its group length, goes through pydicom's file reader (``read_partial``) instead.
    """
    ts = UID(event.context.transfer_syntax)
    if not head:
        with path.open("rb") as handle:
            head = handle.read(_HEAD_BYTES)
    start = _data_set_start(head)
    if ts.is_deflated or start is None:
        with path.open("rb") as handle:
            return _header_of(read_partial(handle, stop_when=_past_header), event.request)
    stream = io.BytesIO(head)
    stream.seek(start)
    try:
        header = _read_placing(stream, ts, event.request)
    except Exception:  # cut short in a way pydicom refuses: the file decides
        header = None
    if header is not None and stream.tell() < len(head):
        return header
    with path.open("rb") as handle:
        handle.seek(start)
        return _read_placing(handle, ts, event.request)


def _streamed_path(event: evt.Event) -> Path | None:
    """The file pynetdicom streamed the data set into, or None when it arrived in memory."""
    try:
        path = event.dataset_path
    except AttributeError:
        return None
    return Path(path) if isinstance(path, (str, os.PathLike)) else None


def _missing_placing(header: _Header) -> str:
    """The UIDs that place an instance in the spool which its header lacks ("" when none is missing)."""
    return " and ".join(name for name, value in (("Study Instance UID (0020,000D)", header.study_uid),
                                                 ("Series Instance UID (0020,000E)", header.series_uid)) if not value)


def _failure(status: int, comment: str) -> Dataset:
    reply = Dataset()
    reply.Status = status
    reply.ErrorComment = comment[:64]
    return reply


class StoreHandler:
    """C-STORE and association event handlers bound to one spool and one job store.

    Parameters
    ----------
    spool, jobs : Spool, JobStore
        Where instances go and where they are recorded.
    metrics : Metrics, optional
        Counts received instances.
    min_free_bytes : int
        Disk guard: a C-STORE that would leave less than this free on the spool's filesystem is
        refused with 0xA700 and nothing is stored (0: no guard).  The free space is read with
        ``os.statvfs`` (space an unprivileged process may use) for each instance.
    match_tls_ae_title : bool
        ``[tls] match_ae_title``: an association over TLS whose calling AE title is neither the
        Common Name nor a DNS name of its client certificate is aborted as soon as it is
        established (and any C-STORE on it answered 0x0124).  Plain associations are not
        concerned (a TLS-only node has ``port = 0``).
    decode_limits : DecodeLimits, optional
        ``[node] max_decoded_mb`` / ``max_frame_mb``: an image whose header (Rows, Columns,
        Number of Frames, Samples per Pixel, Bits Allocated, Photometric Interpretation) asks
        for more decoded pixel data is refused with 0xC000 and nothing is stored.  Missing or
        unreadable values are not refused here (processing reports them).  None: no check.
    record_later : bool
        Answer Success once the instance is spooled (file and folder entry fsync'd) and leave its
        job store row to :attr:`pending`, whose ``run`` the caller runs in a thread (the service
        does; :mod:`node.store.pending`).  False: the row is written before Success, as a test
        harness without that thread needs.
    """

    def __init__(
        self, spool: Spool, jobs: JobStore, *, metrics: Metrics | None = None, min_free_bytes: int = 0,
        match_tls_ae_title: bool = False, decode_limits: DecodeLimits | None = None, record_later: bool = False,
    ) -> None:
        self.spool = spool
        self.jobs = jobs
        #: Spooled instances not recorded yet: all of them with *record_later* (a thread runs
        #: ``pending.run``), else those the job store refused (the service records them later).
        self.pending = PendingRecords(jobs)
        self.record_later = record_later
        self.metrics = metrics
        self.min_free_bytes = max(0, int(min_free_bytes))
        self.decode_limits = decode_limits
        #: C-STOREs refused by the disk guard since start-up.
        self.refused_low_disk = 0
        self._counts: dict[int, int] = {}
        self._refused: dict[int, int] = {}
        self._lock = threading.Lock()
        self._low_disk_warned_at: float | None = None  # monotonic time of the last warning
        self._low_disk_unlogged = 0  # refusals since that warning
        self._spool_device = os.stat(self.spool.root).st_dev
        self.match_tls_ae_title = match_tls_ae_title
        self._unauthorised: set[int] = set()  # id() of the associations refused for their AE title

    def handlers(self) -> list[tuple]:
        """The (event, handler) pairs to give ``AE.start_server``."""
        return [
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_CONN_OPEN, self.on_connection_open),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_CONN_CLOSE, self.on_connection_closed),
        ]

    def on_connection_open(self, event: evt.Event) -> None:
        """Nagle off: each C-STORE-RSP goes out at once instead of waiting for a delayed ACK; and
        pynetdicom's hot path made quicker for this association (:mod:`node.net.fastpath`)."""
        no_delay(event.assoc)
        fastpath.attach(event.assoc)

    def on_echo(self, event: evt.Event) -> int:
        """C-ECHO: always Success (also when the disk guard refuses C-STOREs)."""
        return STATUS["success"]

    def on_store(self, event: evt.Event) -> int | Dataset:
        """Spool one instance durably, record it, and only then answer Success.

        Works on the data set in memory, or on the file pynetdicom streamed it into (see
        :func:`enable_streamed_receive`); that file is moved into the spool or, on any refusal,
        deleted before this returns.
        """
        path = _streamed_path(event)
        if id(event.assoc) in self._unauthorised:
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                _forget(path)
            return self._refusal("not_authorised", "calling AE title not in the client certificate")
        if path is None:
            return self._store(event, None)
        try:
            incoming = _incoming_file(path)
            if incoming is not None:
                incoming.finish()
                if incoming.failure is not None:
                    return self._failed_receive(event, incoming)
            return self._store(event, path, incoming)
        finally:
            with contextlib.suppress(FileNotFoundError):  # not adopted: refused, resent or failed
                path.unlink()
            _forget(path)

    def _store(self, event: evt.Event, path: Path | None, incoming: _IncomingFile | None = None) -> int | Dataset:
        calling = event.assoc.requestor.ae_title
        head = incoming.head if incoming is not None else b""
        raw = b""
        try:
            if path is None:
                raw = event.encoded_dataset(include_meta=False)  # the bytes as sent: never decoded, never transcoded
                header = _read_header(event, raw)
            else:
                header = _read_file_header(event, path, head)
        except Exception as exc:  # any parse failure of a peer's bytes is that peer's problem
            log.error("C-STORE from %s refused: cannot parse the data set header: %s: %s",
                      calling, type(exc).__name__, exc)
            return self._refusal("cannot_parse", f"cannot parse the header: {exc}")
        missing = _missing_placing(header)
        if missing:  # not in the header, or the bytes are not a data set in the transfer syntax agreed
            log.error("C-STORE from %s refused: cannot parse the data set header: %s missing (read as %s)",
                      calling, missing, UID(event.context.transfer_syntax).name)
            comment = f"{missing} missing"
            return self._refusal("cannot_parse", comment if len(comment) <= 64 else "Study and Series Instance UID "
                                 "(0020,000D/E) missing")
        try:
            self.spool.path_for(header.study_uid, header.series_uid, header.sop_uid)
        except InvalidUID as exc:
            log.error("C-STORE from %s refused: %s", calling, exc)
            return self._refusal("invalid_uid", str(exc))
        over = self._over_decode_limits(header)
        if over is not None:
            log.warning("C-STORE from %s refused (0x%04X): SOP Instance %s: %s", calling, STATUS["too_large"],
                        header.sop_uid, over)
            return self._refusal("too_large", over.comment)
        if path is None:
            chunks = (b"\x00" * 128, b"DICM", encode_file_meta(event.file_meta), raw)
            needed = sum(len(c) for c in chunks)
        else:
            needed = 0  # written already, on the spool's disk (or counted below when it is not)
            with contextlib.suppress(OSError):
                stat = path.stat()
                needed = 0 if stat.st_dev == self._spool_device else stat.st_size
        refusal = self._disk_guard(event, needed)
        if refusal is not None:
            return refusal
        try:
            if (self.spool.holds(header.study_uid, header.series_uid, header.sop_uid, chunks) if path is None
                    else self.spool.holds_file(header.study_uid, header.series_uid, header.sop_uid, path)):
                log.info("C-STORE from %s: %s already spooled with identical bytes: acknowledged, nothing changed",
                         calling, header.sop_uid)
                return STATUS["success"]
            replacing = self.spool.path_for(header.study_uid, header.series_uid, header.sop_uid).exists()
            if path is None:
                stored = self.spool.store(header.study_uid, header.series_uid, header.sop_uid, chunks)
            else:
                stored = self.spool.adopt(path, header.study_uid, header.series_uid, header.sop_uid)
        except OSError as exc:
            log.error("C-STORE from %s: spool write failed for %s: %s", calling, header.sop_uid, exc)
            return self._refusal("spool_write_failed", f"spool write failed: {exc.strerror or exc}")
        row = dict(study_uid=header.study_uid, series_uid=header.series_uid, sop_uid=header.sop_uid,
                   sop_class_uid=header.sop_class_uid, path=stored.path, size=stored.size,
                   modality=header.modality, calling_ae=calling, received_at=time.time())
        if self.record_later:
            self.pending.submit(row)  # the file is safe on disk, which is the record
        else:
            try:
                self.jobs.record_instance(**row)
            except Exception as exc:  # the file is safe on disk, which is the record: written to the store later
                self.pending.add(row, exc)
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

    def _over_decode_limits(self, header: _Header) -> OverLimit | None:
        """What of the header's decoded size is above :attr:`decode_limits` (None: fits, or unknown)."""
        if self.decode_limits is None:
            return None
        pixels = header.pixels
        dimensions = {name: pixels.get(name, default) for name, default in
                      (("rows", None), ("columns", None), ("bits", None), ("frames", 1), ("samples", 1))}
        if not all(isinstance(value, int) and value >= 1 for value in dimensions.values()):
            return None  # not an image, or values processing will report
        return self.decode_limits.check(**dimensions, photometric=str(pixels.get("photometric", "")))

    def _refusal(self, reason: str, comment: str) -> Dataset:
        """The failure reply for *reason* (a :data:`node.telemetry.metrics.REFUSAL_REASONS` entry), counted."""
        if self.metrics is not None:
            self.metrics.instance_refused(reason)
        return _failure(_REFUSAL_STATUS[reason], comment)

    def _failed_receive(self, event: evt.Event, incoming: _IncomingFile) -> Dataset:
        """0xA700 for a data set whose file stopped being written while it arrived."""
        if incoming.low_disk_free is not None:
            return self._refuse_low_disk(event, incoming.low_disk_free, "while the instance arrived")
        log.error("C-STORE from %s: %s for %s", event.assoc.requestor.ae_title, incoming.failure,
                  event.request.AffectedSOPInstanceUID)
        return self._refusal("spool_write_failed", incoming.failure or "spool write failed")

    def _disk_guard(self, event: evt.Event, needed: int) -> Dataset | None:
        """0xA700 when storing *needed* more bytes would leave less than ``min_free_bytes`` free.

        The first refusal is logged at WARNING, then at most one line every
        :data:`LOW_DISK_WARNING_SECONDS` with the count of refusals in between; when space is back,
        one INFO line says so.
        """
        if not self.min_free_bytes:
            return None
        try:
            st = os.statvfs(self.spool.root)
        except OSError as exc:  # cannot tell: let the write itself succeed or fail
            log.debug("statvfs(%s) failed: %s", self.spool.root, exc)
            return None
        free = st.f_bavail * st.f_frsize
        if free - needed >= self.min_free_bytes:
            with self._lock:
                if self._low_disk_warned_at is not None:
                    log.info("spool disk has %d MB free again (min_free_disk_mb = %d): C-STOREs accepted again; "
                             "%d refused in all", free >> 20, self.min_free_bytes >> 20, self.refused_low_disk)
                    self._low_disk_warned_at = None
                    self._low_disk_unlogged = 0
            return None
        return self._refuse_low_disk(event, free, f"{(free - needed) >> 20} MB after this instance")

    def _refuse_low_disk(self, event: evt.Event, free: int, detail: str) -> Dataset:
        """Count a disk-guard refusal, warn (rate-limited) and return the 0xA700 reply."""
        now = time.monotonic()
        with self._lock:
            self.refused_low_disk += 1
            self._low_disk_unlogged += 1
            key = id(event.assoc)
            self._refused[key] = self._refused.get(key, 0) + 1
            warn = self._low_disk_warned_at is None or now - self._low_disk_warned_at >= LOW_DISK_WARNING_SECONDS
            if warn:
                unlogged, self._low_disk_unlogged = self._low_disk_unlogged, 0
                self._low_disk_warned_at = now
        if warn:
            log.warning(
                "C-STORE refused (0xA700, out of resources): the spool disk (%s) has %d MB free (%s), "
                "below min_free_disk_mb = %d; %d refused since the last warning, %d in all "
                "(next warning in %.0f s at the earliest)", self.spool.root, free >> 20, detail,
                self.min_free_bytes >> 20, unlogged, self.refused_low_disk, LOW_DISK_WARNING_SECONDS,
            )
        comment = f"disk low: {free >> 20} MB free, min {self.min_free_bytes >> 20} MB"
        return self._refusal("disk_low", comment)

    def on_established(self, event: evt.Event) -> None:
        """Log the new association; abort it if its AE title is not its TLS certificate's (see match_tls_ae_title)."""
        peer = event.assoc.requestor
        log.info("association from %s at %s:%s", peer.ae_title, peer.address, peer.port)
        if not self.match_tls_ae_title:
            return
        sock = getattr(getattr(getattr(event.assoc, "dul", None), "socket", None), "socket", None)
        if not isinstance(sock, ssl.SSLSocket):
            return  # a plain association: nothing to match
        names = certificate_names(sock)
        if peer.ae_title.strip() in names:
            return
        with self._lock:
            self._unauthorised.add(id(event.assoc))
        log.warning("association from %s at %s aborted: its TLS client certificate names %s, not that AE title "
                    "([tls] match_ae_title)", peer.ae_title, peer.address, ", ".join(names) or "nothing")
        event.assoc.abort(block=False)

    def on_closed(self, event: evt.Event) -> None:
        """Log the end of an association with how many instances it stored (and the disk guard refused)."""
        peer = event.assoc.requestor
        with self._lock:
            count = self._counts.pop(id(event.assoc), 0)
            refused = self._refused.pop(id(event.assoc), 0)
            self._unauthorised.discard(id(event.assoc))
        how = "released" if event.event == evt.EVT_RELEASED else "aborted"
        log.info("association from %s %s: %d instances stored%s", peer.ae_title, how, count,
                 f", {refused} refused (disk low)" if refused else "")

    def on_connection_closed(self, event: evt.Event) -> None:
        """Delete what a transfer cut short left in ``.incoming`` (streamed receive only)."""
        removed = _remove_left_by(getattr(event.assoc, "dul", None))
        if removed:
            log.warning("connection from %s closed mid-transfer: %d partly received file(s) deleted",
                        event.assoc.requestor.ae_title, removed)

    def on_rejected(self, event: evt.Event) -> None:
        """Log a refused association (unknown calling AE, too many associations)."""
        peer = event.assoc.requestor
        log.warning("association from %s at %s refused", peer.ae_title, peer.address)


def build_application_entity(
    ae_title: str, *, allowed_calling_aets: tuple[str, ...] = (), max_associations: int = 10,
    association_timeout: float = 10.0,
) -> AE:
    """An AE that accepts C-ECHO and C-STORE of every storage SOP class in every transfer syntax.

    Every transfer syntax pydicom knows is accepted as proposed: the node never transcodes on
    receipt (decoding happens later, in the pipeline, where a failure costs nothing but that file).

    Parameters
    ----------
    ae_title : str
        Our AE title.
    allowed_calling_aets : tuple of str
        Calling AE titles accepted; empty: any.
    max_associations : int
        Associations at once (``maximum_associations``). Behind the node's listeners
        (:class:`node.receive.guard.GuardedAssociationServer`) only connections that sent an
        A-ASSOCIATE-RQ count; behind pynetdicom's own server every connection does.
    association_timeout : float
        ``acse_timeout``: behind pynetdicom's own server, how long a connection may stay silent
        before its A-ASSOCIATE-RQ (the node's listeners read that request themselves, within
        ``association_timeout_seconds``); also the ARTIM timer.
    """
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = max_associations
    ae.require_calling_aet = list(allowed_calling_aets)
    # no limit on the PDUs we receive: pynetdicom's 16 KiB default splits a 512x512 CT slice into
    # ~32 PDUs, each handled in Python (the ingest benchmark measured 24% of the node's time)
    ae.maximum_pdu_size = 0
    # pynetdicom's default is 30 s
    ae.acse_timeout = association_timeout
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, AllTransferSyntaxes)
    return ae
