"""Fresh defer_ids: unique, and hashing to one tier partition per run of STICKY_IDS."""

from __future__ import annotations

import string
import threading
import zlib
from collections import Counter
from typing import Any

from ensync_kafka import DeferClient, DeferRequest
from ensync_kafka._ids import STICKY_IDS, AlignedIds
from ensync_kafka.config import config_from_mapping

T1, T10 = "q.defer.1s", "q.defer.10s"


def partition(defer_id: str, n: int) -> int:
    """librdkafka's default partitioner (consistent_random) for a non-empty key."""
    return zlib.crc32(defer_id.encode()) % n


def test_a_run_of_ids_shares_one_partition_and_the_next_run_takes_the_next() -> None:
    ids = AlignedIds(6)
    first = [partition(ids.new(T10), 6) for _ in range(STICKY_IDS)]
    second = [partition(ids.new(T10), 6) for _ in range(STICKY_IDS)]
    assert len(set(first)) == 1
    assert set(second) == {(first[0] + 1) % 6}


def test_topics_move_on_independently_and_every_partition_takes_its_share() -> None:
    ids = AlignedIds(3)
    assert len({partition(ids.new(T1), 3) for _ in range(10)}) == 1
    counts = Counter(partition(ids.new(T10), 3) for _ in range(3 * STICKY_IDS))
    assert counts == Counter(dict.fromkeys(range(3), STICKY_IDS))


def test_ids_look_like_a_uuid4_hex_and_never_repeat_across_threads() -> None:
    ids = AlignedIds(6)
    made: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(ids.new(T10) for _ in range(3 * STICKY_IDS))

    threads = [threading.Thread(target=make, args=(out,)) for out in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in made for i in out]
    assert len(set(every)) == len(every) == 12 * STICKY_IDS
    assert all(len(i) == 32 and set(i) <= set(string.hexdigits.lower()) for i in every)
    # Twelve whole runs, however interleaved: two per partition.
    assert Counter(partition(i, 6) for i in every) == Counter(dict.fromkeys(range(6), 400))


def test_one_partition_needs_no_alignment() -> None:
    ids = AlignedIds(1)
    made = {ids.new(T10) for _ in range(100)}
    assert len(made) == 100


def _client_ids(kafka: dict[str, Any], n: int) -> list[str]:
    """The ids a client makes for ``n`` requests (prepared, never sent)."""
    config = config_from_mapping(
        {"kafka": kafka, "topics": {"defer": {"partitions": 4}}}, environ={}
    )
    client = DeferClient(config, producer_settings={"log_level": "0"})
    requests = [DeferRequest(name="e", payload=b"", delay=5) for _ in range(n)]
    return [client._prepare(r, 0)[3].defer_id for r in requests]


def test_the_client_aligns_its_ids_to_the_configured_tier_partitions() -> None:
    made = _client_ids({"bootstrap_servers": "127.0.0.1:1"}, 50)
    assert len({partition(i, 4) for i in made}) == 1


def test_with_another_partitioner_the_client_leaves_ids_random() -> None:
    kafka = {"bootstrap_servers": "127.0.0.1:1", "client": {"partitioner": "murmur2_random"}}
    made = _client_ids(kafka, 200)
    assert len({partition(i, 4) for i in made}) == 4
