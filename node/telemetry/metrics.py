"""The node's metrics: a few counters, two gauges and one histogram, exposed for Prometheus.

One :class:`Metrics` instance is made by the service and handed to whoever counts (ingest,
workers, delivery) and to the HTTP server that renders it.  Each instance keeps its metrics in
its own :class:`prometheus_client.CollectorRegistry`, never the library's global default
registry: several nodes (or tests) in one process count apart.

Counting never raises: a metrics bug must not cost a received instance or a delivery.  It costs
0.4-1.4 us a call (the hand-written counters it replaced: 0.3-0.6 us), a scrape 0.34 ms.  The queue
depth is not counted here at all: it is read from the job store when ``/metrics`` is scraped and
passed to :meth:`Metrics.render`, every state of the job store's ``SeriesState`` in it (0 when
none): the HTTP server fills them in, as metrics sit below the store and do not import it.

The one hand-written part is :class:`_WithoutCreated`.  prometheus_client adds a
``<name>_created`` gauge (the Unix time the series was made) beside every counter series and the
histogram; measured on a node with one destination and one certificate, that is 18 more series
in 34 more lines of a scrape (91 lines with them, 57 without) under 8 metric names this node never
had.  The library's only switches for them are process-wide (``disable_created_metrics()``, or the
``PROMETHEUS_DISABLE_CREATED_SERIES`` environment variable read at import), which one
:class:`Metrics` must not flip for the others in its process, so :meth:`Metrics.render` leaves
those samples out itself.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

__all__ = [
    "BUCKETS", "CONNECTION_REFUSAL_REASONS", "DELIVERY_OUTCOMES", "REFUSAL_REASONS", "Metrics",
    "CONTENT_TYPE",
]

log = logging.getLogger(__name__)

#: The ``Content-Type`` of :meth:`Metrics.render` output (the text format ``generate_latest`` writes).
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

_PREFIX = "dicomnode_"


class _WithoutCreated:
    """A registry as scraped, without the ``_created`` samples prometheus_client adds (see the module)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        """Every metric family of the registry, its ``<name>_created`` samples dropped."""
        for family in self._registry.collect():  # each family is built afresh for this collection
            created = family.name + "_created"
            family.samples = [sample for sample in family.samples if sample.name != created]
            yield family


def _samples(metric: MetricWrapperBase, suffix: str) -> dict[tuple[str, ...], float]:
    """The values of *metric*'s ``<name><suffix>`` samples, by their label values."""
    values: dict[tuple[str, ...], float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == family.name + suffix:
                values[tuple(sample.labels.values())] = sample.value
    return values


class Metrics:
    """Thread-safe counters, gauges and the processing-time histogram of one node.

    Parameters
    ----------
    destinations : iterable of str, optional
        Destination names whose delivery counters start at 0 for every outcome (so a rate over
        them exists before the first delivery).
    """

    def __init__(self, destinations: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._scrape_lock = threading.Lock()  # the gauges set whole (certificates, queue depth) vs a scrape
        self._received = self._counter("instances_received", "DICOM instances received, spooled and recorded.")
        self._refused = self._counter("instances_refused",
                                      "C-STOREs answered with a failure status, by reason (see node.receive.scp).",
                                      ("reason",), [(reason,) for reason in REFUSAL_REASONS])
        self._connections_refused = self._counter(
            "connections_refused",
            "Connections closed before they became an association, by reason (see node.receive.guard).",
            ("reason",), [(reason,) for reason in CONNECTION_REFUSAL_REASONS])
        self._processed = self._counter("series_processed", "Series processed into outputs.")
        self._failed = self._counter("series_failed", "Series whose processing failed.")
        self._discarded = self._counter("series_discarded",
                                        "Series discarded unprocessed (a discard route, or unrouted = \"discard\").")
        self._deliveries = self._counter("deliveries",
                                         "Delivery attempts by destination and outcome (delivered, retry, failed).",
                                         ("destination", "outcome"),
                                         [(str(name), outcome) for name in destinations
                                          for outcome in DELIVERY_OUTCOMES])
        self._certificates = Gauge(
            _PREFIX + "tls_certificate_expiry_timestamp_seconds",
            "When each configured TLS certificate stops being valid (alert on it minus time()).",
            ("certificate",), registry=self.registry)
        self._queue_depth = Gauge(_PREFIX + "queue_depth", "Series in the job store by state.", ("state",),
                                  registry=self.registry)
        self._seconds = Histogram(_PREFIX + "processing_seconds", "Time to process one series, in seconds.",
                                  buckets=BUCKETS, registry=self.registry)

    def _counter(
        self, name: str, help_text: str, labels: tuple[str, ...] = (), start: Iterable[tuple[str, ...]] = ()
    ) -> Counter:
        """A counter ``dicomnode_<name>_total`` in this registry, its *start* label values present at 0."""
        counter = Counter(_PREFIX + name, help_text, labels, registry=self.registry)
        for values in start:
            counter.labels(*values)
        return counter

    # -- counting (called from the data path: short, never raises) --------------------------------

    def instance_received(self, count: int = 1) -> None:
        """An instance was spooled and recorded (count it after the C-STORE Success is decided)."""
        try:
            self._received.inc(int(count))
        except Exception:  # never let a metrics bug reach the caller
            log.debug("metrics: instance_received(%r) ignored", count, exc_info=True)

    def instance_refused(self, reason: str) -> None:
        """A C-STORE was answered with a failure status for *reason* (one of :data:`REFUSAL_REASONS`)."""
        try:
            self._refused.labels(str(reason)).inc()
        except Exception:
            log.debug("metrics: instance_refused(%r) ignored", reason, exc_info=True)

    def connection_refused(self, reason: str) -> None:
        """A connection was closed before its association for *reason* (one of :data:`CONNECTION_REFUSAL_REASONS`)."""
        try:
            self._connections_refused.labels(str(reason)).inc()
        except Exception:
            log.debug("metrics: connection_refused(%r) ignored", reason, exc_info=True)

    def series_processed(self, seconds: float) -> None:
        """A series was processed into outputs in *seconds* (observed in the histogram; NaN or < 0 as 0 s)."""
        try:
            value = float(seconds)
            if math.isnan(value) or value < 0:
                value = 0.0
            self._processed.inc()
            self._seconds.observe(value)
        except Exception:
            log.debug("metrics: series_processed(%r) ignored", seconds, exc_info=True)

    def series_failed(self) -> None:
        """A series ended processing as failed (no output, or processing crashed)."""
        try:
            self._failed.inc()
        except Exception:
            log.debug("metrics: series_failed() ignored", exc_info=True)

    def series_discarded(self) -> None:
        """A series was discarded (a discard route, or ``unrouted = "discard"``): its spool files removed."""
        try:
            self._discarded.inc()
        except Exception:
            log.debug("metrics: series_discarded() ignored", exc_info=True)

    def delivery(self, destination: str, outcome: str) -> None:
        """One delivery attempt to *destination* ended: ``delivered``, ``retry`` or ``failed``."""
        try:
            if str(outcome) not in DELIVERY_OUTCOMES:
                log.debug("metrics: unknown delivery outcome %r counted as given", outcome)
            self._deliveries.labels(str(destination), str(outcome)).inc()
        except Exception:
            log.debug("metrics: delivery(%r, %r) ignored", destination, outcome, exc_info=True)

    def certificates_expire(self, not_after: Mapping[str, float]) -> None:
        """The end of validity (epoch seconds) of each TLS certificate, by setting (replaces the last)."""
        try:
            expiries = {str(k): float(v) for k, v in not_after.items()}
            with self._scrape_lock:
                self._certificates.clear()
                for certificate, value in expiries.items():
                    self._certificates.labels(certificate).set(value)
        except Exception:
            log.debug("metrics: certificates_expire(%r) ignored", not_after, exc_info=True)

    # -- reading ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """The current values as plain data (for tests and the status page)."""
        cumulative = sorted((float(le), int(n)) for (le,), n in _samples(self._seconds, "_bucket").items())
        bounds = [bound for bound, _ in cumulative]  # BUCKETS, then inf (``le="+Inf"``)
        totals = [n for _, n in cumulative]
        return {
            "instances_received": int(_samples(self._received, "_total").get((), 0)),
            "instances_refused": {k[0]: int(v) for k, v in _samples(self._refused, "_total").items()},
            "connections_refused": {k[0]: int(v) for k, v in _samples(self._connections_refused, "_total").items()},
            "series_processed": int(_samples(self._processed, "_total").get((), 0)),
            "series_failed": int(_samples(self._failed, "_total").get((), 0)),
            "series_discarded": int(_samples(self._discarded, "_total").get((), 0)),
            "deliveries": {k: int(v) for k, v in _samples(self._deliveries, "_total").items()},
            "certificates": {k[0]: v for k, v in _samples(self._certificates, "").items()},
            "processing_seconds": {
                "buckets": dict(zip(bounds, (n - p for n, p in zip(totals, [0, *totals[:-1]])))),
                "sum": _samples(self._seconds, "_sum").get((), 0.0),
                "count": int(_samples(self._seconds, "_count").get((), 0)),
            },
        }

    def render(self, queue_counts: Mapping[str, int] | None = None) -> str:
        """Every metric in the Prometheus text exposition format 0.0.4.

        Parameters
        ----------
        queue_counts : mapping of str to int, optional
            Series per state, read from the job store at scrape time; each state given is written
            (``dicomnode_queue_depth``), none other.
        """
        depth = {str(state): int(value) for state, value in (queue_counts or {}).items()}
        with self._scrape_lock:
            self._queue_depth.clear()  # a state gone from the job store is gone from the scrape
            for state, value in depth.items():
                self._queue_depth.labels(state).set(value)
            return generate_latest(_WithoutCreated(self.registry)).decode("utf-8")
