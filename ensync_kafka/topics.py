"""Topic names, and idempotent provisioning that verifies what already exists."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    BrokerMetadata,
    ConfigResource,
    NewTopic,
)

from ._kafka import ADMIN_TIMEOUT_S
from .config import PRIORITY_MAX, PRIORITY_MIN, Config, TopicFamilyConfig
from .exceptions import BrokerError
from .groups import configure_tier_groups

METADATA_POLL_S = 0.05
TIER_RETENTION_FLOOR_S = 7 * 86400.0
"""A tier topic keeps records at least this long, and always longer than the tier's span, so a
worker down for a while still finds its deferrals (they are held in state once consumed)."""


class TopicNames:
    """Every topic name derives from the prefix; nothing else builds them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def defer(self, tier: str) -> str:
        return f"{self.prefix}.defer.{tier}"

    def state(self, tier: str) -> str:
        return f"{self.prefix}.state.{tier}"

    def worker_group(self, tier: str) -> str:
        """The consumer group of a tier's workers (a group, not a topic: named here all the same,
        as tools that look at a tier's offsets need it)."""
        return f"{self.prefix}.worker.{tier}"

    def priority(self, queue: str, priority: int) -> str:
        return f"{self.prefix}.{queue}.p{priority}"

    def queue(self, queue: str) -> list[str]:
        """Highest priority first."""
        return [self.priority(queue, p) for p in range(PRIORITY_MAX, PRIORITY_MIN - 1, -1)]

    @property
    def audit(self) -> str:
        return f"{self.prefix}.audit"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def invalid(self) -> str:
        return f"{self.prefix}.invalid"

    @property
    def workers(self) -> str:
        """Compacted: one record per running worker (see registry.py), keyed by worker id."""
        return f"{self.prefix}.workers"


@dataclass(frozen=True, kw_only=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    config: dict[str, str]


_COMPACTED = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))


def _spec(
    name: str,
    family: TopicFamilyConfig,
    config: Mapping[str, str] | None = None,
    *,
    partitions: int | None = None,
    retention: bool = True,
) -> TopicSpec:
    cfg = {"cleanup.policy": "delete", **(config or {})}
    if retention and family.retention is not None:
        cfg["retention.ms"] = _ms(family.retention)
    if family.min_insync_replicas is not None:
        cfg["min.insync.replicas"] = str(family.min_insync_replicas)
    return TopicSpec(
        name=name,
        partitions=family.partitions if partitions is None else partitions,
        replication=family.replication,
        config=cfg,
    )


def topic_specs(config: Config) -> list[TopicSpec]:
    names = TopicNames(config.prefix)
    t = config.topics
    specs: list[TopicSpec] = []
    for tier in config.tiers:
        retention = max(TIER_RETENTION_FLOOR_S, 2 * tier.span)
        specs.append(_spec(names.defer(tier.name), t.defer, {"retention.ms": _ms(retention)}))
        # The changelog must mirror the tier topic's partitioning: partition p's state lives in
        # changelog partition p.
        specs.append(_spec(names.state(tier.name), t.defer, _COMPACTED, retention=False))
    for queue in config.queues:
        specs.extend(_spec(name, t.priority) for name in names.queue(queue))
    specs.append(_spec(names.audit, t.audit))
    specs.append(_spec(names.dead, t.dead))
    specs.append(_spec(names.invalid, t.invalid))
    # The worker registry: tiny, compacted, one partition so a reader sees one ordered history.
    specs.append(_spec(names.workers, t.audit, _COMPACTED, partitions=1, retention=False))
    return specs


@dataclass(frozen=True, kw_only=True, slots=True)
class ProvisionReport:
    created: list[str]
    verified: list[str]
    mismatches: list[str]
    groups: list[str]
    """Tier groups whose session timeout was set on the broker (worker.group_protocol consumer)."""

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _admin(config: Config) -> AdminClient:
    return AdminClient(config.kafka.client_settings())


def ensure_topics(config: Config, admin: AdminClient | None = None) -> ProvisionReport:
    """Create missing topics; check the partitions, replication, cleanup policy and minimum ISR
    of existing ones; set the tier groups' session on the broker if it keeps it (groups.py).

    Safe to run any number of times and from several processes at once.
    """
    admin = admin or _admin(config)
    specs = topic_specs(config)
    metadata = admin.list_topics(timeout=ADMIN_TIMEOUT_S)
    existing = metadata.topics
    missing = [s for s in specs if s.name not in existing]
    created: list[str] = []
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, s.replication, config=s.config) for s in missing],
            operation_timeout=ADMIN_TIMEOUT_S,
        )
        for name, future in futures.items():
            try:
                future.result()
                created.append(name)
            except KafkaException as exc:
                err = exc.args[0]
                if err.name() != "TOPIC_ALREADY_EXISTS":  # lost a race with another process
                    msg = f"cannot create {name}: {err.str()}"
                    raise BrokerError(msg, code=err.code()) from exc
    _await_metadata(list(metadata.brokers.values()), {s.name for s in specs}, config)
    present = [s for s in specs if s.name not in created]
    mismatches = _verify(admin, present) if present else []
    names = TopicNames(config.prefix)
    tier_groups = [names.worker_group(tier) for tier in config.tier_names]
    groups = configure_tier_groups(config, admin, tier_groups)
    return ProvisionReport(
        created=sorted(created),
        verified=sorted(s.name for s in present),
        mismatches=mismatches,
        groups=groups,
    )


def _await_metadata(brokers: list[BrokerMetadata], names: set[str], config: Config) -> None:
    """A created topic is known to the controller first; each broker publishes it to clients a
    little later (KRaft metadata propagation), and a client asks whichever broker it reaches.
    Return once every broker shows all of them, so callers can use them at once."""
    deadline = time.monotonic() + ADMIN_TIMEOUT_S
    for broker in brokers:
        # A client's first metadata request goes to its bootstrap broker: this one.
        probe = AdminClient(
            {**config.kafka.client_settings(), "bootstrap.servers": f"{broker.host}:{broker.port}"}
        )
        while missing := names - set(probe.list_topics(timeout=ADMIN_TIMEOUT_S).topics):
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"created but not visible on broker {broker.id} after "
                    f"{ADMIN_TIMEOUT_S:.0f}s: {sorted(missing)}"
                )
            time.sleep(METADATA_POLL_S)


def _verify(admin: AdminClient, specs: list[TopicSpec]) -> list[str]:
    metadata = admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics
    resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in specs]
    configs = {
        res.name: future.result(timeout=ADMIN_TIMEOUT_S)
        for res, future in admin.describe_configs(resources).items()
    }
    problems = []
    for spec in specs:
        partitions = len(metadata[spec.name].partitions)
        if partitions != spec.partitions:
            problems.append(
                f"{spec.name}: has {partitions} partitions, the configuration expects "
                f"{spec.partitions}"
            )
        replicas = {len(p.replicas) for p in metadata[spec.name].partitions.values()}
        if replicas != {spec.replication}:
            problems.append(
                f"{spec.name}: has replication {'/'.join(map(str, sorted(replicas)))}, the "
                f"configuration expects {spec.replication}"
            )
        for key in ("cleanup.policy", "min.insync.replicas"):
            expected = spec.config.get(key)
            actual = configs[spec.name][key].value
            if expected is not None and actual != expected:
                problems.append(f"{spec.name}: {key} is {actual}, expected {expected}")
    return problems
