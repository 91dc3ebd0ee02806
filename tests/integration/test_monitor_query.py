"""status / upcoming / show agree with what was deferred, across two workers (real Kafka)."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ensync_kafka import DeferClient, ensure_topics
from ensync_kafka.config import Config, config_from_mapping
from ensync_kafka.models import to_ms
from ensync_kafka.query import Cluster
from tests.helpers import WorkerThread, wait_until

WAIT_S = 60.0


def _config(bootstrap: str, prefix: str, state: Path, worker_id: str) -> Config:
    return config_from_mapping(
        {
            "prefix": prefix,
            "kafka": {"bootstrap_servers": bootstrap},
            "tiers": {"1m": "1m", "1h": "1h"},
            "queues": ["default", "billing"],
            "topics": {
                "defer": {"partitions": 4},
                "priority": {"partitions": 1},
                "audit": {"partitions": 1},
            },
            "worker": {"id": worker_id, "state_dir": str(state / worker_id)},
            "monitor": {"port": "auto", "host": "127.0.0.1", "announce_interval": "2s"},
        },
        environ={},
    )


def _http(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _settled(cluster: Cluster, workers: set[str], held: int) -> dict[str, Any] | None:
    """The cluster status once exactly ``workers`` cover every partition and hold ``held``."""
    status = cluster.status()
    announced = {w["worker_id"] for w in status["workers"] if w["reachable"] and w["ready"]}
    tiers = status["tiers"]
    complete = all(t["covered"] == t["partitions"] and not t["restoring"] for t in tiers)
    owners = set().union(*(set(t["workers"]) for t in tiers))
    total = sum(t["held"] for t in tiers)
    if announced == workers and owners == workers and complete and total == held:
        return status
    return None


def test_status_upcoming_show_across_two_workers(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    c1 = _config(kafka_bootstrap, unique_prefix, tmp_path, "w1")
    c2 = _config(kafka_bootstrap, unique_prefix, tmp_path, "w2")
    assert ensure_topics(c1).ok
    cluster = Cluster(c1)
    client = DeferClient(c1)
    try:
        with WorkerThread(c1) as t1, WorkerThread(c2) as t2:
            w1, w2 = t1.worker, t2.worker
            receipts = []
            for i in range(12):
                delay = 30 + i if i % 2 else 600 + 10 * i  # both tiers: 1m and 1h
                receipts.append(
                    client.defer(
                        f"event.{i}",
                        {"i": i},
                        delay=delay,
                        priority=1 + i % 5,
                        reason=f"reason {i}",
                        queue="billing" if i % 3 == 0 else "default",
                    )
                )
            status = wait_until(
                lambda: _settled(cluster, {"w1", "w2"}, 12),
                timeout=WAIT_S,
                what="both workers to hold all 12",
                interval=0.2,
            )
            by_tier = {t["tier"]: t for t in status["tiers"]}
            assert by_tier["1m"]["held"] == 6 and by_tier["1h"]["held"] == 6
            assert all(t["held_exact"] for t in status["tiers"])
            first_due = min(to_ms(r.due_at) for r in receipts if r.tier == "1m")
            assert by_tier["1m"]["next_due_ms"] == first_due
            assert by_tier["1m"]["oldest_overdue_s"] == 0.0

            expected = [
                r.defer_id
                for r in sorted(receipts, key=lambda r: (to_ms(r.due_at), -r.priority, r.defer_id))
            ]
            page = cluster.upcoming(limit=100)
            assert [i["defer_id"] for i in page["items"]] == expected
            assert page["next"] is None and not page["unreachable"]
            assert {i["worker_id"] for i in page["items"]} <= {"w1", "w2"}

            # Paging: pages of 5 concatenate to the same order.
            paged: list[str] = []
            after = None
            while True:
                page = cluster.upcoming(limit=5, after=after)
                paged.extend(i["defer_id"] for i in page["items"])
                after = page["next"]
                if after is None:
                    break
            assert paged == expected

            billing_1h = [
                r.defer_id
                for r in sorted(receipts, key=lambda r: (to_ms(r.due_at), -r.priority, r.defer_id))
                if r.queue == "billing" and r.tier == "1h"
            ]
            filtered = cluster.upcoming(tier="1h", queue="billing", limit=100)
            assert [i["defer_id"] for i in filtered["items"]] == billing_1h

            for r in receipts:
                shown = cluster.show(r.defer_id)
                assert shown["state"] == "held"
                assert shown["tier"] == r.tier and shown["priority"] == r.priority
                assert shown["due_ms"] == to_ms(r.due_at)
                assert shown["reason"] == f"reason {receipts.index(r)}"
                assert shown["worker_id"] in {"w1", "w2"}
            assert cluster.show("no-such-id")["state"] == "unknown"

            for w in (w1, w2):
                assert w.monitor is not None
                assert _http(w.monitor.port, "/healthz") == 200
                assert _http(w.monitor.port, "/readyz") == 200
                assert _http(w.monitor.port, "/api/v1/local/deferrals/no-such-id") == 404

            # w2 leaves: it withdraws from the registry and w1 takes over its partitions,
            # restoring them from the changelog with nothing lost.
            t2.stop()
            wait_until(
                lambda: _settled(cluster, {"w1"}, 12),
                timeout=WAIT_S,
                what="w1 alone to hold all 12",
                interval=0.2,
            )
            assert [i["defer_id"] for i in cluster.upcoming(limit=100)["items"]] == expected
    finally:
        client.close()
        cluster.close()
