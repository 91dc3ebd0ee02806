"""Records a worker cannot accept go to {prefix}.invalid with the reason; the worker goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from ensync_kafka import DeferClient, ensure_topics
from ensync_kafka.codec import MAGIC
from ensync_kafka.models import to_ms
from ensync_kafka.topics import TopicNames
from tests.helpers import (
    TopicReader,
    WorkerThread,
    audit_records,
    delivered,
    invalid_records,
    pipeline_config,
    queue_reader,
    raw_deferral,
)

WAIT_S = 30.0


def test_invalid_records_are_quarantined_and_the_worker_keeps_delivering(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path / "state")
    ensure_topics(config)
    names = TopicNames(unique_prefix)
    tier_topic = names.defer("1s")
    bad: dict[bytes, tuple[bytes, str]] = {
        b"garbage": (b"\x00\x01 not avro at all \xff", "format marker"),
        b"truncated": (raw_deferral("truncated")[:-5], "cannot decode"),
        b"prio-9": (raw_deferral("prio-9", priority=9), "priority 9"),
        b"prio-0": (raw_deferral("prio-0", priority=0), "priority 0"),
        b"no-queue": (raw_deferral("no-queue", queue="nope"), "unknown queue 'nope'"),
        b"marker-only": (MAGIC, "cannot decode"),
    }
    raw = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    with (
        WorkerThread(config) as worker,
        queue_reader(kafka_bootstrap, unique_prefix) as reader,
        TopicReader(kafka_bootstrap, [names.invalid]) as invalid_reader,
        TopicReader(kafka_bootstrap, [names.audit]) as audit_reader,
        DeferClient(config) as client,
    ):
        before = client.defer("valid", "before", delay=0.2)
        for key, (value, _) in bad.items():
            raw.produce(tier_topic, key=key, value=value)
        raw.produce(tier_topic, key=None, value=b"keyless garbage")
        assert raw.flush(10) == 0
        after = client.defer("valid", "after", delay=0.3)
        valid = {before.defer_id, after.defer_id}
        reader.poll_until(
            lambda records: {d.event.defer_id for d in delivered(records)} >= valid,
            timeout=WAIT_S,
            what="the valid deferrals sent around the invalid ones",
        )
        invalid_reader.poll_until(
            lambda records: len(records) >= len(bad) + 1,
            timeout=WAIT_S,
            what="every invalid record in the invalid topic",
        )

        def rejected(records: list) -> list[dict[str, Any]]:
            return [a for a in audit_records(records) if a["event"] == "REJECTED"]

        audit_reader.poll_until(
            lambda records: len(rejected(records)) >= len(bad) + 1,
            timeout=WAIT_S,
            what="a REJECTED audit per invalid record",
        )
        reader.drain(1.0)
        assert worker.error is None
        stats = worker.stats()
    raw.flush(5)

    quarantined = invalid_records(invalid_reader.records)
    by_key = {q["key"]: q for q in quarantined}
    assert set(by_key) == {*bad, None}
    for key, (value, reason) in bad.items():
        q = by_key[key]
        assert q["value"] == value, key
        assert reason in q["reason"], f"{key!r}: {q['reason']!r}"
        assert q["source_topic"] == tier_topic
        assert q["rejected_at"] > 0
    offsets = {(q["source_partition"], q["source_offset"]) for q in quarantined}
    assert len(offsets) == len(quarantined)
    # The invalid topic is keyed by the original key.
    assert {r.key for r in invalid_reader.records} == {*bad, None}

    rejections = {a["defer_id"]: a for a in rejected(audit_reader.records)}
    for key, (_, reason) in bad.items():
        audit = rejections[key.decode()]
        assert reason in audit["reason"]
        assert audit["tier"] == "1s"
    assert "" in rejections  # the keyless record is audited too

    events = delivered(reader.records)
    assert sorted(d.event.defer_id for d in events) == sorted(valid)
    for d in events:
        assert d.record.received_ms >= to_ms(d.event.due_at)
    assert stats["invalid"] == len(bad) + 1
    assert stats["delivered"] == 2
