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
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    OffsetSpec,
)

from ._kafka import reader
from .config import Config
from .exceptions import BrokerError
from .models import now_ms
from .topics import TopicNames, topic_specs

log = logging.getLogger("ensync_kafka.hanging")

OFFSETS_TOPIC = "__consumer_offsets"
KAFKA_MAX_TRANSACTION_TIMEOUT_S = 900.0
"""Kafka's default ``transaction.max.timeout.ms``: no transaction may stay open longer."""
ADMIN_TIMEOUT_S = 15.0
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
    admin: AdminClient, partitions: Iterable[Partition]
) -> dict[Partition, tuple[int, int]]:
    """(last stable offset, end offset) of each partition. The LSO is read first, so it is never
    above the end read after it."""
    tps = [TopicPartition(t, p) for t, p in partitions]
    if not tps:
        return {}

    spec = OffsetSpec.latest()  # type: ignore[no-untyped-call]

    def latest(level: IsolationLevel) -> dict[Partition, int]:
        futures = admin.list_offsets(
            {tp: spec for tp in tps},
            isolation_level=level,
            request_timeout=ADMIN_TIMEOUT_S,
        )
        return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}

    for attempt in range(OFFSETS_ATTEMPTS):
        try:
            lso = latest(IsolationLevel.READ_COMMITTED)
            end = latest(IsolationLevel.READ_UNCOMMITTED)
            return {tp: (lso[tp], end[tp]) for tp in lso}
        except KafkaException as exc:
            err = exc.args[0]
            again = err.retriable() or err.code() in _LEADER_MOVING
            if not again or attempt == OFFSETS_ATTEMPTS - 1:
                raise BrokerError(f"listing offsets: {err.str()}", code=err.code()) from exc
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


def max_transaction_timeout_s(admin: AdminClient) -> float:
    """The broker's ``transaction.max.timeout.ms``; Kafka's default where it cannot be read
    (no DescribeConfigs permission, say)."""
    try:
        brokers = admin.list_topics(timeout=ADMIN_TIMEOUT_S).brokers
        if brokers:
            resource = ConfigResource("BROKER", str(min(brokers)))
            futures = admin.describe_configs([resource], request_timeout=ADMIN_TIMEOUT_S)
            for future in futures.values():
                entry = future.result().get("transaction.max.timeout.ms")
                if entry is not None and entry.value:
                    return int(entry.value) / 1000
    except KafkaException as exc:
        log.debug("transaction.max.timeout.ms: %s", exc)
    return KAFKA_MAX_TRANSACTION_TIMEOUT_S


def project_partitions(
    config: Config, admin: AdminClient, groups: Iterable[str] = ()
) -> list[Partition]:
    """Every partition of the configuration's topics that exists, and the ``__consumer_offsets``
    partition of each tier's group and of ``groups``."""
    try:
        topics = admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics
    except KafkaException as exc:
        raise BrokerError(f"listing topics: {exc.args[0].str()}", code=exc.args[0].code()) from exc
    out = {
        (spec.name, p)
        for spec in topic_specs(config)
        if spec.name in topics and topics[spec.name].error is None
        for p in topics[spec.name].partitions
    }
    offsets = topics.get(OFFSETS_TOPIC)
    if offsets is not None and offsets.partitions:
        names = TopicNames(config.prefix)
        all_groups = [*(names.worker_group(t.name) for t in config.tiers), *groups]
        count = len(offsets.partitions)
        out.update((OFFSETS_TOPIC, offsets_partition(g, count)) for g in all_groups)
    return sorted(out)


def find_hanging(
    config: Config, *, groups: Iterable[str] = (), max_age_s: float | None = None
) -> HangingReport:
    """The open transactions on the project's partitions; those older than ``max_age_s`` (the
    broker's ``transaction.max.timeout.ms`` by default) are hanging."""
    admin = AdminClient(config.kafka.client_settings())
    partitions = project_partitions(config, admin, groups)
    limit = max_transaction_timeout_s(admin) if max_age_s is None else max_age_s
    return HangingReport(
        checked=partitions, max_age_s=limit, open=open_transactions(config, partitions, admin)
    )


class StabilityWatch:
    """How long each watched partition's last stable offset has stood still below its end:
    under load it moves with every commit, so one that stands still for longer than any
    transaction may last marks a hanging transaction. Logged once per transaction, as an error
    naming the command that ends it."""

    def __init__(self, config: Config, hanging_after_s: float) -> None:
        self._config = config
        self.hanging_after_s = hanging_after_s
        self._admin: AdminClient | None = None
        self._since: dict[Partition, tuple[int, float]] = {}
        self._reported: set[tuple[Partition, int]] = set()
        self.ages: dict[Partition, float] = {}
        """The latest check's open partitions and how long each has stood still, in seconds."""

    def check(self, partitions: Iterable[Partition]) -> dict[Partition, float]:
        if self._admin is None:
            self._admin = AdminClient(self._config.kafka.client_settings())
        offsets = stable_offsets(self._admin, partitions)
        now = time.monotonic()
        since: dict[Partition, tuple[int, float]] = {}
        for tp, (lso, end) in offsets.items():
            if lso < end:
                kept = self._since.get(tp)
                since[tp] = kept if kept is not None and kept[0] == lso else (lso, now)
        self._since = since
        self.ages = {tp: now - at for tp, (_, at) in since.items()}
        bootstrap = str(self._config.kafka.client_settings().get("bootstrap.servers", "…"))
        for (topic, p), age in self.ages.items():
            lso, _ = since[(topic, p)]
            if age > self.hanging_after_s and ((topic, p), lso) not in self._reported:
                self._reported.add(((topic, p), lso))
                end = offsets[(topic, p)][1]
                txn = OpenTransaction(
                    topic=topic, partition=p, start_offset=lso, end_offset=end, started_ms=None
                )
                log.error(
                    "%s[%d]: a transaction has stayed open from offset %d for %.0f s, longer than "
                    "any of ours may (hanging: its readers and the tier stall). End it with `%s`, "
                    "then restart this tier's workers with their state directories removed "
                    "(README)",
                    topic,
                    p,
                    lso,
                    age,
                    txn.abort_command(bootstrap),
                )
        return self.ages
