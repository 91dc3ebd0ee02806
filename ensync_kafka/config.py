"""Configuration: frozen pydantic models read from YAML, overridable from ``ENSYNC_*`` variables.

Durations are seconds (float) and also accept ``"250ms"``, ``"5s"``, ``"1m"``, ``"2h"``, ``"7d"``.
librdkafka client settings pass through unchanged under ``kafka.client``; their values are held
as ``SecretStr`` so no password ever reaches a log line or a repr.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import pydantic
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator

from .exceptions import ConfigError

# Defaults, with units in the name where the value has one.
DEFAULT_CONFIG_FILE = "ensync.yaml"
DEFAULT_PREFIX = "ensync"
DEFAULT_QUEUE = "default"
DEFAULT_TIERS_S: tuple[tuple[str, float], ...] = (
    ("1s", 1.0),
    ("10s", 10.0),
    ("1m", 60.0),
    ("10m", 600.0),
    ("1h", 3600.0),
)
DEFAULT_PARTITIONS = 6
DEFAULT_REPLICATION = 1
DEFAULT_MAX_DELAY_S = 30 * 86400.0
DEFAULT_MAX_PAYLOAD_BYTES = 1_000_000
DEFAULT_FIRE_BATCH_SIZE = 5000
DEFAULT_INTAKE_BATCH_SIZE = 5000
DEFAULT_MAX_COMMIT_INTERVAL_S = 0.05
DEFAULT_RELEASE_LOOKAHEAD_S = 0.05
DEFAULT_DELIVERED_RETENTION_S = 7 * 86400.0
DEFAULT_CATCHUP_RATE_PER_S = 10_000.0
DEFAULT_CATCHUP_GRACE_S = 1.0
DEFAULT_TRANSACTION_TIMEOUT_S = 10.0
DEFAULT_WORKER_SESSION_TIMEOUT_S = 10.0
GroupProtocol = Literal["classic", "consumer"]
"""A consumer group's rebalance protocol (``worker.group_protocol``)."""
GROUP_PROTOCOLS: tuple[GroupProtocol, ...] = get_args(GroupProtocol)
DEFAULT_WORKER_GROUP_PROTOCOL: GroupProtocol = "classic"
DEFAULT_STATE_CACHE_BYTES = 32 * 1024 * 1024
DEFAULT_STATE_MEMTABLE_BYTES = 64 * 1024 * 1024
DEFAULT_STATE_DIR = "./ensync-state"
DEFAULT_AUDIT_RETENTION_S = 90 * 86400.0
DEFAULT_DEAD_RETENTION_S = 90 * 86400.0

# Monitoring (HTTP API, metrics, worker registry) and the audit store.
DEFAULT_MONITOR_HOST = "127.0.0.1"
DEFAULT_MONITOR_PORT: int | Literal["auto"] = "auto"
DEFAULT_ANNOUNCE_INTERVAL_S = 30.0
DEFAULT_QUERY_TIMEOUT_S = 5.0
DEFAULT_CONTROL_TIMEOUT_S = 15.0
DEFAULT_AUDIT_DB = "./ensync-audit.sqlite3"

CLIENT_DEFAULTS: dict[str, str] = {"metadata.recovery.strategy": "none"}
"""librdkafka settings every client gets unless ``kafka.client`` sets them. When every broker it
knows is down, librdkafka 2.10+ re-bootstraps and decommissions the brokers it had learned; a
transactional producer's coordinator requests can then wait for good (librdkafka #5511). Here that
wedged a worker for good when a single broker restarted (tests/e2e, the broker restart test).
With ``none`` a client keeps reconnecting to the brokers it knows, which is what a restart or a
rolling upgrade needs; set ``rebootstrap`` where every broker's address can change at once.
Neither strategy survives a Metadata response that lists no brokers (_kafka.BrokerWatch)."""

# Consumers of the priority topics (consumer.py): retry policy, ordering, load shedding.
DEFAULT_RETRY_BASE_DELAY_S = 1.0
DEFAULT_RETRY_FACTOR = 2.0
DEFAULT_RETRY_MAX_DELAY_S = 3600.0
DEFAULT_RETRY_MAX_ATTEMPTS = 5
DEFAULT_RETRY_JITTER = 0.2
"""Fraction: a retry waits between (1 - jitter) and 1 times its backoff delay."""
DEFAULT_WEIGHTED_SHARES: dict[int, float] = {4: 0.15, 3: 0.1, 2: 0.05, 1: 0.05}
"""Minimum share of handled events per priority while it has a backlog (weighted ordering)."""
DEFAULT_STRICT_WAIT_S = 1.0
DEFAULT_CONSUMER_BUFFER = 1000
DEFAULT_CONSUMER_COMMIT_INTERVAL_S = 0.5
DEFAULT_SHED_DELAY_S = 60.0
DEFAULT_SHED_MAX_PRIORITY = 1

PRIORITY_MIN = 1
PRIORITY_MAX = 5

ENV_PREFIX = "ENSYNC_"
ENV_CONFIG = "ENSYNC_CONFIG"
ENV_BOOTSTRAP = "ENSYNC_KAFKA_BOOTSTRAP"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_NAME_RE = r"^[A-Za-z0-9_-]+$"


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``"250ms"``, ``"5s"``, ``"2h"``, ``"7d"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '5s'")
    if isinstance(value, int | float):
        return float(value)
    if hasattr(value, "total_seconds"):
        return float(value.total_seconds())
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNIT_S[match.group(2)]
    raise ValueError(
        f"{value!r} is not a duration (seconds, or e.g. '250ms', '5s', '1m', '2h', '7d')"
    )


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than 0")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]


def _client_settings(value: Any) -> Any:
    # librdkafka takes every setting as a string; YAML may give ints and bools.
    if isinstance(value, Mapping):
        return {str(k): _client_value(v) for k, v in value.items()}
    return value


def _client_value(value: Any) -> Any:
    if isinstance(value, SecretStr):  # already validated (a dump/revalidate round trip)
        return value
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaConfig(_Frozen):
    bootstrap_servers: str | None = None
    """host:port[,host:port]. When unset: $ENSYNC_KAFKA_BOOTSTRAP, else the running local broker."""
    client: Annotated[dict[str, SecretStr], BeforeValidator(_client_settings)] = Field(
        default_factory=dict
    )
    """librdkafka settings passed through as-is (security.protocol, sasl.*, ssl.*, ...)."""

    def client_settings(self) -> dict[str, str | int | float | bool]:
        """The librdkafka settings with secrets revealed: pass only to a client constructor."""
        base: dict[str, str | int | float | bool] = {
            **CLIENT_DEFAULTS,
            **{k: v.get_secret_value() for k, v in self.client.items()},
        }
        if self.bootstrap_servers:
            base["bootstrap.servers"] = self.bootstrap_servers
        return base


class TierConfig(_Frozen):
    name: str = Field(pattern=_NAME_RE)
    span: PositiveDuration
    """Longest delay (seconds) this tier is meant for; the topic name uses ``name``."""


class TopicFamilyConfig(_Frozen):
    partitions: int = Field(default=DEFAULT_PARTITIONS, ge=1)
    replication: int = Field(default=DEFAULT_REPLICATION, ge=1)
    min_insync_replicas: int | None = Field(default=None, ge=1)
    """Replicas that must have a write before it is acknowledged (``acks=all``); None keeps the
    broker's ``min.insync.replicas``. With replication 3, 2 lets one broker fail without
    refusing writes or losing acknowledged ones."""
    retention: Duration | None = None
    """Seconds; None keeps the family's own default (see topics.py)."""

    @model_validator(mode="after")
    def _check_isr(self) -> TopicFamilyConfig:
        if self.min_insync_replicas is not None and self.min_insync_replicas > self.replication:
            raise ValueError(
                f"min_insync_replicas ({self.min_insync_replicas}) exceeds replication "
                f"({self.replication}): every write would be refused"
            )
        return self


def _family(partitions: int = DEFAULT_PARTITIONS, retention: float | None = None) -> Any:
    return Field(
        default_factory=lambda: TopicFamilyConfig(partitions=partitions, retention=retention)
    )


class TopicsConfig(_Frozen):
    defer: TopicFamilyConfig = _family()
    """Tier topics; their changelogs (``{prefix}.state.<tier>``) get the same partition count."""
    priority: TopicFamilyConfig = _family()
    audit: TopicFamilyConfig = _family(3, DEFAULT_AUDIT_RETENTION_S)
    dead: TopicFamilyConfig = _family(3, DEFAULT_DEAD_RETENTION_S)
    invalid: TopicFamilyConfig = _family(3)


class DeferConfig(_Frozen):
    max_delay: PositiveDuration = DEFAULT_MAX_DELAY_S
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1)


class WorkerConfig(_Frozen):
    id: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9._-]+$")
    """Stable per worker process: part of its transactional ids, so a restart fences its
    predecessor at once instead of waiting out the transaction timeout. Unique per process."""
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    fire_batch_size: int = Field(default=DEFAULT_FIRE_BATCH_SIZE, ge=1)
    intake_batch_size: int = Field(default=DEFAULT_INTAKE_BATCH_SIZE, ge=1)
    max_commit_interval: PositiveDuration = DEFAULT_MAX_COMMIT_INTERVAL_S
    release_lookahead: Duration = Field(default=DEFAULT_RELEASE_LOOKAHEAD_S, ge=0, le=1)
    """At most this far ahead, timers join the current transaction, which commits only once the
    last of them is due: read_committed consumers never see one early, and the transaction's
    own latency is spent before the due time instead of after it. The worker pre-stages only as
    far as its measured transaction preparation time, up to this cap."""
    delivered_retention: PositiveDuration = DEFAULT_DELIVERED_RETENTION_S
    """How long a delivered marker is kept to drop a late duplicate of the same defer_id."""
    catchup_rate: float = Field(default=DEFAULT_CATCHUP_RATE_PER_S, gt=0)
    """Deferrals per second per tier worker released from an overdue backlog."""
    catchup_grace: Duration = Field(default=DEFAULT_CATCHUP_GRACE_S, ge=0)
    """A timer more than this many seconds overdue counts as backlog and is rate-capped."""
    transaction_timeout: PositiveDuration = DEFAULT_TRANSACTION_TIMEOUT_S
    session_timeout: Duration = Field(default=DEFAULT_WORKER_SESSION_TIMEOUT_S, ge=6, le=1800)
    """How long a tier's group waits for a worker that stopped answering before its partitions
    move on: a crashed worker's, and those of a consumer replaced while it could not leave the
    group (BrokerWatch). Their deferrals wait that long; librdkafka's 45 s is for flaky networks.
    Within the broker's group.min/max.session.timeout.ms (6 s to 30 min by default); with
    ``group_protocol: consumer``, its group.consumer.min/max.session.timeout.ms (45 to 60 s)."""
    group_protocol: GroupProtocol = DEFAULT_WORKER_GROUP_PROTOCOL
    """The tier groups' rebalance protocol. "consumer" (KIP-848; Kafka 4.0+ brokers) keeps a
    worker in its group while the group's coordinator moves to another broker, where "classic"
    can time out, rejoin and wait for its old membership to expire: a killed broker of three
    cost 10-19 s of lateness (median 13) instead of 14-26 (median 22; README). Its session
    timeout is a group config on the broker, which ``topics create`` sets from
    ``session_timeout``."""
    state_cache_bytes: int = Field(default=DEFAULT_STATE_CACHE_BYTES, ge=1024 * 1024)
    """RocksDB block cache shared by every partition store of a worker process."""
    state_memtable_bytes: int = Field(default=DEFAULT_STATE_MEMTABLE_BYTES, ge=1024 * 1024)
    """Memtable budget shared by every store (charged to the cache): memory stays bounded by
    these two numbers, not by the number of partitions or of held deferrals."""


class MonitorConfig(_Frozen):
    """The worker's HTTP server: /metrics, /healthz, /readyz, the JSON query API, the dashboard."""

    port: Annotated[int, Field(ge=0, le=65535)] | Literal["auto"] = DEFAULT_MONITOR_PORT
    """0 disables the server; "auto" takes a free port (announced in ``{prefix}.workers``)."""
    host: str = DEFAULT_MONITOR_HOST
    """Address to bind; 0.0.0.0 for every interface (containers)."""
    advertised_host: str | None = None
    """Host others reach it at; default: ``host``, or the hostname when ``host`` is a wildcard."""
    announce_interval: PositiveDuration = DEFAULT_ANNOUNCE_INTERVAL_S
    """Seconds between re-announcements in ``{prefix}.workers`` (also sent on every rebalance)."""
    query_timeout: PositiveDuration = DEFAULT_QUERY_TIMEOUT_S
    """Seconds a cross-worker query waits for each worker."""
    control_timeout: PositiveDuration = DEFAULT_CONTROL_TIMEOUT_S
    """Seconds ``cancel``/``reschedule`` wait for every tier's answer."""


class AuditStoreConfig(_Frozen):
    """Where ``{prefix}.audit`` is materialized for queries (rebuildable from the topic)."""

    path: Path = Path(DEFAULT_AUDIT_DB)
    """SQLite database file, used unless ``dsn`` is set."""
    dsn: SecretStr | None = None
    """PostgreSQL connection string (``postgresql://...``); needs the ``postgres`` extra."""


class RetryOverride(_Frozen):
    """Per event name: only the keys given replace the ``consumer.retry`` defaults."""

    base_delay: PositiveDuration | None = None
    factor: float | None = Field(default=None, ge=1)
    max_delay: PositiveDuration | None = None
    max_attempts: int | None = Field(default=None, ge=1)
    jitter: float | None = Field(default=None, ge=0, le=1)


class RetryPolicyConfig(_Frozen):
    """Exponential backoff for failed handlers: attempt n waits ``base_delay * factor**(n-1)``,
    at most ``max_delay``, shortened by up to ``jitter`` (a fraction); after ``max_attempts``
    failed attempts the event goes to ``{prefix}.dead``."""

    base_delay: PositiveDuration = DEFAULT_RETRY_BASE_DELAY_S
    factor: float = Field(default=DEFAULT_RETRY_FACTOR, ge=1)
    max_delay: PositiveDuration = DEFAULT_RETRY_MAX_DELAY_S
    max_attempts: int = Field(default=DEFAULT_RETRY_MAX_ATTEMPTS, ge=1)
    jitter: float = Field(default=DEFAULT_RETRY_JITTER, ge=0, le=1)
    by_name: dict[str, RetryOverride] = Field(default_factory=dict)
    """Overrides per event name, e.g. ``{payment.capture: {max_attempts: 10}}``."""

    def for_event(self, name: str) -> RetryPolicyConfig:
        """The policy for events called ``name``: this one with its override applied."""
        override = self.by_name.get(name)
        if override is None:
            return self
        changes = override.model_dump(exclude_none=True)
        return self.model_copy(update={**changes, "by_name": {}}) if changes else self


class SheddingConfig(_Frozen):
    """While the consumer's lag is above ``lag_threshold``, events at or below ``max_priority``
    are deferred by ``delay`` instead of handled (audited SHED, reason "load shedding")."""

    lag_threshold: int | None = Field(default=None, ge=0)
    """Events waiting on the queue's partitions this consumer owns; None turns shedding off."""
    max_priority: int = Field(default=DEFAULT_SHED_MAX_PRIORITY, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    delay: PositiveDuration = DEFAULT_SHED_DELAY_S


class ConsumerConfig(_Frozen):
    """:class:`~ensync_kafka.PriorityConsumer`: ordering across priorities, retries, shedding."""

    ordering: Literal["strict", "weighted"] = "strict"
    """strict: a lower priority is served only when every higher one is empty. weighted: higher
    first, but each priority in ``shares`` gets at least that fraction while it has a backlog."""
    shares: dict[int, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTED_SHARES))
    """Priority -> minimum fraction of handled events (weighted ordering); they sum below 1."""
    strict_wait: Duration = Field(default=DEFAULT_STRICT_WAIT_S, ge=0)
    """Strict ordering: seconds a lower priority waits for a higher partition to report its end
    (after an assignment or a fetch error) before it is served anyway."""
    buffer: int = Field(default=DEFAULT_CONSUMER_BUFFER, ge=1)
    """Events fetched ahead per priority; past this, that priority's partitions are paused."""
    commit_interval: PositiveDuration = DEFAULT_CONSUMER_COMMIT_INTERVAL_S
    """Seconds between offset commits (also on revoke and on stop)."""
    retry: RetryPolicyConfig = Field(default_factory=RetryPolicyConfig)
    shedding: SheddingConfig = Field(default_factory=SheddingConfig)
    alert: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    """``module:callable`` called once per dead letter with a :class:`~ensync_kafka.DeadLetter`."""

    @model_validator(mode="after")
    def _check_shares(self) -> ConsumerConfig:
        for priority, share in self.shares.items():
            if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
                raise ValueError(f"shares: priority {priority} outside 1..5")
            if share < 0:
                raise ValueError(f"shares: share of priority {priority} is negative")
        if sum(self.shares.values()) >= 1:
            raise ValueError("shares: must sum below 1 (the highest priority gets the rest)")
        return self


class Config(_Frozen):
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    prefix: str = Field(default=DEFAULT_PREFIX, pattern=r"^[A-Za-z0-9._-]+$")
    tiers: tuple[TierConfig, ...] = tuple(TierConfig(name=n, span=s) for n, s in DEFAULT_TIERS_S)
    queues: tuple[Annotated[str, Field(pattern=_NAME_RE)], ...] = (DEFAULT_QUEUE,)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    defer: DeferConfig = Field(default_factory=DeferConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    consumer: ConsumerConfig = Field(default_factory=ConsumerConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    audit_store: AuditStoreConfig = Field(default_factory=AuditStoreConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.tiers:
            raise ValueError("tiers: at least one tier is required")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tiers: names must be unique, got {names}")
        spans = [t.span for t in self.tiers]
        if spans != sorted(spans) or len(set(spans)) != len(spans):
            raise ValueError("tiers: spans must be strictly increasing")
        if not self.queues or len(set(self.queues)) != len(self.queues):
            raise ValueError("queues: at least one, names unique")
        return self

    def tier(self, name: str) -> TierConfig:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise ConfigError(f"unknown tier {name!r}; configured: {', '.join(self.tier_names)}")

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    @property
    def bootstrap_servers(self) -> str:
        if not self.kafka.bootstrap_servers:
            raise ConfigError("kafka.bootstrap_servers: not set")
        return self.kafka.bootstrap_servers


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: cannot override inside a non-mapping value")
        node = child
    node[path[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``ENSYNC_WORKER__FIRE_BATCH_SIZE=500`` sets ``worker.fire_batch_size``; values are YAML."""
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if rest == "PREFIX":
            tree["prefix"] = raw
        elif "__" in rest:
            path = [p.lower() for p in rest.split("__")]
            _set_path(tree, path, yaml.safe_load(raw) if raw else raw)
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _format_errors(exc: pydantic.ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return f"invalid configuration ({source}):\n  " + "\n  ".join(lines)


def _normalise_tiers(data: dict[str, Any]) -> None:
    # Allow the compact form ``tiers: {1s: 1s, 10s: 10s}`` beside the list of mappings.
    tiers = data.get("tiers")
    if isinstance(tiers, Mapping):
        data["tiers"] = [{"name": str(k), "span": v} for k, v in tiers.items()]


def config_from_mapping(
    data: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    source: str = "<mapping>",
    resolve_bootstrap: bool = True,
) -> Config:
    """Build a Config from already-parsed data plus ``ENSYNC_*`` overrides."""
    env = os.environ if environ is None else environ
    merged = _merge(dict(data or {}), _env_overrides(env))
    _normalise_tiers(merged)
    try:
        config = Config.model_validate(merged)
    except pydantic.ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    if resolve_bootstrap and not config.kafka.bootstrap_servers:
        bootstrap = env.get(ENV_BOOTSTRAP) or _local_broker_bootstrap()
        if not bootstrap:
            raise ConfigError(
                "kafka.bootstrap_servers: not set; set it in the config file, export "
                f"{ENV_BOOTSTRAP}=host:port, or run `ensync-kafka broker start`"
            )
        config = config.model_copy(
            update={"kafka": config.kafka.model_copy(update={"bootstrap_servers": bootstrap})}
        )
    return config


def _local_broker_bootstrap() -> str | None:
    from .localbroker import running_bootstrap  # deferred: only needed without a configured cluster

    return running_bootstrap()


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    resolve_bootstrap: bool = True,
) -> Config:
    """Read YAML at ``path`` (default ``$ENSYNC_CONFIG`` or ``./ensync.yaml``).

    A missing default file means "all defaults"; a missing file that was named explicitly is
    an error. Raises :class:`ConfigError` naming the offending key path.
    """
    env = os.environ if environ is None else environ
    explicit = path is not None or bool(env.get(ENV_CONFIG))
    file = Path(path if path is not None else env.get(ENV_CONFIG) or DEFAULT_CONFIG_FILE)
    data: Any = {}
    if file.exists():
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{file}: the top level must be a mapping of keys")
    elif explicit:
        raise ConfigError(f"{file}: no such config file")
    return config_from_mapping(
        data, environ=env, source=str(file), resolve_bootstrap=resolve_bootstrap
    )
