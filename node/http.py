"""The node's HTTP side: health, readiness, metrics, the job API and a status page.

Standard library only (:class:`http.server.ThreadingHTTPServer`), one thread per request, all of
it read-only: nothing here changes a job.  Endpoints:

``/healthz``
    200 ``ok`` while the node's threads are alive, else 503.
``/readyz``
    200 ``ready`` when the node takes work (store open, listener up), else 503.
``/metrics``
    Prometheus text format 0.0.4 (:mod:`node.metrics`), queue depth read from the job store.
``/api/jobs`` and ``/api/jobs/{id}``
    Recent series as JSON (``?limit=``, ``?state=``); one series with deliveries and events.
``/``
    A server-rendered HTML page (no JavaScript): counts by state, recent series each with a
    before/after thumbnail from ``/thumbs/{id}/source.png`` and ``/thumbs/{id}/output.png``,
    each linked to its own page.
``/series/{id}``
    One series as HTML (:mod:`node.seriesview`, the facts ``dicom-node status JOB`` prints):
    UTC times, calling AE, route, pipeline, each delivery with attempts ``n/m`` and the peer's
    last reason, the outputs with their thumbnails, and the series' events.

With ``[http] auth`` every request but ``/healthz`` and ``/readyz`` (and ``/metrics`` with
``public_metrics``) needs credentials (:mod:`node.httpauth`); with ``cert_file``/``key_file`` the
listener speaks HTTPS only (TLS 1.2 or later, the handshake in the request's own thread).

No patient name or ID is ever shown: the job store holds none, and thumbnails are pixels only.
Files are read only from inside the spool and the outputs folder; thumbnails are small PNGs
(at most 128 px) cached under ``<outputs>/.thumbs``.  A thumbnail that cannot be made is a 404
with a placeholder image, never an error page.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import html
import io
import ipaddress
import json
import logging
import re
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pydicom
from PIL import Image, ImageDraw

from node.store.fsutil import atomic_output
from node.httpauth import HttpGuard
from node.imaging.source import DecodeLimits, ImageFile
from node.store.jobstore import JobStore, SeriesState
from node.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from node.metrics import Metrics
from node.config.pipeline import Clip, OutputFormat, Pipeline
from node.process.render import FrameRenderer
from node.seriesview import SeriesView, series_view, utc_time
from node.outputs.uids import derived_uid

__all__ = ["StatusServer", "THUMBNAIL_SIZE", "Thumbnails", "render_page", "render_series_page"]

log = logging.getLogger(__name__)

#: Largest side of a thumbnail, in pixels.
THUMBNAIL_SIZE = 128
#: Series shown on the page unless ``?limit=`` says otherwise.
PAGE_LIMIT = 50
#: Series listed by ``/api/jobs`` unless ``?limit=`` says otherwise.
API_LIMIT = 100
MAX_LIMIT = 1000

_HEADER_SCAN_LIMIT = 2000  # above this many files, order by name instead of reading every header
_RENDERS_AT_ONCE = 2  # thumbnails rendered at the same time: the data path keeps the CPU
_FAILURE_MEMORY_SECONDS = 60.0
_HANDSHAKE_SECONDS = 10.0  # a TLS client has this long to complete its handshake

_STATES = [state.value for state in SeriesState]
_ID = re.compile(r"[0-9]{1,18}")
_THUMB = re.compile(r"/thumbs/([^/]*)/(source|output)\.png")
_SERIES_PAGE = re.compile(r"/series/([^/]*)")

# The source as a viewer would show it by default: rescale, then the file's window or the range.
_SOURCE_VIEW = Pipeline(name="thumbnail", output=OutputFormat.PNG)

_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_HTML = "text/html; charset=utf-8"
_PNG = "image/png"
_PAGE_POLICY = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'self'"


class _BadRequest(Exception):
    """A request the client got wrong (400), with a message for it."""


# --------------------------------------------------------------------------- thumbnails


@functools.lru_cache(maxsize=1)
def _placeholder_png() -> bytes:
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
                stem = derived_uid(sop_uid, "instance", fingerprint)
                for name, out_frame in ((f"{stem}.dcm", frame), (f"{stem}_{frame + 1:04d}.png", 0), (f"{stem}.png", 0)):
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
            if derived and derived_uid(series_uid, "series", p.fingerprint()) == derived
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


# --------------------------------------------------------------------------- the page


def _esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(epoch: object, now: float) -> tuple[str, str]:
    """(local time, how long ago) of a timestamp, or dashes."""
    if not isinstance(epoch, (int, float)):
        return "—", ""
    stamp = datetime.datetime.fromtimestamp(epoch).astimezone()
    ago = max(0.0, now - epoch)
    if ago < 90:
        rel = f"{ago:.0f} s ago"
    elif ago < 90 * 60:
        rel = f"{ago / 60:.0f} min ago"
    elif ago < 36 * 3600:
        rel = f"{ago / 3600:.0f} h ago"
    else:
        rel = f"{ago / 86400:.0f} d ago"
    return stamp.strftime("%Y-%m-%d %H:%M:%S"), rel


_STYLE = """
:root { color-scheme: light; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0; color: #1d2330; background: #f4f5f7; }
header { background: #1f2a3c; color: #fff; padding: 12px 24px; display: flex; align-items: baseline;
         gap: 24px; flex-wrap: wrap; }
header h1 { font-size: 20px; margin: 0; font-weight: 600; }
header .meta { color: #c5cede; font-size: 13px; }
header a { color: #c5d8ff; }
main { padding: 16px 24px 32px; }
.counts { display: flex; gap: 10px; flex-wrap: wrap; margin: 0 0 16px; padding: 0; list-style: none; }
.counts a { display: block; text-decoration: none; color: inherit; background: #fff; border: 1px solid #d5d9e0;
            border-radius: 6px; padding: 6px 14px; min-width: 84px; }
.counts a.current { border-color: #1f2a3c; box-shadow: inset 0 0 0 1px #1f2a3c; }
.counts .n { font-size: 22px; font-weight: 600; display: block; }
.counts .zero .n { color: #9aa3b2; }
.counts .alert .n { color: #b91c1c; }
.counts .s { font-size: 12px; color: #556070; text-transform: uppercase; letter-spacing: .04em; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #d5d9e0; }
th, td { text-align: left; vertical-align: top; padding: 8px 10px; border-bottom: 1px solid #e4e7ec; }
th { background: #eef0f3; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: #445064; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.thumbs { display: flex; gap: 6px; }
figure { margin: 0; text-align: center; }
figcaption { font-size: 11px; color: #667085; }
.box { width: 96px; height: 96px; background: #10141b; display: flex; align-items: center;
       justify-content: center; border-radius: 3px; overflow: hidden; color: #7d8797; font-size: 12px; }
.box img { max-width: 96px; max-height: 96px; }
.state { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         color: #fff; background: #6b7280; }
.st-receiving { background: #2563eb; } .st-queued { background: #6b7280; } .st-processing { background: #b45309; }
.st-delivering { background: #7c3aed; } .st-delivered { background: #15803d; } .st-failed { background: #b91c1c; }
.st-unrouted { background: #c2410c; } .st-discarded { background: #9ca3af; }
.uid { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 11px; color: #667085;
       word-break: break-all; }
.error { color: #9f1239; max-width: 36em; white-space: pre-wrap; word-break: break-word; }
.muted { color: #8a94a6; }
.rel { display: block; font-size: 12px; color: #667085; }
.empty { padding: 24px; text-align: center; color: #667085; background: #fff; border: 1px solid #d5d9e0; }
"""


def render_page(
    counts: Mapping[str, int], rows: list[dict[str, Any]], *, state: str | None, limit: int, now: float
) -> str:
    """The status page: counts by state, then the recent series with their thumbnails."""
    total = sum(counts.values())
    generated, _ = _when(now, now)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="refresh" content="10">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>dicom-node status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<header><h1>dicom-node</h1>",
        f'<span class="meta">{total} series · updated {_esc(generated)} · refreshes every 10 s</span>',
        '<span class="meta"><a href="/api/jobs">jobs JSON</a> · <a href="/metrics">metrics</a> · '
        '<a href="/healthz">health</a> · <a href="/readyz">readiness</a></span></header>',
        "<main>",
        '<ul class="counts">',
    ]
    current = "" if state is None else state
    mark = "" if current else ' class="current"'
    out.append(f'<li><a href="/"{mark}><span class="n">{total}</span><span class="s">all</span></a></li>')
    names = list(_STATES) + sorted(set(counts) - set(_STATES))
    for name in names:
        number = int(counts.get(name, 0))
        classes = " ".join(c for c in (
            "current" if name == current else "",
            "zero" if not number else "alert" if name in ("failed", "unrouted") else "",
        ) if c)
        mark = f' class="{classes}"' if classes else ""
        out.append(f'<li><a href="/?state={_esc(name)}"{mark}><span class="n">{number}</span>'
                   f'<span class="s">{_esc(name)}</span></a></li>')
    out.append("</ul>")
    what = f"{_esc(state)} series" if state else "Recent series"
    out.append(f'<h2 style="font-size:16px;margin:0 0 8px">{what} '
               f'<span class="muted" style="font-weight:normal">(newest first, at most {limit})</span></h2>')
    if not rows:
        out.append('<div class="empty">No series yet.</div>')
    else:
        out.append("<table><thead><tr><th>Before / after</th><th>Series</th><th>State</th><th>Modality</th>"
                   "<th>Instances</th><th>Outputs</th><th>Pipeline</th><th>Last received</th><th>Error</th>"
                   "</tr></thead><tbody>")
        for row in rows:
            out.append(_series_row(row, now))
        out.append("</tbody></table>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _thumb(row: Mapping[str, Any], kind: str, label: str, available: bool) -> str:
    if available:
        src = f"/thumbs/{int(row['id'])}/{kind}.png?v={Thumbnails.version(row, kind)}"
        inner = f'<img src="{_esc(src)}" alt="{_esc(label)}" loading="lazy">'
    else:
        inner = '<span class="muted">—</span>'
    return f'<figure><div class="box">{inner}</div><figcaption>{_esc(label)}</figcaption></figure>'


def _series_row(row: Mapping[str, Any], now: float) -> str:
    series_id = int(row["id"])
    state = str(row.get("state") or "")
    received, ago = _when(row.get("last_received"), now)
    error = row.get("error")
    if error:
        text = str(error)
        shown = text if len(text) <= 400 else text[:400] + "…"
        kind = "muted" if state == SeriesState.DISCARDED.value else "error"  # why it was dropped: no fault
        error_cell = f'<div class="{kind}" title="{_esc(text)}">{_esc(shown)}</div>'
    else:
        error_cell = '<span class="muted">—</span>'
    outputs = row.get("outputs")
    pipeline = row.get("pipeline")
    cells = [
        '<div class="thumbs">'
        + _thumb(row, "source", "before", bool(row.get("instances")) and state != SeriesState.DISCARDED.value)
        + _thumb(row, "output", "after", bool(row.get("output_dir")) and bool(outputs))
        + "</div>",
        f'<a href="/series/{series_id}">#{series_id}</a> <a class="muted" href="/api/jobs/{series_id}">json</a>'
        f'<div class="uid" title="Series Instance UID">{_esc(row.get("series_uid"))}</div>',
        f'<span class="state st-{_esc(state)}">{_esc(state)}</span>',
        _esc(row.get("modality") or "—"),
        f'{int(row.get("instances") or 0)}',
        "—" if outputs is None else f"{int(outputs)}",
        _esc(pipeline) if pipeline else '<span class="muted">—</span>',
        f'{_esc(received)}<span class="rel">{_esc(ago)}</span>',
        error_cell,
    ]
    classes = ["", "", "", "", "num", "num", "", "", ""]
    tds = "".join(f'<td class="{c}">{cell}</td>' if c else f"<td>{cell}</td>" for c, cell in zip(classes, cells))
    return f"<tr>{tds}</tr>"


_SERIES_STYLE = """
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0 0 16px;
           background: #fff; border: 1px solid #d5d9e0; padding: 12px 16px; }
dl.facts dt { color: #556070; } dl.facts dd { margin: 0; word-break: break-all; }
h2 { font-size: 16px; margin: 20px 0 8px; }
.big .box { width: 128px; height: 128px; } .big .box img { max-width: 128px; max-height: 128px; }
"""


def _series_thumbs(row: Mapping[str, Any]) -> str:
    state = str(row.get("state") or "")
    outputs = row.get("outputs")
    return ('<div class="thumbs big">'
            + _thumb(row, "source", "before", bool(row.get("instances")) and state != SeriesState.DISCARDED.value)
            + _thumb(row, "output", "after", bool(row.get("output_dir")) and bool(outputs))
            + "</div>")


def _deliveries_table(view: SeriesView) -> str:
    if not view.deliveries:
        return '<div class="empty">No deliveries.</div>'
    out = ["<table><thead><tr><th>Destination</th><th>State</th><th>Attempts</th><th>Delivered</th>"
           "<th>Next attempt</th><th>Peer's last reason</th></tr></thead><tbody>"]
    for d in view.deliveries:
        reason = f'<div class="error">{_esc(d.last_error)}</div>' if d.last_error else '<span class="muted">—</span>'
        out.append(f'<tr><td>{_esc(d.destination)}</td><td><span class="state st-{_esc(d.state)}">{_esc(d.state)}'
                   f'</span></td><td class="num">{_esc(d.attempts)}</td><td>{_esc(d.delivered_at)}</td>'
                   f"<td>{_esc(d.next_attempt_at)}</td><td>{reason}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _events_table(view: SeriesView) -> str:
    if not view.events:
        return '<div class="empty">No events.</div>'
    rows = "".join(f"<tr><td>{_esc(e.at)}</td><td>{_esc(e.state)}</td><td>{_esc(e.detail)}</td></tr>"
                   for e in view.events)
    return f"<table><thead><tr><th>At</th><th>State</th><th>What happened</th></tr></thead><tbody>{rows}</tbody></table>"


def render_series_page(row: Mapping[str, Any], *, max_attempts: int | None, now: float) -> str:
    """The page of one series: its facts, before/after thumbnails, deliveries and events.

    Parameters
    ----------
    row : mapping
        :meth:`~node.store.jobstore.JobStore.series` of the series.
    max_attempts : int or None
        ``[delivery] max_attempts``, the *m* of each delivery's ``n/m``.
    now : float
        The time the page is made (seconds since the epoch).
    """
    view = series_view(row, max_attempts)
    generated = utc_time(now)
    facts = "".join(f"<dt>{_esc(label)}</dt><dd>{_esc(value)}</dd>" for label, value in view.facts)
    if view.error:
        kind = "muted" if view.state == SeriesState.DISCARDED.value else "error"
        facts += f'<dt>Error</dt><dd><div class="{kind}">{_esc(view.error)}</div></dd>'
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>dicom-node series #{view.id}</title>",
        f"<style>{_STYLE}{_SERIES_STYLE}</style></head><body>",
        f'<header><h1>Series #{view.id}</h1><span class="state st-{_esc(view.state)}">{_esc(view.state)}</span>',
        f'<span class="meta">page made {_esc(generated)}</span>',
        f'<span class="meta"><a href="/">status</a> · <a href="/api/jobs/{view.id}">JSON</a></span></header>',
        "<main>",
        f'<dl class="facts">{facts}</dl>',
        "<h2>Outputs: before / after</h2>",
        _series_thumbs(row),
        "<h2>Deliveries</h2>",
        _deliveries_table(view),
        "<h2>Events (UTC)</h2>",
        _events_table(view),
        "</main></body></html>",
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- the server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], status: StatusServer, tls: ssl.SSLContext | None = None) -> None:
        self.status = status
        self.tls = tls
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's full name, which can hang: not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        request, client = super().get_request()
        if self.tls is not None:  # the handshake waits for the request's thread (finish_request)
            request = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        return request, client

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(_HANDSHAKE_SECONDS)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:  # plain HTTP, an untrusting client, a port scan
                log.debug("HTTPS handshake with %s failed: %s", client_address[0], exc)
                return
        super().finish_request(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "dicom-node"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection gives its thread back after this long

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it so
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _not_allowed(self) -> None:
        if self._refused(head=False):
            return
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, _json_bytes({"error": "read-only: GET or HEAD"}), _JSON,
                   head=False, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815

    def _refused(self, *, head: bool) -> bool:
        """Answer 401 or 429 when ``[http] auth`` turns the request away; True when it did."""
        guard = self.server.status.guard
        if guard is None:
            return False
        refusal = guard.refusal(urlsplit(self.path).path, self.headers.get("Authorization"), self.client_address[0])
        if refusal is None:
            return False
        body = _json_bytes({"error": refusal.reason})
        self._send(refusal.status, body, _JSON, head=head, extra=refusal.headers)
        return True

    def _serve(self, *, head: bool) -> None:
        status = self.server.status
        if self._refused(head=head):
            return
        try:
            code, body, ctype, extra = status.respond(self.path)
        except _BadRequest as exc:
            code, body, ctype, extra = HTTPStatus.BAD_REQUEST, _json_bytes({"error": str(exc)}), _JSON, {}
        except Exception:
            log.exception("HTTP %s failed", self.path[:200])
            code, body, ctype, extra = (HTTPStatus.INTERNAL_SERVER_ERROR, _json_bytes({"error": "internal error"}),
                                        _JSON, {})
        self._send(code, body, ctype, head=head, extra=extra)

    def _send(self, code: int, body: bytes, ctype: str, *, head: bool, extra: Mapping[str, str]) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            if "Cache-Control" not in extra:
                self.send_header("Cache-Control", "no-store")
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _limit(query: Mapping[str, list[str]], default: int) -> int:
    values = query.get("limit")
    if not values:
        return default
    text = values[-1].strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise _BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def _state(query: Mapping[str, list[str]]) -> str | None:
    values = query.get("state")
    if not values or not values[-1]:
        return None
    if values[-1] not in _STATES:
        raise _BadRequest(f"state must be one of {', '.join(_STATES)}")
    return values[-1]


_Response = tuple[int, bytes, str, dict[str, str]]


class StatusServer:
    """The node's HTTP endpoints, served from a background thread.

    Parameters
    ----------
    host, port : str, int
        Where to listen; port 0 picks a free port (see :attr:`port` after :meth:`start`).
    jobs : JobStore
        The job store (read only here).
    metrics : Metrics
        The node's metrics, rendered by ``/metrics``.
    outputs_dir, spool_dir : pathlib.Path
        The node's outputs and spool folders: the only places files are read from.
    is_alive, is_ready : callable
        Liveness and readiness of the node; an exception counts as False.
    pipelines : mapping of str to Pipeline, optional
        The configured pipelines (``config.pipelines``): with them the "after" thumbnail is
        exactly the output of the "before" instance.
    decode_limits : DecodeLimits, optional
        The node's decode limits: thumbnails of a file above them are never decoded.
    guard : HttpGuard, optional
        ``[http] auth``: who may read what (:meth:`HttpGuard.for_settings`); None: everyone.
    tls : ssl.SSLContext, optional
        HTTPS with this server context (:func:`node.net.tls.https_server_context`); None: plain HTTP.
    max_delivery_attempts : int, optional
        ``[delivery] max_attempts``: the *m* of a delivery's attempts ``n/m`` on ``/series/{id}``;
        None shows *n* alone.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        jobs: JobStore,
        metrics: Metrics,
        outputs_dir: Path,
        spool_dir: Path,
        is_alive: Callable[[], bool],
        is_ready: Callable[[], bool],
        pipelines: Mapping[str, Pipeline] | None = None,
        decode_limits: DecodeLimits | None = None,
        guard: HttpGuard | None = None,
        tls: ssl.SSLContext | None = None,
        max_delivery_attempts: int | None = None,
    ) -> None:
        self.host = host
        self.max_delivery_attempts = max_delivery_attempts
        self.guard = guard
        self.tls = tls
        self.port = port
        self.jobs = jobs
        self.metrics = metrics
        self.outputs_dir = Path(outputs_dir)
        self.spool_dir = Path(spool_dir)
        self.is_alive = is_alive
        self.is_ready = is_ready
        self.thumbnails = Thumbnails(jobs, self.outputs_dir, self.spool_dir, pipelines, decode_limits)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL (``http://host:port``, ``https://`` with TLS)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}"

    def start(self) -> None:
        """Listen and serve in a background thread; returns once the socket listens.

        Raises
        ------
        OSError
            The address cannot be bound (port in use, unknown host).
        """
        if self._server is not None:
            raise RuntimeError("StatusServer already started")
        self._server = _Server((self.host, self.port), self, self.tls)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="http", daemon=True)
        self._thread.start()
        who = "no login" if self.guard is None else f"{self.guard.kind} auth"
        log.info("HTTP status on %s/ (metrics on /metrics; %s)", self.url, who)
        self._warn_if_exposed(str(self._server.server_address[0]))

    def _warn_if_exposed(self, address: str) -> None:
        """A WARNING when other machines can reach the listener without a login, or read credentials."""
        if ipaddress.ip_address(address.split("%", 1)[0]).is_loopback:
            return
        if self.guard is None:
            log.warning("HTTP on %s without a login ([http] allow_anonymous = true): whoever reaches it sees the "
                        "status page and thumbnails of patient images", self.url)
        elif self.tls is None:
            log.warning("HTTP %s auth over plain HTTP on %s: the credentials cross the network readable unless a "
                        "reverse proxy terminates TLS in front; give [http] cert_file and key_file for HTTPS",
                        self.guard.kind, self.url)

    def stop(self) -> None:
        """Stop serving and close the socket (requests under way finish in their own threads)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- routing --------------------------------------------------------------------------------

    def respond(self, target: str) -> _Response:
        """The response to ``GET target``: (status, body, content type, extra headers)."""
        parts = urlsplit(target)
        path = parts.path
        try:
            query = parse_qs(parts.query, keep_blank_values=True, max_num_fields=20)
        except ValueError:
            raise _BadRequest("too many query parameters") from None
        if path == "/":
            return self._page(query)
        if path == "/healthz":
            return self._probe(self.is_alive, "ok", "not alive")
        if path == "/readyz":
            return self._probe(self.is_ready, "ready", "not ready")
        if path == "/metrics":
            body = self.metrics.render(self.jobs.counts()).encode("utf-8")
            return HTTPStatus.OK, body, METRICS_CONTENT_TYPE, {}
        if path in ("/api/jobs", "/api/jobs/"):
            rows = self.jobs.list_series(limit=_limit(query, API_LIMIT), state=_state(query))
            return HTTPStatus.OK, _json_bytes(rows), _JSON, {}
        if path.startswith("/api/jobs/"):
            series_id = self._series_id(path[len("/api/jobs/"):])
            row = self.jobs.series(series_id)
            if row is None:
                return HTTPStatus.NOT_FOUND, _json_bytes({"error": f"no series {series_id}"}), _JSON, {}
            return HTTPStatus.OK, _json_bytes(row), _JSON, {}
        found = _THUMB.fullmatch(path)
        if found:
            return self._thumbnail(self._series_id(found.group(1)), found.group(2))
        found = _SERIES_PAGE.fullmatch(path)
        if found:
            return self._series_page(found.group(1))
        return HTTPStatus.NOT_FOUND, _json_bytes({"error": "not found"}), _JSON, {}

    @staticmethod
    def _series_id(text: str) -> int:
        if not _ID.fullmatch(text):
            raise _BadRequest("a series id is a whole number")
        return int(text)

    @staticmethod
    def _probe(check: Callable[[], bool], good: str, bad: str) -> _Response:
        try:
            ok = bool(check())
        except Exception:
            log.debug("probe raised", exc_info=True)
            ok = False
        if ok:
            return HTTPStatus.OK, f"{good}\n".encode(), _TEXT, {}
        return HTTPStatus.SERVICE_UNAVAILABLE, f"{bad}\n".encode(), _TEXT, {}

    def _thumbnail(self, series_id: int, kind: str) -> _Response:
        try:
            data = self.thumbnails.get(series_id, kind)
        except Exception:  # never an error page for a picture
            log.debug("thumbnail %s of series %d failed", kind, series_id, exc_info=True)
            data = None
        if data is None:
            return HTTPStatus.NOT_FOUND, _placeholder_png(), _PNG, {"Cache-Control": "private, max-age=10"}
        return HTTPStatus.OK, data, _PNG, {"Cache-Control": "private, max-age=3600"}

    def _series_page(self, text: str) -> _Response:
        headers = {"Content-Security-Policy": _PAGE_POLICY}
        row = self.jobs.series(int(text)) if _ID.fullmatch(text) else None
        if row is None:
            what = f"no series {_esc(text)}" if _ID.fullmatch(text) else "a series id is a whole number"
            body = f"<!DOCTYPE html><title>not found</title><p>{what}</p><p><a href=\"/\">status</a></p>"
            code = HTTPStatus.NOT_FOUND if _ID.fullmatch(text) else HTTPStatus.BAD_REQUEST
            return code, body.encode(), _HTML, headers
        page = render_series_page(row, max_attempts=self.max_delivery_attempts, now=time.time())
        return HTTPStatus.OK, page.encode("utf-8"), _HTML, headers

    def _page(self, query: Mapping[str, list[str]]) -> _Response:
        try:
            limit, state = _limit(query, PAGE_LIMIT), _state(query)
        except _BadRequest as exc:
            body = f"<!DOCTYPE html><title>bad request</title><p>{_esc(exc)}</p><p><a href=\"/\">status</a></p>"
            return HTTPStatus.BAD_REQUEST, body.encode(), _HTML, {"Content-Security-Policy": _PAGE_POLICY}
        rows = self.jobs.list_series(limit=limit, state=state)
        page = render_page(self.jobs.counts(), rows, state=state, limit=limit, now=time.time())
        return HTTPStatus.OK, page.encode("utf-8"), _HTML, {"Content-Security-Policy": _PAGE_POLICY}
