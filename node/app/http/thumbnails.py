"""Before/after thumbnails of series for the status pages: chosen, rendered small, cached on disk.

The "before" picture is the middle instance of a series (in instance order) as a viewer would
show it by default; the "after" picture is the output made from that instance, found by the
node's own output naming (:mod:`node.outputs.naming`) when the pipelines are known, else by the
Source Image Sequence of a Secondary Capture, else the middle output.  Files are read only from
inside the spool and the outputs folder; thumbnails are small PNGs (at most
:data:`THUMBNAIL_SIZE` px) cached under ``<outputs>/.thumbs``.  Nothing but pixels is shown.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw

from node.config.pipeline import Clip, OutputFormat, Pipeline
from node.imaging.source import DecodeLimits, ImageFile
from node.outputs import naming
from node.process.render import FrameRenderer
from node.store.fsutil import atomic_output
from node.store.jobstore import JobStore

__all__ = ["THUMBNAIL_SIZE", "Thumbnails", "placeholder_png"]

log = logging.getLogger(__name__)

#: Largest side of a thumbnail, in pixels.
THUMBNAIL_SIZE = 128

_HEADER_SCAN_LIMIT = 2000  # above this many files, order by name instead of reading every header
_RENDERS_AT_ONCE = 2  # thumbnails rendered at the same time: the data path keeps the CPU
_FAILURE_MEMORY_SECONDS = 60.0

# The source as a viewer would show it by default: rescale, then the file's window or the range.
_SOURCE_VIEW = Pipeline(name="thumbnail", output=OutputFormat.PNG)


@functools.lru_cache(maxsize=1)
def placeholder_png() -> bytes:
    """The image sent with a thumbnail 404: a grey square with a cross."""
    size = 64
    picture = Image.new("RGB", (size, size), (58, 60, 66))
    draw = ImageDraw.Draw(picture)
    draw.line((16, 16, size - 17, size - 17), fill=(120, 124, 132), width=3)
    draw.line((16, size - 17, size - 17, 16), fill=(120, 124, 132), width=3)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def _inside(path: Path, root: Path) -> Path | None:
    """*path* resolved, if it is inside *root* (symlinks followed); else None."""
    try:
        resolved = path.resolve()
        return resolved if resolved.is_relative_to(root.resolve()) else None
    except (OSError, RuntimeError, ValueError):
        return None


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    """A rendered frame as ``uint8`` (16-bit renders and 16-bit PNGs are scaled down)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    top = float(arr.max()) if arr.size else 0.0
    low = float(arr.min()) if arr.size else 0.0
    if top <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.floor((arr.astype(np.float64) - low) * (255 / (top - low))).astype(np.uint8)


def _png_bytes(arr: np.ndarray) -> bytes:
    """A frame (grey or RGB) shrunk to fit :data:`THUMBNAIL_SIZE` and encoded as PNG."""
    picture = Image.fromarray(_to_8bit(arr))
    picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def _dicom_frame(path: Path, frame: int, *, as_stored: bool, limits: DecodeLimits | None = None) -> np.ndarray:
    """Frame *frame* of a DICOM image rendered for display.

    A source is shown as a viewer would by default (Modality LUT, then its own window, else its
    range).  A Secondary Capture this node wrote already holds display values: *as_stored* shows
    them over the full range of Bits Stored, not stretched again.  Only that frame is decoded,
    and nothing at all of a file above *limits* (:class:`~node.imaging.source.TooLarge`).
    """
    image = ImageFile.open(path, limits)
    frame = max(0, min(frame, image.number_of_frames - 1))
    arr = next(image.iter_frames([frame]))
    pipeline = _SOURCE_VIEW
    if as_stored and image.is_grey:
        header = image.header
        bits = int(header.get("BitsStored") or header.get("BitsAllocated") or 8)
        if int(header.get("PixelRepresentation") or 0):
            low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            low, high = 0, 2**bits - 1
        pipeline = Pipeline(name="thumbnail", output=OutputFormat.PNG, rescale=False, clip=Clip(low, high))
    return FrameRenderer(pipeline, image).render(arr, frame)


def _png_frame(path: Path) -> np.ndarray:
    """A PNG output's pixels (16-bit grey scaled to 8-bit later)."""
    with Image.open(path) as picture:
        picture.load()
        if picture.mode.startswith("I"):  # 16-bit grey (I;16) or 32-bit integers
            return np.asarray(picture)
        if picture.mode not in ("L", "RGB"):
            picture = picture.convert("RGB")
        return np.asarray(picture)


class Thumbnails:
    """Before/after thumbnails of series, rendered on demand and cached on disk.

    Parameters
    ----------
    jobs : JobStore
        Where series rows come from; instance paths are read from its database (read-only).
    outputs_dir, spool_dir : pathlib.Path
        The only folders files are read from; the cache is ``outputs_dir/.thumbs``.
    pipelines : mapping of str to Pipeline, optional
        The configured pipelines: they name the output made from the chosen source instance
        exactly (derived UIDs); without them a Secondary Capture is found by its Source Image
        Sequence and a PNG output is the middle one by name.
    decode_limits : DecodeLimits, optional
        ``[node] max_decoded_mb`` / ``max_frame_mb`` (default: their defaults): a file above
        them is never decoded; its thumbnail is the placeholder.
    """

    def __init__(
        self,
        jobs: JobStore,
        outputs_dir: Path,
        spool_dir: Path,
        pipelines: Mapping[str, Pipeline] | None = None,
        decode_limits: DecodeLimits | None = None,
    ) -> None:
        self.jobs = jobs
        self.decode_limits = decode_limits or DecodeLimits()
        self.outputs_dir = Path(outputs_dir)
        self.spool_dir = Path(spool_dir)
        self.cache_dir = self.outputs_dir / ".thumbs"
        self.pipelines = dict(pipelines or {})
        self._renders = threading.BoundedSemaphore(_RENDERS_AT_ONCE)
        self._failed: dict[str, float] = {}
        self._failed_lock = threading.Lock()
        self._sources: dict[tuple[int, str], tuple[Path, str, int] | None] = {}  # choice per series version

    @staticmethod
    def version(row: Mapping[str, Any], kind: str) -> str:
        """What a thumbnail of *row* depends on, hashed: it changes when the picture may change."""
        # the Series UID too: a job store made afresh beside old outputs reuses the ids
        if kind == "source":
            key = f"{row.get('series_uid')}|{row.get('generation')}|{row.get('instances')}"
        else:
            key = (f"{row.get('series_uid')}|{row.get('generation')}|{row.get('output_dir')}|{row.get('outputs')}|"
                   f"{row.get('processing_seconds')!r}|{row.get('derived_series_uid')}")
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def get(self, series_id: int, kind: str) -> bytes | None:
        """The PNG of one thumbnail (``kind``: ``source`` or ``output``), or None when there is none."""
        row = self.jobs.series(series_id)
        if row is None:
            return None
        version = self.version(row, kind)
        cached = self.cache_dir / str(series_id) / f"{kind}-{version}.png"
        failure_key = f"{series_id}/{kind}/{version}"
        data = self._read_cached(cached)
        if data is not None:
            return data
        if self._recently_failed(failure_key):
            return None
        with self._renders:
            data = self._read_cached(cached)  # another request may have made it meanwhile
            if data is not None:
                return data
            started = time.monotonic()
            try:
                data = self._render(row, kind)
            except Exception as exc:  # any file problem: no thumbnail, logged once a minute
                log.debug("thumbnail %s of series %d: %s: %s", kind, series_id, type(exc).__name__, exc)
                data = None
            if data is None:
                self._remember_failure(failure_key)
                return None
            log.debug("thumbnail %s of series %d made in %.2f s", kind, series_id, time.monotonic() - started)
        self._write_cached(cached, data)
        return data

    # cache ------------------------------------------------------------------------------------

    def _read_cached(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except OSError:
            return None

    def _write_cached(self, path: Path, data: bytes) -> None:
        try:
            with atomic_output(path, durable=False) as handle:
                handle.write(data)
            prefix = path.name.split("-", 1)[0] + "-"
            for old in path.parent.glob(f"{prefix}*.png"):
                if old != path:
                    old.unlink(missing_ok=True)
        except OSError as exc:  # a read-only or full disk: serve it uncached
            log.debug("thumbnail cache %s not written: %s", path, exc)

    def _recently_failed(self, key: str) -> bool:
        with self._failed_lock:
            when = self._failed.get(key)
            return when is not None and time.monotonic() - when < _FAILURE_MEMORY_SECONDS

    def _remember_failure(self, key: str) -> None:
        with self._failed_lock:
            if len(self._failed) > 4096:
                self._failed.clear()
            self._failed[key] = time.monotonic()

    # choosing and rendering -------------------------------------------------------------------

    def _render(self, row: Mapping[str, Any], kind: str) -> bytes | None:
        key = (int(row["id"]), self.version(row, "source"))
        with self._failed_lock:
            known = key in self._sources
            source = self._sources.get(key)
        if not known:  # reading every header of a long series once is enough for both pictures
            source = self.choose_source(key[0])
            with self._failed_lock:
                if len(self._sources) > 1024:
                    self._sources.clear()
                self._sources[key] = source
        if kind == "source":
            if source is None:
                return None
            path, _, frame = source
            return _png_bytes(_dicom_frame(path, frame, as_stored=False, limits=self.decode_limits))
        chosen = self.choose_output(row, source)
        if chosen is None:
            return None
        path, frame = chosen
        if path.suffix == ".png":
            return _png_bytes(_png_frame(path))
        return _png_bytes(_dicom_frame(path, frame, as_stored=True, limits=self.decode_limits))

    def choose_source(self, series_id: int) -> tuple[Path, str, int] | None:
        """The middle instance of a series in instance order (path, SOP UID), and its middle frame."""
        found = []
        for sop_uid, stored in self.jobs.instances(series_id):
            path = _inside(stored, self.spool_dir)
            if path is not None and path.is_file():
                found.append((sop_uid, path))
        if not found:
            return None
        if len(found) <= _HEADER_SCAN_LIMIT:
            found.sort(key=lambda item: (_instance_number(item[1]), item[0]))
        sop_uid, path = found[len(found) // 2]
        try:
            frames = int(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
                         .get("NumberOfFrames") or 1)
        except Exception:
            frames = 1
        return path, sop_uid, max(frames, 1) // 2

    def output_folder(self, row: Mapping[str, Any]) -> Path | None:
        """The folder of a series' outputs, when it has outputs there inside the outputs folder; else None."""
        if not row.get("output_dir") or not row.get("outputs"):
            return None
        return _inside(Path(row["output_dir"]), self.outputs_dir)

    def choose_output(
        self, row: Mapping[str, Any], source: tuple[Path, str, int] | None
    ) -> tuple[Path, int] | None:
        """The output made from the chosen source instance (and frame), else the middle output."""
        if not row.get("output_dir"):
            return None
        folder = _inside(Path(row["output_dir"]), self.outputs_dir)
        if folder is None or not folder.is_dir():
            return None
        files = sorted(
            p for p in folder.iterdir()
            if p.suffix in (".dcm", ".png") and not p.name.startswith(".") and p.is_file()
        )
        files = [p for p in files if _inside(p, self.outputs_dir) is not None]
        if not files:
            return None
        if source is not None:
            _, sop_uid, frame = source
            by_name = {p.name: p for p in files}
            for fingerprint in self._fingerprints(row):
                for name, out_frame in naming.outputs_holding_frame(sop_uid, fingerprint, frame):
                    if name in by_name:
                        return by_name[name], out_frame
            dicom = [p for p in files if p.suffix == ".dcm"]
            if dicom and len(dicom) <= _HEADER_SCAN_LIMIT:
                for path in dicom:
                    if sop_uid in _referenced_sops(path):
                        return path, frame
        middle = files[len(files) // 2]
        return middle, (source[2] if source else 0)

    def _fingerprints(self, row: Mapping[str, Any]) -> list[str]:
        """Fingerprints of configured pipelines that made this series' derived UID (normally one)."""
        named = self.pipelines.get(str(row.get("pipeline") or ""))
        candidates = ([named] if named else []) + [p for p in self.pipelines.values() if p is not named]
        series_uid, derived = str(row.get("series_uid") or ""), str(row.get("derived_series_uid") or "")
        return [
            p.fingerprint() for p in candidates
            if derived and naming.derived_series_uid(series_uid, p.fingerprint()) == derived
        ]


def _instance_number(path: Path) -> int:
    try:
        value = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["InstanceNumber"]).get("InstanceNumber")
        return int(value) if value not in (None, "") else 0
    except Exception:
        return 0


def _referenced_sops(path: Path) -> set[str]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SourceImageSequence"])
        return {str(item.get("ReferencedSOPInstanceUID", "")) for item in ds.get("SourceImageSequence", [])}
    except Exception:
        return set()
