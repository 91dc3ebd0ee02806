"""A PriorityConsumer and a frozen broker: a group session that times out (its partitions are
lost, then assigned to it again, and every event is handled), and a stop while it is frozen."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ensync_kafka import DeferClient, DeferRequest, DeliveredEvent, PriorityConsumer, ensure_topics
from ensync_kafka import consumer as consumer_module
from ensync_kafka._kafka import OVERRUN_GRACE_S
from ensync_kafka.config import Config, config_from_mapping
from ensync_kafka.localbroker import BrokerInfo, LocalBroker
from tests.helpers import (
    FAST_GROUP_CLIENT,
    ConsumerThread,
    WorkerThread,
    consumer_state,
    delivered,
    frozen,
    pipeline_mapping,
    queue_reader,
    wait_until,
)

EVENTS = 200
BUFFER = 10
WAIT_S = 60.0
FREEZE_S = 7.0
"""Past the consumer's group session (6 s), short of the broker's KRaft session (9 s, past which
it wakes fenced: librdkafka #5301, tested in test_pipeline_exactly_once)."""


def _pipeline(
    broker: LocalBroker, prefix: str, tmp_path: Path, **consumer: Any
) -> tuple[BrokerInfo, Config]:
    """The running ``broker`` and a config on it (one tier, ``consumer`` settings), topics made."""
    info = broker.status()
    assert info is not None
    mapping = pipeline_mapping(
        prefix, info.bootstrap, tmp_path / "state", tiers=({"name": "all", "span": 60},)
    )
    if consumer:
        mapping["consumer"] = consumer
    config = config_from_mapping(mapping, environ={})
    ensure_topics(config)
    return info, config


@pytest.mark.timeout(180)
def test_partitions_paused_when_lost_are_consumed_when_assigned_again(
    own_broker: LocalBroker, unique_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """librdkafka keeps a partition's pause across a lost assignment (librdkafka #1849): one
    paused for a full buffer when the session timed out must be fetched once it is back."""
    info, config = _pipeline(own_broker, unique_prefix, tmp_path, buffer=BUFFER)
    handled: set[str] = set()
    gate, held = threading.Event(), threading.Event()
    gate.set()

    def handle(event: DeliveredEvent) -> None:
        if not gate.is_set():
            held.set()
            gate.wait()
        time.sleep(0.01)  # slower than the fetch: the buffers stay full
        handled.add(event.defer_id)

    with (
        queue_reader(info.bootstrap, unique_prefix) as reader,
        WorkerThread(config),
        DeferClient(config) as client,
    ):
        client.defer_many(
            DeferRequest(name="o", payload={"i": i}, delay=0, priority=1 + i % 5)
            for i in range(EVENTS)
        )
        reader.poll_until(lambda r: len(r) >= EVENTS, timeout=WAIT_S, what="every delivery")
    expected = {d.event.defer_id for d in delivered(reader.records)}

    consumer = PriorityConsumer(config, consumer_settings=FAST_GROUP_CLIENT)
    with (
        caplog.at_level(logging.WARNING, "ensync_kafka.consumer"),
        ConsumerThread(consumer, handle) as consuming,
    ):
        # Hold the handler (so no poll serves the lost assignment early) while partitions are
        # paused, then freeze the broker past the group session.
        wait_until(lambda: consumer._paused, timeout=WAIT_S, what="a partition paused")
        gate.clear()
        assert held.wait(WAIT_S), "the handler did not take another event"
        assert consumer._paused, "paused while the session times out"
        try:
            with frozen(info.pid):
                time.sleep(FREEZE_S)
        finally:
            gate.set()
        wait_until(lambda: "lost" in caplog.text, timeout=WAIT_S, what="the lost assignment")
        wait_until(
            lambda: consuming.alive() and expected <= handled,
            timeout=WAIT_S,
            what="every event handled",
            describe=lambda: (
                f"{len(expected - handled)} not handled; {consumer_state(consumer)}; "
                f"{consuming.stack()}"
            ),
        )


@pytest.mark.timeout(180)
def test_a_consumer_stops_within_seconds_while_the_broker_is_frozen(
    own_broker: LocalBroker,
    unique_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop commits and leaves the group, and librdkafka's close waits for a broker that does
    not answer for as long as it takes (librdkafka #3740): run() returns all the same, by
    STOP_TIMEOUT_S plus the grace, and says what it left undone."""
    stop_timeout_s = 2.0
    monkeypatch.setattr(consumer_module, "STOP_TIMEOUT_S", stop_timeout_s)
    info, config = _pipeline(own_broker, unique_prefix, tmp_path)
    handled: set[str] = set()
    with (
        caplog.at_level(logging.WARNING, "ensync_kafka.consumer"),
        WorkerThread(config),
        DeferClient(config) as client,
        ConsumerThread(PriorityConsumer(config), lambda e: handled.add(e.defer_id)) as consuming,
    ):
        client.defer_many(DeferRequest(name="s", payload=i, delay=0) for i in range(20))
        wait_until(lambda: len(handled) == 20, timeout=WAIT_S, what="every event handled")
        with frozen(info.pid):
            started = time.monotonic()
            consuming.consumer.stop()
            consuming.join(stop_timeout_s + OVERRUN_GRACE_S + 10)
            took = time.monotonic() - started
        assert not consuming.alive(), "run() did not return while the broker was frozen"
    assert took < stop_timeout_s + OVERRUN_GRACE_S + 5, f"the stop took {took:.1f} s"
    assert "no answer from Kafka" in caplog.text
