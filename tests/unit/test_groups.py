"""Tier consumer settings per group protocol: what librdkafka accepts for each."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException

from ensync_kafka.config import WorkerConfig
from ensync_kafka.groups import CLASSIC_ONLY, tier_consumer_settings

CLIENT = {
    "bootstrap.servers": "127.0.0.1:9",
    "session.timeout.ms": 6000,  # kafka.client is shared with PriorityConsumers
    "heartbeat.interval.ms": 500,
    "client.id": "kept",
}


def accepted_by_librdkafka(settings: dict[str, Any]) -> None:
    """Creating a consumer validates its settings; it connects to nothing here."""
    Consumer({**settings, "group.id": "g"}).close()


def test_classic_takes_the_session_from_the_worker_config() -> None:
    settings = tier_consumer_settings(CLIENT, WorkerConfig(session_timeout=12))
    assert settings["session.timeout.ms"] == 12_000
    assert settings["partition.assignment.strategy"] == "cooperative-sticky"
    assert settings["heartbeat.interval.ms"] == 500
    assert "group.protocol" not in settings
    accepted_by_librdkafka(settings)


def test_consumer_protocol_leaves_what_the_broker_keeps_to_the_broker() -> None:
    settings = tier_consumer_settings(CLIENT, WorkerConfig(group_protocol="consumer"))
    assert settings["group.protocol"] == "consumer"
    assert not CLASSIC_ONLY & settings.keys()
    assert settings["client.id"] == "kept"
    accepted_by_librdkafka(settings)


@pytest.mark.parametrize("key", sorted(CLASSIC_ONLY))
def test_librdkafka_refuses_each_classic_only_setting_with_the_consumer_protocol(
    key: str,
) -> None:
    """Why CLASSIC_ONLY is what it is: each of them alone makes the consumer fail to start."""
    settings = tier_consumer_settings({}, WorkerConfig(group_protocol="consumer"))
    value = {"partition.assignment.strategy": "range", "group.protocol.type": "consumer"}.get(
        key, 6000
    )
    with pytest.raises(KafkaException, match=key):
        accepted_by_librdkafka({**settings, "bootstrap.servers": "127.0.0.1:9", key: value})
