"""Client -> tier worker -> priority topics, against a real broker with an in-process worker.

Timing, priority, tier routing and the audit trail of ordinary deferrals.
"""

from __future__ import annotations

import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ensync_kafka import DeferClient, DeferRequest, ensure_topics
from ensync_kafka.models import JSON, to_ms
from ensync_kafka.topics import TopicNames
from tests.helpers import (
    TopicReader,
    WorkerThread,
    audit_records,
    delivered,
    pipeline_config,
    queue_reader,
)

WAIT_S = 30.0
LATENESS_BOUND_MS = 2000
"""Generous: this checks "on time" under a shared 2-core machine, not the benchmark target."""


def test_delivered_never_early_and_on_time(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path / "state")
    ensure_topics(config)
    delays = [0.2, 0.5, 0.9, 1.3, 2.0, 3.0]  # both tiers (1s, 10s)
    receipts = {}
    with (
        WorkerThread(config),
        queue_reader(kafka_bootstrap, unique_prefix) as reader,
        DeferClient(config) as client,
    ):
        for i, delay in enumerate(delays):
            receipt = client.defer(
                "timing.check",
                {"i": i, "delay": delay},
                delay=delay,
                key=f"key-{i}",
                headers={"trace": f"t{i}", "empty": None},
                reason="timing test",
            )
            receipts[receipt.defer_id] = (i, receipt)
        reader.poll_until(
            lambda records: len(records) >= len(delays), timeout=WAIT_S, what="every deferral"
        )
        reader.drain(1.0)

    events = delivered(reader.records)
    assert sorted(d.event.defer_id for d in events) == sorted(receipts)
    for d in events:
        i, receipt = receipts[d.event.defer_id]
        ev = d.event
        due = to_ms(receipt.due_at)
        delivered_ms = to_ms(ev.delivered_at)
        assert ev.due_at == receipt.due_at
        assert delivered_ms >= due, f"{i}: delivered {due - delivered_ms} ms early"
        # What counts is when a read_committed consumer can see it (the worker may write the
        # record a little ahead and commit it at the due time, so the record's own timestamp
        # can precede due_at; delivered_at is then due_at).
        assert d.record.received_ms >= due, f"{i}: received {due - d.record.received_ms} ms early"
        assert delivered_ms - due <= LATENESS_BOUND_MS, (
            f"{i}: delivered_at {delivered_ms - due} ms late"
        )
        lateness = d.record.received_ms - due
        assert lateness <= LATENESS_BOUND_MS, f"{i}: received {lateness} ms after its due time"
        # Due time is the requested delay after the deferral was made.
        assert to_ms(ev.due_at) - to_ms(ev.deferred_at) == pytest.approx(delays[i] * 1000, abs=2)
        # The delivered event carries what was deferred.
        assert ev.name == "timing.check"
        assert ev.json() == {"i": i, "delay": delays[i]}
        assert ev.content_type == JSON
        assert ev.key == f"key-{i}".encode()
        assert d.record.key == f"key-{i}".encode()  # the record is keyed by the event key
        assert ev.headers == (("trace", f"t{i}".encode()), ("empty", None))
        assert dict(d.record.headers)["trace"] == f"t{i}".encode()  # original headers kept
        assert ev.reason == "timing test"
        assert ev.priority == 1
        assert ev.queue == "default"
        assert ev.attempt == 1
        assert ev.tier == receipt.tier == ("1s" if delays[i] <= 1 else "10s")


def test_priority_preserved_default_1(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path / "state")
    ensure_topics(config)
    names = TopicNames(unique_prefix)
    expected: dict[str, int] = {}
    with (
        WorkerThread(config),
        queue_reader(kafka_bootstrap, unique_prefix) as reader,
        DeferClient(config) as client,
    ):
        receipt = client.defer("prio", "default priority", delay=0.3)  # no priority given
        assert receipt.priority == 1
        expected[receipt.defer_id] = 1
        for priority in (1, 2, 3, 4, 5):
            receipt = client.defer("prio", {"p": priority}, delay=0.3, priority=priority)
            assert receipt.priority == priority
            expected[receipt.defer_id] = priority
        receipt = client.schedule("prio", b"\x00bin", at=receipt.due_at, priority=4)
        expected[receipt.defer_id] = 4
        reader.poll_until(
            lambda records: len(records) >= len(expected), timeout=WAIT_S, what="every priority"
        )
        reader.drain(1.0)

    events = delivered(reader.records)
    assert sorted(d.event.defer_id for d in events) == sorted(expected)
    for d in events:
        priority = expected[d.event.defer_id]
        assert d.event.priority == priority
        assert d.record.topic == names.priority("default", priority)
        # No event key given: the record is keyed by defer_id.
        assert d.record.key == d.event.defer_id.encode()
        assert d.event.key is None
    by_id = {d.event.defer_id: d.event for d in events}
    assert by_id[receipt.defer_id].payload == b"\x00bin"


def test_each_tier_used_by_a_matching_delay(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    tiers = [
        {"name": "500ms", "span": "500ms"},
        {"name": "2s", "span": 2},
        {"name": "4s", "span": 4},
    ]
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path / "state", tiers=tiers)
    ensure_topics(config)
    names = TopicNames(unique_prefix)
    cases = {0.0: "500ms", 0.3: "500ms", 0.5: "500ms", 1.5: "2s", 3.0: "4s", 4.5: "4s"}
    expected: dict[str, str] = {}
    tier_topics = [names.defer(t["name"]) for t in tiers]
    with (
        WorkerThread(config),
        queue_reader(kafka_bootstrap, unique_prefix) as reader,
        DeferClient(config) as client,
    ):
        for delay, tier in cases.items():
            receipt = client.defer("tiered", {"delay": delay}, delay=delay)
            assert receipt.tier == tier, f"delay {delay}s routed to {receipt.tier}, not {tier}"
            expected[receipt.defer_id] = tier
        reader.poll_until(
            lambda records: len(records) >= len(cases), timeout=WAIT_S, what="every tier"
        )
        reader.drain(0.5)
    with TopicReader(kafka_bootstrap, tier_topics) as tier_reader:
        tier_reader.poll_until(
            lambda records: len(records) >= len(cases), timeout=WAIT_S, what="the tier topics"
        )
        routed = {r.key.decode(): r.topic for r in tier_reader.records if r.key}

    events = delivered(reader.records)
    assert sorted(d.event.defer_id for d in events) == sorted(expected)
    for d in events:
        tier = expected[d.event.defer_id]
        assert d.event.tier == tier, "released by another tier than the one it was sent to"
        assert routed[d.event.defer_id] == names.defer(tier)
        assert to_ms(d.event.delivered_at) >= to_ms(d.event.due_at)
    assert {d.event.tier for d in events} == {t["name"] for t in tiers}


def test_audit_trail_deferred_and_delivered_with_reason(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path / "state", worker_id="aud")
    ensure_topics(config)
    names = TopicNames(unique_prefix)
    reason = "payment provider returned 503"
    with (
        WorkerThread(config),
        TopicReader(kafka_bootstrap, [names.audit]) as audit_reader,
        DeferClient(config) as client,
    ):
        receipt = client.defer("order.retry", {"order": 7}, delay=0.5, priority=3, reason=reason)

        def trail(records: list) -> list[str]:
            return [a["event"] for a in audit_records(records) if a["defer_id"] == receipt.defer_id]

        audit_reader.poll_until(
            lambda records: "DELIVERED" in trail(records),
            timeout=WAIT_S,
            what="the DELIVERED audit record",
            describe=lambda records: str(trail(records)),
        )
        audit_reader.drain(0.5)
        records = audit_records(audit_reader.records)

    mine = [a for a in records if a["defer_id"] == receipt.defer_id]
    assert [a["event"] for a in mine] == ["DEFERRED", "DELIVERED"]
    due = to_ms(receipt.due_at)
    deferred, delivered_ = mine
    for a in mine:
        assert a["reason"] == reason
        assert a["name"] == "order.retry"
        assert a["queue"] == "default"
        assert a["priority"] == 3
        assert a["tier"] == receipt.tier == "1s"
        assert a["due_at"] == due
        assert a["attempt"] == 1
        assert "aud" in a["actor"]
    assert deferred["at"] <= delivered_["at"]
    assert delivered_["at"] >= due
    # Every audit record is keyed by its defer_id.
    keyed = [r for r in audit_reader.records if r.key == receipt.defer_id.encode()]
    assert len(keyed) == 2


def test_keyed_events_keep_their_order_and_keyless_ones_share_a_partition_per_turn(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """A keyed event's record goes where its key hashes (per-key order holds); the keyless
    events released in one turn go to one partition per priority topic (Release.sticky)."""
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path / "state", partitions=6)
    ensure_topics(config)
    at = datetime.now(UTC) + timedelta(seconds=2)
    keyed = [
        DeferRequest(
            name="ordered", payload={"n": n}, at=at + timedelta(milliseconds=300 * n), key="k-A"
        )
        for n in range(4)
    ]
    # Ids of our own: the client's would all hash to one partition (_ids.py).
    keyless = [
        DeferRequest(name="batch", payload={"n": n}, at=at, priority=2, defer_id=uuid.uuid4().hex)
        for n in range(24)
    ]
    with (
        WorkerThread(config),
        queue_reader(kafka_bootstrap, unique_prefix) as reader,
        DeferClient(config) as client,
    ):
        receipts = client.defer_many([*keyed, *keyless])
        reader.poll_until(
            lambda records: len(records) >= len(receipts), timeout=WAIT_S, what="every deferral"
        )
        reader.drain(0.5)

    events = delivered(reader.records)
    assert sorted(d.event.defer_id for d in events) == sorted(r.defer_id for r in receipts)
    ordered = sorted(
        (d for d in events if d.event.name == "ordered"), key=lambda d: d.record.offset
    )
    assert len({d.record.partition for d in ordered}) == 1
    assert [d.event.json()["n"] for d in ordered] == [0, 1, 2, 3]
    batch = [d for d in events if d.event.name == "batch"]
    assert len(batch) == len(keyless)
    # One due time, released in one turn: one partition, though their ids hash all over six.
    assert len({d.record.partition for d in batch}) == 1
    assert all(d.record.key == d.event.defer_id.encode() for d in batch)


def test_a_batch_of_fresh_ids_goes_to_one_tier_partition_where_the_ids_hash(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """The client chooses the ids it makes so that a batch is one ProduceRequest (_ids.py);
    librdkafka's partitioner, keyed by those ids, must agree with its choice."""
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path / "state", partitions=6)
    ensure_topics(config)
    with DeferClient(config) as client:
        receipts = client.defer_many(
            [DeferRequest(name="fresh", payload={"n": n}, delay=5) for n in range(40)]
        )
    topic = TopicNames(unique_prefix).defer(receipts[0].tier)
    with TopicReader(kafka_bootstrap, [topic]) as reader:
        records = reader.poll_until(
            lambda records: len(records) >= len(receipts), timeout=WAIT_S, what="every deferral"
        )
    hashed = {zlib.crc32(r.defer_id.encode()) % 6 for r in receipts}
    assert len(hashed) == 1
    assert {r.partition for r in records} == hashed
    assert sorted(r.key for r in records) == sorted(r.defer_id.encode() for r in receipts)
