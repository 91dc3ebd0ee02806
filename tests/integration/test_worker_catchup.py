"""Outage catch-up: an overdue backlog is released highest priority first, oldest first, capped
by worker.catchup_rate."""

from __future__ import annotations

import random
import time
from pathlib import Path

from ensync_kafka import DeferClient, DeferRequest, ensure_topics
from ensync_kafka.models import now_ms, to_ms
from tests.helpers import WorkerThread, delivered, pipeline_config, queue_reader, wait_until

WAIT_S = 30.0
BACKLOG = 100
RATE_PER_S = 50.0


def test_overdue_backlog_released_by_priority_then_age_at_the_catchup_rate(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = pipeline_config(
        unique_prefix,
        kafka_bootstrap,
        tmp_path / "state",
        tiers=[{"name": "1s", "span": 1}],
        partitions=2,
        worker={"catchup_rate": RATE_PER_S, "catchup_grace": 0.2},
    )
    ensure_topics(config)
    rng = random.Random(7)
    # The outage: deferrals come due while no worker runs.
    with DeferClient(config) as client:
        receipts = client.defer_many(
            [
                DeferRequest(
                    name="backlog",
                    payload=i,
                    delay=round(rng.uniform(0.05, 0.5), 3),
                    priority=rng.randint(1, 5),
                )
                for i in range(BACKLOG)
            ]
        )
    latest_due = max(to_ms(r.due_at) for r in receipts)
    wait_until(
        lambda: now_ms() > latest_due + 500,
        timeout=5,
        what="every deferral to be well overdue",
    )
    with queue_reader(kafka_bootstrap, unique_prefix) as reader:
        started = time.monotonic()
        with WorkerThread(config):
            reader.poll_until(
                lambda records: len(records) >= BACKLOG,
                timeout=WAIT_S,
                what="the whole backlog",
            )
            reader.drain(0.5)
        elapsed = time.monotonic() - started

    events = sorted((d.event for d in delivered(reader.records)), key=lambda e: e.delivered_at)
    assert sorted(e.defer_id for e in events) == sorted(r.defer_id for r in receipts)
    # Highest priority first: nothing of a lower priority before the last of a higher one.
    for higher in range(5, 1, -1):
        last_higher = max(e.delivered_at for e in events if e.priority == higher)
        first_lower = min(e.delivered_at for e in events if e.priority < higher)
        assert last_higher <= first_lower, (
            f"priority {higher} still released at {last_higher} after a lower priority at "
            f"{first_lower}"
        )
    # Oldest first within a priority (one transaction's releases share a delivered_at).
    for priority in range(1, 6):
        mine = [e for e in events if e.priority == priority]
        inversions = [
            (a.defer_id, a.due_at, a.delivered_at, b.defer_id, b.due_at, b.delivered_at)
            for a in mine
            for b in mine
            if a.delivered_at < b.delivered_at and a.due_at > b.due_at
        ]
        assert not inversions, f"priority {priority}: younger released first: {inversions[:3]}"
    # Capped: the releases span about BACKLOG / RATE seconds, not one burst.
    span_s = (events[-1].delivered_at - events[0].delivered_at).total_seconds()
    assert span_s >= 0.6 * BACKLOG / RATE_PER_S, f"released {BACKLOG} in {span_s:.2f}s"
    assert elapsed < WAIT_S
