"""The audit store: query by reason, incremental resume without duplicates, rebuild (real Kafka)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from ensync_kafka import DeferClient, ensure_topics
from ensync_kafka.auditstore import AuditStore
from ensync_kafka.config import Config, config_from_mapping
from ensync_kafka.exceptions import ConfigError
from tests.helpers import WorkerThread

WAIT_S = 30.0


def _config(bootstrap: str, prefix: str, tmp_path: Path) -> Config:
    return config_from_mapping(
        {
            "prefix": prefix,
            "kafka": {"bootstrap_servers": bootstrap},
            "tiers": {"1s": "1s", "1h": "1h"},
            "topics": {"defer": {"partitions": 2}, "audit": {"partitions": 3}},
            "worker": {"id": "audit-w", "state_dir": str(tmp_path / "state")},
            "monitor": {"port": 0},
            "audit_store": {"path": str(tmp_path / "audit.sqlite3")},
        },
        environ={},
    )


def _sync_until(store: AuditStore, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while store.count() < count:
        if time.monotonic() > deadline:
            pytest.fail(f"audit store has {store.count()} records, expected {count}")
        store.sync(timeout=5)
        time.sleep(0.1)


def test_audit_query_resume_and_rebuild(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = _config(kafka_bootstrap, unique_prefix, tmp_path)
    assert ensure_topics(config).ok
    with WorkerThread(config) as running, DeferClient(config) as client:
        assert running.worker.monitor is None  # port 0: no HTTP server
        invoices = [
            client.defer("invoice.remind", {"n": i}, delay=3600, reason=f"Invoice #{i} overdue")
            for i in range(5)
        ]
        trial = client.defer("trial.end", {}, delay=0.2, reason="trial expires")
        with AuditStore(config) as store:
            _sync_until(store, 7)  # 6 DEFERRED + 1 DELIVERED

            found = store.query(reason="invoice")
            assert sorted(r["defer_id"] for r in found) == sorted(r.defer_id for r in invoices)
            assert {r["event"] for r in found} == {"DEFERRED"}
            assert [r["event"] for r in store.history(trial.defer_id)] == ["DEFERRED", "DELIVERED"]
            assert len(store.query(name="trial.end")) == 2
            assert len(store.query(event="delivered")) == 1
            first_at = min(r["at_ms"] for r in store.query(limit=None))
            assert len(store.query(until_ms=first_at)) == 0
            assert len(store.query(since_ms=first_at)) == 7
            assert len(store.query(limit=3)) == 3

        # A restart resumes from the stored offsets: nothing new, nothing twice.
        with AuditStore(config) as store:
            assert store.sync(timeout=5) == 0
            assert store.count() == 7
            cancelled = client.cancel(invoices[0].defer_id, reason="paid by wire")
            assert cancelled.done
            _sync_until(store, 9)  # + CANCELLED (1h tier) + UNCHANGED (1s tier)
            assert store.count() == 9
            events = [r["event"] for r in store.history(invoices[0].defer_id)]
            assert events[0] == "DEFERRED" and sorted(events[1:]) == ["CANCELLED", "UNCHANGED"]
            answer = store.query(defer_id=invoices[0].defer_id, event="CANCELLED")[0]
            assert answer["request_id"] == cancelled.request_id
            assert answer["outcome"] == "cancelled" and "paid by wire" in answer["reason"]

    # A crash between writing rows and their offsets cannot happen (one DB transaction), but
    # even offsets that fall behind re-read without duplicating a row.
    db = sqlite3.connect(tmp_path / "audit.sqlite3")
    with db:
        db.execute("UPDATE offsets SET next_offset = 0")
    db.close()
    with AuditStore(config) as store:
        store.sync(timeout=10)
        assert store.count() == 9
        assert store.rebuild(timeout=10) == 9
        assert store.count() == 9
        assert len(store.query(reason="INVOICE #3")) == 1

    other = config.model_copy(update={"prefix": unique_prefix + "x"})
    with pytest.raises(ConfigError, match="holds prefix"):
        AuditStore(other)
