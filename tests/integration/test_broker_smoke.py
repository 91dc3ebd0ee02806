"""The test broker is a real Kafka: Admin API, produce/consume, and transactions."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

TIMEOUT_S = 30.0


def _create_topic(admin: AdminClient, name: str, partitions: int = 1) -> None:
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1)], operation_timeout=30
    )
    futures[name].result(timeout=TIMEOUT_S)
    # The controller has it now; brokers publish metadata asynchronously (KRaft), so await it.
    deadline = time.monotonic() + TIMEOUT_S
    while name not in admin.list_topics(timeout=TIMEOUT_S).topics:
        if time.monotonic() >= deadline:
            pytest.fail(f"topic {name} created but not in metadata after {TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def _drain(consumer: Consumer, done: Callable[[list[bytes]], bool], what: str) -> list[bytes]:
    """Poll until ``done(values)``; fail (never hang) after TIMEOUT_S."""
    values: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not done(values):
            if time.monotonic() >= deadline:
                pytest.fail(f"{what}: timed out after {TIMEOUT_S:.0f} s with {values!r}")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            values.append(msg.value())
    finally:
        consumer.close()
    return values


def _reader(bootstrap: str, topic: str, isolation: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}-{isolation}",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    return consumer


def test_admin_produce_and_consume_in_a_group(
    kafka_bootstrap: str, admin: AdminClient, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}.smoke"
    _create_topic(admin, topic, partitions=3)
    assert topic in admin.list_topics(timeout=TIMEOUT_S).topics

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    sent = [f"m{i}".encode() for i in range(10)]
    for value in sent:
        producer.produce(topic, key=value, value=value)
    assert producer.flush(TIMEOUT_S) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"{unique_prefix}-group",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])  # a real consumer group: group coordinator, offsets topic
    received = _drain(consumer, lambda got: len(got) >= len(sent), "group consumer")
    assert sorted(received) == sorted(sent)


def test_read_committed_sees_committed_transactions_only(
    kafka_bootstrap: str, admin: AdminClient, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}.tx"
    _create_topic(admin, topic)
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{unique_prefix}-tx"}
    )
    producer.init_transactions(TIMEOUT_S)
    for value, commit in ((b"committed-1", True), (b"aborted", False), (b"committed-2", True)):
        producer.begin_transaction()
        producer.produce(topic, key=value, value=value)
        if commit:
            producer.commit_transaction(TIMEOUT_S)
        else:
            producer.flush(TIMEOUT_S)  # the aborted record really reaches the log
            producer.abort_transaction(TIMEOUT_S)

    # The last committed record comes after the aborted one: once a reader has it, it has
    # seen everything it will ever see before it.
    committed = _drain(
        _reader(kafka_bootstrap, topic, "read_committed"),
        lambda got: b"committed-2" in got,
        "read_committed consumer",
    )
    assert committed == [b"committed-1", b"committed-2"]

    uncommitted = _drain(
        _reader(kafka_bootstrap, topic, "read_uncommitted"),
        lambda got: b"committed-2" in got,
        "read_uncommitted consumer",
    )
    assert uncommitted == [b"committed-1", b"aborted", b"committed-2"]
