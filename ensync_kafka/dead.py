"""Dead letters: events whose handler failed every attempt, parked on ``{prefix}.dead``.

:func:`read_dead_letters` lists them (one per defer_id, however many copies a crashed consumer
left); :func:`redrive_dead_letters` defers them again with the attempts reset. A redrive's
defer_id is ``{dead defer_id}:r`` whatever the command line or the copy, so redriving the same
dead event twice is delivered once: the tier worker drops the second as a duplicate (while it
keeps the delivered marker, ``worker.delivered_retention``, and given the same ``delay`` tier).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from . import audit
from ._kafka import reader
from .client import DeferClient, ProgressCallback
from .codec import DEAD
from .config import Config
from .exceptions import BrokerError, SerializationError
from .models import (
    Attempt,
    DeferRequest,
    DeliveredEvent,
    Event,
    Receipt,
    event_fields,
    from_ms,
    now_ms,
    to_ms,
)
from .retry import chain_headers, redefer_payload, redrive_id
from .topics import TopicNames

READ_TIMEOUT_S = 30.0
AUDIT_TIMEOUT_S = 30.0


@dataclass(frozen=True, kw_only=True, slots=True)
class DeadLetter(Event):
    """An event that failed every attempt (the ``DeadLetter`` record on ``{prefix}.dead``).

    ``attempt`` is the last attempt, the one that used up the policy's ``max_attempts``;
    ``history`` every failed attempt, oldest first, the last one included."""

    error: str
    """The last failure: ``ExceptionType: message``."""
    traceback: str
    dead_at: datetime
    group: str
    """The consumer group whose handler gave up."""
    partition: int = -1
    offset: int = -1
    copies: int = field(default=1, compare=False)
    """How many records on the dead topic carry this defer_id (more than one after a crash)."""

    @classmethod
    def from_record(
        cls, record: dict[str, Any], *, partition: int = -1, offset: int = -1
    ) -> DeadLetter:
        return cls(
            **event_fields(record),
            error=record["error"],
            traceback=record["traceback"],
            dead_at=from_ms(record["dead_at"]),
            group=record["group"],
            partition=partition,
            offset=offset,
        )


def dead_record(
    event: DeliveredEvent,
    *,
    error: str,
    traceback: str,
    history: Sequence[Attempt],
    dead_at_ms: int,
    group: str,
) -> dict[str, Any]:
    """The DeadLetter record (schemas/DeadLetter.avsc) for ``event``."""
    return {
        "defer_id": event.defer_id,
        "name": event.name,
        "payload": event.payload,
        "content_type": event.content_type,
        "key": event.key,
        "headers": [{"key": k, "value": v} for k, v in event.headers],
        "priority": event.priority,
        "queue": event.queue,
        "deferred_at": to_ms(event.deferred_at),
        "due_at": to_ms(event.due_at),
        "reason": event.reason,
        "attempt": event.attempt,
        "history": [{"attempt": a.attempt, "at": to_ms(a.at), "reason": a.reason} for a in history],
        "error": error,
        "traceback": traceback,
        "dead_at": dead_at_ms,
        "group": group,
    }


def read_dead_letters(
    config: Config,
    *,
    name: str | None = None,
    since: datetime | None = None,
    ids: Collection[str] | None = None,
    timeout: float = READ_TIMEOUT_S,
) -> list[DeadLetter]:
    """Every dead letter on ``{prefix}.dead`` now, oldest first, one per defer_id.

    Filters: event ``name``, died at or after ``since`` (a timezone-aware datetime; the read
    starts at that time's offsets), ``ids``. Reads to the end offsets seen at the start, without
    joining a consumer group.
    """
    topic = TopicNames(config.prefix).dead
    consumer = reader(config, "dead-reader")
    try:
        starts, ends = _bounds(consumer, topic, since, timeout)
        letters = _read(consumer, starts, ends, timeout)
    except KafkaException as exc:
        err = exc.args[0]
        raise BrokerError(f"reading {topic}: {err}", code=_code(err)) from exc
    finally:
        consumer.close()
    wanted = set(ids) if ids is not None else None
    since_ms = to_ms(since) if since is not None else None
    unique: dict[str, DeadLetter] = {}
    copies: dict[str, int] = {}
    for letter in sorted(letters, key=lambda d: (d.dead_at, d.partition, d.offset)):
        if name is not None and letter.name != name:
            continue
        if wanted is not None and letter.defer_id not in wanted:
            continue
        if since_ms is not None and to_ms(letter.dead_at) < since_ms:
            continue
        copies[letter.defer_id] = copies.get(letter.defer_id, 0) + 1
        unique.setdefault(letter.defer_id, letter)
    return [_with_copies(letter, copies[letter.defer_id]) for letter in unique.values()]


def _with_copies(letter: DeadLetter, copies: int) -> DeadLetter:
    if copies == 1:
        return letter
    data = {f: getattr(letter, f) for f in DeadLetter.__dataclass_fields__}
    return DeadLetter(**{**data, "copies": copies})


def _code(err: Any) -> int | None:
    return err.code() if isinstance(err, KafkaError) else None


def _bounds(
    consumer: Consumer, topic: str, since: datetime | None, timeout: float
) -> tuple[list[TopicPartition], dict[int, int]]:
    metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise BrokerError(f"{topic}: no such topic (run `ensync-kafka topics create`)")
    partitions = sorted(metadata.partitions)
    ends: dict[int, int] = {}
    starts: list[TopicPartition] = []
    for p in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
        if high > low:
            ends[p] = high
            starts.append(TopicPartition(topic, p, low))
    if since is not None and starts:
        at = [TopicPartition(topic, tp.partition, to_ms(since)) for tp in starts]
        found = consumer.offsets_for_times(at, timeout=timeout)
        starts = [
            TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else ends[tp.partition])
            for tp in found
        ]
        starts = [tp for tp in starts if tp.offset < ends[tp.partition]]
    return starts, ends


def _read(
    consumer: Consumer, starts: list[TopicPartition], ends: dict[int, int], timeout: float
) -> list[DeadLetter]:
    if not starts:
        return []
    consumer.assign(starts)
    open_partitions = {tp.partition for tp in starts}
    letters: list[DeadLetter] = []
    deadline = time.monotonic() + timeout
    while open_partitions:
        if time.monotonic() > deadline:
            raise BrokerError(f"reading the dead letters timed out after {timeout:.0f}s")
        for msg in consumer.consume(1000, 0.5):
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise BrokerError(f"reading the dead letters: {err.str()}", code=err.code())
                continue
            p, offset = msg.partition(), msg.offset()
            if p is None or offset is None:
                continue
            if offset + 1 >= ends[p]:
                open_partitions.discard(p)
            if offset >= ends[p]:
                continue
            try:
                record = DEAD.decode(msg.value())
            except SerializationError:
                continue  # not ours to interpret; dead list shows DeadLetter records only
            letters.append(DeadLetter.from_record(record, partition=p, offset=offset))
        # A partition's last offsets may be transaction markers, never delivered: done when the
        # position has passed the end seen at the start.
        for tp in consumer.position([TopicPartition(t.topic, t.partition) for t in starts]):
            if tp.offset >= ends[tp.partition]:
                open_partitions.discard(tp.partition)
    return letters


def redrive_request(letter: DeadLetter, *, delay: float = 0.0) -> DeferRequest:
    """The deferral that redrives ``letter``: attempts reset, a new chain named by its id."""
    defer_id = redrive_id(letter.defer_id)
    return DeferRequest(
        name=letter.name,
        payload=redefer_payload(letter.payload, letter.content_type),
        delay=delay,
        priority=letter.priority,
        reason=f"redriven after {letter.attempt} attempts: {letter.error}"[:1000],
        queue=letter.queue,
        key=letter.key,
        defer_id=defer_id,
        headers=chain_headers(letter.headers, defer_id),
        attempt=1,
        history=(),
    )


def redrive_dead_letters(
    config: Config,
    letters: Iterable[DeadLetter],
    *,
    delay: float = 0.0,
    client: DeferClient | None = None,
    progress: ProgressCallback | None = None,
    actor: str = "redrive",
) -> list[Receipt]:
    """Defer every letter again after ``delay`` seconds (attempt 1, empty history), then write a
    REDRIVEN audit record for each. Returns once the broker has all of them."""
    letters = list(letters)
    if not letters:
        return []
    requests = [redrive_request(letter, delay=delay) for letter in letters]
    owned = client is None
    sender = client or DeferClient(config)
    try:
        receipts = sender.defer_many(requests, progress=progress)
    finally:
        if owned:
            sender.close()
    _audit_redriven(config, letters, receipts, actor)
    return receipts


def _audit_redriven(
    config: Config, letters: Sequence[DeadLetter], receipts: Sequence[Receipt], actor: str
) -> None:
    names = TopicNames(config.prefix)
    producer = Producer({**config.kafka.client_settings(), "enable.idempotence": "true"})
    failures: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            failures.append(err)

    now = now_ms()
    for letter, receipt in zip(letters, receipts, strict=True):
        value = audit.audit_value(
            audit.REDRIVEN,
            defer_id=receipt.defer_id,
            at_ms=now,
            reason=f"redrive of dead {letter.defer_id} ({names.dead}[{letter.partition}]"
            f"@{letter.offset})",
            deferral={
                "name": letter.name,
                "queue": letter.queue,
                "priority": letter.priority,
                "due_at": to_ms(receipt.due_at),
                "attempt": 1,
            },
            actor=actor,
        )
        producer.produce(
            names.audit, key=receipt.defer_id.encode(), value=value, on_delivery=on_delivery
        )
    remaining = producer.flush(AUDIT_TIMEOUT_S)
    if remaining or failures:
        detail = failures[0].str() if failures else f"{remaining} not acknowledged"
        raise BrokerError(f"redriven, but the REDRIVEN audit records failed: {detail}")
