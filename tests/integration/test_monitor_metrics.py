"""Prometheus metrics move as deferrals flow (real Kafka)."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ensync_kafka import DeferClient, TurnPhases, Worker, ensure_topics, monitor
from ensync_kafka.config import config_from_mapping
from tests.helpers import transactional_producer, wait_until

WAIT_S = 30.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_as_deferrals_flow(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_from_mapping(
        {
            "prefix": unique_prefix,
            "kafka": {"bootstrap_servers": kafka_bootstrap},
            "tiers": {"1s": "1s", "1m": "1m"},
            "topics": {"defer": {"partitions": 2}, "priority": {"partitions": 1}},
            "worker": {"id": "metrics-w", "state_dir": str(tmp_path)},
            "monitor": {"port": "auto"},
        },
        environ={},
    )
    assert ensure_topics(config).ok
    worker = Worker(config)
    assert worker.monitor is not None
    port = worker.monitor.port
    thread = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False})
    thread.start()
    client = DeferClient(config)
    try:
        before = _scrape(port)
        assert _value(before, "ensync_deferrals_accepted_total", tier="1s", queue="default",
                      priority="3") == 0  # fmt: skip

        for i in range(3):
            client.defer(f"soon.{i}", {}, delay=0.3, priority=3)
        held = client.defer("held", {}, delay=50, priority=5)
        client.defer("dup", {}, delay=50, defer_id=held.defer_id)  # a duplicate
        assert client.cancel(client.defer("gone", {}, delay=40, priority=2).defer_id).done

        deadline = time.monotonic() + WAIT_S
        while True:
            now = _scrape(port)
            delivered = _value(now, "ensync_deferrals_delivered_total", tier="1s",
                               queue="default", priority="3")  # fmt: skip
            if delivered == 3 and _value(now, "ensync_held_deferrals", tier="1m") == 1:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"metrics did not move: delivered={delivered}")
            time.sleep(0.2)

        labels = {"tier": "1m", "queue": "default"}
        assert _value(now, "ensync_deferrals_accepted_total", tier="1s", queue="default",
                      priority="3") == 3  # fmt: skip
        assert _value(now, "ensync_deferrals_accepted_total", priority="5", **labels) == 1
        assert _value(now, "ensync_deferrals_duplicate_total", tier="1m") == 1
        assert _value(now, "ensync_deferrals_cancelled_total", priority="2", **labels) == 1
        assert _value(now, "ensync_control_requests_total", tier="1m", op="cancel",
                      outcome="cancelled") == 1  # fmt: skip
        assert _value(now, "ensync_delivery_lateness_seconds_count", tier="1s") == 3
        assert _value(now, "ensync_transaction_seconds_count", tier="1s", result="commit") >= 1
        for phase in TurnPhases.NAMES:  # every committed turn reports each of its phases
            assert _value(now, "ensync_turn_phase_seconds_count", tier="1s", phase=phase) >= 1
        assert _value(now, "ensync_turn_phase_seconds_sum", tier="1s", phase="acks") > 0
        assert _value(now, "ensync_partitions_assigned", tier="1s") == 2
        assert _value(now, "ensync_partitions_restoring", tier="1s") == 0
        assert _value(now, "ensync_next_due_seconds", tier="1m") > 30
        assert _value(now, "ensync_oldest_overdue_seconds", tier="1m") == 0
        assert ("ensync_consumer_lag", (("partition", "0"), ("tier", "1m"))) in now
        assert _value(now, "ensync_tier_restarts_total", tier="1s") == 0
        assert _value(now, "ensync_ready") == 1
        assert not any(name == "ensync_open_transaction_seconds" for name, _ in now)

        # A transaction left open where the tiers write shows, and goes once it ends.
        monkeypatch.setattr(monitor, "STABILITY_CHECK_INTERVAL_S", 0.2)
        held = [
            {"topic": f"{unique_prefix}.state.1m", "partition": "0"},  # a changelog
            {"topic": f"{unique_prefix}.default.p4", "partition": "0"},  # a priority topic
        ]
        producer = transactional_producer(kafka_bootstrap)
        producer.begin_transaction()
        for labels in held:
            producer.produce(labels["topic"], b"open", b"k", partition=0)
        assert producer.flush(30) == 0

        def ages() -> list[float]:
            now = _scrape(port)
            return [_value(now, "ensync_open_transaction_seconds", **labels) for labels in held]

        wait_until(lambda: min(ages()) > 0.5, timeout=WAIT_S, what="the open transaction's ages")
        producer.commit_transaction(30)
        wait_until(
            lambda: (
                not any(
                    ("ensync_open_transaction_seconds", tuple(sorted(labels.items())))
                    in _scrape(port)
                    for labels in held
                )
            ),
            timeout=WAIT_S,
            what="the gauge to drop the committed transaction",
        )
    finally:
        client.close()
        worker.stop()
        thread.join(60)
    assert not worker.errors
