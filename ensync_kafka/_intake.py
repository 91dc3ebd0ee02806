"""What a tier worker makes of each record it reads from its tier topic, staged into a Turn.

A record is a deferral (checked, deduplicated by defer_id, held as a timer), a control request
(cancel or reschedule: control.py), or neither: quarantined on ``{prefix}.invalid`` with the
reason and a REJECTED audit record, so a bad record costs nothing but itself. Nothing here
writes to Kafka or RocksDB: the turn's transaction carries every effect, and the worker applies
the state changes once it commits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Message

from . import audit, control
from ._turn import Turn
from .codec import DEFERRAL, INVALID
from .config import PRIORITY_MAX, PRIORITY_MIN
from .exceptions import SerializationError
from .state import TIMER, PartitionStore, timer_key
from .topics import TopicNames

log = logging.getLogger("ensync_kafka.worker")

DUPLICATE_REASON = "duplicate defer_id: already held or delivered"


def problem(rec: dict[str, Any], queues: frozenset[str]) -> str | None:
    """Why a decoded Deferral cannot be held, or None."""
    if not rec["defer_id"]:
        return "empty defer_id"
    if not PRIORITY_MIN <= rec["priority"] <= PRIORITY_MAX:
        return f"priority {rec['priority']} outside {PRIORITY_MIN}..{PRIORITY_MAX}"
    if rec["queue"] not in queues:
        return f"unknown queue {rec['queue']!r}"
    if rec["due_at"] < 0:
        return "negative due_at"
    return None


class Intake:
    """One tier worker's reading of its tier topic."""

    def __init__(
        self,
        names: TopicNames,
        queues: Iterable[str],
        *,
        tier: str,
        actor: str,
        audit_of: audit.DeferralAudit,
    ) -> None:
        self.names = names
        self.queues = frozenset(queues)
        self.tier = tier
        self.actor = actor
        self.audit = audit_of

    def take(self, msg: Message, p: int, store: PartitionStore, turn: Turn, now: int) -> None:
        """Stage into ``turn`` what ``msg``, read from partition ``p``, does to its state."""
        op = control.control_op(msg)
        if op is not None:
            self._control(op, msg, p, store, turn, now)
            return
        value = msg.value()
        try:
            rec = DEFERRAL.decode(value)
            reason = problem(rec, self.queues)
        except SerializationError as exc:
            rec, reason = None, str(exc)
        if reason is not None or rec is None:
            self.quarantine(msg, reason or "undecodable", turn, now)
            return
        defer_id = rec["defer_id"]
        if defer_id in turn.seen or store.knows(defer_id):
            turn.duplicates += 1
            turn.emit(
                self.names.audit,
                defer_id.encode(),
                self.audit(audit.DUPLICATE, rec, now, DUPLICATE_REASON),
            )
            return
        turn.seen.add(defer_id)
        turn.accepted += 1
        turn.admitted.append(rec)
        key = timer_key(rec["due_at"], rec["priority"], defer_id)
        turn.change(p, TIMER + key, value)
        turn.emit(self.names.audit, key[9:], self.audit(audit.DEFERRED, rec, now, rec["reason"]))

    def _control(
        self, op: bytes, msg: Message, p: int, store: PartitionStore, turn: Turn, now: int
    ) -> None:
        """A cancel or reschedule request, worked out against the state this turn will leave."""
        try:
            rec = control.decode(op, msg)
        except SerializationError as exc:
            self.quarantine(msg, str(exc), turn, now)
            return
        effect = control.apply(
            rec, store, turn.changelog.get(p, ()), now=now, tier=self.tier, actor=self.actor
        )
        for key, value in effect.changes:
            turn.change(p, key, value)
        turn.emit(self.names.audit, msg.key(), effect.audit)
        turn.controls.append(effect)

    def quarantine(self, msg: Message, reason: str, turn: Turn, now: int) -> None:
        """The record as it came, with why, to the invalid topic; a REJECTED audit record."""
        turn.invalid += 1
        key = msg.key()
        invalid = INVALID.encode(
            {
                "source_topic": msg.topic(),
                "source_partition": msg.partition(),
                "source_offset": msg.offset(),
                "key": key,
                "value": msg.value(),
                "reason": reason,
                "rejected_at": now,
            }
        )
        turn.emit(self.names.invalid, key, invalid)
        rejected = audit.audit_value(
            audit.REJECTED,
            defer_id=key.decode(errors="replace") if key else "",
            at_ms=now,
            reason=reason,
            tier=self.tier,
            actor=self.actor,
        )
        turn.emit(self.names.audit, key, rejected)
        log.warning(
            "tier %s: quarantined %s[%d]@%d: %s",
            self.tier,
            msg.topic(),
            msg.partition(),
            msg.offset(),
            reason,
        )
