"""cancel and reschedule through the worker's transactional path (real Kafka).

"Never delivered" is checked without sleep-and-hope: a sentinel deferral due *after* the one
under test is awaited; the worker releases in due order across its partitions, so once the
sentinel is out, anything due before it that was going to be released has been.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from ensync_kafka import DeferClient, ensure_topics
from ensync_kafka.codec import DELIVERED, INVALID
from ensync_kafka.config import Config, config_from_mapping
from ensync_kafka.control import CONTROL, OP_HEADER
from ensync_kafka.models import to_ms
from ensync_kafka.topics import TopicNames
from tests.helpers import WorkerThread

WAIT_S = 30.0


def _config(bootstrap: str, prefix: str, state: Path) -> Config:
    return config_from_mapping(
        {
            "prefix": prefix,
            "kafka": {"bootstrap_servers": bootstrap},
            "tiers": {"1s": "1s", "10s": "10s"},
            "topics": {
                "defer": {"partitions": 3},
                "priority": {"partitions": 1},
                "audit": {"partitions": 1},
                "invalid": {"partitions": 1},
            },
            "worker": {"id": "w1", "state_dir": str(state)},
            "monitor": {"port": "auto", "control_timeout": "20s"},
        },
        environ={},
    )


class Deliveries:
    """Reads every priority topic of the default queue, read_committed, from the beginning."""

    def __init__(self, config: Config) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": config.bootstrap_servers,
                "group.id": f"test-{uuid.uuid4().hex}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
            }
        )
        topics = TopicNames(config.prefix).queue("default")
        self.consumer.assign([TopicPartition(t, 0, OFFSET_BEGINNING) for t in topics])
        self.seen: dict[str, list[dict[str, object]]] = {}

    def until(self, defer_id: str, timeout: float = WAIT_S) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while defer_id not in self.seen:
            if time.monotonic() > deadline:
                pytest.fail(f"{defer_id} not delivered within {timeout:.0f}s")
            for msg in self.consumer.consume(100, 0.2):
                if msg.error() is None:
                    rec = DELIVERED.decode(msg.value())
                    self.seen.setdefault(rec["defer_id"], []).append(rec)
        return self.seen[defer_id][0]

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def setup(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> Iterator[tuple[Config, DeferClient, Deliveries]]:
    config = _config(kafka_bootstrap, unique_prefix, tmp_path)
    assert ensure_topics(config).ok
    client = DeferClient(config)
    deliveries = Deliveries(config)
    with WorkerThread(config):
        yield config, client, deliveries
    deliveries.close()
    client.close()


def test_cancel_before_due_is_never_delivered_and_after_is_reported_delivered(
    setup: tuple[Config, DeferClient, Deliveries],
) -> None:
    _, client, deliveries = setup
    doomed = client.defer("doomed", {"n": 1}, delay=3.0, reason="to be cancelled")
    result = client.cancel(doomed.defer_id, reason="customer changed their mind")
    assert result.outcome == "cancelled" and result.done
    assert result.tiers == {"1s": "unknown", "10s": "cancelled"}
    assert not result.missing

    # A late re-send of the same id must not resurrect it.
    client.defer("doomed", {"n": 1}, delay=3.0, defer_id=doomed.defer_id)
    sentinel = client.defer("sentinel", {}, delay=4.5)
    deliveries.until(sentinel.defer_id)
    assert doomed.defer_id not in deliveries.seen

    again = client.cancel(doomed.defer_id)
    assert again.outcome == "already_cancelled" and not again.done
    late = client.cancel(sentinel.defer_id)
    assert late.outcome == "already_delivered"
    assert late.tiers == {"1s": "unknown", "10s": "already_delivered"}
    assert client.cancel(f"never-{uuid.uuid4().hex}").outcome == "unknown"


def test_reschedule_moves_delivery(setup: tuple[Config, DeferClient, Deliveries]) -> None:
    _, client, deliveries = setup
    early = client.defer("moved.earlier", {}, delay=300.0, priority=4)
    later = client.defer("moved.later", {}, delay=2.0)
    sooner = client.reschedule(early.defer_id, delay=1.0, reason="ops asked")
    assert sooner.outcome == "rescheduled" and sooner.due_at is not None
    postponed = client.reschedule(later.defer_id, delay=120.0)
    assert postponed.outcome == "rescheduled"

    delivered = deliveries.until(early.defer_id, timeout=15.0)
    assert delivered["due_at"] == to_ms(sooner.due_at)
    assert delivered["priority"] == 4
    sentinel = client.defer("sentinel", {}, delay=3.5)
    deliveries.until(sentinel.defer_id)
    assert later.defer_id not in deliveries.seen
    # Once delivered it cannot move any more.
    assert client.reschedule(early.defer_id, delay=10.0).outcome == "already_delivered"


def test_malformed_control_is_quarantined(
    setup: tuple[Config, DeferClient, Deliveries],
) -> None:
    config, client, deliveries = setup
    names = TopicNames(config.prefix)
    producer = Producer({"bootstrap.servers": config.bootstrap_servers})
    bad_value = b"not avro at all"
    good_value = CONTROL.encode(
        {
            "op": "CANCEL",
            "defer_id": "x1",
            "request_id": "r1",
            "due_at": None,
            "at": 0,
            "reason": "",
            "actor": "",
        }
    )
    producer.produce(
        names.defer("10s"), key=b"x1", value=bad_value, headers=[(OP_HEADER, b"cancel")]
    )
    producer.produce(
        names.defer("10s"), key=b"x2", value=good_value, headers=[(OP_HEADER, b"cancel")]
    )  # key differs from its defer_id: would land on the wrong partition
    producer.produce(
        names.defer("10s"), key=b"x1", value=good_value, headers=[(OP_HEADER, b"explode")]
    )
    assert producer.flush(10) == 0
    invalid = Consumer(
        {
            "bootstrap.servers": config.bootstrap_servers,
            "group.id": f"test-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
        }
    )
    invalid.assign([TopicPartition(names.invalid, 0, OFFSET_BEGINNING)])
    reasons: list[str] = []
    deadline = time.monotonic() + WAIT_S
    try:
        while len(reasons) < 3 and time.monotonic() < deadline:
            for msg in invalid.consume(10, 0.2):
                if msg.error() is None:
                    reasons.append(INVALID.decode(msg.value())["reason"])
    finally:
        invalid.close()
    assert len(reasons) == 3, reasons
    assert any("cannot decode Control" in r or "not an ensync Control" in r for r in reasons)
    assert any("key must be its defer_id" in r for r in reasons)
    assert any("unknown control op" in r for r in reasons)
    # The worker carries on.
    sentinel = client.defer("after.garbage", {}, delay=0.1)
    deliveries.until(sentinel.defer_id)
