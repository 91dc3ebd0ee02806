"""Transactions left open on a partition for longer than any transaction may last ("hanging").

A partition's records from its last stable offset (LSO) on stay invisible to read_committed
readers until the transaction that starts there ends. The coordinator ends every transaction
within its timeout, unless the transaction's markers are lost, as a single broker can lose them
when it restarts (README, "A single broker's restart can leave a hanging transaction"): the
partition then stays unstable for good, its readers stall, and a group whose offsets wait there
times out in ``committed()``. librdkafka has no DescribeProducers, so a hanging transaction is
found as a reader sees it: the LSO below the partition's end, and the record at the LSO (the
transaction's first) older than the broker's ``transaction.max.timeout.ms``. Kafka's
``kafka-transactions.sh abort`` ends one, given the partition and that offset.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ClusterMetadata,
    ConfigResource,
    OffsetSpec,
)

from ._kafka import read_partition, reader
from .config import Config
from .exceptions import BrokerError
from .models import now_ms
from .topics import TopicNames, topic_specs

log = logging.getLogger("ensync_kafka.hanging")

OFFSETS_TOPIC = "__consumer_offsets"
KAFKA_MAX_TRANSACTION_TIMEOUT_S = 900.0
"""Kafka's default ``transaction.max.timeout.ms``: no transaction may stay open longer."""
QUERY_TIMEOUT_S = 15.0
"""How long one of these checks' requests may take: shorter than provisioning's
``ADMIN_TIMEOUT_S``, since they run while the cluster may be failing and are asked again."""
OFFSETS_ATTEMPTS = 5
OFFSETS_RETRY_S = 0.5
_LEADER_MOVING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)
"""ListOffsets errors that pass once leadership settles (a topic just created, a broker that
restarted), though librdkafka does not flag them retriable."""
FIRST_RECORDS_TIMEOUT_S = 10.0
"""How long reading the first record of every open transaction may take in all."""
HANGING_MARGIN_S = 60.0
"""How long past a worker's transaction timeout its changelog may stay unstable before the
worker calls the transaction there hanging: the coordinator looks for timed-out transactions
every 10 s (``transaction.abort.timed.out.transaction.cleanup.interval.ms``) and then writes
their abort markers."""

Partition = tuple[str, int]
OffsetCommit = tuple[str, str, int, int | None]


def _failed(what: str, exc: KafkaException) -> BrokerError:
    err: KafkaError = exc.args[0]
    return BrokerError(f"{what}: {err.str()}", code=err.code())


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenTransaction:
    """The oldest transaction still open on one partition."""

    topic: str
    partition: int
    start_offset: int
    """The partition's last stable offset: that transaction's first record."""
    end_offset: int
    started_ms: int | None
    """That record's timestamp; None when it could not be read."""

    def age_s(self, now: int) -> float | None:
        return None if self.started_ms is None else max(0, now - self.started_ms) / 1000

    def abort_command(self, bootstrap: str) -> str:
        return (
            f"kafka-transactions.sh --bootstrap-server {bootstrap} abort --topic {self.topic} "
            f"--partition {self.partition} --start-offset {self.start_offset}"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class HangingReport:
    checked: list[Partition]
    max_age_s: float
    """A transaction open longer than this is hanging."""
    open: list[OpenTransaction]
    groups: dict[str, int] = field(default_factory=dict)
    """The ``__consumer_offsets`` partition of each group checked."""
    at_ms: int = field(default_factory=now_ms)

    @property
    def hanging(self) -> list[OpenTransaction]:
        return [t for t in self.open if (t.age_s(self.at_ms) or 0.0) > self.max_age_s]


def offsets_partition(group: str, partitions: int) -> int:
    """The partition of ``__consumer_offsets`` holding ``group``'s offsets: Kafka takes the
    absolute value of Java's ``String.hashCode`` (0 for its minimum) modulo the partitions."""
    h = 0
    utf16 = group.encode("utf-16-be")
    for i in range(0, len(utf16), 2):
        h = (31 * h + int.from_bytes(utf16[i : i + 2], "big")) & 0xFFFFFFFF
    if h >= 0x80000000:
        h -= 1 << 32
    return 0 if h == -(1 << 31) else abs(h) % partitions


def stable_offsets(
    admin: AdminClient,
    partitions: Iterable[Partition],
    *,
    timeout_s: float = QUERY_TIMEOUT_S,
    attempts: int = OFFSETS_ATTEMPTS,
) -> dict[Partition, tuple[int, int]]:
    """(last stable offset, end offset) of each partition. The LSO is read first, so it is never
    above the end read after it. In a broker failure a request for a partition whose leader died
    waited out the whole timeout (librdkafka 2.16), so a caller that checks again anyway passes
    a short one and one attempt."""
    tps = [TopicPartition(t, p) for t, p in partitions]
    if not tps:
        return {}

    spec = OffsetSpec.latest()  # type: ignore[no-untyped-call]

    def latest(level: IsolationLevel) -> dict[Partition, int]:
        futures = admin.list_offsets(
            {tp: spec for tp in tps},
            isolation_level=level,
            request_timeout=timeout_s,
        )
        return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}

    for attempt in range(attempts):
        try:
            lso = latest(IsolationLevel.READ_COMMITTED)
            end = latest(IsolationLevel.READ_UNCOMMITTED)
            return {tp: (lso[tp], end[tp]) for tp in lso}
        except KafkaException as exc:
            err = exc.args[0]
            again = err.retriable() or err.code() in _LEADER_MOVING
            if not again or attempt == attempts - 1:
                raise _failed("listing offsets", exc) from exc
            time.sleep(OFFSETS_RETRY_S)
    raise AssertionError("unreachable")


def _first_record_times(config: Config, starts: dict[Partition, int]) -> dict[Partition, int]:
    """The timestamp of the first record at or after each offset, read uncommitted."""
    found: dict[Partition, int] = {}
    if not starts:
        return found
    consumer = reader(config, "hanging", {"isolation.level": "read_uncommitted"})
    try:
        consumer.assign([TopicPartition(t, p, o) for (t, p), o in starts.items()])
        deadline = time.monotonic() + FIRST_RECORDS_TIMEOUT_S
        while len(found) < len(starts) and (left := deadline - time.monotonic()) > 0:
            for msg in consumer.consume(500, min(left, 0.5)):
                if msg.error() is not None:
                    continue
                kind, stamp = msg.timestamp()
                tp = (msg.topic() or "", msg.partition() or 0)
                if kind != TIMESTAMP_NOT_AVAILABLE and tp not in found:
                    found[tp] = stamp
    finally:
        consumer.close()
    return found


def open_transactions(
    config: Config, partitions: Iterable[Partition], admin: AdminClient | None = None
) -> list[OpenTransaction]:
    """Every partition whose last stable offset stands below its end, with when the transaction
    there began."""
    admin = admin or AdminClient(config.kafka.client_settings())
    unstable = {tp: o for tp, o in stable_offsets(admin, partitions).items() if o[0] < o[1]}
    started = _first_record_times(config, {tp: lso for tp, (lso, _) in unstable.items()})
    return [
        OpenTransaction(
            topic=t, partition=p, start_offset=lso, end_offset=end, started_ms=started.get((t, p))
        )
        for (t, p), (lso, end) in sorted(unstable.items())
    ]


def max_transaction_timeout_s(admin: AdminClient, brokers: Iterable[int]) -> float:
    """The broker's ``transaction.max.timeout.ms`` (the first of ``brokers``); Kafka's default
    where it cannot be read (no DescribeConfigs permission, say)."""
    try:
        resource = ConfigResource("BROKER", str(min(brokers)))
        futures = admin.describe_configs([resource], request_timeout=QUERY_TIMEOUT_S)
        for future in futures.values():
            entry = future.result().get("transaction.max.timeout.ms")
            if entry is not None and entry.value:
                return int(entry.value) / 1000
    except (KafkaException, ValueError) as exc:  # ValueError: no broker
        log.debug("transaction.max.timeout.ms: %s", exc)
    return KAFKA_MAX_TRANSACTION_TIMEOUT_S


def offset_commit_record(key: bytes | None, value: bytes | None) -> OffsetCommit | None:
    """(group, topic, partition, offset or None for a deletion) of an offset commit record of
    ``__consumer_offsets``; None for its other records. The key (versions 0 and 1) is the group,
    topic and partition; every value version starts with the offset after its own version."""
    if key is None or len(key) < 2 or struct.unpack_from(">h", key)[0] not in (0, 1):
        return None
    pos = 2
    strings = []
    for _ in range(2):
        (n,) = struct.unpack_from(">h", key, pos)
        strings.append(key[pos + 2 : pos + 2 + n].decode())
        pos += 2 + n
    (partition,) = struct.unpack_from(">i", key, pos)
    offset = None if value is None else struct.unpack_from(">q", value, 2)[0]
    return strings[0], strings[1], partition, offset


def committed_before(
    config: Config, group: str, topic: str, offsets_partition_number: int, before: int
) -> dict[int, int]:
    """The positions ``group`` had committed for ``topic``'s partitions in the records of its
    ``__consumer_offsets`` partition before offset ``before``. Read while the transaction that
    starts at ``before`` is still open: the log cleaner keeps the last record of each key below
    the last stable offset until then."""
    consumer = reader(config, "hanging-offsets", {"enable.partition.eof": True})
    positions: dict[int, int] = {}
    start = TopicPartition(OFFSETS_TOPIC, offsets_partition_number, OFFSET_BEGINNING)
    try:
        for msg in read_partition(consumer, start, before):
            commit = offset_commit_record(msg.key(), msg.value())
            if commit is None or commit[0] != group or commit[1] != topic:
                continue
            if commit[3] is None:
                positions.pop(commit[2], None)
            else:
                positions[commit[2]] = commit[3]
    finally:
        consumer.close()
    return positions


def cluster_metadata(admin: AdminClient) -> ClusterMetadata:
    try:
        return admin.list_topics(timeout=QUERY_TIMEOUT_S)
    except KafkaException as exc:
        raise _failed("listing topics", exc) from exc


def partition_counts(metadata: ClusterMetadata) -> dict[str, int]:
    """Every topic of the cluster (``__consumer_offsets`` among them) and its partition count."""
    return {name: len(t.partitions) for name, t in metadata.topics.items() if t.error is None}


def offsets_partitions(
    config: Config, counts: Mapping[str, int], groups: Iterable[str] = ()
) -> dict[str, int]:
    """The ``__consumer_offsets`` partition of each tier's group and of ``groups`` (none before
    the first group commits: the topic does not exist yet)."""
    names = TopicNames(config.prefix)
    n = counts.get(OFFSETS_TOPIC, 0)
    all_groups = [*(names.worker_group(t.name) for t in config.tiers), *groups]
    return {g: offsets_partition(g, n) for g in all_groups} if n else {}


def project_partitions(config: Config, counts: Mapping[str, int]) -> list[Partition]:
    """Every partition of the configuration's topics that exists."""
    specs = topic_specs(config)
    return sorted((s.name, p) for s in specs if s.name in counts for p in range(counts[s.name]))


def find_hanging(
    config: Config, *, groups: Iterable[str] = (), max_age_s: float | None = None
) -> HangingReport:
    """The open transactions on the configuration's partitions and on the ``__consumer_offsets``
    partitions of the tiers' groups and of ``groups``; those older than ``max_age_s`` (the
    broker's ``transaction.max.timeout.ms`` by default) are hanging."""
    admin = AdminClient(config.kafka.client_settings())
    metadata = cluster_metadata(admin)
    counts = partition_counts(metadata)
    by_group = offsets_partitions(config, counts, groups)
    partitions = sorted(
        {*project_partitions(config, counts), *((OFFSETS_TOPIC, p) for p in by_group.values())}
    )
    if max_age_s is None:
        max_age_s = max_transaction_timeout_s(admin, metadata.brokers)
    return HangingReport(
        checked=partitions,
        max_age_s=max_age_s,
        open=open_transactions(config, partitions, admin),
        groups=by_group,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class TierRepair:
    """What a tier needs once the hanging transactions it wrote are aborted. Its workers applied
    the aborted turn to their state (its commit had returned), and later turns committed the
    group's offsets past that turn's intake: so the state is rebuilt from the changelog (the
    state directories removed), and the group is rewound to where it stood before the first
    hanging transaction, so that the aborted turn's intake is read again. Everything read again
    that a later turn held or delivered is dropped as a duplicate."""

    tier: str
    group: str
    topic: str
    rewind: dict[int, int | None] | None
    """Each tier partition -> the offset its group had committed before the hanging
    transaction on its offsets (None: nothing, so the earliest); None when none hangs there."""

    def commands(self, bootstrap: str) -> list[str]:
        base = f"kafka-consumer-groups.sh --bootstrap-server {bootstrap} --group {self.group}"
        return [
            f"{base} --reset-offsets --topic {self.topic}:{p} "
            + ("--to-earliest" if offset is None else f"--to-offset {offset}")
            + " --execute"
            for p, offset in sorted((self.rewind or {}).items())
        ]


def plan_repairs(config: Config, report: HangingReport) -> list[TierRepair]:
    """What each tier with a hanging transaction on its changelog needs (each tier's turns are
    the only transactions that write there). Its group's offsets are rewound whether or not the
    broker still calls them pending: a later commit of the same producer can have materialized
    them, while the aborted turn's intake is then lost to the rebuilt state unless read again.
    Call while the transactions still hang (committed_before)."""
    names = TopicNames(config.prefix)
    hanging = {(t.topic, t.partition): t for t in report.hanging}
    repairs = []
    for tier in config.tiers:
        if not any(t == names.state(tier.name) for t, _ in hanging):
            continue
        group, topic = names.worker_group(tier.name), names.defer(tier.name)
        part = report.groups.get(group)
        on_offsets = hanging.get((OFFSETS_TOPIC, part)) if part is not None else None
        rewind: dict[int, int | None] | None = None
        if on_offsets is not None and part is not None:
            found = committed_before(config, group, topic, part, on_offsets.start_offset)
            rewind = {p: found.get(p) for t, p in report.checked if t == topic}
        repairs.append(TierRepair(tier=tier.name, group=group, topic=topic, rewind=rewind))
    return repairs


def shared_topics(config: Config) -> list[str]:
    """The topics every tier worker writes records to: the priority topics and the audit topic."""
    names = TopicNames(config.prefix)
    return [names.audit, *(t for q in config.queues for t in names.queue(q))]


class OffsetsProbe:
    """Offsets read again and again through one admin client, made anew after a failed request:
    after a broker was fenced, a client's metadata stayed stale for good (FENCED_LEADER_EPOCH on
    every request)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._admin: AdminClient | None = None

    def _client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(self._config.kafka.client_settings())
        return self._admin

    def partitions(self, topics: Iterable[str]) -> list[Partition]:
        """Every partition of those topics that exist."""
        try:
            counts = partition_counts(cluster_metadata(self._client()))
        except BrokerError:
            self._admin = None
            raise
        return sorted((t, p) for t in set(topics) for p in range(counts.get(t, 0)))

    def stable_offsets(
        self,
        partitions: Iterable[Partition],
        *,
        timeout_s: float = QUERY_TIMEOUT_S,
        attempts: int = OFFSETS_ATTEMPTS,
    ) -> dict[Partition, tuple[int, int]]:
        """:func:`stable_offsets` through this client."""
        client = self._client()
        try:
            return stable_offsets(client, partitions, timeout_s=timeout_s, attempts=attempts)
        except BrokerError:
            self._admin = None
            raise


class StabilityWatch:
    """How long each watched partition's last stable offset has stood still below its end:
    under load it moves with every commit, so one that stands still for longer than any
    transaction may last marks a hanging transaction, logged once as an error. Watched where the
    tier workers write: their changelogs (one worker each), the priority topics and the audit
    topic (every worker, all with the configured transaction timeout). A broker restart has left
    one on priority partitions alone, which readers then stall on while the tiers run on."""

    def __init__(self, config: Config, hanging_after_s: float) -> None:
        self._config = config
        self.hanging_after_s = hanging_after_s
        self._probe = OffsetsProbe(config)
        self._since: dict[Partition, tuple[int, float]] = {}
        self._reported: set[tuple[Partition, int]] = set()
        self.ages: dict[Partition, float] = {}
        """The latest check's open partitions and how long each has stood still, in seconds."""

    def shared_partitions(self) -> list[Partition]:
        """Every partition of the priority topics and the audit topic."""
        return self._probe.partitions(shared_topics(self._config))

    def check(self, partitions: Iterable[Partition]) -> dict[Partition, float]:
        offsets = self._probe.stable_offsets(partitions)
        now = time.monotonic()
        since: dict[Partition, tuple[int, float]] = {}
        for tp, (lso, end) in offsets.items():
            if lso < end:
                kept = self._since.get(tp)
                since[tp] = kept if kept is not None and kept[0] == lso else (lso, now)
        self._since = since
        self.ages = {tp: now - at for tp, (_, at) in since.items()}
        for (topic, p), age in self.ages.items():
            lso, _ = since[(topic, p)]
            if age > self.hanging_after_s and ((topic, p), lso) not in self._reported:
                self._reported.add(((topic, p), lso))
                log.error(
                    "%s[%d]: a transaction has stayed open from offset %d for %.0f s, longer than "
                    "any of ours may (hanging: its readers and the tier stall until it ends). "
                    "`ensync-kafka topics hanging` names every partition it holds and the steps "
                    "that end it without losing a deferral, which an abort alone can (README)",
                    topic,
                    p,
                    lso,
                    age,
                )
        return self.ages
