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
from typing import Annotated, Any

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
DEFAULT_POLL_INTERVAL_S = 0.1
DEFAULT_RELEASE_LOOKAHEAD_S = 0.05
DEFAULT_DELIVERED_RETENTION_S = 7 * 86400.0
DEFAULT_CATCHUP_RATE_PER_S = 10_000.0
DEFAULT_CATCHUP_GRACE_S = 1.0
DEFAULT_TRANSACTION_TIMEOUT_S = 10.0
DEFAULT_STATE_DIR = "./ensync-state"
DEFAULT_AUDIT_RETENTION_S = 90 * 86400.0
DEFAULT_DEAD_RETENTION_S = 90 * 86400.0

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
        return {
            str(k): (str(v).lower() if isinstance(v, bool) else str(v)) if v is not None else ""
            for k, v in value.items()
        }
    return value


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
            k: v.get_secret_value() for k, v in self.client.items()
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
    retention: Duration | None = None
    """Seconds; None keeps the family's own default (see topics.py)."""


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
    poll_interval: PositiveDuration = DEFAULT_POLL_INTERVAL_S
    release_lookahead: Duration = Field(default=DEFAULT_RELEASE_LOOKAHEAD_S, ge=0, le=1)
    """Timers due within this many seconds join the current transaction, which commits only
    once the last of them is due: read_committed consumers never see one early, and the
    transaction's own latency is spent before the due time instead of after it."""
    delivered_retention: PositiveDuration = DEFAULT_DELIVERED_RETENTION_S
    """How long a delivered marker is kept to drop a late duplicate of the same defer_id."""
    catchup_rate: float = Field(default=DEFAULT_CATCHUP_RATE_PER_S, gt=0)
    """Deferrals per second per tier worker released from an overdue backlog."""
    catchup_grace: Duration = Field(default=DEFAULT_CATCHUP_GRACE_S, ge=0)
    """A timer more than this many seconds overdue counts as backlog and is rate-capped."""
    transaction_timeout: PositiveDuration = DEFAULT_TRANSACTION_TIMEOUT_S


class Config(_Frozen):
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    prefix: str = Field(default=DEFAULT_PREFIX, pattern=r"^[A-Za-z0-9._-]+$")
    tiers: tuple[TierConfig, ...] = tuple(TierConfig(name=n, span=s) for n, s in DEFAULT_TIERS_S)
    queues: tuple[Annotated[str, Field(pattern=_NAME_RE)], ...] = (DEFAULT_QUEUE,)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    defer: DeferConfig = Field(default_factory=DeferConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)

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
