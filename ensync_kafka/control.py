"""Cancel and reschedule: control records that travel the deferrals' own transactional path.

A request is one ``Control`` record sent to *every* tier topic, keyed by the defer_id, so in each
tier it lands on the partition that holds that id (same key, same partition count, same
partitioner as the deferral: both are sent by :class:`~ensync_kafka.client.DeferClient`). The
header ``ensync.op`` marks it, so the worker's intake needs no decode attempt to tell it apart.

Each tier's worker applies it inside the turn's transaction (changelog tombstone of the timer,
a CANCELLED marker or the moved timer, and one AuditRecord answer carrying ``request_id`` and
``outcome``), so it takes effect exactly once. The client reads those answers from the audit topic
(read_committed, from its end as it was before the request was sent) until every tier answered.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from ._kafka import reader
from .audit import audit_value
from .codec import AUDIT, DEFERRAL, MARKER, Codec
from .config import Config
from .exceptions import BrokerError, SerializationError
from .models import from_ms, now_ms
from .state import (
    MARKER_PREFIX,
    STATUS_CANCELLED,
    STATUS_DELIVERED,
    TIMER,
    PartitionStore,
    timer_key,
)
from .topics import TopicNames

CONTROL = Codec("Control")

OP_HEADER = "ensync.op"
CANCEL = "cancel"
RESCHEDULE = "reschedule"
_OPS = {CANCEL.encode(): "CANCEL", RESCHEDULE.encode(): "RESCHEDULE"}

# A tier's answer (AuditRecord.outcome), and the request's overall outcome.
CANCELLED = "cancelled"
RESCHEDULED = "rescheduled"
ALREADY_DELIVERED = "already_delivered"
ALREADY_CANCELLED = "already_cancelled"
UNKNOWN = "unknown"
PENDING = "pending"
"""Overall only: a tier did not answer in time. The request is durable in the tier topic and
is applied when that tier's worker reads it."""

_PRECEDENCE = (CANCELLED, RESCHEDULED, ALREADY_DELIVERED, ALREADY_CANCELLED, PENDING, UNKNOWN)
_METADATA_TIMEOUT_S = 10.0

Headers = list[tuple[str, str | bytes | None]]
_POLL_S = 0.2


def control_op(msg: Message) -> bytes | None:
    """The ``ensync.op`` header of a tier-topic record, None for a plain deferral."""
    headers = msg.headers()
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, dict) else headers
    for name, value in pairs:
        if name == OP_HEADER:
            return value.encode() if isinstance(value, str) else value or b""
    return None


# -- worker side ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Effect:
    """What one control record does to a partition, for the worker to put in its turn."""

    changes: list[tuple[bytes, bytes | None]]
    audit: bytes
    outcome: str
    op: str
    deferral: dict[str, Any] | None


def decode(op: bytes, msg: Message) -> dict[str, Any]:
    """The Control record of ``msg``; SerializationError when it is not a valid request."""
    expected = _OPS.get(op)
    if expected is None:
        raise SerializationError(f"unknown control op {op!r} in header {OP_HEADER}")
    rec = CONTROL.decode(msg.value())
    key = msg.key()
    if rec["op"] != expected:
        raise SerializationError(f"control: header says {expected}, the record says {rec['op']}")
    if not rec["defer_id"] or key is None or key != rec["defer_id"].encode():
        raise SerializationError("control: the record key must be its defer_id")
    if expected == "RESCHEDULE" and (rec["due_at"] is None or rec["due_at"] < 0):
        raise SerializationError("control: reschedule without a valid due_at")
    return rec


def _current(
    store: PartitionStore, pending: Sequence[tuple[bytes, bytes | None]], defer_id: str
) -> tuple[bytes | None, bytes | None, int | None]:
    """(held timer key, its Deferral bytes, marker status) as they will be once the turn's
    pending changelog records are applied on top of the store."""
    held = store.held_key(defer_id)
    value = store.timer(held) if held is not None else None
    marker = store.marker(defer_id)
    status = None if marker is None else marker[0]
    id_bytes = defer_id.encode()
    marker_key = MARKER_PREFIX + id_bytes
    for key, val in pending:
        if key[:1] == TIMER and key[10:] == id_bytes:
            if val is not None:
                held, value = key[1:], val
            elif held == key[1:]:
                held, value = None, None
        elif key == marker_key:
            if val is None:
                status = None
            else:
                name = MARKER.decode(val)["status"]
                status = STATUS_CANCELLED if name == "CANCELLED" else STATUS_DELIVERED
    return held, value, status


def apply(
    rec: dict[str, Any],
    store: PartitionStore,
    pending: Sequence[tuple[bytes, bytes | None]],
    *,
    now: int,
    tier: str,
    actor: str,
) -> Effect:
    """Work out one control request against a partition's state (store + this turn so far)."""
    defer_id = rec["defer_id"]
    op = rec["op"]
    held, value, status = _current(store, pending, defer_id)
    changes: list[tuple[bytes, bytes | None]] = []
    deferral: dict[str, Any] | None = None
    if held is not None and value is not None:
        deferral = DEFERRAL.decode(value)
        changes.append((TIMER + held, None))
        if op == "CANCEL":
            marker = MARKER.encode({"defer_id": defer_id, "status": "CANCELLED", "at": now})
            changes.append((MARKER_PREFIX + defer_id.encode(), marker))
            event, outcome = "CANCELLED", CANCELLED
            reason = rec["reason"] or "cancelled on request"
        else:
            moved = {**deferral, "due_at": rec["due_at"]}
            new_key = timer_key(moved["due_at"], moved["priority"], defer_id)
            changes.append((TIMER + new_key, DEFERRAL.encode(moved)))
            event, outcome = "RESCHEDULED", RESCHEDULED
            was = from_ms(deferral["due_at"]).isoformat()
            reason = f"due {was} -> {from_ms(rec['due_at']).isoformat()}"
            if rec["reason"]:
                reason += f": {rec['reason']}"
            deferral = moved
    elif status == STATUS_DELIVERED:
        event, outcome, reason = "UNCHANGED", ALREADY_DELIVERED, f"{op.lower()}: already delivered"
    elif status == STATUS_CANCELLED:
        event, outcome, reason = "UNCHANGED", ALREADY_CANCELLED, f"{op.lower()}: already cancelled"
    else:
        event, outcome, reason = "UNCHANGED", UNKNOWN, f"{op.lower()}: unknown here"
    audit = audit_value(
        event,
        defer_id=defer_id,
        at_ms=now,
        reason=reason,
        deferral=deferral,
        tier=tier,
        actor=rec["actor"] or actor,
        request_id=rec["request_id"],
        outcome=outcome,
    )
    return Effect(
        changes=changes,
        audit=audit,
        outcome=outcome,
        op=op,
        deferral=deferral,
    )


# -- client side ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ControlResult:
    """The answer to :meth:`DeferClient.cancel` / :meth:`DeferClient.reschedule`."""

    defer_id: str
    request_id: str
    op: str
    outcome: str
    """cancelled | rescheduled | already_delivered | already_cancelled | unknown | pending"""
    tiers: dict[str, str] = field(default_factory=dict)
    """Each tier's answer."""
    missing: tuple[str, ...] = ()
    """Tiers that did not answer in time (their request stays queued)."""
    due_at: datetime | None = None
    """reschedule: the new due time."""

    @property
    def done(self) -> bool:
        """The deferral was cancelled / moved by this request."""
        return self.outcome in (CANCELLED, RESCHEDULED)

    def as_dict(self) -> dict[str, Any]:
        return {
            "defer_id": self.defer_id,
            "request_id": self.request_id,
            "op": self.op,
            "outcome": self.outcome,
            "tiers": dict(self.tiers),
            "missing": list(self.missing),
            "due_at": None if self.due_at is None else self.due_at.isoformat(),
        }


def overall(answers: dict[str, str], tiers: Sequence[str]) -> str:
    """One outcome from the tiers' answers: an effective one wins, then what says most."""
    seen = set(answers.values())
    if len(answers) < len(tiers):
        seen.add(PENDING)
    for outcome in _PRECEDENCE:
        if outcome in seen:
            return outcome
    return UNKNOWN


def request(
    config: Config,
    producer: Producer,
    *,
    op: str,
    defer_id: str,
    due_at_ms: int | None = None,
    reason: str = "",
    actor: str = "client",
    timeout: float,
    wait: bool = True,
) -> ControlResult:
    """Send one request to every tier and, when ``wait``, collect every tier's answer."""
    names = TopicNames(config.prefix)
    tiers = list(config.tier_names)
    request_id = uuid.uuid4().hex
    value = CONTROL.encode(
        {
            "op": _OPS[op.encode()],
            "defer_id": defer_id,
            "request_id": request_id,
            "due_at": due_at_ms,
            "at": now_ms(),
            "reason": reason,
            "actor": actor,
        }
    )
    headers: Headers = [(OP_HEADER, op.encode())]
    watcher = _AnswerWatcher(config, names.audit) if wait else None
    try:
        if watcher is not None:
            watcher.start()  # positioned before the requests exist: no answer is missed
        send, failures = _sender(producer)
        for tier in tiers:
            send(names.defer(tier), defer_id.encode(), value, headers)
        remaining = producer.flush(timeout)
        if remaining:
            raise BrokerError(f"{op} {defer_id}: {remaining} control records not acknowledged")
        if failures:  # reported while flushing
            err = failures[0]
            raise BrokerError(
                f"{op} {defer_id}: control record failed: {err.str()}", code=err.code()
            )
        answers = {} if watcher is None else watcher.collect(request_id, tiers, timeout)
    finally:
        if watcher is not None:
            watcher.close()
    return ControlResult(
        defer_id=defer_id,
        request_id=request_id,
        op=op,
        outcome=overall(answers, tiers) if wait else PENDING,
        tiers=answers,
        missing=tuple(t for t in tiers if t not in answers) if wait else (),
        due_at=None if due_at_ms is None else from_ms(due_at_ms),
    )


def _sender(
    producer: Producer,
) -> tuple[Callable[[str, bytes, bytes, Headers], None], list[KafkaError]]:
    """A send function that fails fast on an earlier delivery error, and the list of errors
    (delivery reports also arrive during the final flush: check it after)."""
    failures: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failures.append(err)

    def send(topic: str, key: bytes, value: bytes, headers: Headers) -> None:
        producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
        producer.poll(0)
        if failures:
            err = failures[0]
            raise BrokerError(f"control record to {topic}: {err.str()}", code=err.code())

    return send, failures


class _AnswerWatcher:
    """Reads the audit topic (read_committed) from its current end, looking for answers."""

    def __init__(self, config: Config, topic: str) -> None:
        self.topic = topic
        self.consumer = reader(config, "control", {"fetch.wait.max.ms": 50})

    def start(self) -> None:
        """Assign every partition at its current end (retrying while leaders are elected)."""
        deadline = time.monotonic() + _METADATA_TIMEOUT_S
        while True:
            try:
                self.consumer.assign(self._ends())
                return
            except KafkaException as exc:
                if time.monotonic() >= deadline:
                    raise BrokerError(f"{self.topic}: cannot read its end: {exc}") from exc
                time.sleep(0.1)

    def _ends(self) -> list[TopicPartition]:
        meta = self.consumer.list_topics(self.topic, timeout=_METADATA_TIMEOUT_S)
        topic = meta.topics.get(self.topic)
        if topic is None or not topic.partitions:
            raise BrokerError(f"{self.topic}: no such topic (run `ensync-kafka topics create`)")
        ends = []
        for p in sorted(topic.partitions):
            tp = TopicPartition(self.topic, p)
            _, high = self.consumer.get_watermark_offsets(tp, timeout=_METADATA_TIMEOUT_S)
            ends.append(TopicPartition(self.topic, p, high))
        return ends

    def collect(self, request_id: str, tiers: Sequence[str], timeout: float) -> dict[str, str]:
        answers: dict[str, str] = {}
        wanted = set(tiers)
        deadline = time.monotonic() + timeout
        marker = request_id.encode()
        while wanted - answers.keys() and time.monotonic() < deadline:
            for msg in self.consumer.consume(500, _POLL_S):
                if msg.error() is not None:
                    continue
                value = msg.value()
                if not value or marker not in value:  # cheap filter before decoding
                    continue
                try:
                    rec = AUDIT.decode(value)
                except SerializationError:
                    continue
                if rec.get("request_id") == request_id and rec.get("tier") in wanted:
                    answers[rec["tier"]] = rec.get("outcome") or UNKNOWN
        return answers

    def close(self) -> None:
        self.consumer.close()
