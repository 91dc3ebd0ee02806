"""What one tier-worker turn stages for its transaction, and applies locally once it commits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Message

from . import control
from ._kafka import where


@dataclass
class Turn:
    """What one transaction will write, and what to do with local state once it commits."""

    started: float = 0.0
    """time.monotonic() when the turn began staging: its preparation time runs from here."""
    records: list[tuple[str, bytes | None, bytes | None, Any, int]] = field(default_factory=list)
    """(topic, key, value, headers, partition); partition -1: the producer's partitioner."""
    changelog: dict[int, list[tuple[bytes, bytes | None]]] = field(default_factory=dict)
    first_offset: dict[int, int] = field(default_factory=dict)
    next_offset: dict[int, int] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    released: list[dict[str, Any]] = field(default_factory=list)
    admitted: list[dict[str, Any]] = field(default_factory=list)
    controls: list[control.Effect] = field(default_factory=list)
    commit_not_before_ms: int = 0
    """The latest due time released in this turn: the commit waits for it."""
    accepted: int = 0
    duplicates: int = 0
    invalid: int = 0

    def consumed(self, msg: Message) -> None:
        p, offset = where(msg)
        self.first_offset.setdefault(p, offset)
        self.next_offset[p] = offset + 1

    def change(self, partition: int, key: bytes, value: bytes | None) -> None:
        self.changelog.setdefault(partition, []).append((key, value))

    def emit(self, topic: str, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
        self.records.append((topic, key, value, headers, -1))

    @property
    def empty(self) -> bool:
        return not (self.records or self.changelog or self.next_offset)
