"""Prometheus metrics of a running node, served as ``GET /metrics`` on the worklist's HTTP port.

Two sources, both read-only (``docs/operations.md`` lists every metric):

* counters from the audit trail: a :class:`logging.Handler` on the ``triaged.audit`` logger counts the
  events the listener logs (``store`` with its bytes, ``association.accepted``, ``association.refused``,
  ``store.refused``).  Counting log records rather than calling into the receiver keeps working when the
  records come from receiver processes and are forwarded to the node's logger.  The events are INFO
  lines; ``triaged.audit`` stays at INFO whatever ``logging.level`` says (the level applies to the log
  handlers), so the counters count with ``logging.level: WARNING`` too.
* gauges and histograms read from the ledger, spool and listener at scrape time (:class:`NodeCollector`):
  jobs per state, the analysis queue per priority, the outbox, free disk, every node sharing the ledger
  (up, heartbeat age, what it holds, the leader); each analysis and its
  arrival → result time is observed once, at the first scrape after its result was recorded.

Every node has its own :class:`~prometheus_client.CollectorRegistry` (nothing global), so two nodes in
one process (the tests) do not share gauges; both see all audit records of the process, though.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from datetime import datetime

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from triaged.audit import AUDIT_LOG
from triaged.domain import JobState, OutboxState
from triaged.observe import NodeView

log = logging.getLogger(__name__)

#: Analysis seconds: a 2-D pipeline on a CPU takes seconds, a 3-D network on a busy CPU minutes.
ANALYSIS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, float("inf"))
#: Arrival → result seconds: the completion delay (30 s by default) plus the queue and the analysis.
RESULT_BUCKETS = (30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600, 7200, float("inf"))
#: Longest label value taken from an audit field (reasons are fixed texts; this only bounds a surprise).
LABEL_MAX = 80
_QUOTED = re.compile(r"'[^']*'")


class AuditCounters(logging.Handler):
    """Counts the listener's audit events (the records' ``audit`` fields) into Prometheus counters."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(level=logging.DEBUG)
        self.instances = Counter(
            "triaged_instances_received",
            "Instances stored with Success, by outcome (new, duplicate, replaced, ...).",
            ["outcome"],
            registry=registry,
        )
        self.bytes = Counter(
            "triaged_received_bytes",
            "Bytes of the instances stored with Success.",
            registry=registry,
        )
        self.accepted = Counter(
            "triaged_associations_accepted",
            "Associations accepted.",
            registry=registry,
        )
        self.refused = Counter(
            "triaged_associations_refused",
            "Associations and connections refused before an association, by reason.",
            ["reason"],
            registry=registry,
        )
        self.stores_refused = Counter(
            "triaged_stores_refused",
            "C-STORE requests refused, by DIMSE status.",
            ["status"],
            registry=registry,
        )

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "audit", None)
        if not isinstance(fields, dict):
            return
        try:
            self._count(fields)
        except Exception:  # noqa: BLE001 - a metric must never break logging
            self.handleError(record)

    def _count(self, fields: dict[str, object]) -> None:
        event = fields.get("event")
        if event == "store":
            self.instances.labels(_label(fields.get("outcome")) or "new").inc()
            size = fields.get("bytes")
            if isinstance(size, int | float) and size >= 0:
                self.bytes.inc(size)
        elif event == "association.accepted":
            self.accepted.inc()
        elif event == "association.refused":
            # A throttled line of the connection trail stands for ``events`` refusals with one ``cause``.
            events = fields.get("events")
            # Quoted parts are the peer's AE titles: not a label value (one series per title is unbounded).
            reason = (
                _label(_QUOTED.sub("*", str(fields.get("cause") or fields.get("reason") or ""))) or "unknown"
            )
            self.refused.labels(reason).inc(events if isinstance(events, int) and events > 0 else 1)
        elif event == "store.refused":
            self.stores_refused.labels(_label(fields.get("status")) or "unknown").inc()


def _label(value: object) -> str:
    return "" if value is None else str(value)[:LABEL_MAX]


class NodeCollector(Collector):
    """Gauges read at scrape time, and the analysis histograms fed from results recorded since the start."""

    def __init__(self, view: NodeView, registry: CollectorRegistry, started: datetime) -> None:
        self._view = view
        self._started = started
        self._lock = threading.Lock()
        self._observed: set[int] = set()
        self.analysis = Histogram(
            "triaged_analysis_seconds",
            "Seconds from ANALYSING to ENCODING per pipeline (load + analysis).",
            ["pipeline"],
            buckets=ANALYSIS_BUCKETS,
            registry=registry,
        )
        self.to_result = Histogram(
            "triaged_arrival_to_result_seconds",
            "Seconds from a study's first instance to its recorded result.",
            buckets=RESULT_BUCKETS,
            registry=registry,
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self._view
        status = view.status()
        jobs = GaugeMetricFamily("triaged_jobs", "Jobs in the ledger per state.", labels=["state"])
        for state, count in status.jobs_per_state.items():
            jobs.add_metric([state], count)
        yield jobs
        queued = GaugeMetricFamily(
            "triaged_queue_depth",
            "Jobs waiting for analysis (QUEUED) per analysis priority.",
            labels=["priority"],
        )
        depth = dict.fromkeys(("STAT", "URGENT", "ROUTINE"), 0)
        for job in view.ledger.jobs(states=[JobState.QUEUED], limit=100000):
            routed = view.ledger.route_decision(job)
            level = str(routed.analysis_priority) if routed else "ROUTINE"
            depth[level] = depth.get(level, 0) + 1
        for level, count in depth.items():
            queued.add_metric([level], count)
        yield queued
        outbox = GaugeMetricFamily(
            "triaged_outbox_items",
            "Result objects not yet delivered: pending (first try), retrying, dead.",
            labels=["state"],
        )
        unsent = view.outbox(unsent_only=True)
        outbox.add_metric(
            ["pending"], sum(1 for e in unsent if e.state == OutboxState.PENDING and not e.attempts)
        )
        outbox.add_metric(
            ["retrying"], sum(1 for e in unsent if e.state == OutboxState.PENDING and e.attempts)
        )
        outbox.add_metric(["dead"], sum(1 for e in unsent if e.state == OutboxState.DEAD))
        yield outbox
        if status.spool_free_bytes is not None:
            yield GaugeMetricFamily(
                "triaged_spool_free_bytes",
                "Bytes free on the spool's file system.",
                value=status.spool_free_bytes,
            )
        yield GaugeMetricFamily(
            "triaged_spool_min_free_bytes",
            "storage.min_free_mb in bytes: below it, 0xA700.",
            value=status.min_free_mb * 1024 * 1024,
        )
        yield GaugeMetricFamily(
            "triaged_active_associations",
            "DICOM associations in progress.",
            value=status.active_associations or 0,
        )
        yield from self._node_gauges()

    def _node_gauges(self) -> Iterator[GaugeMetricFamily]:
        """Every node of the ledger (one on SQLite): up, heartbeat age, jobs held, and the leader."""
        nodes = self._view.nodes()
        up = GaugeMetricFamily(
            "triaged_node_up",
            "1 while a node beats within node.lease_seconds, 0 when stopped or lost.",
            labels=["node"],
        )
        age = GaugeMetricFamily(
            "triaged_node_heartbeat_age_seconds", "Seconds since a node's last heartbeat.", labels=["node"]
        )
        held = GaugeMetricFamily(
            "triaged_node_jobs_held", "Jobs a node holds (ANALYSING, ENCODING).", labels=["node"]
        )
        sending = GaugeMetricFamily(
            "triaged_node_outbox_rows_held", "Outbox rows a node has claimed to send.", labels=["node"]
        )
        leader = GaugeMetricFamily(
            "triaged_node_leader",
            "1 for the node that leads now (sweep, retention, lease recovery).",
            labels=["node"],
        )
        for n in nodes:
            name = _label(n.name)
            up.add_metric([name], 1 if n.up else 0)
            age.add_metric([name], n.heartbeat_age_seconds)
            held.add_metric([name], len(n.jobs))
            sending.add_metric([name], n.outbox_rows)
            leader.add_metric([name], 1 if n.leader else 0)
        yield from (up, age, held, sending, leader)

    def observe_results(self) -> None:
        """Each result recorded since the start, once: its analysis time and arrival → result time."""
        with self._lock:
            for row in self._view.rows():
                if row.result_at is None or row.result_at < self._started or row.job_id in self._observed:
                    continue
                self._observed.add(row.job_id)
                self.to_result.observe(max(0.0, (row.result_at - row.arrived).total_seconds()))
                job = self._view.job(row.job_id)
                if job is None:
                    continue
                started = [at for at, _src, dst, _d in job.history if dst == JobState.ANALYSING]
                ended = [
                    at
                    for at, src, dst, _d in job.history
                    if src == JobState.ANALYSING and dst == JobState.ENCODING
                ]
                if started and ended and ended[-1] >= started[-1]:
                    seconds = (ended[-1] - started[-1]).total_seconds()
                    self.analysis.labels(job.pipeline or "unknown").observe(seconds)


class NodeMetrics:
    """A node's metrics: its registry, the audit counters (attached while it runs) and the collector."""

    def __init__(self, view: NodeView, started: datetime) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.counters = AuditCounters(self.registry)
        self.collector = NodeCollector(view, self.registry, started)
        self.registry.register(self.collector)

    def attach(self) -> None:
        """Count audit events from now on."""
        AUDIT_LOG.addHandler(self.counters)

    def detach(self) -> None:
        AUDIT_LOG.removeHandler(self.counters)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type (``GET /metrics``)."""
        self.collector.observe_results()  # before the histograms are read
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
