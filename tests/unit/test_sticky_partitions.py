"""Keyless releases: one partition per topic per turn, the next turn on the next one."""

from __future__ import annotations

from collections import Counter

from ensync_kafka._sticky import STICKY_RECORDS, StickyPartitions

P1, P5 = "q.default.p1", "q.default.p5"


def turn(sticky: StickyPartitions, topic: str, n: int) -> list[int]:
    sticky.new_turn()
    return [sticky.partition(topic) for _ in range(n)]


def test_a_small_turn_writes_one_partition_per_topic_and_the_next_turn_the_next_one() -> None:
    sticky = StickyPartitions({P1: 6, P5: 6})
    first = turn(sticky, P1, 20)
    assert len(set(first)) == 1
    second = turn(sticky, P1, 20)
    assert set(second) == {(first[0] + 1) % 6}


def test_topics_move_on_independently() -> None:
    sticky = StickyPartitions({P1: 6, P5: 3})
    sticky.new_turn()
    p1 = {sticky.partition(P1) for _ in range(5)}
    p5 = {sticky.partition(P5) for _ in range(5)}
    assert len(p1) == len(p5) == 1
    assert p5 <= {0, 1, 2}


def test_a_large_turn_spreads_evenly_over_every_partition() -> None:
    sticky = StickyPartitions({P1: 6})
    counts = Counter(turn(sticky, P1, 6 * STICKY_RECORDS))
    assert counts == Counter({p: STICKY_RECORDS for p in range(6)})


def test_many_turns_use_every_partition_alike() -> None:
    sticky = StickyPartitions({P1: 4})
    counts = Counter(p for _ in range(400) for p in turn(sticky, P1, 3))
    assert counts == Counter({p: 300 for p in range(4)})


def test_a_topic_whose_partitions_are_unknown_is_left_to_the_producer() -> None:
    sticky = StickyPartitions({P1: 6})
    sticky.new_turn()
    assert sticky.partition("q.gone.p3") == -1
    assert StickyPartitions({}).partition(P1) == -1
