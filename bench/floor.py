"""Section (c)'s floor: a bare transactional releaser at the same load, in the same run.

What a tier worker's release is, and nothing else: records fall due at the offered rate
(``due_i = start + i / rate``), and a loop takes what is due, produces the DeliveredEvent of each
(the Deferral's bytes plus the release's tail, as the worker writes them) to its priority topic,
keyed by its id, and commits the transaction; two transactional producers take turns, as the
worker's do. No intake, no state, no changelog, no audit, no consumer offsets: its lateness is
what this broker, at this load, gives any transactional release to the five priority topics, so
it is the floor under the pipeline's figures measured on the same day. The pipeline is stopped
while it runs; the same receiving process measures it the same way.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Producer

from ensync_kafka._txn import (
    TRANSACTIONAL_PRODUCER_SETTINGS,
    TRANSACTIONAL_PRODUCERS,
    TXN_TIMEOUT_S,
)
from ensync_kafka.codec import DEFERRAL, delivered_suffix
from ensync_kafka.models import now_ms
from ensync_kafka.topics import TopicNames

from .samples import sample_deferral

START_AFTER_MS = 1000
"""The first record falls due this long after the releaser is ready."""


def due_runs(due: list[int]) -> Iterator[tuple[int, int, int]]:
    """Walk due times in order, sleeping until the next is due: ``(i, j, now)`` for each run
    ``due[i:j]`` due by ``now``, a releaser's turn."""
    i = 0
    while i < len(due):
        now = now_ms()
        if due[i] > now:
            time.sleep((due[i] - now) / 1000)
            continue
        j = i
        while j < len(due) and due[j] <= now:
            j += 1
        yield i, j, now
        i = j


def floor_id(i: int) -> str:
    return f"floor-{i}"


def release(spec: dict[str, Any], ready: Any, out_path: str) -> None:
    """Release ``spec["n"]`` records at ``spec["rate"]``/s; write the commit lateness and counts."""
    n, rate, names = spec["n"], spec["rate"], TopicNames(spec["prefix"])
    producers = [
        Producer(
            {
                "bootstrap.servers": spec["bootstrap"],
                "transactional.id": f"{spec['prefix']}.floor.{k}",
                **TRANSACTIONAL_PRODUCER_SETTINGS,
            }
        )
        for k in range(TRANSACTIONAL_PRODUCERS)
    ]
    for producer in producers:
        producer.init_transactions(TXN_TIMEOUT_S)
        producer.list_topics(timeout=TXN_TIMEOUT_S)
    start = now_ms() + START_AFTER_MS
    due = [start + i * 1000 // rate for i in range(n)]
    records = []
    for i in range(n):
        rec = {**sample_deferral(i, start), "defer_id": floor_id(i), "due_at": due[i]}
        topic = names.priority(rec["queue"], rec["priority"])
        records.append((topic, floor_id(i).encode(), DEFERRAL.encode(rec)))
    ready.set()
    commit_lateness: list[int] = []
    turns = 0
    for i, j, now in due_runs(due):
        producer = producers[turns % len(producers)]
        tail = delivered_suffix(now, "floor")
        producer.begin_transaction()
        for topic, key, value in records[i:j]:
            producer.produce(topic, value + tail, key)
        producer.commit_transaction(TXN_TIMEOUT_S)
        committed = now_ms()
        commit_lateness.extend(committed - d for d in due[i:j])
        turns += 1
    with open(out_path, "wb") as fh:
        pickle.dump({"commit_lateness_ms": commit_lateness, "transactions": turns}, fh)
