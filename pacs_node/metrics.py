"""Prometheus metrics, served on a local address (`[metrics]`).

Counters and latency histograms are fed from the audit record: every audited event (association
accepted or rejected, instance stored, C-FIND, C-MOVE, C-GET, errors) passes through `observe`,
so the numbers always agree with the audit and no module needs a second set of calls. Queue
depth, oldest pending age and cache bytes are read from the index when scraped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_FAILED_EVENTS = {
    "instance_rejected": "store",
    "instance_abandoned": "store",
    "instance_unrecoverable": "verify",
    "tls_handshake_failed": "tls",
    "commitment_refused": "commitment",
}


def _status_class(status: object) -> str:
    if not isinstance(status, int):
        return "unknown"
    if status == 0x0000:
        return "success"
    if status == 0xFE00:
        return "cancel"
    if status & 0xF000 == 0xB000:
        return "warning"
    return "failure"


class Metrics:
    def __init__(self, gauges: Callable[[], Mapping[str, float | None]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.associations = Counter(
            "pacs_associations", "DICOM associations by result", ["result"], registry=r
        )
        self.instances = Counter(
            "pacs_instances_stored", "C-STORE instances by outcome", ["outcome"], registry=r
        )
        self.stored_bytes = Counter(
            "pacs_stored_bytes", "Dataset bytes of newly stored instances", registry=r
        )
        self.requests = Counter(
            "pacs_dimse_requests", "Q/R requests by operation and status", ["operation", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "pacs_dimse_duration_seconds", "Q/R request duration", ["operation"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.instances_sent = Counter(
            "pacs_instances_sent", "Instances sent by C-MOVE/C-GET sub-operations",
            ["operation", "result"], registry=r,
        )  # fmt: skip
        self.errors = Counter("pacs_errors", "Errors by kind", ["kind"], registry=r)
        if gauges is not None:
            r.register(_GaugeCollector(gauges))
        self._server: Any = None

    def observe(self, event: str, fields: Mapping[str, Any]) -> None:
        """One audited event: never raises (metrics must not break what they measure)."""
        try:
            self._observe(event, fields)
        except Exception:  # a metrics bug is logged, never propagated
            log.exception("event=metrics_error audit_event=%s", event)

    def _observe(self, event: str, fields: Mapping[str, Any]) -> None:
        if event == "association_accepted":
            self.associations.labels("accepted").inc()
        elif event == "association_rejected":
            self.associations.labels("rejected").inc()
        elif event.startswith("instance_") and event in (
            "instance_stored",
            "instance_duplicate",
            "instance_new_version",
        ):
            outcome = event.removeprefix("instance_")
            self.instances.labels(outcome).inc()
            if outcome != "duplicate":
                self.stored_bytes.inc(int(fields.get("bytes") or 0))
        elif event in ("find", "move", "get"):
            self.requests.labels(event, _status_class(fields.get("status"))).inc()
            if fields.get("ms") is not None:
                self.latency.labels(event).observe(float(fields["ms"]) / 1000)
            if event != "find":
                for result in ("completed", "failed", "warning"):
                    if fields.get(result):
                        self.instances_sent.labels(event, result).inc(int(fields[result]))
        if event in _FAILED_EVENTS:
            self.errors.labels(_FAILED_EVENTS[event]).inc()

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the port (useful with port 0)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _GaugeCollector(Collector):
    """Values read at scrape time (queue depth, oldest pending age, cache bytes)."""

    _HELP = {
        "pacs_replication_pending": "Instances waiting for replication",
        "pacs_replication_oldest_pending_age_seconds": "Age of the oldest unreplicated instance",
        "pacs_replication_failing": "Pending instances whose last attempt failed",
        "pacs_cache_bytes": "Bytes of instances in the local cache",
        "pacs_instances": "Instances in the index",
    }

    def __init__(self, read: Callable[[], Mapping[str, float | None]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            values = self._read()
        except Exception as e:  # a scrape must answer even when the index is busy
            log.warning("event=metrics_gauges_unavailable error=%s", e)
            return
        for name, value in values.items():
            if value is not None:
                yield GaugeMetricFamily(name, self._HELP.get(name, name), value=value)
