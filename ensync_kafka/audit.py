"""Audit records: one per lifecycle step of a deferral, written in the step's own transaction."""

from __future__ import annotations

from typing import Any

from .codec import AUDIT

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


def deferral_audit(
    event: str, deferral: dict[str, Any], at_ms: int, *, tier: str, actor: str, reason: str
) -> bytes:
    """:func:`audit_value` for a step of a decoded Deferral, without the optional-field lookups:
    a worker writes two of these per deferral."""
    d = deferral
    return AUDIT.encode(
        {
            "defer_id": d["defer_id"],
            "event": event,
            "at": at_ms,
            "reason": reason,
            "name": d["name"],
            "queue": d["queue"],
            "priority": d["priority"],
            "tier": tier,
            "due_at": d["due_at"],
            "attempt": d["attempt"],
            "actor": actor,
        }
    )
