"""Prometheus metrics: what the daemon counts, in Prometheus' conventions.

Why prometheus-client and not hand-written text: the exposition format has
escaping, type and histogram rules that its official library gets right and
``promtool check metrics`` holds us to.  One private registry per process
(not the library's global one), so tests and reloads never see duplicates.

Label values never come unbounded from the wire: statuses are our own DIMSE
codes, reject reasons our own texts, the called AE title is the configured
one (or ``any`` when we answer to whatever is called); no SOP instance UIDs,
no calling AE titles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: Store and commit durations: from a fraction of a millisecond (a small object
#: on a journaled disk) to tens of seconds (100 MB over a slow link).
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class LiveFigures:
    """What the running daemon reports at scrape time."""

    active: int = 0
    pending: int = 0
    free_bytes: dict[str, int] = field(default_factory=dict)
    disk_low: bool = False
    draining: bool = False
    #: Acknowledged objects that cannot be made into files now (0: none waits); the
    #: quarantine's entries.
    materialise_waiting: int = 0
    materialise_failing: bool = False
    #: Outbox deliveries waiting (events not yet handled by a hook) and dead-lettered ones.
    events_pending: int = 0
    events_dead: int = 0
    #: Storage Commitment reports waiting, and how long the oldest has (None: not enabled).
    commitment_pending: int | None = None
    commitment_oldest_seconds: float = 0.0
    #: Per forward destination: deliveries waiting, the oldest one's age in seconds, paused.
    forward: dict[str, tuple[int, float, bool]] = field(default_factory=dict)


class _Live(Collector):
    """Gauges read at scrape time from the running daemon (free space, live counts)."""

    def __init__(self, read: Callable[[], LiveFigures]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        now = self._read()
        free = GaugeMetricFamily(
            "dcmrecvd_output_free_bytes", "Free space of the output directory, in bytes", labels=["directory"]
        )
        for directory, value in now.free_bytes.items():
            free.add_metric([directory], float(value))
        yield free
        yield GaugeMetricFamily(
            "dcmrecvd_associations_active", "Associations being served now", value=now.active
        )
        yield GaugeMetricFamily(
            "dcmrecvd_connections_pending",
            "Connections accepted that have not negotiated yet",
            value=now.pending,
        )
        yield GaugeMetricFamily(
            "dcmrecvd_disk_low",
            "1 while the output directory is below output.min_free",
            value=int(now.disk_low),
        )
        yield GaugeMetricFamily(
            "dcmrecvd_draining", "1 while SIGTERM drains associations in flight", value=int(now.draining)
        )
        yield GaugeMetricFamily(
            "dcmrecvd_materialise_failing",
            "1 while acknowledged objects cannot be made into files (new objects are refused)",
            value=int(now.materialise_failing),
        )
        yield GaugeMetricFamily(
            "dcmrecvd_journal_waiting",
            "Acknowledged objects whose files are not made yet",
            value=now.materialise_waiting,
        )
        yield GaugeMetricFamily(
            "dcmrecvd_events_pending", "Event deliveries waiting in the outbox", value=now.events_pending
        )
        yield GaugeMetricFamily(
            "dcmrecvd_events_dead",
            "Event deliveries dead-lettered after their last retry",
            value=now.events_dead,
        )
        if now.commitment_pending is not None:
            yield GaugeMetricFamily(
                "dcmrecvd_commitment_pending",
                "Storage Commitment transactions whose report is not delivered yet",
                value=now.commitment_pending,
            )
            yield GaugeMetricFamily(
                "dcmrecvd_commitment_oldest_pending_seconds",
                "Age of the oldest Storage Commitment transaction waiting for its report",
                value=now.commitment_oldest_seconds,
            )

        if now.forward:
            yield from _forward_gauges(now.forward)


def _forward_gauges(figures: dict[str, tuple[int, float, bool]]) -> Iterable[GaugeMetricFamily]:
    queue = GaugeMetricFamily(
        "dcmrecvd_forward_queue", "Objects waiting for delivery, by destination", labels=["destination"]
    )
    oldest = GaugeMetricFamily(
        "dcmrecvd_forward_oldest_pending_seconds",
        "Age of the oldest object waiting for delivery, by destination",
        labels=["destination"],
    )
    paused = GaugeMetricFamily(
        "dcmrecvd_forward_paused",
        "1 while a destination is paused (it refused us for good; probed every backoff_max)",
        labels=["destination"],
    )
    for name, (waiting, age, is_paused) in sorted(figures.items()):
        queue.add_metric([name], waiting)
        oldest.add_metric([name], age)
        paused.add_metric([name], int(is_paused))
    yield from (queue, oldest, paused)


class Metrics:
    """Every metric of the daemon, on one private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.accepted = Counter("dcmrecvd_associations_accepted", "Associations accepted", registry=r)
        self.rejected = Counter(
            "dcmrecvd_associations_rejected", "Associations rejected, by reason", ["reason"], registry=r
        )
        self.refused = Counter(
            "dcmrecvd_connections_refused",
            "Connections closed at once: more than network.max_pending_connections not yet negotiated",
            registry=r,
        )
        self.objects = Counter(
            "dcmrecvd_objects",
            "C-STORE requests answered, by DIMSE status and called AE title",
            ["status", "called_ae"],
            registry=r,
        )
        self.received = Counter("dcmrecvd_received_bytes", "Dataset bytes received", registry=r)
        self.store_seconds = Histogram(
            "dcmrecvd_store_duration_seconds",
            "From the C-STORE command to its response",
            buckets=_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "dcmrecvd_commit_duration_seconds",
            "Making one object durable: flush, rename, directory fsync",
            buckets=_BUCKETS,
            registry=r,
        )
        self.records_per_flush = Histogram(
            "dcmrecvd_journal_records_per_flush",
            "Ack-journal records one device flush made durable (group commit: the objects of "
            "every association waiting at that moment); _sum / _count is the average",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.duplicates = Counter(
            "dcmrecvd_duplicates",
            "Second copies of an instance, by what became of them (replaced, discarded, rejected, "
            "identical, beside)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("replaced", "discarded", "rejected", "identical", "beside"):  # seen as 0 at once
            self.duplicates.labels(outcome)
        self.quarantined = Counter(
            "dcmrecvd_quarantined",
            "Acknowledged objects whose files could not be made, set aside in the quarantine, by "
            "reason (the errno's name, or invalid)",
            ["reason"],
            registry=r,
        )
        self.reloads = Counter(
            "dcmrecvd_reloads", "Configuration reloads (SIGHUP), by result", ["result"], registry=r
        )
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        self.hook_runs = Counter(
            "dcmrecvd_hook_runs",
            "Hook runs, by hook and result (ok, retry, dead)",
            ["hook", "result"],
            registry=r,
        )

        self.commitment_requests = Counter(
            "dcmrecvd_commitment_requests",
            "Storage Commitment N-ACTIONs answered, by outcome (accepted, or the refusal status)",
            ["outcome"],
            registry=r,
        )
        self.commitment_items = Counter(
            "dcmrecvd_commitment_items",
            "Instances in delivered reports, by result (committed, or the failure reason)",
            ["result"],
            registry=r,
        )
        self.commitment_report_seconds = Histogram(
            "dcmrecvd_commitment_report_seconds",
            "From the N-ACTION to its delivered N-EVENT-REPORT",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600, 21600, 86400),
            registry=r,
        )
        self.commitment_undeliverable = Counter(
            "dcmrecvd_commitment_undeliverable",
            "Storage Commitment reports given up after commitment.give_up_after",
            registry=r,
        )
        self.forward_objects = Counter(
            "dcmrecvd_forward_objects",
            "Forwarding attempts by destination and outcome (delivered, warning, duplicate, retry, "
            "dead, paused, skipped)",
            ["destination", "outcome"],
            registry=r,
        )
        self.forward_seconds = Histogram(
            "dcmrecvd_forward_send_seconds",
            "One object's C-STORE to a destination, association included when one was opened",
            ["destination"],
            buckets=_BUCKETS,
            registry=r,
        )

    def watch(self, read: Callable[[], LiveFigures]) -> None:
        """Add the gauges that are read from the daemon at scrape time."""
        self.registry.register(_Live(read))

    def exposition(self) -> bytes:
        """The text format (version 0.0.4) of every metric now."""
        return generate_latest(self.registry)


#: The process's metrics; cheap to update even when nobody scrapes.
METRICS = Metrics()
