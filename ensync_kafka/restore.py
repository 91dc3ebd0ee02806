"""Restoring a tier worker's state: replay the changelog into the partition stores.

A partition fires only after this returned for it. The read is read_committed, so an aborted
transaction's changelog records are never applied, and each store remembers the offset it
reached, so the next restore (after a rebalance or a restart) reads only what came since.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from ._kafka import where
from .exceptions import BrokerError
from .state import PartitionStore

RESTORE_TIMEOUT_S = 300.0
RESTORE_APPLY_BATCH = 10_000
RESTORE_POLL_S = 0.05


def replay_changelog(
    restorer: Consumer,
    topic: str,
    stores: dict[int, PartitionStore],
    *,
    on_applied: Callable[[int], None] | None = None,
    timeout_s: float = RESTORE_TIMEOUT_S,
) -> int:
    """Replay each partition's changelog from its store's offset to the end; the number of
    records replayed. ``on_applied(n)`` reports progress as batches are written."""
    starts = []
    for p, store in stores.items():
        offset = store.changelog_offset()
        starts.append(TopicPartition(topic, p, OFFSET_BEGINNING if offset is None else offset))
    restorer.assign(starts)
    pending: dict[int, list[tuple[bytes, bytes | None]]] = {p: [] for p in stores}
    last: dict[int, int] = {}
    open_partitions = set(stores)
    total = 0

    def apply(p: int, next_offset: int) -> None:
        if on_applied is not None:
            on_applied(len(pending[p]))
        stores[p].apply(pending[p], next_offset)
        pending[p] = []

    deadline = time.monotonic() + timeout_s
    try:
        while open_partitions:
            if time.monotonic() > deadline:
                raise BrokerError(f"restore of {topic} {sorted(open_partitions)} timed out")
            for msg in restorer.consume(1000, RESTORE_POLL_S):
                err = msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    raise BrokerError(f"restore {topic}: {err.str()}", code=err.code())
                p, offset = where(msg)
                if err is not None:  # end of the partition: restored
                    apply(p, offset)
                    open_partitions.discard(p)
                    continue
                pending[p].append((msg.key() or b"", msg.value()))
                last[p] = offset
                total += 1
                if len(pending[p]) >= RESTORE_APPLY_BATCH:
                    apply(p, last[p] + 1)
    finally:
        restorer.unassign()
    return total
