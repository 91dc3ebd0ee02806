"""Small helpers at the confluent-kafka boundary."""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException, Message


def where(msg: Message) -> tuple[int, int]:
    """(partition, offset) of a consumed record; librdkafka sets both on every one."""
    p, offset = msg.partition(), msg.offset()
    assert p is not None and offset is not None
    return p, offset


def retrying(call: Callable[[], None], attempts: int = 3) -> None:
    """Repeat a transactional call on a retriable error, as librdkafka asks; an abortable or
    fatal error propagates (a commit that timed out may have succeeded: it must not be aborted)."""
    for attempt in range(attempts):
        try:
            call()
            return
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if not err.retriable() or attempt == attempts - 1:
                raise
