"""Value objects of the public API."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .config import DEFAULT_QUEUE

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def iso_ms(ms: int | None) -> str | None:
    """ISO 8601 (UTC) of epoch milliseconds, for JSON answers; None stays None."""
    return None if ms is None else from_ms(ms).isoformat()


def now_ms() -> int:
    return int(datetime.now(tz=UTC).timestamp() * 1000)


@dataclass(frozen=True, kw_only=True, slots=True)
class Attempt:
    """One failed attempt at handling an event."""

    attempt: int
    at: datetime
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Receipt:
    """Returned once the broker has durably accepted a deferral."""

    defer_id: str
    due_at: datetime
    tier: str
    queue: str
    priority: int


@dataclass(frozen=True, kw_only=True, slots=True)
class DeferRequest:
    """One deferral for :meth:`DeferClient.defer_many`; exactly one of ``delay`` / ``at``."""

    name: str
    payload: Any
    delay: Any = None
    """Seconds (float) or ``timedelta``."""
    at: datetime | None = None
    priority: int = 1
    reason: str = ""
    queue: str = DEFAULT_QUEUE
    key: bytes | str | None = None
    defer_id: str | None = None
    headers: Any = None
    """A mapping or a list of (name, value) pairs; values bytes, str or None."""
    attempt: int = 1
    history: tuple[Attempt, ...] = field(default_factory=tuple)


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """An application's event as carried by a Deferral, a DeliveredEvent and a DeadLetter."""

    defer_id: str
    name: str
    payload: bytes
    content_type: str
    key: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    priority: int
    queue: str
    deferred_at: datetime
    due_at: datetime
    reason: str
    attempt: int
    history: tuple[Attempt, ...]

    def json(self) -> Any:
        """The payload decoded as JSON (what ``defer`` sent for non-bytes, non-str payloads)."""
        return json.loads(self.payload)

    def text(self) -> str:
        return self.payload.decode()


@dataclass(frozen=True, kw_only=True, slots=True)
class DeliveredEvent(Event):
    """A deferral as delivered to ``{prefix}.<queue>.p<priority>``."""

    delivered_at: datetime
    tier: str

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DeliveredEvent:
        return cls(
            **event_fields(record),
            delivered_at=from_ms(record["delivered_at"]),
            tier=record["tier"],
        )


def event_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The fields every event-carrying record shares (Deferral, DeliveredEvent, DeadLetter),
    decoded into their Python types."""
    return dict(
        defer_id=record["defer_id"],
        name=record["name"],
        payload=record["payload"],
        content_type=record["content_type"],
        key=record["key"],
        headers=tuple((h["key"], h["value"]) for h in record["headers"]),
        priority=record["priority"],
        queue=record["queue"],
        deferred_at=from_ms(record["deferred_at"]),
        due_at=from_ms(record["due_at"]),
        reason=record["reason"],
        attempt=record["attempt"],
        history=tuple(
            Attempt(attempt=a["attempt"], at=from_ms(a["at"]), reason=a["reason"])
            for a in record["history"]
        ),
    )
