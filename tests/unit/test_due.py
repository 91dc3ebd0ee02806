"""DueTimers: which held timers a tier releases next, in what order, and how long it may wait."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ensync_kafka.config import WorkerConfig
from ensync_kafka.due import PREP_ESTIMATE_START_MS, DueTimers
from ensync_kafka.state import PartitionStore

from .test_state import T0, put

NOW = T0 + 60_000


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[dict[int, PartitionStore]]:
    s = {p: PartitionStore(tmp_path / f"p{p}") for p in (0, 1)}
    yield s
    for store in s.values():
        store.close()


def hold(store: PartitionStore, *timers: tuple[str, int, int]) -> None:
    store.apply([put(defer_id, due, priority) for defer_id, due, priority in timers], None)


def released(due: list) -> list[str]:
    return [timer.defer_id for _, timer in due]


def worker(**settings: object) -> WorkerConfig:
    return WorkerConfig.model_validate(
        {"catchup_grace": 1.0, "release_lookahead": 0.05, **settings}
    )


def test_on_time_timers_in_due_order_and_nothing_not_yet_due(
    stores: dict[int, PartitionStore],
) -> None:
    hold(stores[0], ("a", NOW - 10, 1), ("later", NOW + 5_000, 5))
    hold(stores[1], ("b", NOW - 5, 3), ("c", NOW, 1))
    due = DueTimers(worker()).take(stores, NOW)
    assert released(due) == ["a", "b", "c"]
    assert [p for p, _ in due] == [0, 1, 1]


def test_timers_due_within_the_lookahead_are_pre_staged(
    stores: dict[int, PartitionStore],
) -> None:
    timers = DueTimers(worker())
    assert timers.lookahead_ms == PREP_ESTIMATE_START_MS
    hold(stores[0], ("soon", NOW + 5, 1), ("beyond", NOW + 500, 1))
    assert released(timers.take(stores, NOW)) == ["soon"]


def test_the_lookahead_follows_the_preparation_time_up_to_its_cap() -> None:
    timers = DueTimers(worker(release_lookahead=0.03))
    for _ in range(100):
        timers.observe_prep(25.0)
    assert timers.lookahead_ms == 24  # the moving average converges on 25 from below
    for _ in range(100):
        timers.observe_prep(80.0)
    assert timers.lookahead_ms == 30
    assert DueTimers(worker(release_lookahead=0)).lookahead_ms == 0


def test_backlog_goes_highest_priority_first_then_oldest_across_partitions(
    stores: dict[int, PartitionStore],
) -> None:
    hold(stores[0], ("old-p1", NOW - 50_000, 1), ("new-p5", NOW - 2_000, 5))
    hold(stores[1], ("old-p5", NOW - 40_000, 5), ("p3", NOW - 30_000, 3))
    due = DueTimers(worker(catchup_rate=1000)).take(stores, NOW)
    assert released(due) == ["old-p5", "new-p5", "p3", "old-p1"]


def test_on_time_timers_go_before_the_backlog(stores: dict[int, PartitionStore]) -> None:
    hold(stores[0], ("overdue", NOW - 10_000, 5), ("on-time", NOW - 100, 1))
    due = DueTimers(worker(catchup_rate=1000)).take(stores, NOW)
    assert released(due) == ["on-time", "overdue"]


def test_the_backlog_is_capped_by_the_catch_up_rate(stores: dict[int, PartitionStore]) -> None:
    hold(stores[0], *((f"d{i:02d}", NOW - 10_000 - i, 1) for i in range(50)))
    timers = DueTimers(worker(catchup_rate=100))  # a burst of 0.1 s: 10 releases
    first = released(timers.take(stores, NOW))
    assert first == [f"d{i:02d}" for i in range(49, 39, -1)]  # oldest first
    assert timers.take(stores, NOW) == []  # the bucket is empty until it refills
    assert 0 < timers.wait_s(stores, NOW) <= 1 / 100


def test_a_fire_batch_bounds_a_turn(stores: dict[int, PartitionStore]) -> None:
    hold(stores[0], *((f"t{i}", NOW - 100 + i, 1) for i in range(10)))
    hold(stores[1], ("other", NOW - 50, 1))
    assert len(DueTimers(worker(fire_batch_size=4)).take(stores, NOW)) == 4


def test_wait_until_the_next_due_time_less_the_lookahead(
    stores: dict[int, PartitionStore],
) -> None:
    timers = DueTimers(worker(max_commit_interval=0.5))
    assert timers.wait_s(stores, NOW) == 0.5  # nothing held: the commit interval
    hold(stores[1], ("next", NOW + 200, 1))
    assert timers.wait_s(stores, NOW) == pytest.approx(0.19)  # 200 ms less 10 ms lookahead
    hold(stores[0], ("due", NOW - 100, 1))
    assert timers.wait_s(stores, NOW) == 0.0
