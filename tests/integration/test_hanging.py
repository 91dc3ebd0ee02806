"""Open and hanging transactions found on a real broker (hanging.py, ``topics hanging``)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from ensync_kafka import ensure_topics
from ensync_kafka.hanging import (
    OFFSETS_TOPIC,
    StabilityWatch,
    find_hanging,
    offsets_partition,
    open_transactions,
    plan_repairs,
)
from ensync_kafka.models import now_ms
from ensync_kafka.settle import AbortSettle
from ensync_kafka.topics import TopicNames
from tests.helpers import pipeline_config, transactional_producer, wait_until

WAIT_S = 30.0


@contextmanager
def open_transaction(bootstrap: str) -> Iterator[Producer]:
    """A transaction begun and left open; committed on the way out."""
    producer = transactional_producer(bootstrap)
    producer.begin_transaction()
    try:
        yield producer
    finally:
        producer.commit_transaction(30)


def test_an_open_transaction_is_found_from_its_first_record(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path)
    assert ensure_topics(config).ok
    topic = TopicNames(unique_prefix).state("1s")
    partitions = [(topic, 0), (topic, 1)]
    plain = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(3):
        plain.produce(topic, b"committed", f"k{i}".encode(), partition=0)
    assert plain.flush(30) == 0
    assert open_transactions(config, partitions) == []

    before = now_ms()
    with open_transaction(kafka_bootstrap) as txn:
        for i in range(2):
            txn.produce(topic, b"open", f"t{i}".encode(), partition=0)
        assert txn.flush(30) == 0
        found = open_transactions(config, partitions)
        assert [(t.topic, t.partition, t.start_offset, t.end_offset) for t in found] == [
            (topic, 0, 3, 5)
        ]
        assert found[0].started_ms is not None and before <= found[0].started_ms <= now_ms()
    # The commit's markers are written after commit_transaction returns.
    wait_until(
        lambda: open_transactions(config, partitions) == [],
        timeout=WAIT_S,
        what="the committed transaction's partition to be stable again",
    )


def test_pending_offsets_are_found_in_their_groups_offsets_partition(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, admin: AdminClient
) -> None:
    """What stalled a tier after a broker restart: offsets committed in a transaction whose
    markers never came. Three groups on different partitions of __consumer_offsets, so the
    partition found is Kafka's, not a lucky guess."""
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path)
    assert ensure_topics(config).ok
    count = len(admin.list_topics(OFFSETS_TOPIC, timeout=10).topics[OFFSETS_TOPIC].partitions)
    groups: dict[int, str] = {}
    while len(groups) < min(3, count):
        group = f"{unique_prefix}.app.{uuid.uuid4().hex[:6]}"
        groups.setdefault(offsets_partition(group, count), group)
    source = TopicNames(unique_prefix).defer("1s")
    with open_transaction(kafka_bootstrap) as txn:
        for group in groups.values():
            metadata = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
            txn.send_offsets_to_transaction(
                [TopicPartition(source, 0, 1)], metadata.consumer_group_metadata(), 30
            )
            metadata.close()
        report = find_hanging(config, groups=groups.values(), max_age_s=0.0)
        hanging = {(t.topic, t.partition) for t in report.hanging}
        for p in groups:
            assert (OFFSETS_TOPIC, p) in report.checked
            assert (OFFSETS_TOPIC, p) in hanging, f"{groups[p]} -> partition {p}: {report}"
        # Past the broker's transaction.max.timeout.ms (15 min) nothing here is hanging.
        assert find_hanging(config, groups=groups.values()).hanging == []


def test_the_watch_reports_a_stable_offset_that_stands_still(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path)
    assert ensure_topics(config).ok
    topic = TopicNames(unique_prefix).state("1s")
    partitions = [(topic, p) for p in range(3)]
    watch = StabilityWatch(config, hanging_after_s=0.5)
    assert watch.check(partitions) == {}
    with open_transaction(kafka_bootstrap) as txn:
        txn.produce(topic, b"open", b"k", partition=2)
        assert txn.flush(30) == 0
        first = watch.check(partitions)
        assert list(first) == [(topic, 2)]
        time.sleep(1.0)  # the age itself is under test: time has to pass
        with caplog.at_level(logging.ERROR, logger="ensync_kafka.hanging"):
            second = watch.check(partitions)
        assert second[(topic, 2)] >= first[(topic, 2)] + 1.0
        assert f"{topic}[2]: a transaction has stayed open from offset 0" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="ensync_kafka.hanging"):
            watch.check(partitions)
        assert caplog.text == ""  # once per transaction
    wait_until(
        lambda: watch.check(partitions) == {},
        timeout=WAIT_S,
        what="the watch to see the partition stable again",
    )


def test_a_repair_rewinds_the_tier_group_to_before_the_hanging_offsets(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """The positions printed are those the group had committed before the transaction that
    hangs on its offsets: what the aborted turn started reading from."""
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path)
    assert ensure_topics(config).ok
    names = TopicNames(unique_prefix)
    group, topic = names.worker_group("1s"), names.defer("1s")
    committer = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    committer.commit(
        offsets=[TopicPartition(topic, 0, 5), TopicPartition(topic, 1, 7)], asynchronous=False
    )
    committer.commit(offsets=[TopicPartition(topic, 0, 9)], asynchronous=False)
    with open_transaction(kafka_bootstrap) as txn:
        txn.produce(names.state("1s"), b"open", b"k", partition=0)
        txn.send_offsets_to_transaction(
            [TopicPartition(topic, p, 20 + p) for p in range(3)],
            committer.consumer_group_metadata(),
            30,
        )
        report = find_hanging(config, max_age_s=0.0)
        repairs = {r.tier: r for r in plan_repairs(config, report)}
        assert repairs["1s"].rewind == {0: 9, 1: 7, 2: None}
        assert f"--topic {topic}:2 --to-earliest --execute" in repairs["1s"].commands("b")[2]
    committer.close()


def test_after_an_abort_a_tier_writes_again_only_once_nothing_is_left_open_where_it_writes(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """AbortSettle: settled at once when nothing is open; while a transaction stays open on a
    partition the tier writes it waits, says so once that outlasts any transaction of ours, and
    goes on when it ends; a stop ends the wait."""
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path)
    assert ensure_topics(config).ok
    settle = AbortSettle(config, "1s", hanging_after_s=0.5)
    stop = threading.Event()
    assert settle.wait(stop)
    topic = TopicNames(unique_prefix).priority("default", 3)
    settled = threading.Event()
    waiter = threading.Thread(target=lambda: settle.wait(stop) and settled.set())
    with open_transaction(kafka_bootstrap) as txn:
        txn.produce(topic, b"open", partition=1)
        assert txn.flush(30) == 0
        waiter.start()
        wait_until(lambda: "still open on" in caplog.text, timeout=WAIT_S, what="the error")
        assert f"{topic}[1]@" in caplog.text
        assert not settled.is_set()
    waiter.join(WAIT_S)  # committed on the way out
    assert settled.is_set()
    with open_transaction(kafka_bootstrap) as txn:
        txn.produce(topic, b"open", partition=1)
        assert txn.flush(30) == 0
        stop.set()
        assert not settle.wait(stop)
