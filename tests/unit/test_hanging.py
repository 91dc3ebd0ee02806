"""Finding hanging transactions: the parts that need no broker."""

from __future__ import annotations

import pytest

from ensync_kafka.hanging import HangingReport, OpenTransaction, offsets_partition


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
