"""The events the benchmark defers: one shape everywhere, so every section's records compare."""

from __future__ import annotations

import json
import uuid
from typing import Any

from ensync_kafka.codec import DEFERRAL
from ensync_kafka.models import now_ms

PAYLOAD_TAG = "ensync-kafka-bench"
EVENT_NAME = "bench.event"


def sample_deferral(i: int, now: int) -> dict[str, Any]:
    """A Deferral record as DeferClient builds it for the benchmark's events."""
    payload = json.dumps({"seq": i, "tag": PAYLOAD_TAG}, separators=(",", ":")).encode()
    return {
        "defer_id": uuid.uuid4().hex,
        "name": EVENT_NAME,
        "payload": payload,
        "content_type": "application/json",
        "key": None,
        "headers": [],
        "priority": 1 + i % 5,
        "queue": "default",
        "deferred_at": now,
        "due_at": now + 1000 + i % 1000,
        "reason": "bench",
        "attempt": 1,
        "history": [],
    }


def sample_deferral_value(i: int = 123_456) -> bytes:
    """That record encoded (the raw-Kafka baseline sends these)."""
    return DEFERRAL.encode(sample_deferral(i, now_ms()))
