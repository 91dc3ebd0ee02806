"""Partitions for the releases of events that have no key of their own.

A keyless event's record is keyed by its defer_id, which no consumer orders by: the partition is
ours to choose. Hashing the id would spread one turn's releases over every partition of every
priority topic, and a transaction costs per partition it writes (AddPartitionsToTxn, one
ProduceRequest each, a commit marker each: bench/txn_probe.py). So a turn sends a topic's keyless
releases to one partition, moving on after STICKY_RECORDS of them, and the next turn starts on the
next partition: the same idea as Kafka's sticky partitioner for null keys (KIP-480, KIP-794).
Events with a key keep the producer's key hashing, so their per-key order holds.
"""

from __future__ import annotations

import random

STICKY_RECORDS = 200
"""Keyless releases to one topic that go to one partition before the next one takes over: small
turns touch one partition per topic, a catch-up turn of thousands still spreads over all of them."""


class StickyPartitions:
    """Per topic, the partition count a worker learnt at start: partitions added to a priority
    topic later receive keyless releases once the worker restarts."""

    def __init__(self, partition_counts: dict[str, int]) -> None:
        self._counts = partition_counts
        # Workers start at different partitions, so they do not all write the same one at once.
        self._next = {topic: random.randrange(n) for topic, n in partition_counts.items() if n}
        self._current: dict[str, int] = {}
        self._left: dict[str, int] = {}

    def new_turn(self) -> None:
        self._left.clear()

    def partition(self, topic: str) -> int:
        """The partition for the next keyless record to ``topic``; -1 (the producer's partitioner)
        for a topic whose partitions are not known."""
        left = self._left.get(topic, 0)
        if left == 0:
            n = self._counts.get(topic)
            if not n:
                return -1
            p = self._next[topic]
            self._next[topic] = (p + 1) % n
            self._current[topic] = p
            left = STICKY_RECORDS
        self._left[topic] = left - 1
        return self._current[topic]
