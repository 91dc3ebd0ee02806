"""Small helpers at the confluent-kafka boundary."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from .config import Config


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


def reader(config: Config, purpose: str, settings: Mapping[str, Any] | None = None) -> Consumer:
    """A consumer for reading with ``assign()``: it never joins a group nor commits, but
    librdkafka wants a group.id all the same, so it gets a throwaway one. read_committed (also
    librdkafka's default): aborted transactions' records are never seen."""
    return Consumer(
        {
            **config.kafka.client_settings(),
            "group.id": f"{config.prefix}.{purpose}.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            **(settings or {}),
        }
    )
