"""Exactly-once ledgers with real worker processes: a SIGKILL mid-stream, rebalances, and the
broker itself restarted or frozen.

A stream of deferrals with random delays (0.5-4 s) and priorities over two tiers is sent while
the workers are disturbed; then every defer_id must be delivered exactly once, never early, to a
read_committed consumer of all the priority topics.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ensync_kafka import (
    DeferClient,
    DeferRequest,
    ensure_topics,
)
from ensync_kafka.config import GROUP_PROTOCOLS, config_from_mapping
from ensync_kafka.localbroker import DEFAULT_STOP_TIMEOUT_S, BrokerInfo, LocalBroker
from ensync_kafka.topics import TopicNames
from tests.e2e.hanging_recovery import skipped_and_hanging, skipped_markers
from tests.e2e.ledger_stream import (
    CHUNKS,
    DEFERRALS,
    LEDGER_TIMEOUT_S,
    TIERS,
    delivered_count,
    ride_out,
    stream,
    workers,
)
from tests.helpers import (
    FAST_GROUP_CLIENT,
    FAST_GROUP_WORKER,
    TopicReader,
    WorkerProcess,
    collect_ledger,
    frozen,
    pipeline_mapping,
    wait_until,
    write_config,
)

SIGTERM_EXIT_S = 10.0
FREEZE_TXN_TIMEOUT_S = 4.0
OUTAGES = {"restart": 0.0, "freeze": 7.0, "freeze-past-session": 12.0}
"""Seconds the broker is frozen (SIGSTOP; 0: restarted instead). 7 s is longer than the
worker's transaction timeout in that test (FREEZE_TXN_TIMEOUT_S), so the coordinator aborts
what was open. 12 s is longer than the broker's own KRaft session (9 s): on waking it is fenced
for a moment and answers Metadata requests with no brokers, which strands the librdkafka
clients that ask then (librdkafka #5301, _kafka.BrokerWatch) until they are replaced. Fenced
so, it can also skip the markers of a transaction it completes on waking (Kafka 4.4.0,
restart_between_commits; seen in 1 of 11 runs) and leave it hanging, or a tier waiting after an
abort (settle.AbortSettle): the test then recovers as ``topics hanging`` says
(hanging_recovery) and checks the ledger all the same."""
OUTAGE_TEST_TIMEOUT_S = 480
"""A run takes 20-30 s; one that meets a hanging transaction waits HANGING_AFTER_S for it to
count as hanging, and the recovery runs Kafka's tools (a JVM each) for up to two minutes."""


COMMIT_DRAIN_S = 2.0
"""How long the broker gets to finish a commit it was sent (its markers take milliseconds)
before it is stopped, the worker that sent it held meanwhile."""
RESUME_POLL_S = 0.01


def restart_between_commits(broker: LocalBroker, worker_pid: int) -> BrokerInfo:
    """Restart ``broker`` with no commit of the worker's under way, and the worker running again
    from the moment the old broker is gone (so it meets the outage: refused connections).

    A single KRaft broker that stops, or starts, while its transaction coordinator completes a
    commit can skip that commit's markers: in its shutdown every partition's leader becomes
    unknown and the coordinator takes them for deleted ("Couldn't find leader endpoint ...
    likely deleted already"), and one reloaded in PREPARE_COMMIT meets the same while the broker
    registers again. The transaction is then left open on its partitions for good (a hanging
    transaction: read_committed readers stop there, ``committed()`` on the group times out),
    which no client can mend. Seen on Kafka 4.4.0 in 7 of 22 restarts mid-stream, either
    way of stopping; with more brokers, leadership moves instead."""
    os.kill(worker_pid, signal.SIGSTOP)
    resumer: threading.Thread | None = None
    try:
        time.sleep(COMMIT_DRAIN_S)
        info = broker.status()
        assert info is not None
        resumer = threading.Thread(target=_resume_when_gone, args=(info.pid, worker_pid))
        resumer.start()
        return broker.restart()
    finally:
        os.kill(worker_pid, signal.SIGCONT)
        if resumer is not None:
            resumer.join()


def _resume_when_gone(pid: int, worker_pid: int) -> None:
    deadline = time.monotonic() + DEFAULT_STOP_TIMEOUT_S + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(RESUME_POLL_S)
    os.kill(worker_pid, signal.SIGCONT)


def fast_group_worker(protocol: str) -> dict[str, object]:
    """FAST_GROUP_WORKER on ``protocol``; the consumer protocol's session is set on the broker by
    ensure_topics (the local broker allows 6 s: ops/kafka/server.properties.template)."""
    return {**FAST_GROUP_WORKER, "group_protocol": protocol}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", GROUP_PROTOCOLS)
def test_worker_killed_mid_stream_then_restarted_delivers_exactly_once(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, protocol: str
) -> None:
    state_dir = tmp_path / "state"
    mapping = pipeline_mapping(
        unique_prefix,
        kafka_bootstrap,
        state_dir,
        worker_id="crashy",
        worker=fast_group_worker(protocol),
        client=FAST_GROUP_CLIENT,
    )
    config_path = write_config(tmp_path / "ensync.yaml", mapping)
    config = config_from_mapping(
        pipeline_mapping(
            unique_prefix, kafka_bootstrap, state_dir, worker=fast_group_worker(protocol)
        ),
        environ={},
    )
    ensure_topics(config)
    names = TopicNames(unique_prefix)

    with (
        workers(kafka_bootstrap, config_path, tmp_path) as procs,
        TopicReader(kafka_bootstrap, names.queue("default")) as reader,
        DeferClient(config) as client,
    ):
        first = procs.start("crashy", state_dir)
        first.wait_assigned(TIERS)
        kill_at = CHUNKS // 2

        def disturb(chunk: int) -> None:
            if chunk != kill_at:
                return
            # Mid-stream: some delivered already, many held, more still to come.
            reader.poll_until(
                lambda records: len(records) > 0, timeout=30, what="the first deliveries"
            )
            first.signal(signal.SIGKILL)
            assert first.wait_exit(10) == -signal.SIGKILL
            procs.start("crashy", state_dir)

        expected = stream(client, reader, disturb, seed=1)
        assert 0 < delivered_count(reader) < DEFERRALS
        ledger = collect_ledger(
            kafka_bootstrap, [], expected, timeout=LEDGER_TIMEOUT_S, reader=reader
        )
        restarted = procs.started[-1]
        assert restarted.proc.poll() is None, restarted.log()[-3000:]
        assert restarted.assigned_tiers() == set(TIERS), restarted.log()[-3000:]

    ledger.assert_exactly_once()
    assert {d.event.tier for ds in ledger.deliveries.values() for d in ds} == set(TIERS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", GROUP_PROTOCOLS)
def test_workers_rebalancing_mid_stream_deliver_exactly_once(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, protocol: str
) -> None:
    mapping = pipeline_mapping(
        unique_prefix,
        kafka_bootstrap,
        tmp_path / "state",
        worker=fast_group_worker(protocol),
        client=FAST_GROUP_CLIENT,
    )
    config_path = write_config(tmp_path / "ensync.yaml", mapping)
    config = config_from_mapping(
        pipeline_mapping(
            unique_prefix, kafka_bootstrap, tmp_path / "state", worker=fast_group_worker(protocol)
        ),
        environ={},
    )
    ensure_topics(config)
    names = TopicNames(unique_prefix)

    def start(worker_id: str) -> WorkerProcess:
        return procs.start(worker_id, tmp_path / f"state-{worker_id}")

    exit_seconds: list[float] = []
    with (
        workers(kafka_bootstrap, config_path, tmp_path) as procs,
        TopicReader(kafka_bootstrap, names.queue("default")) as reader,
        DeferClient(config) as client,
    ):
        a, b = start("a"), start("b")
        a.wait_assigned(TIERS)
        b.wait_assigned(TIERS)

        def disturb(chunk: int) -> None:
            if chunk == CHUNKS // 3:
                start("c")  # joins: partitions move from a and b to c
            elif chunk == 2 * CHUNKS // 3:
                a.signal(signal.SIGTERM)  # leaves: its partitions move to b and c
                began = time.monotonic()
                code = a.wait_exit(SIGTERM_EXIT_S)
                exit_seconds.append(time.monotonic() - began)
                assert code == 0, a.log()[-3000:]

        expected = stream(client, reader, disturb, seed=2)
        c = procs.started[-1]
        wait_until(
            lambda: c.assigned_tiers() == set(TIERS),
            timeout=30,
            what="worker c to take partitions of both tiers",
            describe=lambda: c.log()[-3000:],
        )
        ledger = collect_ledger(
            kafka_bootstrap, [], expected, timeout=LEDGER_TIMEOUT_S, reader=reader
        )
        for proc in (b, c):
            assert proc.proc.poll() is None, proc.log()[-3000:]
        # A rebalance really happened: b lost partitions (c joined, a left).
        assert "revoked" in b.log() or "revoked" in a.log()

    ledger.assert_exactly_once()
    assert exit_seconds and exit_seconds[0] < SIGTERM_EXIT_S
    # Each worker delivered a share of the stream.
    tiers = {d.event.tier for ds in ledger.deliveries.values() for d in ds}
    assert tiers == set(TIERS)


@pytest.mark.timeout(OUTAGE_TEST_TIMEOUT_S)
@pytest.mark.parametrize("outage", list(OUTAGES))
def test_worker_and_consumer_ride_out_a_broker_outage_mid_stream(
    own_broker: LocalBroker, unique_prefix: str, tmp_path: Path, outage: str
) -> None:
    """One broker, restarted or frozen while deferrals are held and sent: the same worker
    process delivers each exactly once, and a PriorityConsumer handles each (at least once);
    where the broker left a transaction hanging, after the recovery ``topics hanging`` prints."""
    info = own_broker.status()
    assert info is not None
    bootstrap = info.bootstrap
    frozen_s = OUTAGES[outage]
    worker_settings = {"transaction_timeout": FREEZE_TXN_TIMEOUT_S} if frozen_s else {}
    mapping = pipeline_mapping(
        unique_prefix, bootstrap, tmp_path / "state", worker_id="steady", worker=worker_settings
    )
    config_path = write_config(tmp_path / "ensync.yaml", mapping)
    config = config_from_mapping(mapping, environ={})
    ensure_topics(config)
    outages: list[int] = []

    def outage(worker: WorkerProcess) -> None:
        if not frozen_s:
            assert restart_between_commits(own_broker, worker.proc.pid).pid != info.pid
        else:  # requests hang instead of being refused; open transactions time out
            with frozen(info.pid):
                time.sleep(frozen_s)
        outages.append(1)

    ledger = ride_out(
        bootstrap,
        config,
        config_path,
        tmp_path,
        outage,
        seed=3,
        describe=lambda: f"markers the broker skipped: {skipped_markers(own_broker)}",
        kafka_hung=lambda: skipped_and_hanging(own_broker, config),
    )
    assert outages == [1]
    assert not ledger.duplicated, (
        f"{ledger.summary()}; markers the broker skipped: {skipped_markers(own_broker)}"
    )
    ledger.assert_exactly_once()


@pytest.mark.timeout(120)
def test_sigterm_stops_a_busy_worker_within_seconds(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    secret = "pw-never-logged-4711"
    mapping = pipeline_mapping(
        unique_prefix, kafka_bootstrap, tmp_path / "state", client={"sasl.password": secret}
    )
    config_path = write_config(tmp_path / "ensync.yaml", mapping)
    config = config_from_mapping(
        pipeline_mapping(unique_prefix, kafka_bootstrap, tmp_path / "state"), environ={}
    )
    ensure_topics(config)
    with workers(kafka_bootstrap, config_path, tmp_path) as procs, DeferClient(config) as client:
        proc = procs.start("term", tmp_path / "s")
        proc.wait_assigned(TIERS)
        # Busy: held deferrals in both tiers while it is told to stop.
        client.defer_many(
            [DeferRequest(name="held", payload=i, delay=0.5 + i / 100) for i in range(300)]
        )
        proc.signal(signal.SIGTERM)
        began = time.monotonic()
        code = proc.wait_exit(SIGTERM_EXIT_S)
        elapsed = time.monotonic() - began
    assert code == 0, proc.log()[-3000:]
    assert elapsed < 5.0, f"SIGTERM took {elapsed:.1f}s to stop the worker"
    assert "worker stopped" in proc.log()
    assert secret not in proc.log(), "a kafka.client secret reached the worker's log"
