"""The worker registry: who serves which tier partitions, on the compacted ``{prefix}.workers``.

Each worker with an HTTP server announces itself (host, port, tiers and assigned partitions)
keyed by its worker id, again on every assignment change and every ``monitor.announce_interval``,
and writes a tombstone when it stops. A reader replays the topic into the latest announcement
per worker: the interactive-query pattern of Kafka Streams, where a client finds the instance
that holds a key and asks it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from ._kafka import reader
from .codec import Codec
from .config import Config
from .exceptions import BrokerError, SerializationError
from .models import from_ms, now_ms
from .topics import TopicNames

ANNOUNCEMENT = Codec("WorkerAnnouncement")
READ_TIMEOUT_S = 10.0
FLUSH_TIMEOUT_S = 10.0

log = logging.getLogger("ensync_kafka.registry")


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerInfo:
    """One announced worker."""

    worker_id: str
    host: str
    port: int
    tiers: dict[str, tuple[int, ...]]
    """Tier name -> assigned partitions."""
    restoring: dict[str, tuple[int, ...]]
    started_at_ms: int
    at_ms: int
    version: str = ""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "url": self.url,
            "tiers": {t: list(ps) for t, ps in self.tiers.items()},
            "restoring": {t: list(ps) for t, ps in self.restoring.items() if ps},
            "started_at": from_ms(self.started_at_ms).isoformat(),
            "announced_at": from_ms(self.at_ms).isoformat(),
        }

    def encode(self) -> bytes:
        return ANNOUNCEMENT.encode(
            {
                "worker_id": self.worker_id,
                "host": self.host,
                "port": self.port,
                "tiers": [
                    {
                        "tier": tier,
                        "partitions": list(partitions),
                        "restoring": list(self.restoring.get(tier, ())),
                    }
                    for tier, partitions in self.tiers.items()
                ],
                "started_at": self.started_at_ms,
                "at": self.at_ms,
                "version": self.version,
            }
        )

    @classmethod
    def decode(cls, value: bytes) -> WorkerInfo:
        rec = ANNOUNCEMENT.decode(value)
        return cls(
            worker_id=rec["worker_id"],
            host=rec["host"],
            port=rec["port"],
            tiers={t["tier"]: tuple(t["partitions"]) for t in rec["tiers"]},
            restoring={t["tier"]: tuple(t["restoring"]) for t in rec["tiers"]},
            started_at_ms=rec["started_at"],
            at_ms=rec["at"],
            version=rec["version"],
        )


class Announcer:
    """Publishes this worker's announcements and its final tombstone."""

    def __init__(self, config: Config) -> None:
        self.topic = TopicNames(config.prefix).workers
        self.worker_id = config.worker.id
        self._failures: list[str] = []
        self._exists = False
        self._warned = False
        self._producer = Producer(
            {
                **config.kafka.client_settings(),
                "enable.idempotence": "true",
                "acks": "all",
                "linger.ms": "0",
            }
        )

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._failures.append(err.str())

    def announce(self, info: WorkerInfo) -> None:
        self._send(info.encode())

    def withdraw(self) -> None:
        self._send(None)

    def _topic_exists(self) -> bool:
        # Never produce to a missing topic: a broker with auto.create.topics.enable would make
        # it with the delete policy instead of compaction. A full listing creates nothing.
        if not self._exists:
            try:
                self._exists = self.topic in self._producer.list_topics(timeout=5).topics
            except KafkaException as exc:
                log.debug("listing topics: %s", exc)
            if not self._exists and not self._warned:
                self._warned = True
                log.warning(
                    "%s does not exist: this worker is not announced (run `ensync-kafka topics "
                    "create`)",
                    self.topic,
                )
        return self._exists

    def _send(self, value: bytes | None) -> None:
        if not self._topic_exists():
            return
        self._producer.produce(
            self.topic, key=self.worker_id.encode(), value=value, on_delivery=self._on_delivery
        )
        self._producer.poll(0)
        if self._failures:
            failures, self._failures = self._failures, []
            log.warning("cannot announce worker on %s: %s", self.topic, failures[-1])

    def close(self) -> None:
        self._producer.flush(FLUSH_TIMEOUT_S)
        if self._failures:
            log.warning("worker registry %s: %s", self.topic, self._failures[-1])


class RegistryReader:
    """Replays ``{prefix}.workers`` into the latest announcement per worker.

    Keeps one consumer and reads only what is new on each :meth:`workers` call. Thread-safe.
    """

    def __init__(self, config: Config) -> None:
        self.topic = TopicNames(config.prefix).workers
        self._lock = threading.Lock()
        self._known: dict[str, WorkerInfo] = {}
        self._consumer = reader(config, "registry-reader", {"fetch.wait.max.ms": 10})
        self._assigned = False
        self._open: set[int] = set()

    def _assign(self) -> None:
        meta = self._consumer.list_topics(self.topic, timeout=READ_TIMEOUT_S)
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise BrokerError(f"{self.topic}: no such topic (run `ensync-kafka topics create`)")
        self._open = set(topic.partitions)
        self._consumer.assign(
            [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(self._open)]
        )
        self._assigned = True

    def workers(self, timeout: float = READ_TIMEOUT_S) -> list[WorkerInfo]:
        """Every announced, not withdrawn, worker, by id: the topic read up to its end."""
        with self._lock:
            if not self._assigned:
                self._assign()
            deadline = time.monotonic() + timeout
            ends = {p: self._end(p, deadline) for p in self._open}
            while time.monotonic() < deadline:
                positions = self._consumer.position(
                    [TopicPartition(self.topic, p) for p in self._open]
                )
                behind = [tp for tp in positions if tp.offset < ends[tp.partition]]
                if not behind:
                    break
                for msg in self._consumer.consume(1000, 0.1):
                    if msg.error() is not None:
                        continue
                    self._apply(msg.key(), msg.value())
            return sorted(self._known.values(), key=lambda w: w.worker_id)

    def _end(self, partition: int, deadline: float) -> int:
        """The partition's end offset, retrying while its leader is being elected."""
        while True:
            try:
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition),
                    timeout=max(0.1, deadline - time.monotonic()),
                )
                return int(high)
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                # Not only retriable() ones: a fresh topic answers NOT_LEADER for a moment.
                if time.monotonic() >= deadline:
                    raise BrokerError(f"{self.topic}: {err.str()}", code=err.code()) from exc
                time.sleep(0.1)

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        worker_id = (key or b"").decode(errors="replace")
        if value is None:
            self._known.pop(worker_id, None)
            return
        try:
            self._known[worker_id] = WorkerInfo.decode(value)
        except SerializationError as exc:
            log.warning("%s: skipping an unreadable announcement: %s", self.topic, exc)

    def close(self) -> None:
        with self._lock:
            self._consumer.close()


def snapshot(
    worker_id: str,
    host: str,
    port: int,
    tiers: dict[str, tuple[int, ...]],
    restoring: dict[str, tuple[int, ...]],
    started_at_ms: int,
    version: str = "",
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        host=host,
        port=port,
        tiers=tiers,
        restoring=restoring,
        started_at_ms=started_at_ms,
        at_ms=now_ms(),
        version=version,
    )
