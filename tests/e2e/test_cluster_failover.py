"""Exactly-once ledgers on a three-broker cluster (replication 3, min ISR 2) while its brokers
fail: one killed or frozen mid-stream, or all three restarted one after another (a rolling
restart).

On one broker an outage stops everything and a restart can leave a hanging transaction; on a
cluster, what production runs, a broker's partitions, its transaction coordinator and its group
coordinators move to the others. The same worker process must deliver every deferral exactly
once, none early, and leave no transaction open behind it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from ensync_kafka import DeferClient, ensure_topics
from ensync_kafka._txn import transactional_id
from ensync_kafka.config import Config, config_from_mapping
from ensync_kafka.hanging import find_hanging, offsets_partition
from ensync_kafka.localcluster import LocalCluster
from ensync_kafka.topics import TopicNames
from tests.e2e.ledger_stream import LEDGER_TIMEOUT_S, TIERS, ride_out, stream, workers
from tests.helpers import (
    TopicReader,
    WorkerProcess,
    collect_ledger,
    frozen,
    pipeline_mapping,
    wait_until,
    write_config,
)

REPLICATION = 3
MIN_ISR = 2
TXN_STATE_TOPIC = "__transaction_state"
METADATA_TIMEOUT_S = 10.0
OPEN_AFTER_S = 30.0
"""Left open this long after the stream, a transaction would be one the failover left behind
(a healthy one lasts a turn: milliseconds)."""
ROLLING_AT = (2, 5, 8)
"""The chunks after which the next node is restarted."""


@pytest.fixture
def own_cluster() -> Iterator[LocalCluster]:
    """Three nodes of this test's own, to kill and restart. Needs Java like any local broker,
    whatever ENSYNC_KAFKA_BOOTSTRAP says."""
    cluster = LocalCluster.ephemeral()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def replicated_config(
    prefix: str, cluster: LocalCluster, tmp_path: Path, protocol: str = "classic"
) -> tuple[Config, Path]:
    mapping = pipeline_mapping(
        prefix,
        cluster.bootstrap,
        tmp_path / "state",
        worker_id="steady",
        worker={"group_protocol": protocol},
    )
    for family in mapping["topics"].values():
        family.update(replication=REPLICATION, min_insync_replicas=MIN_ISR)
    return config_from_mapping(mapping, environ={}), write_config(tmp_path / "ensync.yaml", mapping)


def leaders(admin: AdminClient, topics: list[str]) -> dict[tuple[str, int], int]:
    metadata = admin.list_topics(timeout=METADATA_TIMEOUT_S).topics
    return {(t, p): m.leader for t in topics for p, m in metadata[t].partitions.items()}


def coordinator_of(admin: AdminClient, txn_id: str) -> int:
    """The node leading the ``__transaction_state`` partition of ``txn_id``: its coordinator."""
    partitions = admin.list_topics(TXN_STATE_TOPIC, timeout=METADATA_TIMEOUT_S).topics[
        TXN_STATE_TOPIC
    ]
    return int(partitions.partitions[offsets_partition(txn_id, len(partitions.partitions))].leader)


def open_transactions(config: Config) -> str:
    """For a failure message: every transaction open on the configuration's partitions."""
    return f"open transactions: {find_hanging(config, max_age_s=0).open}"


def assert_none_left_open(config: Config) -> None:
    report = find_hanging(config, max_age_s=OPEN_AFTER_S)
    assert not report.hanging, report.hanging


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("outage", "protocol"), [("kill", "classic"), ("freeze", "classic"), ("kill", "consumer")]
)
def test_a_broker_killed_or_frozen_mid_stream_loses_nothing_and_delivers_nothing_twice(
    own_cluster: LocalCluster, unique_prefix: str, tmp_path: Path, outage: str, protocol: str
) -> None:
    """The node coordinating the 1s tier's transactions, SIGKILLed (no controlled shutdown), or
    SIGSTOPped until the controller has fenced it (its session, 9 s) and then let go on (a
    stalled broker: requests to it hang rather than fail, and it wakes fenced). Either way its
    partitions have no leader until it is fenced. The tier groups on either group protocol
    (worker.group_protocol): a killed node is often their coordinator."""
    config, config_path = replicated_config(unique_prefix, own_cluster, tmp_path, protocol)
    ensure_topics(config)
    names = TopicNames(unique_prefix)
    written = [*(names.defer(t) for t in TIERS), *(names.state(t) for t in TIERS)]
    written += names.queue("default")
    admin = AdminClient({"bootstrap.servers": own_cluster.bootstrap})
    disturbed: list[int] = []

    def disturb(worker: WorkerProcess) -> None:
        victim = coordinator_of(admin, transactional_id(unique_prefix, TIERS[0], "steady", 0))
        before = leaders(admin, written)
        assert victim in before.values(), before  # it leads partitions the tiers write
        pid = own_cluster.pid(victim)
        assert pid is not None

        others = ",".join(n.bootstrap for i, n in own_cluster.nodes.items() if i != victim)

        def moved() -> bool:
            # A fresh client asking the other nodes: one that knows the frozen node may keep
            # asking it, and it never answers.
            try:
                asked = AdminClient({"bootstrap.servers": others})
                return victim not in leaders(asked, written).values()
            except KafkaException:
                return False

        what = f"the partitions node {victim} led to move to the other nodes"
        if outage == "kill":
            own_cluster.kill(victim)
            wait_until(moved, timeout=60, what=what)
        else:
            with frozen(pid):
                wait_until(moved, timeout=60, what=what)
        disturbed.append(victim)

    ledger = ride_out(
        own_cluster.bootstrap,
        config,
        config_path,
        tmp_path,
        disturb,
        seed=4,
        describe=lambda: open_transactions(config),
    )
    assert len(disturbed) == 1
    ledger.assert_exactly_once()
    assert_none_left_open(config)


@pytest.mark.timeout(400)
def test_a_rolling_restart_mid_stream_loses_nothing_and_delivers_nothing_twice(
    own_cluster: LocalCluster, unique_prefix: str, tmp_path: Path
) -> None:
    """Each node in turn stopped (a controlled shutdown: its leaderships move first) and started
    again while deferrals are held and sent, as in a rolling upgrade."""
    config, config_path = replicated_config(unique_prefix, own_cluster, tmp_path)
    ensure_topics(config)
    names = TopicNames(unique_prefix)
    restarted: list[int] = []
    with (
        workers(own_cluster.bootstrap, config_path, tmp_path) as procs,
        TopicReader(own_cluster.bootstrap, names.queue("default")) as reader,
        DeferClient(config) as client,
    ):
        worker = procs.start("steady", tmp_path / "state")
        worker.wait_assigned(TIERS)

        def disturb(chunk: int) -> None:
            if chunk not in ROLLING_AT:
                return
            node = sorted(own_cluster.nodes)[ROLLING_AT.index(chunk)]
            own_cluster.stop_node(node)
            own_cluster.start_node(node)
            restarted.append(node)

        expected = stream(client, reader, disturb, seed=5)
        ledger = collect_ledger(
            own_cluster.bootstrap, [], expected, timeout=LEDGER_TIMEOUT_S, reader=reader
        )
        assert worker.proc.poll() is None, worker.log()[-3000:]
        assert not ledger.missing, (
            f"{ledger.summary()}; {open_transactions(config)}; "
            f"the worker's log:\n{worker.log()[-6000:]}"
        )

    assert restarted == sorted(own_cluster.nodes)
    ledger.assert_exactly_once()
    assert_none_left_open(config)
