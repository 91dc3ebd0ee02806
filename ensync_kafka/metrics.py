"""Prometheus metrics of a worker, in the text exposition format (``prometheus-client``).

Flow counters and histograms are fed by :class:`MetricsHooks` (a :class:`WorkerHooks` that
forwards to the application's own hooks); gauges of held state, lag and restore progress are
read from the tier workers at scrape time. Each worker has its own registry: nothing global.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._kafka import reader
from .codec import DEAD
from .config import Config
from .exceptions import SerializationError
from .hooks import TurnPhases, WorkerHooks
from .models import now_ms
from .topics import TopicNames

if TYPE_CHECKING:
    from .state import PartitionStore
    from .worker import TierWorker

log = logging.getLogger("ensync_kafka.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENESS_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0
)  # fmt: skip
TRANSACTION_BUCKETS_S = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PHASE_BUCKETS_S = (0.0005, 0.001, *TRANSACTION_BUCKETS_S)
EXACT_COUNT_LIMIT = 20_000
"""Held counts up to this are exact (a key scan); above, RocksDB's estimate is reported."""
LAG_CACHE_S = 2.0
WATERMARK_TIMEOUT_S = 2.0

_FLOW = ("tier", "queue", "priority")


def held_count(store: PartitionStore, limit: int = EXACT_COUNT_LIMIT) -> tuple[int, bool]:
    """(count, exact): a scan when small, RocksDB's estimate (which lags deletes) when large."""
    estimate = store.held_count()
    if estimate > limit:
        return estimate, False
    count = 0
    for _ in store.iter_timers():
        count += 1
        if count > limit:
            return estimate, False
    return count, True


@dataclasses.dataclass(slots=True)
class _Series:
    counts: list[int]
    total: float = 0.0


class BatchHistogram(Collector):
    """A histogram with one label, fed a whole transaction's observations at once.

    prometheus_client's ``observe`` takes a lock and walks the buckets once per value: about a
    microsecond per released deferral, which a worker spends tens of thousands of times a second.
    Here a turn's values are binned locally and added under one lock."""

    def __init__(self, name: str, documentation: str, label: str, buckets: Iterable[float]) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self._bounds = sorted(buckets)
        self._les = [*(repr(float(b)) for b in self._bounds), "+Inf"]  # as prometheus_client
        self._series: dict[str, _Series] = {}
        self._lock = threading.Lock()

    def observe_many(self, label_value: str, values: Iterable[float]) -> None:
        """Observe every value (negative ones count as 0, as a lateness cannot be below it)."""
        counts = [0] * len(self._les)
        total = 0.0
        index, bounds = bisect.bisect_left, self._bounds
        for value in values:
            if value > 0:
                counts[index(bounds, value)] += 1
                total += value
            else:
                counts[0] += 1
        with self._lock:
            series = self._series.get(label_value)
            if series is None:
                series = self._series[label_value] = _Series([0] * len(counts))
            kept = series.counts
            for i, n in enumerate(counts):
                kept[i] += n
            series.total += total

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = [(v, list(s.counts), s.total) for v, s in self._series.items()]
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for label_value, counts, total in sorted(snapshot):
            cumulative = itertools.accumulate(counts)
            family.add_metric([label_value], list(zip(self._les, cumulative, strict=True)), total)
        yield family


class WorkerMetrics:
    """Every metric of one worker process, in its own registry."""

    def __init__(
        self,
        tiers: Callable[[], Iterable[TierWorker]],
        *,
        lag: Callable[[TierWorker], dict[int, int]],
        ready: Callable[[], bool],
        open_transactions: Callable[[], Mapping[tuple[str, int], float]] = dict,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.accepted = Counter(
            "ensync_deferrals_accepted", "Deferrals accepted and held.", _FLOW, registry=r
        )
        self.delivered = Counter(
            "ensync_deferrals_delivered", "Deferrals released to their priority topic.", _FLOW,
            registry=r,
        )  # fmt: skip
        self.cancelled = Counter(
            "ensync_deferrals_cancelled", "Held deferrals cancelled on request.", _FLOW, registry=r
        )
        self.rescheduled = Counter(
            "ensync_deferrals_rescheduled", "Held deferrals moved on request.", _FLOW, registry=r
        )
        self.duplicates = Counter(
            "ensync_deferrals_duplicate", "Deferrals dropped: id already held or finished.",
            ["tier"], registry=r,
        )  # fmt: skip
        self.invalid = Counter(
            "ensync_records_invalid", "Records quarantined to {prefix}.invalid.", ["tier"],
            registry=r,
        )  # fmt: skip
        self.controls = Counter(
            "ensync_control_requests", "Cancel/reschedule requests answered, by outcome.",
            ["tier", "op", "outcome"], registry=r,
        )  # fmt: skip
        self.dead = Counter(
            "ensync_dead_letters", "Dead letters seen on {prefix}.dead since this worker started.",
            ["queue", "priority"], registry=r,
        )  # fmt: skip
        self.lateness = BatchHistogram(
            "ensync_delivery_lateness_seconds",
            "Release time minus due time.",
            "tier",
            LATENESS_BUCKETS_S,
        )
        r.register(self.lateness)
        self.transaction = Histogram(
            "ensync_transaction_seconds", "Duration of a worker transaction, begin to commit.",
            ["tier", "result"], buckets=TRANSACTION_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.phase = Histogram(
            "ensync_turn_phase_seconds",
            "Where a committed worker turn's time went (see WorkerHooks.on_phases).",
            ["tier", "phase"], buckets=PHASE_BUCKETS_S, registry=r,
        )  # fmt: skip
        r.register(_StateCollector(tiers, lag, ready))
        r.register(_OpenTransactions(open_transactions))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsHooks(WorkerHooks):
    """Counts what the tier workers do, then calls the application's hooks (``inner``)."""

    def __init__(self, metrics: WorkerMetrics, inner: WorkerHooks | None = None) -> None:
        self.metrics = metrics
        self.inner = inner or WorkerHooks()
        # Per-record hooks run thousands of times a second: keep the labelled children.
        self._accepted: dict[tuple[str, str, int], Any] = {}
        self._delivered: dict[tuple[str, str, int], Any] = {}
        self._phases: dict[str, list[Any]] = {}

    def on_assigned(self, tier: str, partitions: list[int]) -> None:
        self.inner.on_assigned(tier, partitions)

    def on_revoked(self, tier: str, partitions: list[int]) -> None:
        self.inner.on_revoked(tier, partitions)

    def on_commit(self, tier: str, accepted: int, duplicates: int, invalid: int) -> None:
        m = self.metrics
        if duplicates:
            m.duplicates.labels(tier).inc(duplicates)
        if invalid:
            m.invalid.labels(tier).inc(invalid)
        self.inner.on_commit(tier, accepted, duplicates, invalid)

    def on_batch(
        self,
        tier: str,
        accepted: list[dict[str, Any]],
        delivered: list[dict[str, Any]],
        delivered_at_ms: int,
    ) -> None:
        # A transaction carries up to thousands of deferrals: one inc per label set, not per
        # deferral (per-deferral hooks were ~8 % of a worker's CPU).
        self._count(self._accepted, self.metrics.accepted, tier, accepted)
        self._count(self._delivered, self.metrics.delivered, tier, delivered)
        if delivered:
            self.metrics.lateness.observe_many(
                tier, [(delivered_at_ms - d["due_at"]) / 1000 for d in delivered]
            )
        self.inner.on_batch(tier, accepted, delivered, delivered_at_ms)

    @staticmethod
    def _count(
        children: dict[tuple[str, str, int], Any],
        counter: Any,
        tier: str,
        deferrals: list[dict[str, Any]],
    ) -> None:
        counts = collections.Counter((d["queue"], d["priority"]) for d in deferrals)
        for (queue, priority), n in counts.items():
            child = children.get((tier, queue, priority))
            if child is None:
                child = children[tier, queue, priority] = counter.labels(tier, queue, str(priority))
            child.inc(n)

    def on_control(self, tier: str, op: str, outcome: str, deferral: dict[str, Any] | None) -> None:
        m = self.metrics
        m.controls.labels(tier, op.lower(), outcome).inc()
        if deferral is not None:
            labels = (tier, deferral["queue"], str(deferral["priority"]))
            if op == "CANCEL":
                m.cancelled.labels(*labels).inc()
            else:
                m.rescheduled.labels(*labels).inc()
        self.inner.on_control(tier, op, outcome, deferral)

    def on_transaction(self, tier: str, seconds: float, committed: bool) -> None:
        self.metrics.transaction.labels(tier, "commit" if committed else "abort").observe(seconds)
        self.inner.on_transaction(tier, seconds, committed)

    def on_phases(self, tier: str, phases: TurnPhases) -> None:
        children = self._phases.get(tier)
        if children is None:
            phase = self.metrics.phase
            children = self._phases[tier] = [phase.labels(tier, n) for n in TurnPhases.NAMES]
        for child, (_, seconds) in zip(children, phases.items(), strict=True):
            child.observe(seconds)
        self.inner.on_phases(tier, phases)


class _OpenTransactions(Collector):
    """What the worker's StabilityWatch (hanging.py) saw at its latest check."""

    def __init__(self, ages: Callable[[], Mapping[tuple[str, int], float]]) -> None:
        self._ages = ages

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "ensync_open_transaction_seconds",
            "How long the last stable offset of a partition the tiers write (changelog, "
            "priority, audit) has stood below its end: a transaction open there (hanging past "
            "worker.transaction_timeout plus a minute).",
            labels=["topic", "partition"],
        )
        for (topic, p), age in sorted(self._ages().items()):
            if age > 0:  # seen at two checks: under load an offset stands still that long rarely
                family.add_metric([topic, str(p)], age)
        yield family


class _StateCollector(Collector):
    """Gauges read from the tier workers at scrape time."""

    def __init__(
        self,
        tiers: Callable[[], Iterable[TierWorker]],
        lag: Callable[[TierWorker], dict[int, int]],
        ready: Callable[[], bool],
    ) -> None:
        self._tiers = tiers
        self._lag = lag
        self._ready = ready

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only: no lock taken on registration

    def collect(self) -> Iterator[Metric]:
        held = GaugeMetricFamily(
            "ensync_held_deferrals", "Deferrals held (estimated above 20k per partition).",
            labels=["tier"],
        )  # fmt: skip
        held_p = GaugeMetricFamily(
            "ensync_held_deferrals_partition", "Deferrals held per partition.",
            labels=["tier", "partition"],
        )  # fmt: skip
        overdue = GaugeMetricFamily(
            "ensync_oldest_overdue_seconds", "How far past due the earliest held timer is.",
            labels=["tier"],
        )  # fmt: skip
        next_due = GaugeMetricFamily(
            "ensync_next_due_seconds", "Seconds until the earliest held timer is due.",
            labels=["tier"],
        )  # fmt: skip
        assigned = GaugeMetricFamily(
            "ensync_partitions_assigned", "Tier partitions assigned to this worker.",
            labels=["tier"],
        )  # fmt: skip
        restoring = GaugeMetricFamily(
            "ensync_partitions_restoring", "Assigned partitions whose state is being restored.",
            labels=["tier"],
        )  # fmt: skip
        restored = CounterMetricFamily(
            "ensync_restored_records", "Changelog records replayed into local state.",
            labels=["tier"],
        )  # fmt: skip
        restarts = CounterMetricFamily(
            "ensync_tier_restarts", "Times a tier joined its group again with new Kafka clients.",
            labels=["tier"],
        )  # fmt: skip
        lag = GaugeMetricFamily(
            "ensync_consumer_lag", "Records of the tier topic not yet consumed and committed.",
            labels=["tier", "partition"],
        )  # fmt: skip
        now = now_ms()
        for tier in self._tiers():
            name = tier.tier.name
            total = 0
            earliest: int | None = None
            with tier.lock:
                numbers = sorted(tier.stores)
                for p, store in sorted(tier.stores.items()):
                    count, _ = held_count(store)
                    total += count
                    held_p.add_metric([name, str(p)], count)
                    due = store.next_due_ms()
                    if due is not None and (earliest is None or due < earliest):
                        earliest = due
                in_restore = len(tier.restoring)
            held.add_metric([name], total)
            overdue.add_metric([name], 0.0 if earliest is None else max(0, now - earliest) / 1000)
            if earliest is not None:
                next_due.add_metric([name], (earliest - now) / 1000)
            assigned.add_metric([name], len(numbers) + in_restore)
            restoring.add_metric([name], in_restore)
            restored.add_metric([name], tier.stats.restored)
            restarts.add_metric([name], tier.stats.restarts)
            for p, value in sorted(self._lag(tier).items()):
                lag.add_metric([name, str(p)], value)
        ready = GaugeMetricFamily("ensync_ready", "1 when every assigned partition is restored.")
        ready.add_metric([], 1.0 if self._ready() else 0.0)
        yield from (held, held_p, overdue, next_due, assigned, restoring, restored, restarts)
        yield from (lag, ready)


class LagProbe:
    """Consumer lag of the tier partitions a worker holds: end offset minus committed position.

    Its own consumer (never the tier's: that one is closed by its thread at any time), with the
    end offsets cached briefly so frequent scrapes cost no broker round trips.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int], tuple[float, int]] = {}
        self._consumer: Consumer | None = None

    def _client(self) -> Consumer:
        if self._consumer is None:
            self._consumer = reader(self._config, "lag-probe")
        return self._consumer

    def end_offset(self, topic: str, partition: int) -> int | None:
        key = (topic, partition)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and time.monotonic() - cached[0] < LAG_CACHE_S:
                return cached[1]
            try:
                _, high = self._client().get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=WATERMARK_TIMEOUT_S
                )
            except (KafkaException, RuntimeError) as exc:
                log.debug("watermarks of %s[%d]: %s", topic, partition, exc)
                return None
            self._cache[key] = (time.monotonic(), int(high))
            return int(high)

    def lag(self, tier: TierWorker) -> dict[int, int]:
        positions = dict(tier.positions)
        with tier.lock:
            partitions = sorted(tier.stores) + sorted(tier.restoring)
        out = {}
        for p in partitions:
            end = self.end_offset(tier.topic, p)
            if end is not None:
                out[p] = max(0, end - positions.get(p, 0))
        return out

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None


class DeadLetterWatch:
    """Counts dead letters appearing on ``{prefix}.dead`` (from its end when the worker starts)."""

    def __init__(self, config: Config, counter: Counter) -> None:
        self.topic = TopicNames(config.prefix).dead
        self._counter = counter
        self._consumer = reader(config, "dead-watch", {"fetch.wait.max.ms": 100})
        self._started = False

    def poll(self) -> None:
        """Count what arrived since the last call; never blocks for long."""
        if not self._started:
            try:
                meta = self._consumer.list_topics(self.topic, timeout=WATERMARK_TIMEOUT_S)
                parts = meta.topics[self.topic].partitions
                if not parts:
                    return
                starts = []
                for p in parts:
                    _, high = self._consumer.get_watermark_offsets(
                        TopicPartition(self.topic, p), timeout=WATERMARK_TIMEOUT_S
                    )
                    starts.append(TopicPartition(self.topic, p, high))
            except (KafkaException, KeyError) as exc:
                log.debug("dead letter watch: %s", exc)
                return
            self._consumer.assign(starts)
            self._started = True
        for msg in self._consumer.consume(1000, 0):
            if msg.error() is not None:
                continue
            try:
                rec = DEAD.decode(msg.value())
            except SerializationError:
                self._counter.labels("", "").inc()
                continue
            self._counter.labels(rec["queue"], str(rec["priority"])).inc()

    def close(self) -> None:
        self._consumer.close()
