"""The benchmark's receiving process: a ``read_committed`` consumer that timestamps arrivals.

Started by ``bench.run`` with ``multiprocessing`` (spawn), so neither the sender's nor the
worker's GIL delays a receive timestamp. The hot loop only stamps and stores raw values; decoding
and statistics happen after the last expected record arrived, outside the measured window.
"""

from __future__ import annotations

import pickle
import time
from array import array
from collections import Counter
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

CONSUME_BATCH = 10_000
POLL_S = 0.05


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max/mean by nearest rank; ``None`` everywhere for no values."""
    if not values:
        return {k: None for k in ("p50", "p90", "p99", "p999", "max", "min", "mean")}
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return float(ordered[min(n - 1, max(0, int(q * n + 0.999999) - 1))])

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "p999": rank(0.999),
        "max": float(ordered[-1]),
        "min": float(ordered[0]),
        "mean": sum(ordered) / n,
    }


def receive(spec: dict[str, Any], ready: Any, stop: Any, progress: Any, out_path: str) -> None:
    """Consume ``spec["topics"]`` until ``spec["expected"]`` records arrived (or ``stop``).

    ``spec["mode"]`` is ``"raw"`` (count and time only: the Kafka baseline) or ``"delivered"``
    (decode DeliveredEvent values afterwards: lateness, duplicates, priority check).
    """
    cpu0 = time.process_time()
    consumer = Consumer(
        {
            "bootstrap.servers": spec["bootstrap"],
            "group.id": spec["group"],
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": spec.get("fetch_wait_ms", 50),
        }
    )
    consumer.assign(
        [
            TopicPartition(topic, p, OFFSET_BEGINNING)
            for topic in spec["topics"]
            for p in range(spec["partitions"])
        ]
    )
    assigned_at = time.time()
    keep = spec["mode"] == "delivered"
    values: list[bytes] = []
    topics: list[str] = []
    stamps = array("d")
    count = 0
    errors = 0
    first = last = None
    expected = spec["expected"]

    def take(msgs: list[Any], now: float) -> int:
        nonlocal errors
        taken = 0
        for msg in msgs:
            if msg.error() is not None:
                errors += 1
                continue
            if keep:
                values.append(msg.value())
                topics.append(msg.topic())
                stamps.append(now)
            taken += 1
        return taken

    # Let the fetchers resolve their start offsets before the sender starts.
    for _ in range(3):
        msgs = consumer.consume(CONSUME_BATCH, 0.1)
        if msgs:
            now = time.time()
            first = first or now
            count += take(msgs, now)
            last = now
    ready.set()

    while count < expected and not stop.is_set():
        msgs = consumer.consume(CONSUME_BATCH, POLL_S)
        if not msgs:
            continue
        now = time.time()
        if first is None:
            first = now
        count += take(msgs, now)
        last = now
        progress.value = count
    complete = count >= expected
    # Linger a little to see duplicates or strays beyond the expected count; not timed.
    extra = 0
    linger_until = time.time() + spec.get("linger_s", 0.0)
    while time.time() < linger_until and not stop.is_set():
        msgs = consumer.consume(CONSUME_BATCH, POLL_S)
        if msgs:
            extra += take(msgs, time.time())
    consumer.close()
    progress.value = count
    cpu_receive = time.process_time() - cpu0

    result: dict[str, Any] = {
        "received": count,
        "extra_after_expected": extra,
        "complete": complete,
        "consumer_errors": errors,
        "assigned_at": assigned_at,
        "first_receive": first,
        "last_receive": last,
        "cpu_s": cpu_receive,
    }
    if keep:
        result.update(_analyse(values, topics, stamps))
    with open(out_path, "wb") as fh:
        pickle.dump(result, fh, protocol=pickle.HIGHEST_PROTOCOL)


def _analyse(values: list[bytes], topics: list[str], stamps: array[float]) -> dict[str, Any]:
    from ensync_kafka.codec import DELIVERED

    ids: set[str] = set()
    duplicates = 0
    undecodable = 0
    wrong_topic = 0
    release: list[int] = []
    receive: list[float] = []
    per_second: Counter[int] = Counter()
    for value, topic, stamp in zip(values, topics, stamps, strict=True):
        try:
            rec = DELIVERED.decode(value)
        except Exception:
            undecodable += 1
            continue
        defer_id = rec["defer_id"]
        if defer_id in ids:
            duplicates += 1
            continue
        ids.add(defer_id)
        if not topic.endswith(f".p{rec['priority']}"):
            wrong_topic += 1
        due = rec["due_at"]
        release.append(rec["delivered_at"] - due)
        receive.append(stamp * 1000.0 - due)
        per_second[int(stamp)] += 1
    timeline = (
        [per_second.get(s, 0) for s in range(min(per_second), max(per_second) + 1)]
        if per_second
        else []
    )
    return {
        "ids": ids,
        "unique": len(ids),
        "duplicates": duplicates,
        "undecodable": undecodable,
        "wrong_priority_topic": wrong_topic,
        "early_release": sum(1 for v in release if v < 0),
        "early_receive": sum(1 for v in receive if v < 0),
        "release_lateness_ms": percentiles([float(v) for v in release]),
        "receive_lateness_ms": percentiles(receive),
        "received_per_second": timeline,
    }
