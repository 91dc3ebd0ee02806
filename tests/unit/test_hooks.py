"""WorkerHooks.on_batch: the per-deferral hooks still see every deferral of a transaction."""

from __future__ import annotations

from typing import Any

from ensync_kafka import WorkerHooks


class _Recorder(WorkerHooks):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int | None]] = []

    def on_accepted(self, tier: str, deferral: dict[str, Any]) -> None:
        self.calls.append(("accepted", deferral["defer_id"], None))

    def on_delivered(self, tier: str, deferral: dict[str, Any], delivered_at_ms: int) -> None:
        self.calls.append(("delivered", deferral["defer_id"], delivered_at_ms))


def test_on_batch_calls_the_per_deferral_hooks_in_order() -> None:
    hooks = _Recorder()
    hooks.on_batch("1s", [{"defer_id": "a"}, {"defer_id": "b"}], [{"defer_id": "c"}], 42)
    assert hooks.calls == [("accepted", "a", None), ("accepted", "b", None), ("delivered", "c", 42)]


def test_metrics_count_a_batch_per_queue_and_priority() -> None:
    from ensync_kafka.metrics import MetricsHooks, WorkerMetrics

    inner = _Recorder()
    metrics = WorkerMetrics(lambda: [], lag=lambda tier: {}, ready=lambda: True)
    hooks = MetricsHooks(metrics, inner)
    deferrals = [
        {"defer_id": str(i), "queue": "default", "priority": 1 + i % 2, "due_at": 1_000}
        for i in range(5)
    ]
    hooks.on_batch("10s", deferrals[:2], deferrals, 1_250)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    flow = {"tier": "10s", "queue": "default"}
    assert sample("ensync_deferrals_delivered_total", **flow, priority="1") == 3
    assert sample("ensync_deferrals_accepted_total", **flow, priority="2") == 1
    assert sample("ensync_delivery_lateness_seconds_sum", tier="10s") == 5 * 0.25
    assert len(inner.calls) == 7
