"""The tier workers' consumer groups: their rebalance protocol's client settings, and the group
configuration the broker keeps for the "consumer" protocol (KIP-848).

With the classic protocol the session timeout is a client setting. With the consumer protocol
the broker owns it, per group (``consumer.session.timeout.ms``, within its
``group.consumer.min/max.session.timeout.ms``: 45 to 60 s unless the operator changed them), so
``topics create`` sets it from ``worker.session_timeout`` and a worker warns when it differs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from ._kafka import ADMIN_TIMEOUT_S
from .config import Config, WorkerConfig
from .exceptions import BrokerError, ConfigError

log = logging.getLogger("ensync_kafka.groups")

SESSION_CONFIG = "consumer.session.timeout.ms"
"""The group config that holds a consumer-protocol group's session timeout."""

CLASSIC_ONLY = frozenset(
    {
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "partition.assignment.strategy",
        "group.protocol.type",
    }
)
"""Client settings librdkafka refuses with ``group.protocol=consumer``: the broker keeps them."""


def tier_consumer_settings(client: Mapping[str, Any], worker: WorkerConfig) -> dict[str, Any]:
    """``client`` (``kafka.client``) with a tier consumer's group settings for
    ``worker.group_protocol``. For the consumer protocol the classic-only settings of
    ``kafka.client`` (there for PriorityConsumers, say) are left out: the broker assigns and
    keeps the session (:func:`configure_tier_groups`)."""
    if worker.group_protocol == "consumer":
        kept = {k: v for k, v in client.items() if k not in CLASSIC_ONLY}
        return {**kept, "group.protocol": "consumer"}
    return {
        **client,
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": session_ms(worker),
    }


def session_ms(worker: WorkerConfig) -> int:
    return int(worker.session_timeout * 1000)


def configure_tier_groups(config: Config, admin: AdminClient, groups: list[str]) -> list[str]:
    """Set the tier groups' session timeout on the broker when the tiers use the consumer
    protocol (nothing to do for classic); returns the groups configured. A group need not exist
    yet: the broker keeps its configuration until it does."""
    if config.worker.group_protocol != "consumer":
        return []
    value = str(session_ms(config.worker))
    resources = [
        ConfigResource(
            ResourceType.GROUP,
            group,
            incremental_configs=[
                ConfigEntry(SESSION_CONFIG, value, incremental_operation=AlterConfigOpType.SET)
            ],
        )
        for group in groups
    ]
    for resource, future in admin.incremental_alter_configs(resources).items():
        try:
            future.result(timeout=ADMIN_TIMEOUT_S)
        except KafkaException as exc:
            err = exc.args[0]
            if err.name() == "INVALID_CONFIG":  # out of the broker's bounds
                raise ConfigError(
                    f"worker.session_timeout: {config.worker.session_timeout:g} s is not allowed "
                    f"for the consumer group protocol by this broker: {err.str()} (its "
                    "group.consumer.min/max.session.timeout.ms; or use worker.group_protocol: "
                    "classic)"
                ) from exc
            raise BrokerError(
                f"cannot set {SESSION_CONFIG} of group {resource.name} "
                f"(worker.group_protocol: consumer needs Kafka 4.0+ brokers): {err.str()}",
                code=err.code(),
            ) from exc
    return groups


def warn_if_session_differs(config: Config, group: str) -> None:
    """Log a warning when a consumer-protocol tier group's session on the broker is not
    ``worker.session_timeout`` (``topics create`` not run since it changed): failover then
    waits the broker's session instead. A broker that does not answer is not worth failing for."""
    if config.worker.group_protocol != "consumer":
        return
    admin = AdminClient(config.kafka.client_settings())
    resource = ConfigResource(ResourceType.GROUP, group)
    try:
        entries = admin.describe_configs([resource])[resource].result(timeout=ADMIN_TIMEOUT_S)
    except KafkaException as exc:
        log.warning("group %s: cannot read its %s: %s", group, SESSION_CONFIG, exc)
        return
    entry = entries.get(SESSION_CONFIG)
    actual = None if entry is None else entry.value
    if actual != str(session_ms(config.worker)):
        log.warning(
            "group %s: the broker's %s is %s ms, worker.session_timeout is %g s: run "
            "`ensync-kafka topics create` to set it",
            group,
            SESSION_CONFIG,
            actual,
            config.worker.session_timeout,
        )
