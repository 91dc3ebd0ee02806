"""WorkerHooks: on_batch still feeds the per-deferral hooks; metrics count batches and phases."""

from __future__ import annotations

from typing import Any

import pytest

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


def test_batch_histogram_exposes_what_prometheus_client_would() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from ensync_kafka.metrics import LATENESS_BUCKETS_S, BatchHistogram

    values = [0.0, 0.005, 0.0051, 0.3, 2.5, 42.0, 3600.0, 7200.0]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("late_seconds", "Doc.", "tier", LATENESS_BUCKETS_S)
    ours.register(batch)
    reference = Histogram("late_seconds", "Doc.", ["tier"], buckets=LATENESS_BUCKETS_S,
                          registry=theirs)  # fmt: skip
    for tier, part in (("1s", values[:3]), ("1s", values[3:]), ("10s", values[2:5])):
        batch.observe_many(tier, part)
        for value in part:
            reference.labels(tier).observe(value)
    batch.observe_many("1s", [-0.25])  # a clock step: counted at zero, never below
    reference.labels("1s").observe(0.0)

    def series(registry: CollectorRegistry) -> dict[str, str]:
        text = generate_latest(registry).decode()
        lines = (line.rsplit(" ", 1) for line in text.splitlines() if "_created" not in line)
        return dict((line[0], line[-1]) for line in lines)

    mine, reference_series = series(ours), series(theirs)
    assert mine.keys() == reference_series.keys()
    for name, value in mine.items():  # sums may differ in the last bit: added in another order
        expected = reference_series[name]
        assert value == expected or float(value) == pytest.approx(float(expected)), name


def test_turn_phases_reach_the_metrics_and_the_inner_hooks() -> None:
    from ensync_kafka import TurnPhases
    from ensync_kafka.metrics import MetricsHooks, WorkerMetrics

    seen: list[TurnPhases] = []

    class Inner(WorkerHooks):
        def on_phases(self, tier: str, phases: TurnPhases) -> None:
            seen.append(phases)

    metrics = WorkerMetrics(lambda: [], lag=lambda tier: {}, ready=lambda: True)
    hooks = MetricsHooks(metrics, Inner())
    phases = TurnPhases(
        stage=0.001, produce=0.002, acks=0.003, offsets=0.004, hold=0.0, commit=0.005, apply=0.006
    )
    hooks.on_phases("1s", phases)
    hooks.on_phases("1s", phases)

    assert TurnPhases.NAMES == ("stage", "produce", "acks", "offsets", "hold", "commit", "apply")
    assert abs(phases.total - 0.021) < 1e-9
    assert seen == [phases, phases]
    for name, seconds in phases.items():
        labels = {"tier": "1s", "phase": name}
        assert metrics.registry.get_sample_value("ensync_turn_phase_seconds_count", labels) == 2
        assert metrics.registry.get_sample_value("ensync_turn_phase_seconds_sum", labels) == (
            2 * seconds
        )
