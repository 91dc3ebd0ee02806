"""What a handler can say besides "done", and the backoff that turns failures into retries.

A handler of :class:`~ensync_kafka.PriorityConsumer` returns to say "handled", or raises:

- any exception: a failed attempt, deferred again after an exponential backoff with jitter;
- :class:`Retry`: a failed attempt with an explicit delay and reason;
- :class:`Postpone`: not now (e.g. a rate limit); deferred without counting an attempt;
- :class:`Drop`: skip it for good (audited DROPPED).

These are control-flow signals, not errors, so they do not derive from
:class:`~ensync_kafka.EnsyncKafkaError`.

Re-deferrals get a defer_id derived only from the event being handled (see :func:`retry_id`),
and a delay that is a pure function of it (see :func:`backoff_delay`). A consumer that crashes
after the broker acknowledged a retry but before it committed the failed event's offset handles
the event again and sends the *same* deferral again: same id, same delay, so same tier and
partition, and the tier worker drops it as a duplicate. One failure never becomes two retries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from .client import MAX_DEFER_ID_CHARS
from .config import RetryPolicyConfig
from .models import JSON, TEXT, Attempt, DeferRequest, DeliveredEvent

CHAIN_HEADER = "ensync-chain"
"""Header carrying the defer_id a chain of re-deferrals started from (the original event's)."""


class HandlerSignal(Exception):
    """The handler asked for a non-default outcome."""

    def __init__(self, reason: str = "") -> None:
        self.reason = reason or (self.__doc__ or "").strip().splitlines()[0]
        super().__init__(self.reason)


class Drop(HandlerSignal):
    """Dropped by the handler."""


class Retry(HandlerSignal):
    """Retry requested by the handler.

    Counts as a failed attempt: the event comes back after ``delay`` (seconds or a timedelta;
    None: the configured backoff) with its attempt number increased, and goes to the dead-letter
    topic once the attempts are used up.
    """

    def __init__(self, delay: float | timedelta | None = None, reason: str = "") -> None:
        super().__init__(reason)
        self.delay = _seconds(delay)


class Postpone(HandlerSignal):
    """Postponed by the handler.

    Not a failure: the event comes back after ``delay`` with the same attempt number.
    :class:`~ensync_kafka.RateLimit` raises it for events over the limit.
    """

    def __init__(self, delay: float | timedelta, reason: str = "") -> None:
        super().__init__(reason)
        seconds = _seconds(delay)
        self.delay = 0.0 if seconds is None else seconds


def _seconds(delay: float | timedelta | None) -> float | None:
    if delay is None:
        return None
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    return max(0.0, seconds)


def _unit(*parts: object) -> float:
    """A number in [0, 1) that depends only on ``parts``."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def backoff_delay(policy: RetryPolicyConfig, failed_attempt: int, chain: str) -> float:
    """Seconds to wait after attempt ``failed_attempt`` (1-based) of the chain failed.

    ``base_delay * factor**(failed_attempt - 1)``, capped at ``max_delay``, then shortened by a
    jitter of up to ``jitter`` times itself. The jitter is drawn from the chain id and the attempt
    rather than a random source, so redoing the same handling asks for the same delay (and lands
    on the same tier, where the worker deduplicates it); different events still spread out.
    """
    exponent = max(0, failed_attempt - 1)
    try:
        delay = min(policy.max_delay, policy.base_delay * policy.factor**exponent)
    except OverflowError:
        delay = policy.max_delay
    return delay * (1.0 - policy.jitter * _unit(chain, failed_attempt))


def child_id(chain: str, suffix: str) -> str:
    """``{chain}:{suffix}``, with the chain replaced by a digest if the id would be too long."""
    candidate = f"{chain}:{suffix}"
    if len(candidate) <= MAX_DEFER_ID_CHARS:
        return candidate
    return f"h{hashlib.sha256(chain.encode()).hexdigest()[:40]}:{suffix}"


def retry_id(chain: str, next_attempt: int) -> str:
    """The retry of a chain's attempt ``next_attempt - 1``: ``{chain}:a{next_attempt}``."""
    return child_id(chain, f"a{next_attempt}")


def postpone_id(chain: str, partition: int, offset: int) -> str:
    """A postponement (shedding, rate limit) of the record at ``partition``/``offset``.

    A chain keeps its priority and queue, so all its records are on one topic and the record's
    position names the handling uniquely: ``{chain}:p{partition}.{offset}``.
    """
    return child_id(chain, f"p{partition}.{offset}")


def redrive_id(dead_defer_id: str) -> str:
    """A redrive of a dead event: ``{defer_id}:r``. Every copy of the same dead letter and every
    repeated redrive get this one id, so the tier worker delivers it once."""
    return child_id(dead_defer_id, "r")


def chain_of(defer_id: str, headers: Sequence[tuple[str, bytes | None]]) -> str:
    """The id a chain of re-deferrals is named after: the :data:`CHAIN_HEADER`, else defer_id."""
    for name, value in headers:
        if name == CHAIN_HEADER and value:
            return value.decode(errors="replace")
    return defer_id


def chain_headers(
    headers: Sequence[tuple[str, bytes | None]], chain: str
) -> list[tuple[str, bytes | None]]:
    """The event's own headers with :data:`CHAIN_HEADER` set to ``chain``."""
    kept = [(name, value) for name, value in headers if name != CHAIN_HEADER]
    return [*kept, (CHAIN_HEADER, chain.encode())]


def redefer_payload(payload: bytes, content_type: str) -> Any:
    """What to hand ``DeferClient`` so a re-deferral keeps the payload and its content type.

    The client picks the content type from the Python type: bytes (binary), str (text),
    anything else (JSON, encoded compactly as it did the first time).
    """
    if content_type == TEXT:
        try:
            return payload.decode()
        except UnicodeDecodeError:
            return payload
    if content_type == JSON:
        try:
            value = json.loads(payload)
        except ValueError:
            return payload
        # A JSON string would go back as text: keep the exact bytes instead.
        return payload if isinstance(value, str) else value
    return payload


def redefer_request(
    event: DeliveredEvent,
    *,
    defer_id: str,
    chain: str,
    delay: float,
    reason: str,
    attempt: int,
    history: tuple[Attempt, ...],
) -> DeferRequest:
    """``event`` deferred again: same name, payload, content type, priority, queue, key and
    headers (plus :data:`CHAIN_HEADER`), with the given id, delay, reason, attempt and history."""
    return DeferRequest(
        name=event.name,
        payload=redefer_payload(event.payload, event.content_type),
        delay=delay,
        priority=event.priority,
        reason=reason,
        queue=event.queue,
        key=event.key,
        defer_id=defer_id,
        headers=chain_headers(event.headers, chain),
        attempt=attempt,
        history=history,
    )


__all__ = [
    "CHAIN_HEADER",
    "Drop",
    "HandlerSignal",
    "Postpone",
    "Retry",
    "backoff_delay",
    "chain_headers",
    "chain_of",
    "child_id",
    "postpone_id",
    "redefer_payload",
    "redefer_request",
    "redrive_id",
    "retry_id",
]
