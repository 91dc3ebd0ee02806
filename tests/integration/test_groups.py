"""The consumer group protocol's session, kept by the broker: set by ``topics create``, refused
with the key named when out of the broker's bounds, and a worker warning when it differs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from ensync_kafka import ConfigError, ensure_topics
from ensync_kafka.config import Config
from ensync_kafka.groups import SESSION_CONFIG, warn_if_session_differs
from ensync_kafka.topics import TopicNames
from tests.helpers import pipeline_config, wait_until

BROKER_MAX_SESSION_S = 60.0
"""group.consumer.max.session.timeout.ms's default: the local broker keeps it."""


def group_session_ms(config: Config, group: str) -> str | None:
    admin = AdminClient(config.kafka.client_settings())
    resource = ConfigResource(ResourceType.GROUP, group)
    entry = admin.describe_configs([resource])[resource].result(timeout=30).get(SESSION_CONFIG)
    return None if entry is None else entry.value


def consumer_protocol_config(prefix: str, bootstrap: str, tmp_path: Path, session: float) -> Config:
    worker = {"group_protocol": "consumer", "session_timeout": session}
    return pipeline_config(prefix, bootstrap, tmp_path / "state", worker=worker)


def test_topics_create_sets_every_tier_groups_session_on_the_broker(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    config = consumer_protocol_config(unique_prefix, kafka_bootstrap, tmp_path, session=7)
    groups = [TopicNames(unique_prefix).worker_group(t) for t in config.tier_names]

    report = ensure_topics(config)

    assert report.groups == groups
    for group in groups:  # the broker that answers may learn it a moment after the controller
        wait_until(
            lambda g=group: group_session_ms(config, g) == "7000",
            timeout=10,
            what=f"{group}'s session to read 7000 ms",
        )
    classic = pipeline_config(unique_prefix, kafka_bootstrap, tmp_path / "state")
    assert ensure_topics(classic).groups == []  # the classic protocol's session is the client's


def test_a_session_the_broker_refuses_names_the_key(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    too_long = BROKER_MAX_SESSION_S + 1
    config = consumer_protocol_config(unique_prefix, kafka_bootstrap, tmp_path, session=too_long)
    with pytest.raises(ConfigError) as info:
        ensure_topics(config)
    message = str(info.value)
    assert "worker.session_timeout: 61 s" in message, message
    assert "60000" in message, message  # the broker's bound, in its own words


def test_a_worker_warns_when_the_brokers_session_differs_from_its_config(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = consumer_protocol_config(unique_prefix, kafka_bootstrap, tmp_path, session=7)
    ensure_topics(config)
    group = TopicNames(unique_prefix).worker_group("1s")
    wait_until(lambda: group_session_ms(config, group) == "7000", timeout=10, what="the session")
    with caplog.at_level(logging.WARNING, logger="ensync_kafka.groups"):
        warn_if_session_differs(config, group)
        assert caplog.text == ""
        changed = consumer_protocol_config(unique_prefix, kafka_bootstrap, tmp_path, session=8)
        warn_if_session_differs(changed, group)
    assert "7000 ms, worker.session_timeout is 8 s" in caplog.text, caplog.text
