"""PartitionStore: the RocksDB projection of a tier partition's changelog."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ensync_kafka.codec import DEFERRAL, MARKER
from ensync_kafka.state import (
    MARKER_PREFIX,
    STATUS_CANCELLED,
    STATUS_DELIVERED,
    TIMER,
    PartitionStore,
    split_timer_key,
    timer_key,
)

T0 = 1_700_000_000_000


def deferral(defer_id: str, due_ms: int, priority: int = 1) -> bytes:
    return DEFERRAL.encode(
        {
            "defer_id": defer_id,
            "name": "n",
            "payload": b"{}",
            "content_type": "application/json",
            "key": None,
            "headers": [],
            "priority": priority,
            "queue": "default",
            "deferred_at": T0,
            "due_at": due_ms,
            "reason": "",
            "attempt": 1,
            "history": [],
        }
    )


def put(defer_id: str, due_ms: int, priority: int = 1) -> tuple[bytes, bytes]:
    return TIMER + timer_key(due_ms, priority, defer_id), deferral(defer_id, due_ms, priority)


def tombstone(defer_id: str, due_ms: int, priority: int = 1) -> tuple[bytes, None]:
    return TIMER + timer_key(due_ms, priority, defer_id), None


def marker(defer_id: str, at_ms: int, status: str = "DELIVERED") -> tuple[bytes, bytes]:
    value = MARKER.encode({"defer_id": defer_id, "status": status, "at": at_ms})
    return MARKER_PREFIX + defer_id.encode(), value


def ids(timers: list) -> list[str]:
    return [t.defer_id for t in timers]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PartitionStore]:
    s = PartitionStore(tmp_path / "p0")
    yield s
    s.close()


# -- keys -----------------------------------------------------------------------------------------


def test_timer_key_round_trip() -> None:
    key = timer_key(T0 + 5, 4, "abc-é")
    assert split_timer_key(key) == (T0 + 5, 4, "abc-é")


def test_timer_keys_sort_by_due_then_highest_priority_then_id() -> None:
    keys = [
        timer_key(T0 + 1, 1, "a"),
        timer_key(T0, 1, "a"),
        timer_key(T0, 5, "z"),
        timer_key(T0, 3, "b"),
        timer_key(T0, 3, "a"),
        timer_key(2**42, 5, "far"),
    ]
    order = [split_timer_key(k) for k in sorted(keys)]
    assert order == [
        (T0, 5, "z"),
        (T0, 3, "a"),
        (T0, 3, "b"),
        (T0, 1, "a"),
        (T0 + 1, 1, "a"),
        (2**42, 5, "far"),
    ]


# -- timers ---------------------------------------------------------------------------------------


def test_empty_store(store: PartitionStore) -> None:
    assert store.changelog_offset() is None
    assert store.next_due_ms() is None
    assert store.due(0, 2**62, 100) == []
    assert store.held_key("x") is None
    assert store.marker("x") is None
    assert list(store.iter_timers()) == []


def test_apply_puts(store: PartitionStore) -> None:
    store.apply([put("a", T0 + 100, 2), put("b", T0 + 50, 5)], next_offset=2)
    key_a = timer_key(T0 + 100, 2, "a")
    assert store.held_key("a") == key_a
    assert store.timer(key_a) == deferral("a", T0 + 100, 2)
    assert store.next_due_ms() == T0 + 50
    timers = store.due(0, T0 + 1000, 10)
    assert ids(timers) == ["b", "a"]
    assert (timers[0].due_ms, timers[0].priority) == (T0 + 50, 5)
    assert DEFERRAL.decode(timers[1].value)["defer_id"] == "a"
    assert store.changelog_offset() == 2


def test_apply_tombstones(store: PartitionStore) -> None:
    store.apply([put("a", T0, 3), put("b", T0 + 1, 3)], next_offset=2)
    store.apply([tombstone("a", T0, 3)], next_offset=3)
    assert store.held_key("a") is None
    assert store.timer(timer_key(T0, 3, "a")) is None
    assert ids(store.due(0, T0 + 10, 10)) == ["b"]
    assert ids(store.overdue(3, T0 + 10, 10)) == ["b"]
    assert store.next_due_ms() == T0 + 1


def test_tombstone_of_an_unknown_timer_is_harmless(store: PartitionStore) -> None:
    store.apply([tombstone("ghost", T0)], next_offset=1)
    assert store.due(0, 2**62, 10) == []
    assert store.changelog_offset() == 1


def test_put_and_tombstone_in_one_batch(store: PartitionStore) -> None:
    store.apply([put("a", T0), tombstone("a", T0), put("b", T0)], next_offset=3)
    assert ids(store.due(0, T0 + 1, 10)) == ["b"]
    assert store.held_key("a") is None


def test_what_is_known_of_an_id_moves_from_held_to_its_marker(store: PartitionStore) -> None:
    """One family answers both questions: held (and where), or finished (and how)."""
    assert not store.knows("a")
    store.apply([put("a", T0, 2)], next_offset=1)
    assert store.knows("a") and store.marker("a") is None
    store.apply([tombstone("a", T0, 2), put("a", T0 + 5, 2)], next_offset=3)  # a reschedule
    assert store.held_key("a") == timer_key(T0 + 5, 2, "a")
    store.apply([tombstone("a", T0 + 5, 2), marker("a", T0 + 6)], next_offset=5)  # delivered
    assert store.knows("a") and store.held_key("a") is None
    assert store.marker("a") == (STATUS_DELIVERED, T0 + 6)
    store.apply([(MARKER_PREFIX + b"a", None)], next_offset=6)  # the marker expired
    assert not store.knows("a") and store.expired_markers(2**62, 10) == []


@pytest.mark.parametrize("value", [b"", b"E", b"E\x01", b"E\x01\x02a"])
def test_a_malformed_marker_is_a_serialization_error(store: PartitionStore, value: bytes) -> None:
    from ensync_kafka import SerializationError

    with pytest.raises(SerializationError):
        store.apply([(MARKER_PREFIX + b"a", value)], next_offset=1)
    assert store.changelog_offset() is None


def test_a_marker_put_and_expired_in_one_replayed_batch_is_gone(store: PartitionStore) -> None:
    store.apply(
        [put("a", T0), tombstone("a", T0), marker("a", T0 + 1), (MARKER_PREFIX + b"a", None)],
        next_offset=4,
    )
    assert not store.knows("a")
    assert store.expired_markers(2**62, 10) == []


def test_a_store_of_another_layout_is_rebuilt_empty(tmp_path: Path) -> None:
    """State is a projection of the changelog: a directory written with other column families
    (an older version's) is dropped, and restore starts from the changelog's beginning."""
    from rocksdict import Options, Rdict

    old_path = tmp_path / "p0"
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    old = Rdict(str(old_path), options=opts, column_families={"index": opts, "markers": opts})
    old.get_column_family("index")[b"a"] = b"x" * 9
    old.close()
    store = PartitionStore(old_path)
    try:
        assert store.changelog_offset() is None
        assert not store.knows("a")
        store.apply([put("a", T0)], next_offset=1)
        assert store.knows("a")
    finally:
        store.close()
    reopened = PartitionStore(old_path)  # its own layout: kept
    try:
        assert reopened.changelog_offset() == 1 and reopened.knows("a")
    finally:
        reopened.close()


def test_due_orders_by_due_then_priority(store: PartitionStore) -> None:
    store.apply(
        [
            put("late-p5", T0 + 20, 5),
            put("early-p1", T0, 1),
            put("early-p5", T0, 5),
            put("mid-p3", T0 + 10, 3),
            put("early-p3", T0, 3),
        ],
        next_offset=5,
    )
    assert ids(store.due(0, T0 + 100, 100)) == [
        "early-p5",
        "early-p3",
        "early-p1",
        "mid-p3",
        "late-p5",
    ]


def test_due_bounds_and_limit(store: PartitionStore) -> None:
    store.apply([put(f"t{i}", T0 + i) for i in range(10)], next_offset=10)
    assert ids(store.due(T0 + 2, T0 + 5, 100)) == ["t2", "t3", "t4"]  # lower in, upper out
    assert ids(store.due(0, T0 + 10, 3)) == ["t0", "t1", "t2"]
    assert store.due(T0 + 10, T0 + 20, 100) == []
    assert store.due(0, T0, 100) == []


def test_overdue_is_per_priority_oldest_first(store: PartitionStore) -> None:
    store.apply(
        [
            put("p5-new", T0 + 30, 5),
            put("p1-old", T0, 1),
            put("p5-old", T0 + 10, 5),
            put("p5-future", T0 + 1000, 5),
            put("p3", T0 + 5, 3),
        ],
        next_offset=5,
    )
    assert ids(store.overdue(5, T0 + 100, 10)) == ["p5-old", "p5-new"]
    assert ids(store.overdue(5, T0 + 100, 1)) == ["p5-old"]
    assert ids(store.overdue(3, T0 + 100, 10)) == ["p3"]
    assert ids(store.overdue(1, T0 + 100, 10)) == ["p1-old"]
    assert store.overdue(2, T0 + 100, 10) == []
    # The returned timers carry the timer key and the held value, ready to fire.
    [timer] = store.overdue(3, T0 + 100, 10)
    assert timer.key == timer_key(T0 + 5, 3, "p3")
    assert timer.value == deferral("p3", T0 + 5, 3)


def test_iter_timers_in_due_order_and_after(store: PartitionStore) -> None:
    store.apply([put(f"t{i}", T0 + 10 - i) for i in range(5)], next_offset=5)
    timers = list(store.iter_timers())
    assert ids(timers) == ["t4", "t3", "t2", "t1", "t0"]
    assert ids(list(store.iter_timers(after=timers[1].key))) == ["t2", "t1", "t0"]


def test_replaying_records_is_harmless(store: PartitionStore) -> None:
    records = [put("a", T0, 2), put("b", T0 + 1, 4), tombstone("a", T0, 2), marker("a", T0 + 2)]
    store.apply(records, next_offset=4)
    store.apply(records, next_offset=4)
    assert ids(store.due(0, 2**62, 10)) == ["b"]
    assert store.marker("a") == (STATUS_DELIVERED, T0 + 2)
    assert store.expired_markers(2**62, 10) == ["a"]


# -- markers --------------------------------------------------------------------------------------


def test_markers_and_expiry(store: PartitionStore) -> None:
    store.apply(
        [marker("a", T0 + 30), marker("b", T0 + 10), marker("c", T0 + 20, "CANCELLED")],
        next_offset=3,
    )
    assert store.marker("a") == (STATUS_DELIVERED, T0 + 30)
    assert store.marker("c") == (STATUS_CANCELLED, T0 + 20)
    assert store.expired_markers(T0 + 25, 10) == ["b", "c"]  # oldest first, at < before
    assert store.expired_markers(T0 + 25, 1) == ["b"]
    assert store.expired_markers(T0 + 10, 10) == []
    store.apply([(MARKER_PREFIX + b"b", None)], next_offset=4)  # expired: tombstoned
    assert store.marker("b") is None
    assert store.expired_markers(T0 + 25, 10) == ["c"]
    assert store.expired_markers(2**62, 10) == ["c", "a"]


def test_markers_of_one_batch_sharing_a_tail_keep_their_own_status_and_time(
    store: PartitionStore,
) -> None:
    """apply() decodes a tail (status, time) shared by several markers once: ids of every
    length, and markers that differ only in status or time, must each still read back right."""
    long_id = "L" * 64  # its length takes two zigzag bytes: no shared-tail shortcut
    batch = [
        marker("a", T0),
        marker("b", T0),
        marker(long_id, T0),
        marker("c", T0, "CANCELLED"),
        marker("d", T0 + 1),
        marker("é", T0),
    ]
    store.apply(batch, next_offset=len(batch))
    assert store.marker("a") == store.marker("b") == store.marker("é") == (STATUS_DELIVERED, T0)
    assert store.marker(long_id) == (STATUS_DELIVERED, T0)
    assert store.marker("c") == (STATUS_CANCELLED, T0)
    assert store.marker("d") == (STATUS_DELIVERED, T0 + 1)
    assert store.expired_markers(T0 + 1, 10) == sorted(["a", "b", "c", long_id, "é"])


def test_delivering_a_timer_moves_it_to_a_marker(store: PartitionStore) -> None:
    store.apply([put("a", T0, 4)], next_offset=1)
    store.apply([tombstone("a", T0, 4), marker("a", T0 + 3)], next_offset=3)
    assert store.held_key("a") is None
    assert store.marker("a") == (STATUS_DELIVERED, T0 + 3)
    assert store.next_due_ms() is None


# -- changelog offset and persistence -------------------------------------------------------------


def test_changelog_offset(store: PartitionStore) -> None:
    assert store.changelog_offset() is None
    store.apply([], next_offset=0)
    assert store.changelog_offset() == 0
    store.apply([put("a", T0)], next_offset=42)
    assert store.changelog_offset() == 42
    store.apply([put("b", T0)], next_offset=None)  # applied without moving the offset
    assert store.changelog_offset() == 42
    store.apply([], next_offset=2**40)
    assert store.changelog_offset() == 2**40


def test_reopen_after_close(tmp_path: Path) -> None:
    path = tmp_path / "tier" / "3"
    first = PartitionStore(path)
    first.apply(
        [put("held", T0 + 5, 5), put("gone", T0, 1), tombstone("gone", T0, 1), marker("gone", T0)],
        next_offset=17,
    )
    first.close()

    again = PartitionStore(path)  # the lock was released by close()
    try:
        assert again.changelog_offset() == 17
        assert ids(again.due(0, 2**62, 10)) == ["held"]
        assert again.held_key("held") == timer_key(T0 + 5, 5, "held")
        assert again.held_key("gone") is None
        assert again.marker("gone") == (STATUS_DELIVERED, T0)
        assert ids(again.overdue(5, T0 + 10, 10)) == ["held"]
        again.apply([put("more", T0 + 1, 2)], next_offset=18)
        assert ids(again.due(0, 2**62, 10)) == ["more", "held"]
    finally:
        again.close()


def test_destroy_removes_the_state(tmp_path: Path) -> None:
    path = tmp_path / "p"
    s = PartitionStore(path)
    s.apply([put("a", T0)], next_offset=1)
    s.close()
    PartitionStore.destroy(path)
    assert not path.exists()
    fresh = PartitionStore(path)
    try:
        assert fresh.changelog_offset() is None
        assert fresh.due(0, 2**62, 10) == []
    finally:
        fresh.close()


def test_many_timers_scan_in_order(store: PartitionStore) -> None:
    records = [put(f"id{i:05d}", T0 + (i * 7919) % 5000, 1 + i % 5) for i in range(5000)]
    store.apply(records, next_offset=len(records))
    timers = store.due(0, 2**62, 10_000)
    assert len(timers) == 5000
    assert [t.key for t in timers] == sorted(t.key for t in timers)
    assert store.held_count() > 0


# -- scan floors (tombstone skipping) must never hide a live timer -------------------------------


def test_a_timer_put_below_the_raised_floor_is_still_found(store: PartitionStore) -> None:
    store.apply([put(f"a{i}", T0 + 100 + i) for i in range(50)], None)
    assert store.next_due_ms() == T0 + 100
    released = store.due(T0, T0 + 130, 1000)  # raises the floor past what it released
    assert len(released) == 30
    store.apply([tombstone(t.defer_id, t.due_ms) for t in released], None)
    assert store.next_due_ms() == T0 + 130
    store.apply([put("late", T0 + 5), put("mid", T0 + 120, 4)], None)  # below the floor
    assert store.next_due_ms() == T0 + 5
    assert ids(store.due(T0, T0 + 131, 10)) == ["late", "mid", "a30"]
    assert ids(store.overdue(4, T0 + 200, 10)) == ["mid"]
    assert ids(store.overdue(1, T0 + 200, 2)) == ["late", "a30"]


def test_an_emptied_store_finds_the_next_put(store: PartitionStore) -> None:
    store.apply([put("x", T0 + 10, 3)], None)
    assert ids(store.due(T0, T0 + 11, 10)) == ["x"]
    store.apply([tombstone("x", T0 + 10, 3)], None)
    assert store.next_due_ms() is None
    assert store.due(T0, T0 + 1000, 10) == []
    assert store.overdue(3, T0 + 1000, 10) == []
    store.apply([put("y", T0 + 1, 3)], None)
    assert store.next_due_ms() == T0 + 1
    assert ids(store.due(T0, T0 + 2, 10)) == ["y"]
    assert ids(store.overdue(3, T0 + 2, 10)) == ["y"]


def test_a_scan_above_the_floor_does_not_raise_it_past_older_timers(
    store: PartitionStore,
) -> None:
    # An on-time scan starts at now - grace, above an old (backlog) timer: the backlog must stay
    # visible to next_due_ms and to the overdue scan.
    store.apply([put("old", T0), put("new", T0 + 5000)], None)
    assert ids(store.due(T0 + 4000, T0 + 6000, 10)) == ["new"]
    store.apply([tombstone("new", T0 + 5000)], None)
    assert store.next_due_ms() == T0
    assert ids(store.overdue(1, T0 + 6000, 10)) == ["old"]
