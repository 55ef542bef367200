"""The node's metrics: a few counters, one histogram, rendered for Prometheus (text format 0.0.4).

One :class:`Metrics` instance is made by the service and handed to whoever counts (ingest,
workers, delivery) and to the HTTP server that renders it; there is no global registry.

Counting takes one short lock and never raises: a metrics bug must not cost a received instance
or a delivery.  The queue depth is not counted here at all: it is read from the job store when
``/metrics`` is scraped and passed to :meth:`Metrics.render`.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections.abc import Iterable, Mapping

__all__ = [
    "BUCKETS", "CONNECTION_REFUSAL_REASONS", "DELIVERY_OUTCOMES", "QUEUE_STATES", "REFUSAL_REASONS", "Metrics",
    "CONTENT_TYPE",
]

log = logging.getLogger(__name__)

#: The ``Content-Type`` of :meth:`Metrics.render` output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds (seconds) of the processing-time histogram buckets; ``+Inf`` is implied.
BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

#: What :meth:`Metrics.delivery` counts.
DELIVERY_OUTCOMES = ("delivered", "retry", "failed")

#: Why a C-STORE was answered with a failure status (what :meth:`Metrics.instance_refused` counts;
#: see :mod:`node.receive.scp` for the status of each).
REFUSAL_REASONS = (
    "disk_low", "spool_write_failed", "cannot_parse", "invalid_uid", "not_authorised", "too_large",
)

#: Why a connection was closed before it became an association (what :meth:`Metrics.connection_refused`
#: counts; see :mod:`node.receive.guard`): no A-ASSOCIATE-RQ within ``association_timeout_seconds``, something
#: that is not an A-ASSOCIATE-RQ, over ``max_negotiating_connections`` or ``max_connections_per_address``,
#: a failed TLS handshake.
CONNECTION_REFUSAL_REASONS = ("timeout", "invalid_pdu", "over_limit", "tls_handshake")

#: Series states always present in ``dicomnode_queue_depth`` (0 when none), as in the job store.
QUEUE_STATES = ("receiving", "queued", "processing", "delivering", "delivered", "failed", "unrouted", "discarded")

_PREFIX = "dicomnode_"


def _escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """A sample value or bucket bound: integers without a fraction, ``+Inf``, else ``repr``."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _bound(value: float) -> str:
    """A histogram ``le`` label as the Prometheus clients write it (``1.0``, ``0.5``, ``+Inf``)."""
    return "+Inf" if math.isinf(value) else repr(float(value))


class Metrics:
    """Thread-safe counters and the processing-time histogram of one node.

    Parameters
    ----------
    destinations : iterable of str, optional
        Destination names whose delivery counters start at 0 for every outcome (so a rate over
        them exists before the first delivery).
    """

    def __init__(self, destinations: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._instances_received = 0
        self._refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self._connections_refused = dict.fromkeys(CONNECTION_REFUSAL_REASONS, 0)
        self._series_processed = 0
        self._series_failed = 0
        self._series_discarded = 0
        self._certificates: dict[str, float] = {}
        self._deliveries: dict[tuple[str, str], int] = {}
        self._bucket_counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf (above every bound)
        self._seconds_sum = 0.0
        self._seconds_count = 0
        for name in destinations:
            for outcome in DELIVERY_OUTCOMES:
                self._deliveries[(str(name), outcome)] = 0

    # -- counting (called from the data path: short, never raises) --------------------------------

    def instance_received(self, count: int = 1) -> None:
        """An instance was spooled and recorded (count it after the C-STORE Success is decided)."""
        try:
            with self._lock:
                self._instances_received += int(count)
        except Exception:  # never let a metrics bug reach the caller
            log.debug("metrics: instance_received(%r) ignored", count, exc_info=True)

    def instance_refused(self, reason: str) -> None:
        """A C-STORE was answered with a failure status for *reason* (one of :data:`REFUSAL_REASONS`)."""
        try:
            with self._lock:
                self._refused[str(reason)] = self._refused.get(str(reason), 0) + 1
        except Exception:
            log.debug("metrics: instance_refused(%r) ignored", reason, exc_info=True)

    def connection_refused(self, reason: str) -> None:
        """A connection was closed before its association for *reason* (one of :data:`CONNECTION_REFUSAL_REASONS`)."""
        try:
            with self._lock:
                self._connections_refused[str(reason)] = self._connections_refused.get(str(reason), 0) + 1
        except Exception:
            log.debug("metrics: connection_refused(%r) ignored", reason, exc_info=True)

    def series_processed(self, seconds: float) -> None:
        """A series was processed into outputs in *seconds* (observed in the histogram)."""
        try:
            value = float(seconds)
            if math.isnan(value) or value < 0:
                value = 0.0
            index = bisect.bisect_left(BUCKETS, value)  # first bound >= value (``le`` is inclusive)
            with self._lock:
                self._series_processed += 1
                self._bucket_counts[index] += 1
                self._seconds_sum += value
                self._seconds_count += 1
        except Exception:
            log.debug("metrics: series_processed(%r) ignored", seconds, exc_info=True)

    def series_failed(self) -> None:
        """A series ended processing as failed (no output, or processing crashed)."""
        try:
            with self._lock:
                self._series_failed += 1
        except Exception:
            log.debug("metrics: series_failed() ignored", exc_info=True)

    def series_discarded(self) -> None:
        """A series was discarded (a discard route, or ``unrouted = "discard"``): its spool files removed."""
        try:
            with self._lock:
                self._series_discarded += 1
        except Exception:
            log.debug("metrics: series_discarded() ignored", exc_info=True)

    def delivery(self, destination: str, outcome: str) -> None:
        """One delivery attempt to *destination* ended: ``delivered``, ``retry`` or ``failed``."""
        try:
            key = (str(destination), str(outcome))
            if key[1] not in DELIVERY_OUTCOMES:
                log.debug("metrics: unknown delivery outcome %r counted as given", outcome)
            with self._lock:
                self._deliveries[key] = self._deliveries.get(key, 0) + 1
        except Exception:
            log.debug("metrics: delivery(%r, %r) ignored", destination, outcome, exc_info=True)

    def certificates_expire(self, not_after: Mapping[str, float]) -> None:
        """The end of validity (epoch seconds) of each TLS certificate, by setting (replaces the last)."""
        try:
            with self._lock:
                self._certificates = {str(k): float(v) for k, v in not_after.items()}
        except Exception:
            log.debug("metrics: certificates_expire(%r) ignored", not_after, exc_info=True)

    # -- reading ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """The current values as plain data (for tests and the status page)."""
        with self._lock:
            return {
                "instances_received": self._instances_received,
                "instances_refused": dict(self._refused),
                "connections_refused": dict(self._connections_refused),
                "series_processed": self._series_processed,
                "series_failed": self._series_failed,
                "series_discarded": self._series_discarded,
                "deliveries": dict(self._deliveries),
                "certificates": dict(self._certificates),
                "processing_seconds": {
                    "buckets": dict(zip((*BUCKETS, math.inf), self._bucket_counts)),
                    "sum": self._seconds_sum,
                    "count": self._seconds_count,
                },
            }

    def render(self, queue_counts: Mapping[str, int] | None = None) -> str:
        """Every metric in the Prometheus text exposition format 0.0.4.

        Parameters
        ----------
        queue_counts : mapping of str to int, optional
            Series per state (``JobStore.counts()``), read at scrape time; every known state is
            written, 0 when absent.
        """
        with self._lock:
            received = self._instances_received
            refused = sorted(self._refused.items())
            connections_refused = sorted(self._connections_refused.items())
            processed = self._series_processed
            failed = self._series_failed
            discarded = self._series_discarded
            deliveries = sorted(self._deliveries.items())
            certificates = sorted(self._certificates.items())
            buckets = list(self._bucket_counts)
            seconds_sum = self._seconds_sum
            seconds_count = self._seconds_count
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> str:
            full = _PREFIX + name
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} {kind}")
            return full

        name = family("instances_received_total", "counter", "DICOM instances received, spooled and recorded.")
        lines.append(f"{name} {received}")
        name = family("instances_refused_total", "counter",
                      "C-STOREs answered with a failure status, by reason (see node.receive.scp).")
        for reason, value in refused:
            lines.append(f'{name}{{reason="{_escape_label(reason)}"}} {value}')
        name = family("connections_refused_total", "counter",
                      "Connections closed before they became an association, by reason (see node.receive.guard).")
        for reason, value in connections_refused:
            lines.append(f'{name}{{reason="{_escape_label(reason)}"}} {value}')
        name = family("series_processed_total", "counter", "Series processed into outputs.")
        lines.append(f"{name} {processed}")
        name = family("series_failed_total", "counter", "Series whose processing failed.")
        lines.append(f"{name} {failed}")
        name = family("series_discarded_total", "counter",
                      "Series discarded unprocessed (a discard route, or unrouted = \"discard\").")
        lines.append(f"{name} {discarded}")

        name = family("deliveries_total", "counter",
                      "Delivery attempts by destination and outcome (delivered, retry, failed).")
        for (destination, outcome), value in deliveries:
            lines.append(f'{name}{{destination="{_escape_label(destination)}",'
                         f'outcome="{_escape_label(outcome)}"}} {value}')

        name = family("tls_certificate_expiry_timestamp_seconds", "gauge",
                      "When each configured TLS certificate stops being valid (alert on it minus time()).")
        for certificate, value in certificates:
            lines.append(f'{name}{{certificate="{_escape_label(certificate)}"}} {_number(value)}')

        name = family("queue_depth", "gauge", "Series in the job store by state.")
        counts = {state: 0 for state in QUEUE_STATES}
        for state, value in (queue_counts or {}).items():
            counts[str(state)] = int(value)
        for state, value in counts.items():
            lines.append(f'{name}{{state="{_escape_label(state)}"}} {value}')

        name = family("processing_seconds", "histogram", "Time to process one series, in seconds.")
        cumulative = 0
        for bound, count in zip((*BUCKETS, math.inf), buckets):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{_bound(bound)}"}} {cumulative}')
        lines.append(f"{name}_sum {_number(seconds_sum)}")
        lines.append(f"{name}_count {seconds_count}")
        return "\n".join(lines) + "\n"
