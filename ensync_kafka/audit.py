"""Audit records: one per lifecycle step of a deferral, written in the step's own transaction."""

from __future__ import annotations

from typing import Any

from ._avroenc import avro_string, zigzag_long
from .codec import AUDIT, MAGIC, schema_json
from .config import PRIORITY_MAX, PRIORITY_MIN

DEFERRED = "DEFERRED"
DELIVERED = "DELIVERED"
DUPLICATE = "DUPLICATE"
REJECTED = "REJECTED"
CANCELLED = "CANCELLED"
RESCHEDULED = "RESCHEDULED"
DEAD = "DEAD"
REDRIVEN = "REDRIVEN"
DROPPED = "DROPPED"
RETRIED = "RETRIED"
SHED = "SHED"


def audit_value(
    event: str,
    *,
    defer_id: str,
    at_ms: int,
    reason: str = "",
    deferral: dict[str, Any] | None = None,
    tier: str | None = None,
    actor: str = "",
    request_id: str | None = None,
    outcome: str | None = None,
) -> bytes:
    """Encode an AuditRecord; ``deferral`` (a decoded Deferral) fills name, queue, priority, due."""
    d = deferral or {}
    return AUDIT.encode(
        {
            "defer_id": defer_id,
            "event": event,
            "at": at_ms,
            "reason": reason,
            "name": d.get("name"),
            "queue": d.get("queue"),
            "priority": d.get("priority"),
            "tier": tier,
            "due_at": d.get("due_at"),
            "attempt": d.get("attempt"),
            "actor": actor,
            "request_id": request_id,
            "outcome": outcome,
        }
    )


class DeferralAudit:
    """AuditRecords of a tier worker's steps on a decoded Deferral, two per deferral.

    Byte-identical to ``AUDIT.encode`` of the same record (tests/unit/test_codec.py), with what is
    constant for the worker (tier, actor, the null request_id and outcome) encoded once and the
    optional fields' union branches written out: this is the worker's most frequent encoding.
    Reason, name and queue sit side by side in the record and repeat across deferrals (an event
    type's retries share them), so their encoding is cached (``MAX_CACHED_MIDDLES``)."""

    __slots__ = ("_attempt_tail", "_middle", "_priority_tier", "_tail", "_tier")

    def __init__(self, *, tier: str, actor: str) -> None:
        self._tier = _SOME + avro_string(tier)
        self._tail = avro_string(actor) + _NONE + _NONE  # actor, request_id, outcome
        self._middle: dict[tuple[str, str, str], bytes] = {}
        self._priority_tier = {
            p: _SOME + zigzag_long(p) + self._tier for p in range(PRIORITY_MIN, PRIORITY_MAX + 1)
        }
        self._attempt_tail = tuple(
            _SOME + zigzag_long(a) + self._tail for a in range(_CACHED_ATTEMPTS)
        )

    def __call__(self, event: str, d: dict[str, Any], at_ms: int, reason: str) -> bytes:
        name, queue, priority, attempt = d["name"], d["queue"], d["priority"], d["attempt"]
        middle = self._middle.get((reason, name, queue))
        if middle is None:
            middle = b"".join(
                (avro_string(reason), _SOME, avro_string(name), _SOME, avro_string(queue))
            )
            if len(middle) <= MAX_CACHED_MIDDLE_BYTES:
                if len(self._middle) >= MAX_CACHED_MIDDLES:
                    self._middle.clear()
                self._middle[reason, name, queue] = middle
        priority_tier = self._priority_tier.get(priority)
        if priority_tier is None:  # validated at intake; kept correct for any int anyway
            priority_tier = _SOME + zigzag_long(priority) + self._tier
        return b"".join(
            (
                MAGIC,
                avro_string(d["defer_id"]),
                _EVENTS[event],
                zigzag_long(at_ms),
                middle,
                priority_tier,
                _SOME,
                zigzag_long(d["due_at"]),
                self._attempt_tail[attempt]
                if 0 <= attempt < _CACHED_ATTEMPTS
                else _SOME + zigzag_long(attempt) + self._tail,
            )
        )


MAX_CACHED_MIDDLES = 4096
"""Distinct (reason, name, queue) encodings a worker keeps; the cache starts over past it."""
MAX_CACHED_MIDDLE_BYTES = 512
"""Longer ones are not cached, so the cache stays within 2 MB whatever the reasons' length."""
_CACHED_ATTEMPTS = 64
_NONE, _SOME = b"\x00", b"\x02"
"""The branch of a ["null", X] union: null, or X follows."""
EVENTS: tuple[str, ...] = tuple(
    next(f for f in schema_json("AuditRecord")["fields"] if f["name"] == "event")["type"]["symbols"]
)
"""Every AuditEvent symbol, in the schema's order (its Avro encoding is the index)."""
_EVENTS = {symbol: zigzag_long(i) for i, symbol in enumerate(EVENTS)}
