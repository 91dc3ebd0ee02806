"""What an abort hid, written again only for turns that committed (republish.py; real Kafka).

The shape a broker restart left once: a turn whose changelog records got their commit markers
while its records on three priority partitions were left hanging, then aborted with Kafka's tool
(three deliveries lost). Simulated here: the turn's deliveries and audit records aborted, its
changelog markers committed; beside them hidden deliveries of a turn that did not commit (no
marker, or a redo's), of one redone with the same stamp and delivered, and a visible one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from ensync_kafka import BrokerError, ensure_topics
from ensync_kafka.audit import DELIVERED as AUDIT_DELIVERED
from ensync_kafka.audit import audit_value
from ensync_kafka.codec import DELIVERED, delivered_from_deferral, marker_tail, marker_value
from ensync_kafka.hanging import stable_offsets
from ensync_kafka.models import now_ms
from ensync_kafka.republish import hidden_records, republish
from ensync_kafka.state import MARKER_PREFIX, TIMER, timer_key
from ensync_kafka.topics import TopicNames
from tests.helpers import TopicReader, pipeline_config, raw_deferral, transactional_producer

WAIT_S = 30.0


def test_only_deliveries_of_committed_turns_are_written_again(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path)
    assert ensure_topics(config).ok
    names = TopicNames(unique_prefix)
    topic, changelog = names.priority("default", 3), names.state("1s")
    stamp = now_ms()

    def delivery(defer_id: str, at: int) -> bytes:
        return delivered_from_deferral(raw_deferral(defer_id, priority=3), at, "1s")

    def audit(defer_id: str, at: int) -> bytes:
        return audit_value(AUDIT_DELIVERED, defer_id=defer_id, at_ms=at, tier="1s")

    plain = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    plain.produce(topic, delivery("visible", stamp), b"visible", 0)
    # The turn that committed: its changelog marker counts, its records here were aborted.
    plain.produce(
        changelog,
        marker_value(b"kept", marker_tail("DELIVERED", stamp)),
        MARKER_PREFIX + b"kept",
        1,
    )
    # A turn redone after an abort: its marker carries the later turn's stamp.
    plain.produce(
        changelog,
        marker_value(b"redone", marker_tail("DELIVERED", stamp + 40)),
        MARKER_PREFIX + b"redone",
        2,
    )
    # Aborted and redone within the lookahead: the same stamp, and the redo already delivered.
    plain.produce(
        changelog,
        marker_value(b"again", marker_tail("DELIVERED", stamp)),
        MARKER_PREFIX + b"again",
        0,
    )
    plain.produce(topic, delivery("again", stamp), b"again", 1)
    plain.produce(names.audit, audit("again", stamp), b"again", 0)  # its only partition
    assert plain.flush(30) == 0
    aborted = transactional_producer(kafka_bootstrap)
    aborted.begin_transaction()
    for defer_id in ("kept", "redone", "never", "again"):  # "never": no marker at all
        aborted.produce(topic, delivery(defer_id, stamp), defer_id.encode(), 0)
        aborted.produce(names.audit, audit(defer_id, stamp), defer_id.encode(), 0)
    assert aborted.flush(30) == 0
    aborted.abort_transaction(30)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})

    def end_of(t: str) -> int:
        return stable_offsets(admin, [(t, 0)])[(t, 0)][1]

    end = end_of(topic)
    assert end == 6  # the visible one, the four aborted, the abort marker
    assert len(hidden_records(config, topic, 0, 0, end)) == 4

    report = republish(config, topic, 0, 0, end)
    assert report.hidden == 4 and report.republished == ["kept"]
    assert sorted(report.left) == ["again", "never", "redone"]
    audit_report = republish(config, names.audit, 0, 0, end_of(names.audit))
    assert audit_report.republished == ["kept"]

    with TopicReader(kafka_bootstrap, [topic]) as reader:
        records = reader.poll_until(lambda r: len(r) >= 3, timeout=WAIT_S, what="deliveries")
        reader.drain(1.0)
    seen = sorted(DELIVERED.decode(r.value)["defer_id"] for r in reader.records)
    assert seen == ["again", "kept", "visible"], records  # once each; the others stay hidden

    # Never while a transaction is still open there: what hangs would be written twice.
    open_txn = transactional_producer(kafka_bootstrap)
    open_txn.begin_transaction()
    open_txn.produce(topic, delivery("pending", stamp), b"pending", 0)
    assert open_txn.flush(30) == 0
    try:
        with pytest.raises(BrokerError, match="still open from offset"):
            republish(config, topic, 0, 0, 100)
    finally:
        open_txn.abort_transaction(30)


def test_a_hidden_release_on_a_changelog_is_written_again_when_delivered(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """The other side of a turn committed in part: its delivery counts, its changelog records
    were aborted. A state rebuilt without them would release the deferral again."""
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path)
    assert ensure_topics(config).ok
    names = TopicNames(unique_prefix)
    changelog = names.state("1s")
    stamp = now_ms()
    plain = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    delivered = delivered_from_deferral(raw_deferral("shipped", priority=2), stamp, "1s")
    plain.produce(names.priority("default", 2), delivered, b"shipped", 1)
    assert plain.flush(30) == 0
    aborted = transactional_producer(kafka_bootstrap)
    aborted.begin_transaction()
    for defer_id in ("shipped", "unshipped"):  # "unshipped": its delivery was aborted too
        timer = TIMER + timer_key(stamp - 5, 2, defer_id)
        marker = marker_value(defer_id.encode(), marker_tail("DELIVERED", stamp))
        aborted.produce(changelog, None, timer, 0)
        aborted.produce(changelog, marker, MARKER_PREFIX + defer_id.encode(), 0)
    aborted.produce(changelog, b"an intake", TIMER + timer_key(stamp + 9, 1, "held"), 0)
    assert aborted.flush(30) == 0
    aborted.abort_transaction(30)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    end = stable_offsets(admin, [(changelog, 0)])[(changelog, 0)][1]

    report = republish(config, changelog, 0, 0, end)
    assert report.hidden == 5
    assert report.republished == ["shipped", "shipped"]  # its timer's removal, its marker
    assert sorted(report.left) == ["offset 4", "unshipped", "unshipped"]  # and the intake
    with TopicReader(kafka_bootstrap, [changelog]) as reader:
        reader.poll_until(lambda r: len(r) >= 2, timeout=WAIT_S, what="the changelog")
        reader.drain(1.0)
    assert [r.key for r in reader.records] == [
        TIMER + timer_key(stamp - 5, 2, "shipped"),
        MARKER_PREFIX + b"shipped",
    ]
