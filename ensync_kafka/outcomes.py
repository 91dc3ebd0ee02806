"""What becomes of the events a :class:`~ensync_kafka.PriorityConsumer` did not simply handle.

Return: handled. Raise: a failed attempt, deferred again through the DEFER pipeline after the
backoff (attempt + 1, the failure appended to the history, priority, queue, key, payload and
headers kept); after ``max_attempts`` the event goes to ``{prefix}.dead`` and the alert hook is
called. :class:`~ensync_kafka.Retry`, :class:`~ensync_kafka.Postpone` and
:class:`~ensync_kafka.Drop` choose the outcome explicitly. A record that cannot be decoded is
quarantined in ``{prefix}.invalid``. Every outcome but success is audited, and every step is one
structured line on the ``ensync_kafka.consumer`` logger.

Everything here is written through the consumer's producer; :meth:`OutcomeWriter.flush` waits
for the broker's acknowledgement, which the consumer does before it commits an offset.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, Message, Producer

from . import audit
from .client import DeferClient
from .codec import DEAD, INVALID
from .config import Config, RetryPolicyConfig
from .dead import DeadLetter, dead_record
from .exceptions import BrokerError, ValidationError
from .models import Attempt, DeferRequest, DeliveredEvent, Receipt, from_ms, now_ms, to_ms
from .retry import backoff_delay, chain_of, postpone_id, redefer_request, retry_id
from .topics import TopicNames

if TYPE_CHECKING:
    from .consumer import ConsumerStats

log = logging.getLogger("ensync_kafka.consumer")  # the consumer's logger: its steps are these

AlertHook = Callable[[DeadLetter], object]

FLUSH_TIMEOUT_S = 30.0
TRACEBACK_FRAMES = 12
MAX_TRACEBACK_CHARS = 8000
MAX_REASON_CHARS = 1000


class OutcomeWriter:
    """Re-deferrals, dead letters, quarantined records and audit records of one consumer."""

    def __init__(
        self,
        config: Config,
        *,
        names: TopicNames,
        group: str,
        producer: Producer,
        client: DeferClient,
        alert: AlertHook | None,
        stats: ConsumerStats,
    ) -> None:
        self.config = config
        self.names = names
        self.group = group
        self.stats = stats
        self._producer = producer
        self._client = client
        self._alert = alert
        self._failures: list[KafkaError] = []

    def policy(self, event: DeliveredEvent) -> RetryPolicyConfig:
        return self.config.consumer.retry.for_event(event.name)

    # -- producing ------------------------------------------------------------------------------

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failures.append(err)

    def _emit(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Any = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        callback = on_delivery or self._on_delivery
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=callback
                )
                return
            except BufferError:
                self._producer.poll(0.05)

    def flush(self) -> None:
        """Wait until the broker acknowledged everything written; raise if anything failed."""
        remaining = self._producer.flush(FLUSH_TIMEOUT_S)
        if remaining or self._failures:
            err = self._failures[0] if self._failures else None
            detail = err.str() if err else f"{remaining} records not acknowledged"
            self._failures.clear()
            code = err.code() if err is not None else None
            raise BrokerError(f"consumer group {self.group}: {detail}", code=code)

    def audit(
        self, event_type: str, event: DeliveredEvent, reason: str, receipt: Receipt | None = None
    ) -> None:
        deferral = {
            "name": event.name,
            "queue": event.queue,
            "priority": event.priority,
            "due_at": to_ms(receipt.due_at) if receipt else to_ms(event.due_at),
            "attempt": event.attempt,
        }
        value = audit.audit_value(
            event_type,
            defer_id=event.defer_id,
            at_ms=now_ms(),
            reason=reason,
            deferral=deferral,
            actor=f"consumer:{self.group}",
        )
        self._emit(self.names.audit, event.defer_id.encode(), value)

    # -- outcomes -------------------------------------------------------------------------------

    def failed(
        self, event: DeliveredEvent, reason: str, exc: BaseException, delay: float | None
    ) -> None:
        """A failed attempt: defer it again after ``delay`` (default: the backoff), or dead."""
        reason = reason[:MAX_REASON_CHARS]
        policy = self.policy(event)
        history = (*event.history, _attempt(event, reason))
        if event.attempt >= policy.max_attempts:
            self.dead(event, reason, exc, history)
            return
        chain = chain_of(event.defer_id, event.headers)
        if delay is None:
            delay = backoff_delay(policy, event.attempt, chain)
        delay = min(delay, self.config.defer.max_delay)
        request = redefer_request(
            event,
            defer_id=retry_id(chain, event.attempt + 1),
            chain=chain,
            delay=delay,
            reason=f"retry: {reason}",
            attempt=event.attempt + 1,
            history=history,
        )
        try:
            receipt = self._send(request)
        except ValidationError as invalid:  # e.g. its queue is no longer configured
            self.dead(event, f"{reason} (cannot be retried: {invalid})", exc, history)
            return
        self.audit(audit.RETRIED, event, reason, receipt)
        self.stats.retried += 1
        log_step(
            logging.WARNING,
            "retrying",
            event,
            next_attempt=event.attempt + 1,
            of=policy.max_attempts,
            delay_s=round(delay, 3),
            retry_id=receipt.defer_id,
            reason=reason,
        )

    def postpone(
        self,
        event: DeliveredEvent,
        delay: float,
        reason: str,
        event_type: str,
        *,
        partition: int,
        offset: int,
    ) -> None:
        """Defer the event again, same attempt (``partition``/``offset``: where it was read)."""
        chain = chain_of(event.defer_id, event.headers)
        request = redefer_request(
            event,
            defer_id=postpone_id(chain, partition, offset),
            chain=chain,
            delay=min(delay, self.config.defer.max_delay),
            reason=reason,
            attempt=event.attempt,
            history=event.history,
        )
        try:
            receipt = self._send(request)
        except ValidationError as invalid:
            why = f"{reason} (cannot be deferred: {invalid})"
            self.dead(event, why, invalid, (*event.history, _attempt(event, why)))
            return
        self.audit(event_type, event, reason, receipt)
        outcome = "shed" if event_type == audit.SHED else "postponed"
        log_step(
            logging.INFO,
            "skipping",
            event,
            outcome=outcome,
            delay_s=round(delay, 3),
            until=receipt.due_at.isoformat(),
            reason=reason,
        )

    def _send(self, request: DeferRequest) -> Receipt:
        """Defer and wait for the broker's acknowledgement (before the offset is committed)."""
        return self._client.defer_many([request])[0]

    def dead(
        self,
        event: DeliveredEvent,
        reason: str,
        exc: BaseException,
        history: tuple[Attempt, ...],
    ) -> None:
        """Write the dead letter and its audit record, wait for both, then call the alert hook."""
        summary = "".join(traceback.format_exception(exc, limit=-TRACEBACK_FRAMES))
        record = dead_record(
            event,
            error=reason,
            traceback=summary[-MAX_TRACEBACK_CHARS:],
            history=history,
            dead_at_ms=now_ms(),
            group=self.group,
        )
        position: list[tuple[int, int]] = []

        def on_dead(err: KafkaError | None, msg: Message) -> None:
            partition, offset = msg.partition(), msg.offset()
            if err is not None:
                self._failures.append(err)
            elif partition is not None and offset is not None:
                position.append((partition, offset))

        value = DEAD.encode(record)
        self._emit(self.names.dead, event.defer_id.encode(), value, list(event.headers), on_dead)
        self.audit(audit.DEAD, event, reason)
        self.flush()
        self.stats.dead += 1
        partition, offset = position[0] if position else (-1, -1)
        letter = DeadLetter.from_record(record, partition=partition, offset=offset)
        log_step(
            logging.ERROR,
            "dead",
            event,
            attempts=len(history),
            topic=self.names.dead,
            reason=reason,
        )
        if self._alert is not None:
            try:
                self._alert(letter)
            except Exception:
                log.exception("consumer group %s: the alert hook failed", self.group)

    def quarantine(self, msg: Message, tp: tuple[str, int], offset: int, reason: str) -> None:
        """A record that is not a DeliveredEvent: to ``{prefix}.invalid``, with the reason."""
        value = INVALID.encode(
            {
                "source_topic": tp[0],
                "source_partition": tp[1],
                "source_offset": offset,
                "key": msg.key(),
                "value": msg.value(),
                "reason": reason,
                "rejected_at": now_ms(),
            }
        )
        self._emit(self.names.invalid, msg.key(), value)
        self.stats.invalid += 1
        log.warning(
            "consumer group %s: quarantined %s[%d]@%d: %s",
            self.group,
            tp[0],
            tp[1],
            offset,
            reason,
        )


def _attempt(event: DeliveredEvent, reason: str) -> Attempt:
    return Attempt(attempt=event.attempt, at=from_ms(now_ms()), reason=reason)


# -- logging --------------------------------------------------------------------------------------


def log_step(level: int, step: str, event: DeliveredEvent, **fields: Any) -> None:
    """One structured line: ``step event=… defer_id=… attempt=… priority=… queue=… k=v…``."""
    if not log.isEnabledFor(level):
        return
    base = {
        "event": event.name,
        "defer_id": event.defer_id,
        "attempt": event.attempt,
        "priority": event.priority,
        "queue": event.queue,
    }
    pairs = " ".join(f"{k}={_fmt(v)}" for k, v in {**base, **fields}.items())
    log.log(
        level,
        "%s %s",
        step,
        pairs,
        extra={"step": step, **base, **fields},
    )


def _fmt(value: Any) -> str:
    text = str(value)
    return repr(text) if (" " in text or not text) else text
