"""An in-memory stand-in for :class:`DeferClient`, for applications' own unit tests.

It validates exactly like the real client (same code), keeps what was deferred, and releases
due deferrals on demand as :class:`DeliveredEvent` objects, once per defer_id, as the pipeline
would. No Kafka involved: ensync-kafka's own tests use a real broker.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ._ids import AlignedIds
from .client import DeferClient, ProgressCallback
from .codec import DEFERRAL
from .config import Config, config_from_mapping
from .models import DeliveredEvent, Receipt, now_ms, to_ms
from .topics import TopicNames


class InMemoryDeferClient(DeferClient):
    """``defer``/``schedule``/``defer_many`` as in production; ``release_due`` plays the worker."""

    def __init__(self, config: Config | None = None) -> None:  # no Kafka client is created
        self._config = config or config_from_mapping(
            {"kafka": {"bootstrap_servers": "in-memory:0"}}, environ={}
        )
        self._topics = TopicNames(self._config.prefix)
        self._ids = AlignedIds(1)  # no partitions to fill: plain random ids
        self.pending: dict[str, tuple[dict[str, Any], Receipt]] = {}
        self.delivered: dict[str, DeliveredEvent] = {}
        self.duplicates = 0

    def _send(
        self,
        prepared: list[tuple[str, bytes, bytes, Receipt]],
        progress: ProgressCallback | None = None,
    ) -> list[Receipt]:
        for _, _, value, receipt in prepared:
            record = DEFERRAL.decode(value)  # proves it encodes to the wire contract
            if receipt.defer_id in self.pending or receipt.defer_id in self.delivered:
                self.duplicates += 1
            else:
                self.pending[receipt.defer_id] = (record, receipt)
        if progress is not None:
            progress(len(prepared), len(prepared))
        return [receipt for *_, receipt in prepared]

    def release_due(self, now: datetime | None = None) -> list[DeliveredEvent]:
        """Deliver every pending deferral due at ``now`` (default: the clock), by priority, then
        due time, as the workers would."""
        at = now_ms() if now is None else to_ms(now)
        due = sorted(
            ((rec, receipt) for rec, receipt in self.pending.values() if rec["due_at"] <= at),
            key=lambda item: (-item[0]["priority"], item[0]["due_at"]),
        )
        events = []
        for rec, receipt in due:
            del self.pending[receipt.defer_id]
            event = DeliveredEvent.from_record({**rec, "delivered_at": at, "tier": receipt.tier})
            self.delivered[receipt.defer_id] = event
            events.append(event)
        return events

    def flush(self, timeout: float = 0.0) -> int:
        return 0

    def close(self) -> None:
        pass
