"""Once-only delivery: duplicate defer_ids, and restoring a worker's state from the changelog."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer

from ensync_kafka import BrokerError, DeferClient, DeferRequest, _kafka, _txn, ensure_topics
from ensync_kafka import worker as worker_module
from ensync_kafka._txn import (
    PRODUCER_RENEWALS_MAX,
    TRANSACTIONAL_PRODUCERS,
    TransactionalProducers,
    transactional_id,
)
from ensync_kafka.models import to_ms
from ensync_kafka.topics import TopicNames
from ensync_kafka.worker import TierWorker
from tests.helpers import (
    TopicReader,
    WorkerThread,
    audit_records,
    collect_ledger,
    delivered,
    pipeline_config,
    queue_reader,
    strand,
    wait_until,
)

WAIT_S = 30.0


def _audits(reader: TopicReader, event: str, defer_id: str) -> int:
    return sum(
        1
        for a in audit_records(reader.records)
        if a["event"] == event and a["defer_id"] == defer_id
    )


def test_duplicate_defer_id_delivered_once(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path / "state")
    ensure_topics(config)
    names = TopicNames(unique_prefix)
    with (
        WorkerThread(config) as worker,
        queue_reader(kafka_bootstrap, unique_prefix) as reader,
        TopicReader(kafka_bootstrap, [names.audit]) as audit_reader,
        DeferClient(config) as client,
    ):
        # The same request sent twice (a client retry): the second is held-duplicate.
        first = client.defer("dup", {"n": 1}, delay=1.5, defer_id="dup-held", reason="r")
        again = client.defer("dup", {"n": 1}, delay=1.5, defer_id="dup-held", reason="r")
        assert first.tier == again.tier  # same requested delay: same tier and partition
        # Twice in one batch: both may reach the worker in the same transaction.
        same = DeferRequest(name="dup", payload={"n": 2}, delay=0.5, defer_id="dup-batch")
        client.defer_many([same, same])
        reader.poll_until(
            lambda records: (
                {d.event.defer_id for d in delivered(records)} >= {"dup-held", "dup-batch"}
            ),
            timeout=WAIT_S,
            what="both deferrals",
        )
        # Sent once more after delivery (a late retry): dropped by the delivered marker.
        late = client.defer("dup", {"n": 1}, delay=1.5, defer_id="dup-held", reason="r")
        assert late.tier == first.tier
        audit_reader.poll_until(
            lambda _: (
                _audits(audit_reader, "DUPLICATE", "dup-held") >= 2
                and _audits(audit_reader, "DUPLICATE", "dup-batch") >= 1
            ),
            timeout=WAIT_S,
            what="DUPLICATE audit records",
            describe=lambda records: str(
                [(a["event"], a["defer_id"]) for a in audit_records(records)]
            ),
        )
        reader.drain(2.0)
        audit_reader.drain(0.5)
        stats = worker.stats()

    ids = [d.event.defer_id for d in delivered(reader.records)]
    assert sorted(ids) == ["dup-batch", "dup-held"], f"delivered: {ids}"
    by_id = {d.event.defer_id: d for d in delivered(reader.records)}
    # The first send wins: the delivered event has the first request's due time.
    assert by_id["dup-held"].event.due_at == first.due_at
    assert by_id["dup-held"].record.received_ms >= to_ms(first.due_at)
    assert _audits(audit_reader, "DUPLICATE", "dup-held") == 2
    assert _audits(audit_reader, "DUPLICATE", "dup-batch") == 1
    assert _audits(audit_reader, "DEFERRED", "dup-held") == 1
    assert _audits(audit_reader, "DELIVERED", "dup-held") == 1
    duplicate = next(
        a
        for a in audit_records(audit_reader.records)
        if a["event"] == "DUPLICATE" and a["defer_id"] == "dup-held"
    )
    assert "duplicate" in duplicate["reason"]
    assert stats["duplicates"] == 3
    assert stats["delivered"] == 2


@pytest.mark.timeout(180)
def test_restore_from_changelog_on_a_fresh_state_directory(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    config = pipeline_config(unique_prefix, kafka_bootstrap, state_dir, worker_id="first")
    ensure_topics(config)
    names = TopicNames(unique_prefix)
    early_ids = [f"early-{i}" for i in range(4)]
    pending_ids = [f"pending-{i}" for i in range(6)]
    pending_delay_s = 6.0
    expected: dict[str, int] = {}

    reader = queue_reader(kafka_bootstrap, unique_prefix)
    audit_reader = TopicReader(kafka_bootstrap, [names.audit])
    try:
        with DeferClient(config) as client:
            with WorkerThread(config) as first:
                receipts = client.defer_many(
                    [
                        DeferRequest(name="early", payload=i, delay=0.3, defer_id=i)
                        for i in early_ids
                    ]
                    + [
                        DeferRequest(name="pending", payload=i, delay=pending_delay_s, defer_id=i)
                        for i in pending_ids
                    ]
                )
                expected.update({r.defer_id: to_ms(r.due_at) for r in receipts})
                assert {r.tier for r in receipts} == {"1s", "10s"}
                reader.poll_until(
                    lambda records: len(records) >= len(early_ids),
                    timeout=WAIT_S,
                    what="the early deferrals",
                )
                wait_until(
                    lambda: first.stats()["accepted"] >= len(expected),
                    timeout=WAIT_S,
                    what="the first worker to hold every pending deferral",
                    describe=lambda: str(first.stats()),
                )
            # The first worker is stopped: its state directory goes, only the changelog is left.
            seen = {d.event.defer_id for d in delivered(reader.records)}
            too_late = seen & set(pending_ids)
            assert not too_late, f"the machine is too slow for this test: {too_late} already due"
            assert (state_dir / unique_prefix / "first").is_dir()
            shutil.rmtree(state_dir)

            second_config = pipeline_config(
                unique_prefix, kafka_bootstrap, state_dir, worker_id="second"
            )
            with WorkerThread(second_config) as second:
                # Restored from the changelog: the pending timers are held again, and the
                # delivered ones are known as delivered.
                stores = [s for tier in second.worker.tiers for s in tier.stores.values()]

                def known(defer_id: str) -> bool:
                    return any(
                        s.held_key(defer_id) is not None or s.marker(defer_id) is not None
                        for s in stores
                    )

                unknown = [i for i in pending_ids if not known(i)]
                assert not unknown, f"pending deferrals missing from the restored state: {unknown}"
                undelivered = [i for i in early_ids if not any(s.marker(i) for s in stores)]
                assert not undelivered, f"delivered markers not restored: {undelivered}"
                # Resending a delivered one is recognised from the restored markers.
                client.defer("early", "again", delay=0.2, defer_id=early_ids[0])
                ledger = collect_ledger(
                    kafka_bootstrap, [], expected, timeout=WAIT_S, drain_s=2.0, reader=reader
                )
                audit_reader.poll_until(
                    lambda _: _audits(audit_reader, "DUPLICATE", early_ids[0]) >= 1,
                    timeout=WAIT_S,
                    what="the DUPLICATE audit of the resent delivered deferral",
                )
                stats = second.stats()
    finally:
        reader.close()
        audit_reader.close()

    ledger.assert_exactly_once()
    assert stats["delivered"] == len(pending_ids)  # only the pending ones, by the new worker
    for defer_id in pending_ids:
        [delivery] = ledger.deliveries[defer_id]
        assert delivery.record.received_ms >= expected[defer_id]


def test_schedule_retry_with_the_same_at_is_delivered_once(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """A retried ``schedule(at=...)`` is the same request, but its delay (at - now) shrinks while
    the caller retries. The retry must still be recognised as a duplicate of the first send,
    even when the shorter delay falls into a lower tier."""
    tiers = [{"name": "1s", "span": 1}, {"name": "3s", "span": 3}]
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path / "state", tiers=tiers)
    ensure_topics(config)
    with (
        WorkerThread(config),
        queue_reader(kafka_bootstrap, unique_prefix) as reader,
        DeferClient(config) as client,
    ):
        at = datetime.now(tz=UTC) + timedelta(seconds=1.6)
        first = client.schedule("sched", {"n": 1}, at=at, defer_id="sched-retry")
        assert first.tier == "3s"
        # The caller did not see the acknowledgement and retries half a second later.
        wait_until(
            lambda: datetime.now(tz=UTC) >= at - timedelta(seconds=0.9),
            timeout=5,
            what="the retry moment",
        )
        retry = client.schedule("sched", {"n": 1}, at=at, defer_id="sched-retry")
        assert retry.due_at == first.due_at
        ledger = collect_ledger(
            kafka_bootstrap,
            [],
            {"sched-retry": to_ms(first.due_at)},
            timeout=WAIT_S,
            drain_s=2.0,
            reader=reader,
        )
    assert ledger.duplicated == {}, (
        f"the retry went to tier {retry.tier} (first: {first.tier}) and was delivered again: "
        + ledger.summary()
    )
    ledger.assert_exactly_once()


def _fence(bootstrap: str, transactional_id: str) -> None:
    """What a newer instance with the same transactional id does to the one before it."""
    intruder = Producer({"bootstrap.servers": bootstrap, "transactional.id": transactional_id})
    intruder.init_transactions(WAIT_S)
    intruder.flush(5)


def _assert_exactly_once_across(
    bootstrap: str,
    prefix: str,
    tmp_path: Path,
    disturb: Callable[[TierWorker], None],
    settled: Callable[[TierWorker], None],
) -> None:
    """150 deferrals, ``disturb(tier)`` once the first are delivered, 150 more; ``settled(tier)``
    waits for the worker's recovery before it stops; then both batches were delivered exactly
    once."""
    config = pipeline_config(prefix, bootstrap, tmp_path / "state", worker_id="d")
    ensure_topics(config)
    expected: dict[str, int] = {}
    with (
        WorkerThread(config, ["1s"]) as worker,
        queue_reader(bootstrap, prefix) as reader,
        DeferClient(config) as client,
    ):
        tier = worker.worker.tiers[0]

        def send(batch: int) -> None:
            requests = [
                DeferRequest(name="d", payload=i, delay=0.2 + i / 200, defer_id=f"b{batch}-{i}")
                for i in range(150)
            ]
            expected.update({r.defer_id: to_ms(r.due_at) for r in client.defer_many(requests)})

        send(0)
        reader.poll_until(lambda r: len(r) > 0, timeout=WAIT_S, what="the first deliveries")
        disturb(tier)
        send(1)
        ledger = collect_ledger(bootstrap, [], expected, timeout=WAIT_S, reader=reader)
        settled(tier)
        assert worker.error is None
    ledger.assert_exactly_once()


def _all_new(tier: TierWorker, old: Iterable[Producer]) -> bool:
    """None of ``tier``'s producers is one of ``old``: compared by identity with the old objects
    held by the caller, since a freed producer's ``id()`` can come back as its replacement's."""
    return not any(p is o for p in tier.txn.producers for o in old)


def test_a_fenced_producer_is_replaced_and_nothing_is_lost_or_repeated(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    fenced: list[Producer] = []

    def disturb(tier: TierWorker) -> None:
        fenced.extend(tier.txn.producers)
        for n in range(TRANSACTIONAL_PRODUCERS):  # both, while releases are under way
            _fence(kafka_bootstrap, transactional_id(unique_prefix, "1s", "d", n))

    def settled(tier: TierWorker) -> None:
        # A replacement replaces both, as a restart would; one that races an intruder's own
        # start is fenced once more.
        wait_until(
            lambda: tier.txn.renewals and _all_new(tier, fenced),
            timeout=WAIT_S,
            what="both fenced producers replaced",
        )
        # The fenced producers are closed, not kept: their retiring threads end.
        wait_until(
            lambda: not [t for t in threading.enumerate() if t.name.startswith("retire-")],
            timeout=WAIT_S,
            what="the replaced producers to close",
        )

    _assert_exactly_once_across(kafka_bootstrap, unique_prefix, tmp_path, disturb, settled)


def test_a_stranded_tier_consumer_is_replaced_and_nothing_is_lost_or_repeated(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """The tier consumer reports no broker (as after librdkafka #5301) mid-stream: the worker
    lets its partitions go, joins again with new clients, and delivers each deferral once."""
    stranded: list[Consumer] = []

    def disturb(tier: TierWorker) -> None:
        stranded.append(tier.consumer)
        strand(tier._consumer_watch)

    def settled(tier: TierWorker) -> None:
        wait_until(
            lambda: tier.consumer is not stranded[0] and bool(tier.stores),
            timeout=WAIT_S,
            what="a new consumer with the partitions back",
        )
        assert tier.stats.restarts == 1

    _assert_exactly_once_across(kafka_bootstrap, unique_prefix, tmp_path, disturb, settled)


def test_an_assignment_whose_committed_offsets_time_out_is_joined_again(
    kafka_bootstrap: str,
    unique_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The new consumer's ``committed()`` times out in its assignment (as while a transaction
    holding the group's offsets stays open): the tier joins again instead of dying, and delivers
    each deferral once. Before, confluent-kafka raised that timeout from consume() as a bare
    KafkaError, which ended the tier's thread past every ``except``."""
    failures: list[BaseException | None] = []

    def disturb(tier: TierWorker) -> None:
        timeout = worker_module.ASSIGN_COMMITTED_TIMEOUT_S
        monkeypatch.setattr(worker_module, "ASSIGN_COMMITTED_TIMEOUT_S", 1e-6)
        recover = tier._after_rebalance_failure

        def once_failed() -> None:
            monkeypatch.setattr(worker_module, "ASSIGN_COMMITTED_TIMEOUT_S", timeout)
            failures.append(tier._rebalance_failure)
            recover()

        monkeypatch.setattr(tier, "_after_rebalance_failure", once_failed)
        strand(tier._consumer_watch)  # a rejoin with a new consumer: a new assignment

    def settled(tier: TierWorker) -> None:
        wait_until(
            lambda: failures and bool(tier.stores),
            timeout=WAIT_S,
            what="the failed assignment, then the partitions back",
        )
        assert tier.stats.restarts == 2  # the stranding, then the failed assignment

    _assert_exactly_once_across(kafka_bootstrap, unique_prefix, tmp_path, disturb, settled)
    assert len(failures) == 1 and isinstance(failures[0], KafkaException), failures
    assert "committed offsets" in str(failures[0])
    assert "assignment failed" in caplog.text and "topics hanging" in caplog.text  # the hint


def test_a_producer_fenced_again_and_again_stops_the_worker(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """Something else keeps taking our transactional id (two processes with one worker.id):
    after PRODUCER_RENEWALS_MAX replacements the worker stops instead of fencing it back."""
    config = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path / "state", worker_id="g")
    ensure_topics(config)
    worker = WorkerThread(config, ["1s"]).start()
    tier = worker.worker.tiers[0]
    with DeferClient(config) as client:
        for round_ in range(PRODUCER_RENEWALS_MAX + 1):
            fenced = tier.txn.producers
            for n in range(TRANSACTIONAL_PRODUCERS):
                _fence(kafka_bootstrap, transactional_id(unique_prefix, "1s", "g", n))
            client.defer("g", round_, delay=0.1)
            # Noticed, and every producer replaced: the next round fences the new ones.
            wait_until(
                lambda r=round_, f=fenced: (
                    worker.error is not None or (len(tier.txn.renewals) > r and _all_new(tier, f))
                ),
                timeout=WAIT_S,
                what=f"fencing round {round_} to be noticed",
            )
            if worker.error is not None:
                break
    with pytest.raises(BrokerError, match="fenced"):
        worker.stop()
    assert len(tier.txn.renewals) == PRODUCER_RENEWALS_MAX


class _Hang:
    """Once armed, the next call of ``method`` by any producer it wraps does not return until
    released, as send_offsets_to_transaction does while the group coordinator is unreachable
    or forgotten (librdkafka #5456, #5511). Released, it returns without reaching the broker."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.released = threading.Event()
        self._lock = threading.Lock()

    def wrap(self, producer: Producer) -> Any:
        hang = self

        class Wrapped:
            def __getattr__(self, name: str) -> Any:
                attr = getattr(producer, name)
                if name != hang.method:
                    return attr

                def call(*args: Any, **kwargs: Any) -> Any:
                    with hang._lock:
                        stuck = hang.armed.is_set() and not hang.entered.is_set()
                        if stuck:
                            hang.entered.set()
                    if not stuck:
                        return attr(*args, **kwargs)
                    hang.released.wait(WAIT_S * 4)
                    return None

                return call

        return Wrapped()


def test_send_offsets_that_never_returns_is_abandoned_and_nothing_is_lost_or_repeated(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """send_offsets_to_transaction stays inside librdkafka past its timeout: the tier leaves it
    in its thread, starts over with a new producer (which settles the open transaction),
    delivers everything once, and closes the stuck producer only once its call returns."""
    monkeypatch.setattr(_txn, "SEND_OFFSETS_TIMEOUT_S", 4.0)
    monkeypatch.setattr(_kafka, "OVERRUN_GRACE_S", 1.0)
    hang = _Hang("send_offsets_to_transaction")
    new_producer = TransactionalProducers._new
    monkeypatch.setattr(
        TransactionalProducers, "_new", lambda txn, n: hang.wrap(new_producer(txn, n))
    )

    def disturb(tier: TierWorker) -> None:
        hang.armed.set()

    def settled(tier: TierWorker) -> None:
        assert hang.entered.is_set(), "no offsets were sent after the first deliveries"
        assert len(tier.txn.renewals) == 1, "the stuck producer was replaced once"
        stuck = [t for t in threading.enumerate() if t.name == "bounded-1s-send-offsets"]
        assert stuck, "the stuck call's thread is gone: it was not left running"
        hang.released.set()
        wait_until(
            lambda: (
                not [t for t in threading.enumerate() if t in stuck or t.name.startswith("retire-")]
            ),
            timeout=WAIT_S,
            what="the abandoned call to return and its producer to close",
        )

    _assert_exactly_once_across(kafka_bootstrap, unique_prefix, tmp_path, disturb, settled)
