"""DeferClient: validate a deferral, route it to its tier topic, return once the broker has it."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from confluent_kafka import KafkaError, Producer

from . import control
from ._ids import DEFAULT_PARTITIONER, AlignedIds
from ._kafka import retire
from .codec import DEFERRAL
from .config import PRIORITY_MAX, PRIORITY_MIN, Config, TierConfig
from .exceptions import BrokerError, ValidationError
from .models import BINARY, JSON, TEXT, Attempt, DeferRequest, Receipt, from_ms, now_ms, to_ms
from .topics import TopicNames

DELIVERY_TIMEOUT_S = 30.0
MAX_DEFER_ID_CHARS = 200

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` while ``defer_many`` sends."""


def choose_tier(tiers: Sequence[TierConfig], delay_s: float) -> TierConfig:
    """The smallest tier whose span covers the delay; longer delays go to the top tier.

    Chosen from the *requested* delay, so a re-sent deferral lands in the same tier and, keyed by
    defer_id, on the same partition.
    """
    for tier in tiers:
        if delay_s <= tier.span:
            return tier
    return tiers[-1]


def _payload(payload: Any) -> tuple[bytes, str]:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), BINARY
    if isinstance(payload, str):
        return payload.encode(), TEXT
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode(), JSON
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"payload: not bytes, str or JSON-serialisable ({exc})") from None


def _headers(headers: Any) -> list[dict[str, bytes | None]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: list[dict[str, Any]] = []
    try:
        for name, value in items:
            if not isinstance(name, str):
                raise ValidationError(f"headers: name {name!r} is not a string")
            if isinstance(value, str):
                value = value.encode()
            elif value is not None and not isinstance(value, bytes):
                raise ValidationError(f"headers: value of {name!r} is not bytes, str or None")
            out.append({"key": name, "value": value})
    except (TypeError, ValueError) as exc:
        msg = f"headers: expected a mapping or (name, value) pairs: {exc}"
        raise ValidationError(msg) from None
    return out


def _delay_seconds(delay: Any) -> float:
    if isinstance(delay, timedelta):
        return delay.total_seconds()
    if isinstance(delay, bool) or not isinstance(delay, int | float):
        raise ValidationError(f"delay: expected seconds or a timedelta, got {delay!r}")
    return float(delay)


class DeferClient:
    """Sends deferrals. Thread-safe; one per process is plenty.

    Every call returns only after the broker acknowledged the write (``acks=all``, idempotent
    producer), so a returned :class:`Receipt` means the deferral is durable.
    """

    def __init__(self, config: Config, *, producer_settings: Mapping[str, str] | None = None):
        self._config = config
        self._topics = TopicNames(config.prefix)
        self._settings = dict(producer_settings or {})
        self._lock = threading.Lock()
        partitioner = {**config.kafka.client_settings(), **self._settings}.get(
            "partitioner", DEFAULT_PARTITIONER
        )
        self._ids = AlignedIds(
            config.topics.defer.partitions if partitioner == DEFAULT_PARTITIONER else 1
        )
        self._producer = self._new_producer()
        self._closed = False

    def _new_producer(self) -> Producer:
        return Producer(
            {
                **self._config.kafka.client_settings(),
                "enable.idempotence": "true",
                "acks": "all",
                "linger.ms": "5",
                "compression.type": "lz4",
                **self._settings,
            }
        )

    def _replace_producer(self, failed: Producer) -> None:
        """After a send the broker did not acknowledge in time: a producer that lost every
        broker would never send again (see _kafka.BrokerWatch), and a new one costs a
        connection. What the old one still held is dropped; those calls raised, and callers
        re-send with the same defer_ids."""
        with self._lock:
            if self._producer is failed:
                retire(failed, "defer-client-producer")
                self._producer = self._new_producer()

    @property
    def config(self) -> Config:
        return self._config

    def defer(
        self,
        name: str,
        payload: Any,
        *,
        delay: float | timedelta,
        priority: int = 1,
        reason: str = "",
        queue: str | None = None,
        key: bytes | str | None = None,
        defer_id: str | None = None,
        headers: Any = None,
    ) -> Receipt:
        """Deliver ``payload`` as event ``name`` after ``delay`` (seconds or timedelta)."""
        request = DeferRequest(
            name=name,
            payload=payload,
            delay=delay,
            priority=priority,
            reason=reason,
            queue=queue or self._config.queues[0],
            key=key,
            defer_id=defer_id,
            headers=headers,
        )
        return self._send([self._prepare(request, now_ms())])[0]

    def schedule(
        self,
        name: str,
        payload: Any,
        *,
        at: datetime,
        priority: int = 1,
        reason: str = "",
        queue: str | None = None,
        key: bytes | str | None = None,
        defer_id: str | None = None,
        headers: Any = None,
    ) -> Receipt:
        """Deliver at ``at``, a timezone-aware datetime."""
        request = DeferRequest(
            name=name,
            payload=payload,
            at=at,
            priority=priority,
            reason=reason,
            queue=queue or self._config.queues[0],
            key=key,
            defer_id=defer_id,
            headers=headers,
        )
        return self._send([self._prepare(request, now_ms())])[0]

    def defer_many(
        self,
        requests: Iterable[DeferRequest],
        *,
        progress: ProgressCallback | None = None,
    ) -> list[Receipt]:
        """Validate every request first (nothing is sent if one is invalid), then send them all
        and wait for the broker's acknowledgement of each."""
        now = now_ms()
        prepared = []
        for index, req in enumerate(requests):
            try:
                prepared.append(self._prepare(req, now))
            except ValidationError as exc:
                raise ValidationError(f"request {index}: {exc}") from None
        return self._send(prepared, progress)

    def _send(
        self,
        prepared: list[tuple[str, bytes, bytes, Receipt]],
        progress: ProgressCallback | None = None,
    ) -> list[Receipt]:
        total = len(prepared)
        failures: list[tuple[str, KafkaError]] = []
        done = [0]

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            done[0] += 1
            if err is not None:
                failures.append((msg.key().decode(), err))
            if progress is not None and (done[0] % 1000 == 0 or done[0] == total):
                progress(done[0], total)

        producer = self._producer
        try:
            for topic, key, value, _ in prepared:
                while True:
                    try:
                        producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                        break
                    except BufferError:
                        producer.poll(0.05)
            remaining = producer.flush(DELIVERY_TIMEOUT_S)
        except RuntimeError as exc:  # closed: another call's timeout replaced it meanwhile
            raise BrokerError(
                f"deferrals not acknowledged: the producer was replaced ({exc})"
            ) from exc
        if remaining or any(err.code() == KafkaError._MSG_TIMED_OUT for _, err in failures):
            self._replace_producer(producer)
        if remaining:
            raise BrokerError(
                f"{remaining} deferrals not acknowledged within {DELIVERY_TIMEOUT_S}s"
            )
        if failures:
            defer_id, err = failures[0]
            raise BrokerError(
                f"{len(failures)} of {total} deferrals failed; first {defer_id}: {err.str()}",
                code=err.code(),
            )
        return [receipt for *_, receipt in prepared]

    def _prepare(self, req: DeferRequest, now: int) -> tuple[str, bytes, bytes, Receipt]:
        record, tier = self._validate(req, now)
        topic = self._topics.defer(tier.name)
        if record["defer_id"] is None:
            record["defer_id"] = self._ids.new(topic)
        value = DEFERRAL.encode(record)
        receipt = Receipt(
            defer_id=record["defer_id"],
            due_at=from_ms(record["due_at"]),
            tier=tier.name,
            queue=record["queue"],
            priority=record["priority"],
        )
        return topic, record["defer_id"].encode(), value, receipt

    def _validate(self, req: DeferRequest, now: int) -> tuple[dict[str, Any], TierConfig]:
        cfg = self._config
        if not isinstance(req.name, str) or not req.name:
            raise ValidationError("name: a non-empty string is required")
        prio = req.priority
        if (
            isinstance(prio, bool)
            or not isinstance(prio, int)
            or not (PRIORITY_MIN <= prio <= PRIORITY_MAX)
        ):
            raise ValidationError(
                f"priority: must be an integer {PRIORITY_MIN}..{PRIORITY_MAX}, got {prio!r}"
            )
        if req.queue not in cfg.queues:
            raise ValidationError(
                f"queue: unknown queue {req.queue!r}; configured: {', '.join(cfg.queues)}"
            )
        if (req.delay is None) == (req.at is None):
            raise ValidationError("exactly one of delay and at is required")
        if req.at is not None:
            if not isinstance(req.at, datetime):
                raise ValidationError(f"at: expected a datetime, got {req.at!r}")
            if req.at.tzinfo is None or req.at.utcoffset() is None:
                raise ValidationError("at: the datetime is naive; give it a timezone (e.g. UTC)")
            due = to_ms(req.at)
        else:
            delay_s = _delay_seconds(req.delay)
            if not math.isfinite(delay_s) or delay_s < 0:
                raise ValidationError(f"delay: must be a finite number >= 0, got {delay_s!r}")
            due = now + round(delay_s * 1000)
        delay_s = max(0.0, (due - now) / 1000)
        if delay_s > cfg.defer.max_delay:
            raise ValidationError(
                f"delay: {delay_s:.0f}s is past the maximum delay of {cfg.defer.max_delay:.0f}s "
                "(defer.max_delay)"
            )
        payload, content_type = _payload(req.payload)
        if len(payload) > cfg.defer.max_payload_bytes:
            raise ValidationError(
                f"payload: {len(payload)} bytes is over the limit of "
                f"{cfg.defer.max_payload_bytes} (defer.max_payload_bytes)"
            )
        defer_id = req.defer_id  # None: _prepare makes one (_ids.py)
        if defer_id is not None and (
            not isinstance(defer_id, str) or not defer_id or len(defer_id) > MAX_DEFER_ID_CHARS
        ):
            raise ValidationError(f"defer_id: 1..{MAX_DEFER_ID_CHARS} characters required")
        key = req.key.encode() if isinstance(req.key, str) else req.key
        if key is not None and not isinstance(key, bytes):
            raise ValidationError(f"key: expected bytes, str or None, got {type(key).__name__}")
        if not isinstance(req.reason, str):
            raise ValidationError("reason: must be a string")
        if isinstance(req.attempt, bool) or not isinstance(req.attempt, int) or req.attempt < 1:
            raise ValidationError("attempt: must be an integer >= 1")
        record = {
            "defer_id": defer_id,
            "name": req.name,
            "payload": payload,
            "content_type": content_type,
            "key": key,
            "headers": _headers(req.headers),
            "priority": prio,
            "queue": req.queue,
            "deferred_at": now,
            "due_at": due,
            "reason": req.reason,
            "attempt": req.attempt,
            "history": [_attempt(a) for a in req.history],
        }
        if req.at is not None and req.defer_id is not None:
            # An idempotent schedule() must land where its retries land, but its delay shrinks
            # as the clock moves and could cross a tier boundary, escaping that tier's dedup.
            # The top tier holds any delay and fires on time just the same.
            return record, cfg.tiers[-1]
        return record, choose_tier(cfg.tiers, delay_s)

    # -- cancel and reschedule (see control.py) ---------------------------------------------

    def cancel(
        self,
        defer_id: str,
        *,
        reason: str = "",
        timeout: float | None = None,
        wait: bool = True,
    ) -> control.ControlResult:
        """Cancel a pending deferral: it will not be delivered.

        Sent to every tier and applied there in the worker's transaction, so exactly once. With
        ``wait`` (default) returns each tier's answer: ``outcome`` is ``cancelled``,
        ``already_delivered``, ``already_cancelled``, ``unknown``, or ``pending`` when a tier did
        not answer within ``timeout`` (default ``monitor.control_timeout``); a pending request
        stays queued and takes effect when that tier's worker reads it.
        """
        return self._control(control.CANCEL, defer_id, None, reason, timeout, wait)

    def reschedule(
        self,
        defer_id: str,
        *,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        reason: str = "",
        timeout: float | None = None,
        wait: bool = True,
    ) -> control.ControlResult:
        """Move a pending deferral to ``now + delay`` or to ``at`` (exactly one of them).

        It stays in the tier that holds it. Answers like :meth:`cancel`, with ``rescheduled``.
        """
        now = now_ms()
        if (delay is None) == (at is None):
            raise ValidationError("exactly one of delay and at is required")
        if at is not None:
            if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
                raise ValidationError("at: a timezone-aware datetime is required")
            due = to_ms(at)
        else:
            delay_s = _delay_seconds(delay)
            if not math.isfinite(delay_s) or delay_s < 0:
                raise ValidationError(f"delay: must be a finite number >= 0, got {delay_s!r}")
            due = now + round(delay_s * 1000)
        if (due - now) / 1000 > self._config.defer.max_delay:
            raise ValidationError(
                f"the new due time is past the maximum delay of "
                f"{self._config.defer.max_delay:.0f}s (defer.max_delay)"
            )
        return self._control(control.RESCHEDULE, defer_id, max(due, 0), reason, timeout, wait)

    def _control(
        self,
        op: str,
        defer_id: str,
        due_ms: int | None,
        reason: str,
        timeout: float | None,
        wait: bool,
    ) -> control.ControlResult:
        if not isinstance(defer_id, str) or not defer_id or len(defer_id) > MAX_DEFER_ID_CHARS:
            raise ValidationError(f"defer_id: 1..{MAX_DEFER_ID_CHARS} characters required")
        if not isinstance(reason, str):
            raise ValidationError("reason: must be a string")
        return control.request(
            self._config,
            self._producer,
            op=op,
            defer_id=defer_id,
            due_at_ms=due_ms,
            reason=reason,
            timeout=self._config.monitor.control_timeout if timeout is None else timeout,
            wait=wait,
        )

    def flush(self, timeout: float = DELIVERY_TIMEOUT_S) -> int:
        return int(self._producer.flush(timeout))

    def close(self) -> None:
        """Send what is queued, then close the producer: left to the garbage collector, its
        threads go on connecting to the brokers, for good if anything still refers to it."""
        if self._closed:
            return
        self._closed = True
        try:
            self._producer.flush(DELIVERY_TIMEOUT_S)
        finally:
            self._producer.close()

    def __enter__(self) -> DeferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _attempt(a: Attempt) -> dict[str, Any]:
    return {"attempt": a.attempt, "at": to_ms(a.at), "reason": a.reason}
