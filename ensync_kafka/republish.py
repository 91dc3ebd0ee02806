"""What aborting a hanging transaction hid, written again where its turn proves committed.

A single broker's restart can skip a committed transaction's markers on some of its partitions
only (README): what got its markers counts, what was left hanging waits, and Kafka's tools can
only abort that, which hides part of a committed turn for good. This module finds what an abort
hid on a partition (read uncommitted, not read committed) and writes again what the rest of its
turn shows committed, matched by the delivery stamp every record of a release carries:

- on a priority or audit topic, a delivery or DELIVERED audit record whose changelog marker is
  committed with the same stamp (and which the topic does not show already);
- on a changelog, a release's DELIVERED marker and timer removal whose delivery is committed on a
  priority topic with the same stamp, so that a state rebuilt from it does not release it again.

What a turn that did not commit wrote has no such counterpart (its records were aborted with it,
and a redone turn stamps its own), so it is left: its tier redoes it (``TierRepair``). Run after
the aborts; the partition must have nothing open.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from ._kafka import read_partition, reader, where
from .codec import AUDIT, DELIVERED, MARKER
from .config import Config
from .exceptions import BrokerError, SerializationError
from .hanging import stable_offsets
from .state import MARKER_PREFIX, TIMER
from .topics import TopicNames

MARKER_WINDOW_MS = 60_000
"""How far on either side of a delivery stamp its changelog marker is looked for: the turn
writes it when it stages its releases, at most a turn away from the stamp."""
FLUSH_TIMEOUT_S = 30.0
LIST_TIMEOUT_S = 15.0
Decision = tuple[Message, str | None, bool]
"""A hidden record, the defer_id it is about (None: not one of ours), whether to write it."""
TIMER_KEY_ID_AT = 1 + 8 + 1
"""Where the defer_id starts in a changelog timer key: TIMER, due (8 bytes), priority."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RepublishReport:
    hidden: int
    """Records in the range that read_committed readers do not see."""
    republished: list[str]
    """The defer_ids of the records written again."""
    left: list[str]
    """Hidden records not proven committed (defer_id, or the offset when not ours): not written."""


def _range(
    config: Config, level: str, topic: str, partition: int, start: int, end: int
) -> list[Message]:
    consumer = reader(config, "republish", {"isolation.level": level, "enable.partition.eof": True})
    try:
        return list(read_partition(consumer, TopicPartition(topic, partition, start), end))
    finally:
        consumer.close()


def hidden_records(
    config: Config, topic: str, partition: int, start: int, end: int
) -> list[Message]:
    """The records in [start, end) that a read_committed reader does not see: aborted ones."""
    seen = {where(m)[1] for m in _range(config, "read_committed", topic, partition, start, end)}
    everything = _range(config, "read_uncommitted", topic, partition, start, end)
    return [m for m in everything if where(m)[1] not in seen]


def _stamp(topic: str, names: TopicNames, value: bytes | None) -> tuple[str, str, int] | None:
    """(defer_id, tier, delivery stamp) of a delivered event or a DELIVERED audit record."""
    if value is None:
        return None
    try:
        if topic == names.audit:
            rec = AUDIT.decode(value)
            if rec["event"] != "DELIVERED" or not rec["tier"]:
                return None
            return rec["defer_id"], rec["tier"], rec["at"]
        rec = DELIVERED.decode(value)
    except SerializationError:
        return None
    return rec["defer_id"], rec["tier"], rec["delivered_at"]


def _window(config: Config, topic: str, first_ms: int, last_ms: int) -> Iterator[Message]:
    """The committed records of every partition of ``topic`` written from MARKER_WINDOW_MS
    before ``first_ms`` to as long after ``last_ms`` (by record timestamp)."""
    consumer = reader(config, "republish-window", {"enable.partition.eof": True})
    try:
        meta = consumer.list_topics(topic, timeout=LIST_TIMEOUT_S).topics.get(topic)
        if meta is None or meta.error is not None:
            raise BrokerError(f"topic {topic} not found")
        starts = consumer.offsets_for_times(
            [TopicPartition(topic, p, first_ms - MARKER_WINDOW_MS) for p in meta.partitions],
            LIST_TIMEOUT_S,
        )
        for tp in starts:
            if tp.offset < 0:  # nothing written since
                continue
            for msg in read_partition(consumer, tp):
                if msg.timestamp()[1] > last_ms + MARKER_WINDOW_MS:
                    break
                yield msg
    finally:
        consumer.close()


def committed_markers(
    config: Config, tier: str, defer_ids: Iterable[str], first_ms: int, last_ms: int
) -> dict[str, int]:
    """defer_id -> the delivery stamp of its committed DELIVERED marker in ``tier``'s changelog
    (written around the stamps: _window)."""
    wanted = {MARKER_PREFIX + i.encode(): i for i in defer_ids}
    found: dict[str, int] = {}
    for msg in _window(config, TopicNames(config.prefix).state(tier), first_ms, last_ms):
        key, value = msg.key(), msg.value()
        if key in wanted and value is not None:
            marker = MARKER.decode(value)
            if marker["status"] == "DELIVERED":
                found[wanted[key]] = marker["at"]
    return found


def _delivered_stamps(config: Config, first_ms: int, last_ms: int) -> set[tuple[str, int]]:
    """(defer_id, delivery stamp) of every committed delivery on the priority topics written
    around the stamps (_window)."""
    names = TopicNames(config.prefix)
    out: set[tuple[str, int]] = set()
    for topic in (t for queue in config.queues for t in names.queue(queue)):
        for msg in _window(config, topic, first_ms, last_ms):
            stamp = _stamp(topic, names, msg.value())
            if stamp is not None:
                out.add((stamp[0], stamp[2]))
    return out


def _changelog_entry(msg: Message) -> tuple[str, int | None] | None:
    """(defer_id, delivery stamp) of a DELIVERED marker, (defer_id, None) of a timer's removal,
    None for anything else (an intake's timer, a cancel): what a release writes to a changelog."""
    key, value = msg.key() or b"", msg.value()
    if key.startswith(MARKER_PREFIX) and value is not None:
        try:
            marker = MARKER.decode(value)
        except SerializationError:
            return None
        return (marker["defer_id"], marker["at"]) if marker["status"] == "DELIVERED" else None
    if key.startswith(TIMER) and value is None and len(key) > TIMER_KEY_ID_AT:
        return key[TIMER_KEY_ID_AT:].decode(), None
    return None


def _proven_outputs(config: Config, topic: str, hidden: list[Message]) -> list[Decision]:
    """Each hidden delivery or DELIVERED audit record, with its defer_id when proven committed
    (its changelog marker committed with the same stamp, and not shown by ``topic`` already)."""
    names = TopicNames(config.prefix)
    stamped = [(msg, _stamp(topic, names, msg.value())) for msg in hidden]
    stamps = [s for _, s in stamped if s is not None]
    proven: set[tuple[str, str, int]] = set()
    for tier in {t for _, t, _ in stamps}:
        items = [s for s in stamps if s[1] == tier]
        first, last = min(at for *_, at in items), max(at for *_, at in items)
        markers = committed_markers(config, tier, {i for i, *_ in items}, first, last)
        proven.update(s for s in items if markers.get(s[0]) == s[2])
    if proven:
        first, last = min(at for *_, at in proven), max(at for *_, at in proven)
        for msg in _window(config, topic, first, last):
            proven.discard(_stamp(topic, names, msg.value()))
    return [(msg, s and s[0], s in proven) for msg, s in stamped]


def _proven_releases(config: Config, hidden: list[Message]) -> list[Decision]:
    """Each hidden changelog record of a release (its DELIVERED marker, its timer's removal),
    with its defer_id when the delivery it records is committed on a priority topic with the
    same stamp: the turn committed there. Written again after later records for the same
    deferral is safe: a released timer's key and a delivered marker change no more."""
    entries = [(msg, _changelog_entry(msg)) for msg in hidden]
    markers = {e for _, e in entries if e is not None and e[1] is not None}
    delivered: set[tuple[str, int]] = set()
    if markers:
        stamps = [at for _, at in markers if at is not None]
        delivered = _delivered_stamps(config, min(stamps), max(stamps))
    proven = {defer_id for defer_id, at in markers if (defer_id, at) in delivered}
    return [(msg, e and e[0], e is not None and e[0] in proven) for msg, e in entries]


def republish(config: Config, topic: str, partition: int, start: int, end: int) -> RepublishReport:
    """Write again, to the same partition, what an abort hid in [start, end) and its turn
    committed (see the module's docstring). On a priority or audit topic: deliveries and
    DELIVERED audit records whose changelog marker is committed with the same stamp, unless
    ``topic`` shows them already (a turn aborted and redone within the release lookahead can
    stamp the redo as it stamped the first try, and the redo's delivery is the one that
    counts). On a changelog: the markers and timer removals of releases delivered with the same
    stamp, so that a state rebuilt from it does not release them again."""
    admin = AdminClient(config.kafka.client_settings())
    stable, _ = stable_offsets(admin, [(topic, partition)])[(topic, partition)]
    if stable < end:  # what still hangs would count as hidden, and be written twice
        raise BrokerError(
            f"{topic}[{partition}]: a transaction is still open from offset {stable}: abort it "
            "first (ensync-kafka topics hanging)"
        )
    names = TopicNames(config.prefix)
    hidden = hidden_records(config, topic, partition, start, end)
    if topic in {names.state(t.name) for t in config.tiers}:
        decided = _proven_releases(config, hidden)
    else:
        decided = _proven_outputs(config, topic, hidden)
    producer = Producer({**config.kafka.client_settings(), "enable.idempotence": True})
    republished, left = [], []
    for msg, defer_id, proven in decided:
        if proven:
            producer.produce(topic, msg.value(), msg.key(), partition, headers=msg.headers())
            republished.append(defer_id or "")
        else:
            left.append(defer_id or f"offset {where(msg)[1]}")
    if producer.flush(FLUSH_TIMEOUT_S) != 0:
        raise BrokerError(f"republishing to {topic}[{partition}]: not acknowledged in time")
    return RepublishReport(hidden=len(hidden), republished=republished, left=left)
