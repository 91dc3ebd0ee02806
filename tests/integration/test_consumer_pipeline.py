"""PriorityConsumer against a real broker, fed by the real pipeline (client -> worker -> topics).

Competing consumers, strict and weighted ordering, retries with backoff, poison pills to the
dead topic with one alert, redrive delivered once, rate limiting and load shedding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from ensync_kafka import (
    DeadLetter,
    DeferClient,
    DeferRequest,
    DeliveredEvent,
    Drop,
    PriorityConsumer,
    RateLimit,
    Retry,
    ensure_topics,
    read_dead_letters,
    redrive_dead_letters,
)
from ensync_kafka.config import Config, config_from_mapping
from ensync_kafka.hooks import WorkerHooks
from ensync_kafka.models import to_ms
from ensync_kafka.topics import TopicNames
from tests.helpers import (
    ConsumerThread,
    TopicReader,
    WorkerThread,
    audit_records,
    consumer_state,
    invalid_records,
    pipeline_mapping,
    strand,
    wait_until,
)

WAIT_S = 30.0
TIERS = ({"name": "all", "span": 3600},)
"""One tier for every delay the tests use, so one in-process tier worker serves them all."""


def make_config(
    prefix: str,
    bootstrap: str,
    tmp_path: Path,
    consumer: dict[str, Any] | None = None,
    *,
    partitions: int = 2,
) -> Config:
    data = pipeline_mapping(
        prefix, bootstrap, tmp_path / "state", tiers=TIERS, partitions=partitions
    )
    data["consumer"] = consumer or {}
    config = config_from_mapping(data, environ={})
    ensure_topics(config)
    return config


class CountDeliveries(WorkerHooks):
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def on_delivered(self, tier: str, deferral: dict[str, Any], delivered_at_ms: int) -> None:
        with self._lock:
            self.count += 1


class Recorder:
    """A handler that records every call, then runs ``behave`` (which may raise)."""

    def __init__(self, behave: Callable[[DeliveredEvent], None] | None = None) -> None:
        self.calls: list[tuple[float, DeliveredEvent]] = []
        self.behave = behave
        self._lock = threading.Lock()

    def __call__(self, event: DeliveredEvent) -> None:
        with self._lock:
            self.calls.append((time.monotonic(), event))
        if self.behave is not None:
            self.behave(event)

    @property
    def events(self) -> list[DeliveredEvent]:
        with self._lock:
            return [e for _, e in self.calls]


def backlog(client: DeferClient, hooks: CountDeliveries, requests: list[DeferRequest]) -> None:
    """Defer ``requests`` and wait until the worker has delivered all of them."""
    target = hooks.count + len(requests)
    client.defer_many(requests)
    wait_until(lambda: hooks.count >= target, timeout=WAIT_S, what=f"{len(requests)} deliveries")


def payload_ids(events: Iterable[DeliveredEvent]) -> list[int]:
    return [int(e.json()["i"]) for e in events]


def read_audit(
    bootstrap: str, prefix: str, done: Callable[[list[dict[str, Any]]], bool], what: str
) -> list[dict[str, Any]]:
    with TopicReader(bootstrap, [TopicNames(prefix).audit]) as reader:
        reader.poll_until(lambda r: done(audit_records(r)), timeout=WAIT_S, what=what)
        return audit_records(reader.records)


# -- competing consumers and ordering --------------------------------------------------------


def test_competing_consumers_split_the_work_none_twice(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = make_config(unique_prefix, kafka_bootstrap, tmp_path, partitions=3)
    total = 200
    joined = threading.Event()

    def work(event: DeliveredEvent) -> None:
        time.sleep(0.005 if joined.is_set() else 0.05)  # slow until b has joined

    first, second = Recorder(work), Recorder(work)
    hooks = CountDeliveries()
    with WorkerThread(config, hooks=hooks), DeferClient(config) as client:
        a = PriorityConsumer(config, consumer_settings={"client.id": "consumer-a"})
        with ConsumerThread(a, first) as thread_a:
            client.defer_many(
                DeferRequest(name="work", payload={"i": i}, delay=0, priority=1 + i % 5)
                for i in range(total)
            )
            wait_until(lambda: len(first.calls) >= 10, timeout=WAIT_S, what="a's first events")
            b = PriorityConsumer(config, consumer_settings={"client.id": "consumer-b"})
            with ConsumerThread(b, second) as thread_b:  # joins mid-stream: a rebalance
                wait_until(lambda: bool(b.assignment), timeout=WAIT_S, what="b's partitions")
                joined.set()
                wait_until(
                    lambda: (
                        thread_a.alive()
                        and thread_b.alive()
                        and len(first.calls) + len(second.calls) >= total
                    ),
                    timeout=WAIT_S,
                    what="every event handled",
                    describe=lambda: f"a {len(first.calls)}, b {len(second.calls)}",
                )
                time.sleep(0.5)  # anything handled twice would show up now
                assert set(a.assignment).isdisjoint(b.assignment)
    handled = Counter(payload_ids(first.events) + payload_ids(second.events))
    assert sorted(handled) == list(range(total))
    assert [i for i, n in handled.items() if n > 1] == []
    assert first.calls and second.calls, "both consumers take part"
    assert a.stats.handled + b.stats.handled == total


def test_partitions_paused_when_revoked_are_consumed_when_they_come_back(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """librdkafka keeps a partition's pause across revocation and re-assignment (librdkafka
    #1849): a partition paused for a full buffer, revoked (b joins) and assigned again (b
    leaves) must still be fetched, or its events wait forever."""
    config = make_config(unique_prefix, kafka_bootstrap, tmp_path, {"buffer": 2}, partitions=2)
    total = 300
    recorder = Recorder(lambda event: time.sleep(0.01))
    hooks = CountDeliveries()
    with WorkerThread(config, hooks=hooks), DeferClient(config) as client:
        a = PriorityConsumer(config, consumer_settings={"client.id": "consumer-a"})
        with ConsumerThread(a, recorder) as thread_a:
            backlog(
                client,
                hooks,
                [
                    DeferRequest(name="p", payload={"i": i}, delay=0, priority=1 + i % 5)
                    for i in range(total)
                ],
            )
            wait_until(lambda: a._paused, timeout=WAIT_S, what="a to pause for its full buffer")
            b = PriorityConsumer(config, consumer_settings={"client.id": "consumer-b"})
            with ConsumerThread(b, recorder):
                wait_until(lambda: b.stats.handled >= 2, timeout=WAIT_S, what="b's first events")
                moved = set(b.assignment)
            assert moved, "b took partitions from a"
            wait_until(
                lambda: moved <= set(a.assignment), timeout=WAIT_S, what="b's partitions back on a"
            )
            wait_until(
                lambda: thread_a.alive() and set(payload_ids(recorder.events)) == set(range(total)),
                timeout=WAIT_S,
                what="every event handled",
                describe=lambda: (
                    f"{total - len(set(payload_ids(recorder.events)))} not yet; {consumer_state(a)}"
                ),
            )


def test_a_stranded_consumer_starts_over_and_handles_every_event(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """Its Kafka consumer reports no broker (as after librdkafka #5301): the PriorityConsumer
    opens new clients in the same run() and rejoins its group; every event is handled, none is
    lost (what was handled but not committed may come again: at least once)."""
    config = make_config(unique_prefix, kafka_bootstrap, tmp_path)
    total = 300
    recorder = Recorder(lambda event: time.sleep(0.002))
    with WorkerThread(config), DeferClient(config) as client:
        consumer = PriorityConsumer(config)
        with ConsumerThread(consumer, recorder) as thread:
            client.defer_many(
                DeferRequest(name="s", payload={"i": i}, delay=i / 100, priority=1 + i % 5)
                for i in range(total)
            )
            wait_until(lambda: len(recorder.calls) >= 20, timeout=WAIT_S, what="first events")
            stranded = consumer._consumer
            strand(consumer._watch)
            wait_until(
                lambda: consumer._consumer is not stranded and bool(consumer.assignment),
                timeout=WAIT_S,
                what="new clients with the partitions back",
            )
            wait_until(
                lambda: thread.alive() and set(payload_ids(recorder.events)) == set(range(total)),
                timeout=WAIT_S,
                what="every event handled",
                describe=lambda: f"{total - len(set(payload_ids(recorder.events)))} not yet",
            )
    assert len(recorder.calls) - total <= total  # a replay, not a loop
    assert consumer.stats.restarts == 1


def test_strict_ordering_drains_priority_5_first(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = make_config(unique_prefix, kafka_bootstrap, tmp_path, {"ordering": "strict"})
    recorder = Recorder()
    hooks = CountDeliveries()
    with WorkerThread(config, hooks=hooks), DeferClient(config) as client:
        backlog(
            client,
            hooks,
            [
                DeferRequest(name="mixed", payload={"i": i}, delay=0, priority=(1, 3, 5)[i % 3])
                for i in range(45)
            ],
        )
        with ConsumerThread(PriorityConsumer(config), recorder):
            wait_until(lambda: len(recorder.calls) >= 45, timeout=WAIT_S, what="45 events")
    priorities = [e.priority for e in recorder.events]
    assert priorities == [5] * 15 + [3] * 15 + [1] * 15


def test_weighted_ordering_lets_priority_1_progress(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = make_config(
        unique_prefix,
        kafka_bootstrap,
        tmp_path,
        {"ordering": "weighted", "shares": {"1": 0.25}},
    )
    started = threading.Event()

    def first_slowly(event: DeliveredEvent) -> None:
        # Partitions start fetching one by one; meanwhile the first event is in hand. Holding
        # it a moment lets the whole mixed backlog arrive, so the choice below is between both.
        if not started.is_set():
            started.set()
            time.sleep(0.5)

    recorder = Recorder(first_slowly)
    hooks = CountDeliveries()
    with WorkerThread(config, hooks=hooks), DeferClient(config) as client:
        requests = [
            DeferRequest(name="flood", payload={"i": i}, delay=0, priority=5) for i in range(40)
        ]
        requests += [
            DeferRequest(name="trickle", payload={"i": 100 + i}, delay=0, priority=1)
            for i in range(10)
        ]
        backlog(client, hooks, requests)
        with ConsumerThread(PriorityConsumer(config), recorder):
            wait_until(lambda: len(recorder.calls) >= 50, timeout=WAIT_S, what="50 events")
    priorities = [e.priority for e in recorder.events]
    first_half = priorities[1:21]
    assert first_half.count(1) >= 3, f"priority 1 starved: {priorities}"
    assert first_half.count(5) >= 12, f"priority 5 not preferred: {priorities}"
    assert priorities.index(1) < len(priorities) - priorities[::-1].index(5) - 1


# -- outcomes -----------------------------------------------------------------------------------


def test_failing_twice_then_succeeding_retries_with_growing_delays(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ensync_kafka.consumer")
    retry = {"base_delay": "300ms", "factor": 3, "jitter": 0, "max_attempts": 4}
    config = make_config(unique_prefix, kafka_bootstrap, tmp_path, {"retry": retry})

    def flaky(event: DeliveredEvent) -> None:
        if event.attempt < 3:
            raise RuntimeError(f"boom {event.attempt}")

    recorder = Recorder(flaky)
    hooks = CountDeliveries()
    consumer = PriorityConsumer(config)
    with WorkerThread(config, hooks=hooks), DeferClient(config) as client:
        receipt = client.defer("charge", {"i": 1}, delay=0, priority=4, key="acct-7")
        with ConsumerThread(consumer, recorder):
            wait_until(lambda: consumer.stats.handled == 1, timeout=WAIT_S, what="success")
        audit = read_audit(
            kafka_bootstrap,
            unique_prefix,
            lambda recs: sum(r["event"] == "RETRIED" for r in recs) >= 2,
            "two RETRIED audit records",
        )
    calls = recorder.calls
    events = [e for _, e in calls]
    assert [e.attempt for e in events] == [1, 2, 3]
    root = receipt.defer_id
    assert [e.defer_id for e in events] == [root, f"{root}:a2", f"{root}:a3"]
    assert {e.priority for e in events} == {4}  # a retry keeps its priority
    assert {e.key for e in events} == {b"acct-7"}
    requested = [(to_ms(e.due_at) - to_ms(e.deferred_at)) / 1000 for e in events[1:]]
    assert requested == pytest.approx([0.3, 0.9], abs=0.01)  # exponential backoff
    gaps = [calls[1][0] - calls[0][0], calls[2][0] - calls[1][0]]
    assert gaps[0] >= 0.3 - 0.01 and gaps[1] >= 0.9 - 0.01 and gaps[1] > gaps[0]
    assert [(a.attempt, a.reason) for a in events[2].history] == [
        (1, "RuntimeError: boom 1"),
        (2, "RuntimeError: boom 2"),
    ]
    assert consumer.stats.retried == 2 and consumer.stats.dead == 0
    retried = [r for r in audit if r["event"] == "RETRIED"]
    assert [r["reason"] for r in retried] == ["RuntimeError: boom 1", "RuntimeError: boom 2"]
    # One structured line per step, each naming the event, defer_id, attempt and priority.
    steps = [
        (r.getMessage().split()[0], r.levelname, getattr(r, "defer_id", None))
        for r in caplog.records
        if r.name == "ensync_kafka.consumer" and hasattr(r, "step")
    ]
    assert steps == [
        ("attempting", "DEBUG", root),
        ("doing", "DEBUG", root),
        ("retrying", "WARNING", root),
        ("attempting", "DEBUG", f"{root}:a2"),
        ("doing", "DEBUG", f"{root}:a2"),
        ("retrying", "WARNING", f"{root}:a2"),
        ("attempting", "DEBUG", f"{root}:a3"),
        ("doing", "DEBUG", f"{root}:a3"),
        ("finishing", "INFO", f"{root}:a3"),
    ]
    retrying = next(r for r in caplog.records if getattr(r, "step", None) == "retrying")
    assert f"defer_id={root} attempt=1 priority=4" in retrying.getMessage()
    assert "event=charge" in retrying.getMessage() and "delay_s=0.3" in retrying.getMessage()


def test_a_crash_before_the_commit_does_not_retry_twice(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    retry = {"base_delay": "2s", "jitter": 0.5, "max_attempts": 3}
    config = make_config(unique_prefix, kafka_bootstrap, tmp_path, {"retry": retry})

    def first_attempt_fails(event: DeliveredEvent) -> None:
        if event.attempt == 1:
            raise ConnectionError("upstream reset")

    recorder = Recorder(first_attempt_fails)
    hooks = CountDeliveries()
    crashed = PriorityConsumer(config)
    crashed._commit = lambda **_: None  # type: ignore[method-assign]  # dies before committing
    survivor = PriorityConsumer(config)
    with WorkerThread(config, hooks=hooks) as worker, DeferClient(config) as client:
        receipt = client.defer("notify", {"i": 1}, delay=0, priority=2)
        with ConsumerThread(crashed, recorder):
            wait_until(lambda: crashed.stats.retried == 1, timeout=WAIT_S, what="the first retry")
        with ConsumerThread(survivor, recorder):  # handles attempt 1 again, same retry sent
            wait_until(lambda: survivor.stats.handled == 1, timeout=WAIT_S, what="the retry")
            wait_until(
                lambda: worker.stats()["duplicates"] == 1,
                timeout=WAIT_S,
                what="the second copy of the retry dropped",
            )
            time.sleep(0.5)
    root = receipt.defer_id
    assert [(e.defer_id, e.attempt) for e in recorder.events] == [
        (root, 1),
        (root, 1),
        (f"{root}:a2", 2),
    ]
    assert survivor.stats.retried == 1


def test_explicit_retry_drop_and_a_malformed_record(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ensync_kafka.consumer")
    config = make_config(unique_prefix, kafka_bootstrap, tmp_path)
    names = TopicNames(unique_prefix)

    def behave(event: DeliveredEvent) -> None:
        if event.name == "later" and event.attempt == 1:
            raise Retry(delay=0.4, reason="not ready")
        if event.name == "spam":
            raise Drop("spam filter")

    recorder = Recorder(behave)
    hooks = CountDeliveries()
    consumer = PriorityConsumer(config)
    with WorkerThread(config, hooks=hooks), DeferClient(config) as client:
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(names.priority("default", 2), key=b"junk", value=b"not avro")
        producer.flush(WAIT_S)
        later = client.defer("later", {"i": 1}, delay=0, priority=2)
        spam = client.defer("spam", {"i": 2}, delay=0, priority=2)
        with ConsumerThread(consumer, recorder):
            wait_until(
                lambda: consumer.stats.handled == 1 and consumer.stats.dropped == 1,
                timeout=WAIT_S,
                what="the retried event handled and the spam dropped",
            )
            time.sleep(0.5)  # a dropped event must not come back
        audit = read_audit(
            kafka_bootstrap,
            unique_prefix,
            lambda recs: {"RETRIED", "DROPPED"} <= {r["event"] for r in recs},
            "RETRIED and DROPPED audit records",
        )
        with TopicReader(kafka_bootstrap, [names.invalid]) as reader:
            reader.poll_until(lambda r: len(r) >= 1, timeout=WAIT_S, what="the quarantined record")
            invalid = invalid_records(reader.records)
    by_name = Counter(e.name for e in recorder.events)
    assert by_name == {"later": 2, "spam": 1}
    second = [e for e in recorder.events if e.name == "later"][1]
    assert second.defer_id == f"{later.defer_id}:a2"
    assert (to_ms(second.due_at) - to_ms(second.deferred_at)) == pytest.approx(400, abs=5)
    assert [(a.attempt, a.reason) for a in second.history] == [(1, "not ready")]
    dropped = [r for r in audit if r["event"] == "DROPPED"]
    assert [(r["defer_id"], r["reason"]) for r in dropped] == [(spam.defer_id, "spam filter")]
    assert consumer.stats.invalid == 1
    skipping = [r.getMessage() for r in caplog.records if getattr(r, "step", None) == "skipping"]
    assert skipping == [
        f"skipping event=spam defer_id={spam.defer_id} attempt=1 priority=2 queue=default "
        "outcome=dropped reason='spam filter'"
    ]
    assert invalid[0]["value"] == b"not avro" and "format marker" in invalid[0]["reason"]


def test_poison_pill_goes_dead_once_with_history_and_redrive_delivers_once(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ensync_kafka.consumer")
    retry = {"base_delay": "200ms", "factor": 2, "jitter": 0, "max_attempts": 3}
    config = make_config(unique_prefix, kafka_bootstrap, tmp_path, {"retry": retry})
    fixed = threading.Event()

    def poison(event: DeliveredEvent) -> None:
        if not fixed.is_set():
            raise ValueError(f"cannot parse, attempt {event.attempt}")

    alerts: list[DeadLetter] = []
    recorder = Recorder(poison)
    hooks = CountDeliveries()
    consumer = PriorityConsumer(config, alert=alerts.append)
    with WorkerThread(config, hooks=hooks) as worker, DeferClient(config) as client:
        receipt = client.defer("import.row", {"i": 9}, delay=0, priority=3, reason="import")
        with ConsumerThread(consumer, recorder):
            wait_until(lambda: len(alerts) == 1, timeout=WAIT_S, what="the alert")
            letters = read_dead_letters(config)
            assert len(letters) == 1
            letter = letters[0]

            fixed.set()
            first = redrive_dead_letters(config, letters, client=client)
            again = redrive_dead_letters(config, read_dead_letters(config), client=client)
            assert first[0].defer_id == again[0].defer_id == f"{letter.defer_id}:r"
            wait_until(lambda: consumer.stats.handled == 1, timeout=WAIT_S, what="the redrive")
            wait_until(
                lambda: worker.stats()["duplicates"] >= 1,
                timeout=WAIT_S,
                what="the second redrive dropped as a duplicate",
            )
            time.sleep(0.5)  # a second delivery would be handled now
        audit = read_audit(
            kafka_bootstrap,
            unique_prefix,
            lambda recs: sum(r["event"] == "REDRIVEN" for r in recs) == 2,
            "two REDRIVEN audit records",
        )

    root = receipt.defer_id
    assert [e.defer_id for e in recorder.events] == [
        root,
        f"{root}:a2",
        f"{root}:a3",
        f"{root}:a3:r",
    ]
    redriven = recorder.events[-1]
    assert (redriven.attempt, redriven.history, redriven.priority) == (1, (), 3)
    assert consumer.stats.dead == 1 and consumer.stats.handled == 1
    assert alerts == [letter] or alerts[0].defer_id == letter.defer_id
    assert letter.defer_id == f"{root}:a3"
    assert letter.attempt == 3
    assert letter.error == "ValueError: cannot parse, attempt 3"
    assert "ValueError" in letter.traceback and "poison" in letter.traceback
    assert [(a.attempt, a.reason) for a in letter.history] == [
        (n, f"ValueError: cannot parse, attempt {n}") for n in (1, 2, 3)
    ]
    times = [a.at for a in letter.history]
    assert times == sorted(times)
    assert letter.group == consumer.group and letter.priority == 3
    assert letter.json() == {"i": 9}
    dead_audit = [r for r in audit if r["event"] == "DEAD"]
    assert [r["defer_id"] for r in dead_audit] == [letter.defer_id]
    duplicates = [r for r in audit if r["event"] == "DUPLICATE"]
    assert [r["defer_id"] for r in duplicates] == [f"{root}:a3:r"]
    dead_lines = [r for r in caplog.records if getattr(r, "step", None) == "dead"]
    assert [(r.levelname, getattr(r, "defer_id", None)) for r in dead_lines] == [
        ("ERROR", letter.defer_id)
    ]


# -- rate limit and load shedding -----------------------------------------------------------------


def test_rate_limit_defers_the_excess(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = make_config(unique_prefix, kafka_bootstrap, tmp_path)
    limit = RateLimit(rate=4, per="1s", burst=2, name="partner-api")
    passed: list[tuple[float, int]] = []

    def call_out(event: DeliveredEvent) -> None:
        limit.acquire("acme")
        passed.append((time.monotonic(), event.json()["i"]))

    hooks = CountDeliveries()
    consumer = PriorityConsumer(config)
    total = 12
    with WorkerThread(config, hooks=hooks), DeferClient(config) as client:
        backlog(
            client,
            hooks,
            [DeferRequest(name="sync", payload={"i": i}, delay=0) for i in range(total)],
        )
        with ConsumerThread(consumer, Recorder(call_out)):
            wait_until(lambda: len(passed) >= total, timeout=WAIT_S, what="every event passed")
            time.sleep(0.3)
        audit = read_audit(
            kafka_bootstrap,
            unique_prefix,
            lambda recs: any(r["event"] == "RESCHEDULED" for r in recs),
            "RESCHEDULED audit records",
        )
    assert sorted(i for _, i in passed) == list(range(total))  # each once
    assert consumer.stats.postponed >= total - 2 - 1
    times = sorted(t for t, _ in passed)
    for n, t in enumerate(times, start=1):  # never more than the bucket allows
        assert n <= limit.burst + limit.rate * (t - times[0]) + 1
    rescheduled = [r for r in audit if r["event"] == "RESCHEDULED"]
    assert all("partner-api[acme]" in r["reason"] for r in rescheduled)


def test_load_shedding_defers_only_low_priorities_while_lagging(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    shedding = {"lag_threshold": 10, "max_priority": 2, "delay": "1s"}
    config = make_config(unique_prefix, kafka_bootstrap, tmp_path, {"shedding": shedding})
    recorder = Recorder()
    hooks = CountDeliveries()
    consumer = PriorityConsumer(config)
    with WorkerThread(config, hooks=hooks), DeferClient(config) as client:
        backlog(
            client,
            hooks,
            [
                DeferRequest(name="load", payload={"i": i}, delay=0, priority=(5, 2, 1)[i % 3])
                for i in range(36)
            ],
        )
        with ConsumerThread(consumer, recorder):
            wait_until(
                lambda: len(set(payload_ids(recorder.events))) >= 36,
                timeout=WAIT_S,
                what="every event handled",
            )
            time.sleep(0.3)
        audit = read_audit(
            kafka_bootstrap,
            unique_prefix,
            lambda recs: sum(r["event"] == "SHED" for r in recs) >= consumer.stats.shed,
            "SHED audit records",
        )
    handled = Counter(payload_ids(recorder.events))
    assert sorted(handled) == list(range(36)) and max(handled.values()) == 1
    shed = [r for r in audit if r["event"] == "SHED"]
    assert consumer.stats.shed == len(shed) > 0
    assert {r["priority"] for r in shed} <= {1, 2}
    assert all(r["reason"].startswith("load shedding: lag ") for r in shed)
    by_priority = {e.priority: e for e in recorder.events}
    assert ":p" not in by_priority[5].defer_id
    high = [e for e in recorder.events if e.priority == 5]
    assert len(high) == 12 and all(e.defer_id.count(":") == 0 for e in high)
    assert recorder.events[:12] == high  # handled first, never shed
    assert any(":p" in e.defer_id for e in recorder.events)  # shed ones came back later
