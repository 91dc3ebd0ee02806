"""Fresh defer_ids that land together on one partition of their tier topic.

A deferral's record on its tier topic is keyed by its defer_id, and that key must decide the
partition: a re-send with the same id has to reach the worker that holds the first copy, which
is how duplicates are recognised. So the client cannot pick partitions freely, as Kafka's sticky
partitioner does for keyless records (KIP-480, KIP-794). A random id spreads a batch over every
partition, and librdkafka sends one ProduceRequest per partition (confluentinc/librdkafka#1700):
a small ``defer_many`` of 25 deferrals costs about six requests, and each wakes a consumer's fetch.

When the client makes the id itself, it can instead choose one that hashes to the partition it
wants: a random prefix and a counter, tried until librdkafka's default partitioner
(``consistent_random``: CRC-32 of the key modulo the partition count) maps it there, about as
many tries as there are partitions. Consecutive ids then share a partition for STICKY_IDS ids
before the next partition takes over. Nothing depends on the guess being right: the record is
still produced by key, so with another partitioner, or a topic whose partition count differs
from the configuration, the ids are merely spread as before.

Counting up from a random prefix, rather than drawing every id at random until one fits, costs
what ``uuid4().hex`` does (2.3 against 4.4 µs), and a worker's RocksDB takes such runs in faster;
held, they cost it more memory (about 325 against 280 MB with a million: README, Benchmark).
"""

from __future__ import annotations

import os
import random
import threading
import zlib

STICKY_IDS = 200
"""Ids of one tier topic that share a partition before the next partition takes over."""
PREFIX_BYTES = 12
"""Random part of an id (96 bits, hex-encoded); a new prefix with every partition switch."""
COUNTER_DIGITS = 8
"""Hex digits of the counter after the prefix (``%08x`` below): ids are 32 characters, as a
uuid4's hex."""
DEFAULT_PARTITIONER = "consistent_random"


class AlignedIds:
    """Thread-safe source of fresh defer_ids, aligned per tier topic (module docstring)."""

    def __init__(self, partitions: int) -> None:
        self._n = partitions
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}

    def new(self, topic: str) -> str:
        n = self._n
        if n <= 1:
            return os.urandom(PREFIX_BYTES + COUNTER_DIGITS // 2).hex()
        with self._lock:
            run = self._runs.get(topic)
            if run is None or run.left == 0:
                start = random.randrange(n) if run is None else run.partition + 1
                run = self._runs[topic] = _Run(start % n)
            run.left -= 1
            partition, head, crc32 = run.partition, run.prefix_crc, zlib.crc32
            counter = run.counter
            while True:
                counter += 1
                suffix = b"%08x" % counter
                if crc32(suffix, head) % n == partition:  # the CRC-32 of prefix + suffix
                    run.counter = counter
                    return run.prefix + suffix.decode()


class _Run:
    __slots__ = ("counter", "left", "partition", "prefix", "prefix_crc")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.prefix = os.urandom(PREFIX_BYTES).hex()
        self.prefix_crc = zlib.crc32(self.prefix.encode())
        self.counter = 0
        self.left = STICKY_IDS
