"""A tier worker's intake and release staging, without a broker: what one turn would write."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message

from ensync_kafka._intake import DUPLICATE_REASON, Intake
from ensync_kafka._release import Release
from ensync_kafka._sticky import StickyPartitions
from ensync_kafka._turn import Turn
from ensync_kafka.audit import DeferralAudit
from ensync_kafka.codec import AUDIT, DELIVERED, INVALID, MARKER
from ensync_kafka.control import CONTROL, OP_HEADER
from ensync_kafka.state import MARKER_PREFIX, TIMER, PartitionStore, Timer, timer_key
from ensync_kafka.topics import TopicNames
from tests.helpers import raw_deferral

NAMES = TopicNames("t")
QUEUES = ("default", "billing")
TOPIC = NAMES.defer("10s")
NOW = 1_000_000


def _value(defer_id: str = "d1", **changes: Any) -> bytes:
    """A Deferral's bytes: priority 3, reason "r", due 500 ms after NOW, unless changed."""
    return raw_deferral(defer_id, **{"priority": 3, "reason": "r", "due_at": NOW + 500, **changes})


def _msg(value: bytes, *, key: bytes | None = b"d1", offset: int = 7, headers: Any = None) -> Any:
    return Message(topic=TOPIC, partition=2, offset=offset, key=key, value=value, headers=headers)


def _audit_events(turn: Turn) -> list[tuple[str, str]]:
    return [
        (rec["event"], rec["reason"])
        for rec in (AUDIT.decode(v) for t, _, v, _, _ in turn.records if t == NAMES.audit)
    ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PartitionStore]:
    s = PartitionStore(tmp_path / "p2")
    yield s
    s.close()


@pytest.fixture
def intake() -> Intake:
    audit_of = DeferralAudit(tier="10s", actor="worker:w1")
    return Intake(NAMES, QUEUES, tier="10s", actor="worker:w1", audit_of=audit_of)


def test_a_deferral_is_held_as_a_timer_and_audited_as_deferred(
    intake: Intake, store: PartitionStore
) -> None:
    turn = Turn()
    value = _value()
    intake.take(_msg(value), 2, store, turn, NOW)
    key = timer_key(NOW + 500, 3, "d1")
    assert turn.changelog == {2: [(TIMER + key, value)]}
    assert _audit_events(turn) == [("DEFERRED", "r")]
    assert (turn.accepted, turn.duplicates, turn.invalid) == (1, 0, 0)
    assert [rec["defer_id"] for rec in turn.admitted] == ["d1"]


def test_a_defer_id_seen_in_the_turn_or_held_is_a_duplicate(
    intake: Intake, store: PartitionStore
) -> None:
    value = _value()
    turn = Turn()
    intake.take(_msg(value), 2, store, turn, NOW)
    intake.take(_msg(value, offset=8), 2, store, turn, NOW)
    assert (turn.accepted, turn.duplicates) == (1, 1)
    assert _audit_events(turn)[1] == ("DUPLICATE", DUPLICATE_REASON)
    store.apply(turn.changelog[2], 9)  # the turn committed
    later = Turn()
    intake.take(_msg(value, offset=9), 2, store, later, NOW)
    assert (later.accepted, later.duplicates, later.changelog) == (0, 1, {})


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\x00garbage", "not an ensync Deferral record"),
        (_value(priority=9), "priority 9 outside 1..5"),
        (_value(queue="nope"), "unknown queue 'nope'"),
        (_value(""), "empty defer_id"),
        (_value(due_at=-1), "negative due_at"),
    ],
)
def test_a_bad_record_is_quarantined_as_it_came_with_its_reason(
    intake: Intake, store: PartitionStore, value: bytes, reason: str
) -> None:
    turn = Turn()
    intake.take(_msg(value), 2, store, turn, NOW)
    assert turn.changelog == {} and turn.accepted == 0 and turn.invalid == 1
    [invalid] = [INVALID.decode(v) for t, _, v, _, _ in turn.records if t == NAMES.invalid]
    assert invalid["value"] == value and invalid["key"] == b"d1"
    where = (invalid["source_topic"], invalid["source_partition"], invalid["source_offset"])
    assert where == (TOPIC, 2, 7)
    assert reason in invalid["reason"]
    [(event, audited)] = _audit_events(turn)
    assert event == "REJECTED" and audited == invalid["reason"]


def test_a_cancel_in_the_same_turn_removes_the_timer_the_turn_added(
    intake: Intake, store: PartitionStore
) -> None:
    turn = Turn()
    intake.take(_msg(_value()), 2, store, turn, NOW)
    cancel = CONTROL.encode(
        {"op": "CANCEL", "defer_id": "d1", "request_id": "r1", "due_at": None, "at": NOW,
         "reason": "no longer needed", "actor": "ops"}
    )  # fmt: skip
    intake.take(_msg(cancel, offset=8, headers=[(OP_HEADER, b"cancel")]), 2, store, turn, NOW)
    key = TIMER + timer_key(NOW + 500, 3, "d1")
    changes = turn.changelog[2]
    assert changes[1] == (key, None)
    assert MARKER.decode(changes[2][1])["status"] == "CANCELLED"
    assert [effect.outcome for effect in turn.controls] == ["cancelled"]
    assert _audit_events(turn)[1] == ("CANCELLED", "no longer needed")


def test_a_malformed_control_request_is_quarantined(intake: Intake, store: PartitionStore) -> None:
    turn = Turn()
    intake.take(_msg(b"\x00x", headers=[(OP_HEADER, b"explode")]), 2, store, turn, NOW)
    assert turn.invalid == 1 and not turn.controls
    assert "unknown control op" in _audit_events(turn)[0][1]


# -- release ----------------------------------------------------------------------------------


def _timer(defer_id: str, due: int, **fields: Any) -> Timer:
    priority = fields.get("priority", 3)
    return Timer(
        key=timer_key(due, priority, defer_id), value=_value(defer_id, due_at=due, **fields)
    )


@pytest.fixture
def release() -> Release:
    r = Release(NAMES, QUEUES, tier="10s", audit_of=DeferralAudit(tier="10s", actor="worker:w1"))
    r.sticky = StickyPartitions({topic: 4 for topic in r.topics.values()})
    return r


def test_releases_are_stamped_with_the_turns_commit_instant(release: Release) -> None:
    """Late ones get the turn's start, pre-staged ones the latest due time among them: the
    commit waits for it, so none is visible before its stamp."""
    turn = Turn()
    due = [(2, _timer("late", NOW - 40)), (2, _timer("ahead", NOW + 8))]
    release.stage(due, NOW, turn)
    assert turn.commit_not_before_ms == NOW + 8
    delivered = [
        DELIVERED.decode(v) for t, _, v, _, _ in turn.records if t == NAMES.priority("default", 3)
    ]
    assert [(d["defer_id"], d["delivered_at"], d["tier"]) for d in delivered] == [
        ("late", NOW + 8, "10s"),
        ("ahead", NOW + 8, "10s"),
    ]
    assert [rec["defer_id"] for rec in turn.released] == ["late", "ahead"]
    assert _audit_events(turn) == [("DELIVERED", "r"), ("DELIVERED", "r")]


def test_a_release_removes_the_timer_and_leaves_a_delivered_marker(release: Release) -> None:
    turn = Turn()
    timer = _timer("d1", NOW - 1)
    release.stage([(2, timer)], NOW, turn)
    [(gone, tombstone), (marker_key, marker)] = turn.changelog[2]
    assert (gone, tombstone) == (TIMER + timer.key, None)
    assert marker_key == MARKER_PREFIX + b"d1"
    assert MARKER.decode(marker) == {"defer_id": "d1", "status": "DELIVERED", "at": NOW}


def test_keyed_releases_hash_by_key_and_keyless_ones_share_a_partition(release: Release) -> None:
    turn = Turn()
    due = [
        (0, _timer("a", NOW, key=b"k1", priority=5, queue="billing", headers=[
            {"key": "h", "value": b"v"}])),
        (1, _timer("b", NOW, priority=5, queue="billing")),
        (1, _timer("c", NOW, priority=5, queue="billing")),
    ]  # fmt: skip
    release.stage(due, NOW, turn)
    topic = NAMES.priority("billing", 5)
    out = [(key, headers, part) for t, key, _, headers, part in turn.records if t == topic]
    assert out[0] == (b"k1", [("h", b"v")], -1)  # the producer's key hashing
    assert [key for key, _, _ in out[1:]] == [b"b", b"c"]  # keyed by defer_id
    assert out[1][2] == out[2][2] >= 0


def test_nothing_due_stages_nothing(release: Release) -> None:
    turn = Turn()
    release.stage([], NOW, turn)
    assert turn.empty and turn.commit_not_before_ms == 0
