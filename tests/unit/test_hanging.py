"""Finding hanging transactions: the parts that need no broker."""

from __future__ import annotations

import time

import pytest

from ensync_kafka.config import config_from_mapping
from ensync_kafka.exceptions import BrokerError
from ensync_kafka.hanging import (
    OFFSETS_TOPIC,
    QUERY_TIMEOUT_S,
    HangingReport,
    OffsetsProbe,
    OpenTransaction,
    TierRepair,
    offset_commit_record,
    offsets_partition,
    offsets_partitions,
    project_partitions,
)


@pytest.mark.parametrize(
    ("group", "java_hash_code"),
    [
        # Printed by jshell (OpenJDK 17): System.out.println("...".hashCode());
        ("hello", 99162322),
        ("polygenelubricants", -2147483648),  # Integer.MIN_VALUE: Kafka's Utils.abs gives 0
        ("ensync.worker.1s", -693166040),
        ("größe-\U0001f600-group", 1477708241),  # UTF-16 code units, a surrogate pair among them
    ],
)
def test_a_groups_offsets_partition_is_kafkas(group: str, java_hash_code: int) -> None:
    expected = 0 if java_hash_code == -(2**31) else abs(java_hash_code) % 50
    assert offsets_partition(group, 50) == expected
    assert offsets_partition(group, 1) == 0


def _txn(partition: int, started_ms: int | None) -> OpenTransaction:
    return OpenTransaction(
        topic="t.state.1s", partition=partition, start_offset=7, end_offset=9, started_ms=started_ms
    )


def test_only_transactions_older_than_the_limit_are_hanging() -> None:
    old, young, unknown = _txn(0, 1_000), _txn(1, 99_000), _txn(2, None)
    report = HangingReport(checked=[], max_age_s=60.0, open=[old, young, unknown], at_ms=100_000)
    assert report.hanging == [old]
    assert old.age_s(100_000) == 99.0
    assert unknown.age_s(100_000) is None
    assert young.age_s(98_000) == 0.0  # a clock behind the record's is not a negative age


def test_the_abort_command_names_the_partition_and_start_offset() -> None:
    assert _txn(3, 0).abort_command("h:9092") == (
        "kafka-transactions.sh --bootstrap-server h:9092 abort --topic t.state.1s --partition 3 "
        "--start-offset 7"
    )


# Records of __consumer_offsets as a Kafka 4.4 broker wrote them.
_COMMIT_KEY = b"\x00\x01\x00\x16t98dc5659d4.app.83c3d1\x00\x14t98dc5659d4.defer.1s\x00\x00\x00\x02"
_COMMIT_VALUE = b"\x00\x04\x00\x00\x00\x00\x00\x00\x00\x2a\xff\xff\xff\xff\x01\x00\x00\x01\xa2"
_GROUP_KEY = b"\x00\x02\x00\x15t680110742f.worker.1h"


def test_offset_commit_records_are_read_and_others_skipped() -> None:
    assert offset_commit_record(_COMMIT_KEY, _COMMIT_VALUE) == (
        "t98dc5659d4.app.83c3d1",
        "t98dc5659d4.defer.1s",
        2,
        42,
    )
    assert offset_commit_record(_COMMIT_KEY, None) == (  # a deletion
        "t98dc5659d4.app.83c3d1",
        "t98dc5659d4.defer.1s",
        2,
        None,
    )
    assert offset_commit_record(_GROUP_KEY, b"\x00\x03") is None
    assert offset_commit_record(None, None) is None


def test_a_repair_rewinds_each_partition_or_to_the_earliest() -> None:
    repair = TierRepair(tier="1s", group="p.worker.1s", topic="p.defer.1s", rewind={1: None, 0: 9})
    base = "kafka-consumer-groups.sh --bootstrap-server h:9092 --group p.worker.1s --reset-offsets"
    assert repair.commands("h:9092") == [
        f"{base} --topic p.defer.1s:0 --to-offset 9 --execute",
        f"{base} --topic p.defer.1s:1 --to-earliest --execute",
    ]
    assert TierRepair(tier="1s", group="g", topic="t", rewind=None).commands("h") == []


def test_the_partitions_checked_are_the_configurations_and_its_groups_offsets() -> None:
    config = config_from_mapping(
        {"prefix": "p", "tiers": {"1s": "1s"}, "kafka": {"bootstrap_servers": "h:9092"}},
        environ={},
    )
    counts = {"p.defer.1s": 2, "p.state.1s": 1, "p.audit": 1, "other": 3, OFFSETS_TOPIC: 50}
    assert project_partitions(config, counts) == [
        ("p.audit", 0),
        ("p.defer.1s", 0),
        ("p.defer.1s", 1),
        ("p.state.1s", 0),
    ]
    assert offsets_partitions(config, counts, ["hello"]) == {
        "p.worker.1s": offsets_partition("p.worker.1s", 50),
        "hello": 22,
    }
    assert offsets_partitions(config, {}, ["hello"]) == {}  # no group has committed yet


def test_an_offsets_check_asked_for_a_short_timeout_gives_up_after_it_and_starts_afresh() -> None:
    """The abort settle checks with a short timeout and one attempt: an unanswered check must
    not hold a tier for the default timeout (nor its retries), and the next check uses a new
    client, as one whose metadata went stale would never recover."""
    config = config_from_mapping({"kafka": {"bootstrap_servers": "127.0.0.1:9"}}, environ={})
    probe = OffsetsProbe(config)
    first = probe._client()
    started = time.monotonic()
    with pytest.raises(BrokerError, match="listing offsets"):
        probe.stable_offsets([("t", 0)], timeout_s=0.5, attempts=1)
    assert time.monotonic() - started < QUERY_TIMEOUT_S
    assert probe._client() is not first
