"""Config: defaults, YAML, errors naming the key path, ENSYNC_* overrides, secrets kept secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from ensync_kafka import Config, ConfigError, load_config
from ensync_kafka.config import (
    CLIENT_DEFAULTS,
    DEFAULT_FIRE_BATCH_SIZE,
    DEFAULT_MAX_DELAY_S,
    DEFAULT_QUEUE,
    config_from_mapping,
    parse_duration,
)

ROOT = Path(__file__).resolve().parents[2]
BOOT = {"kafka": {"bootstrap_servers": "127.0.0.1:9"}}
SECRET = "hunter2-s3cr3t"


def build(data: dict | None = None, **environ: str) -> Config:
    return config_from_mapping({**BOOT, **(data or {})}, environ=environ)


def config_error(data: dict, **environ: str) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({**BOOT, **data}, environ=environ)
    return str(info.value)


# -- defaults -------------------------------------------------------------------------------------


def test_defaults() -> None:
    config = build()
    assert config.prefix == "ensync"
    assert config.tier_names == ("1s", "10s", "1m", "10m", "1h")
    assert [t.span for t in config.tiers] == [1.0, 10.0, 60.0, 600.0, 3600.0]
    assert config.queues == (DEFAULT_QUEUE,) == ("default",)
    assert config.worker.fire_batch_size == DEFAULT_FIRE_BATCH_SIZE
    assert config.worker.max_commit_interval > 0
    assert config.worker.delivered_retention > 0
    assert config.worker.catchup_rate > 0
    assert config.defer.max_delay == DEFAULT_MAX_DELAY_S
    assert config.defer.max_payload_bytes > 0
    assert config.topics.defer.partitions >= 1
    assert config.topics.priority.replication >= 1
    assert config.kafka.client == {}
    assert config.bootstrap_servers == "127.0.0.1:9"


def test_bootstrap_from_environment_when_not_configured() -> None:
    config = config_from_mapping({}, environ={"ENSYNC_KAFKA_BOOTSTRAP": "10.0.0.1:9092"})
    assert config.bootstrap_servers == "10.0.0.1:9092"
    assert config.kafka.client_settings()["bootstrap.servers"] == "10.0.0.1:9092"


def test_client_defaults_apply_unless_the_config_sets_them() -> None:
    plain = config_from_mapping({}, environ={"ENSYNC_KAFKA_BOOTSTRAP": "10.0.0.1:9092"})
    assert plain.kafka.client_settings()["metadata.recovery.strategy"] == "none"
    assert CLIENT_DEFAULTS.items() <= plain.kafka.client_settings().items()
    chosen = config_from_mapping(
        {"kafka": {"client": {"metadata.recovery.strategy": "rebootstrap"}}},
        environ={"ENSYNC_KAFKA_BOOTSTRAP": "10.0.0.1:9092"},
    )
    assert chosen.kafka.client_settings()["metadata.recovery.strategy"] == "rebootstrap"


def test_configured_bootstrap_wins_over_environment() -> None:
    config = build(ENSYNC_KAFKA_BOOTSTRAP="10.0.0.1:9092")
    assert config.bootstrap_servers == "127.0.0.1:9"


def test_config_is_frozen() -> None:
    config = build()
    with pytest.raises(Exception, match="frozen"):
        config.prefix = "other"  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen"):
        config.worker.fire_batch_size = 1  # type: ignore[misc]


# -- YAML -----------------------------------------------------------------------------------------

YAML = """
prefix: orders
kafka:
  bootstrap_servers: broker-1:9092,broker-2:9092
  client:
    security.protocol: SASL_SSL
    sasl.mechanism: PLAIN
    sasl.username: app
    sasl.password: {secret}
    enable.ssl.certificate.verification: true
tiers:
  - {{name: 1s, span: 1s}}
  - {{name: 30s, span: 30}}
  - {{name: 2h, span: 2h}}
queues: [default, billing]
topics:
  defer: {{partitions: 12, replication: 3}}
  priority: {{partitions: 4}}
  audit: {{retention: 30d}}
defer:
  max_delay: 7d
  max_payload_bytes: 4096
worker:
  id: worker-7
  state_dir: /var/lib/ensync
  fire_batch_size: 250
  max_commit_interval: 20ms
  delivered_retention: 2d
  catchup_rate: 500
"""


def test_load_yaml(tmp_path: Path) -> None:
    path = tmp_path / "ensync.yaml"
    path.write_text(YAML.format(secret=SECRET))
    config = load_config(path, environ={})
    assert config.prefix == "orders"
    assert config.bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert [(t.name, t.span) for t in config.tiers] == [("1s", 1.0), ("30s", 30.0), ("2h", 7200.0)]
    assert config.queues == ("default", "billing")
    assert config.topics.defer.partitions == 12
    assert config.topics.defer.replication == 3
    assert config.topics.priority.partitions == 4
    assert config.topics.audit.retention == 30 * 86400.0
    assert config.defer.max_delay == 7 * 86400.0
    assert config.defer.max_payload_bytes == 4096
    w = config.worker
    assert (w.id, str(w.state_dir), w.fire_batch_size) == ("worker-7", "/var/lib/ensync", 250)
    assert w.max_commit_interval == pytest.approx(0.02)
    assert w.delivered_retention == 2 * 86400.0
    assert w.catchup_rate == 500
    settings = config.kafka.client_settings()
    assert settings["sasl.password"] == SECRET
    assert settings["security.protocol"] == "SASL_SSL"
    # librdkafka wants strings: YAML booleans become "true"/"false".
    assert settings["enable.ssl.certificate.verification"] == "true"
    assert settings["bootstrap.servers"] == "broker-1:9092,broker-2:9092"


def test_load_config_from_environment_variable_path(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text("prefix: fromenv\nkafka: {bootstrap_servers: 'h:1'}\n")
    assert load_config(environ={"ENSYNC_CONFIG": str(path)}).prefix == "fromenv"


def test_missing_default_file_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={"ENSYNC_KAFKA_BOOTSTRAP": "h:1"})
    assert config.prefix == "ensync"
    assert config.tier_names == ("1s", "10s", "1m", "10m", "1h")


def test_missing_named_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("worker: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, environ={})


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path, environ={})


def test_yaml_error_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("kafka: {bootstrap_servers: 'h:1'}\nworker:\n  fire_batch_szie: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "worker.fire_batch_szie: unknown key" in str(info.value)
    assert str(path) in str(info.value)


def test_example_config_loads() -> None:
    example = ROOT / "ensync.example.yaml"
    assert example.is_file(), "the issue asks for a commented ensync.example.yaml"
    assert "#" in example.read_text(), "the example config should be commented"
    config = load_config(example, environ={"ENSYNC_KAFKA_BOOTSTRAP": "h:1"})
    assert config.tiers


# -- errors name the key path ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"worker": {"fire_batch_szie": 10}}, "worker.fire_batch_szie: unknown key"),
        ({"wrker": {}}, "wrker: unknown key"),
        ({"kafka": {"bootstrap": "h:1"}}, "kafka.bootstrap: unknown key"),
        ({"topics": {"defer": {"partitons": 3}}}, "topics.defer.partitons: unknown key"),
        ({"tiers": [{"name": "1s", "span": 1, "spam": 2}]}, "tiers.0.spam: unknown key"),
        ({"defer": {"max_dealy": 5}}, "defer.max_dealy: unknown key"),
    ],
)
def test_unknown_key_names_the_path(data: dict, expected: str) -> None:
    assert expected in config_error(data)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"worker": {"fire_batch_size": 0}}, "worker.fire_batch_size"),
        ({"worker": {"fire_batch_size": "many"}}, "worker.fire_batch_size"),
        ({"worker": {"catchup_grace": "soon"}}, "worker.catchup_grace"),
        ({"worker": {"max_commit_interval": 0}}, "worker.max_commit_interval"),
        ({"worker": {"delivered_retention": "-5s"}}, "worker.delivered_retention"),
        ({"worker": {"catchup_rate": 0}}, "worker.catchup_rate"),
        ({"worker": {"id": "has space"}}, "worker.id"),
        ({"worker": {"group_protocol": "eager"}}, "worker.group_protocol"),
        ({"defer": {"max_delay": 0}}, "defer.max_delay"),
        ({"defer": {"max_delay": True}}, "defer.max_delay"),
        ({"defer": {"max_payload_bytes": 0}}, "defer.max_payload_bytes"),
        ({"topics": {"priority": {"partitions": 0}}}, "topics.priority.partitions"),
        ({"topics": {"audit": {"retention": "forever"}}}, "topics.audit.retention"),
        ({"topics": {"defer": {"min_insync_replicas": 0}}}, "topics.defer.min_insync_replicas"),
        ({"tiers": [{"name": "1s", "span": -1}]}, "tiers.0.span"),
        ({"tiers": [{"name": "1s", "span": 1}, {"name": "bad/name", "span": 5}]}, "tiers.1.name"),
        ({"prefix": "has space"}, "prefix"),
        ({"queues": ["ok", "not ok"]}, "queues.1"),
    ],
)
def test_bad_value_names_the_key(data: dict, key: str) -> None:
    message = config_error(data)
    assert f"{key}:" in message, message


@pytest.mark.parametrize(
    ("tiers", "expected"),
    [
        ([], "at least one tier"),
        ([{"name": "a", "span": 1}, {"name": "a", "span": 2}], "unique"),
        ([{"name": "a", "span": 10}, {"name": "b", "span": 1}], "strictly increasing"),
        ([{"name": "a", "span": 1}, {"name": "b", "span": 1}], "strictly increasing"),
    ],
)
def test_bad_tiers_name_tiers(tiers: list, expected: str) -> None:
    message = config_error({"tiers": tiers})
    assert "tiers" in message
    assert expected in message


def test_min_insync_replicas_above_replication_names_the_family() -> None:
    message = config_error({"topics": {"priority": {"replication": 2, "min_insync_replicas": 3}}})
    assert "topics.priority:" in message
    assert "min_insync_replicas (3) exceeds replication (2)" in message


def test_duplicate_queues_rejected() -> None:
    assert "queues" in config_error({"queues": ["a", "a"]})


def test_every_error_is_listed() -> None:
    message = config_error({"worker": {"fire_batch_szie": 1, "catchup_rate": -1}, "prefx": "x"})
    assert "worker.fire_batch_szie: unknown key" in message
    assert "worker.catchup_rate:" in message
    assert "prefx: unknown key" in message


def test_no_bootstrap_anywhere_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import ensync_kafka.config as config_module

    monkeypatch.setattr(config_module, "_local_broker_bootstrap", lambda: None)
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap_servers"):
        config_from_mapping({}, environ={})


def test_unresolved_bootstrap_property_names_the_key() -> None:
    config = config_from_mapping({}, environ={}, resolve_bootstrap=False)
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap_servers"):
        _ = config.bootstrap_servers


def test_unknown_tier_lookup_names_the_configured_tiers() -> None:
    with pytest.raises(ConfigError, match=r"unknown tier '5m'; configured: 1s, 10s"):
        build().tier("5m")


# -- environment overrides ------------------------------------------------------------------------


def test_env_override_nested_key() -> None:
    config = build(ENSYNC_WORKER__FIRE_BATCH_SIZE="500")
    assert config.worker.fire_batch_size == 500


def test_env_override_wins_over_yaml(tmp_path: Path) -> None:
    path = tmp_path / "ensync.yaml"
    path.write_text("kafka: {bootstrap_servers: 'h:1'}\nworker: {fire_batch_size: 10, id: a}\n")
    config = load_config(path, environ={"ENSYNC_WORKER__FIRE_BATCH_SIZE": "77"})
    assert config.worker.fire_batch_size == 77
    assert config.worker.id == "a"  # siblings of the overridden key are kept


def test_env_overrides_prefix_durations_and_deep_keys() -> None:
    config = build(
        ENSYNC_PREFIX="fromenv",
        ENSYNC_DEFER__MAX_DELAY="2h",
        ENSYNC_TOPICS__DEFER__PARTITIONS="9",
        ENSYNC_KAFKA__BOOTSTRAP_SERVERS="env-host:1",
    )
    assert config.prefix == "fromenv"
    assert config.defer.max_delay == 7200.0
    assert config.topics.defer.partitions == 9
    assert config.bootstrap_servers == "env-host:1"


def test_bad_env_override_names_the_key() -> None:
    message = config_error({}, ENSYNC_WORKER__FIRE_BATCH_SIZE="-3")
    assert "worker.fire_batch_size:" in message
    message = config_error({}, ENSYNC_WORKER__FIRE_BATCH_SZIE="3")
    assert "worker.fire_batch_szie: unknown key" in message


def test_unrelated_environment_is_ignored() -> None:
    config = build(ENSYNC_CONFIG="/nowhere.yaml", HOME="/root", PATH="/bin")
    assert config.prefix == "ensync"


# -- secrets --------------------------------------------------------------------------------------


def secret_config() -> Config:
    return build({"kafka": {"bootstrap_servers": "h:1", "client": {"sasl.password": SECRET}}})


def test_secrets_never_in_repr_or_str() -> None:
    config = secret_config()
    for text in (
        repr(config),
        str(config),
        repr(config.kafka),
        str(config.kafka),
        repr(config.kafka.client),
        str(config.model_dump()),
        config.model_dump_json(),
    ):
        assert SECRET not in text
    assert config.kafka.client_settings()["sasl.password"] == SECRET


def test_secrets_never_in_config_errors() -> None:
    message = config_error(
        {"kafka": {"bootstrap_servers": "h:1", "client": {"sasl.password": SECRET}}, "x": 1}
    )
    assert "x: unknown key" in message
    assert SECRET not in message


def test_secrets_survive_a_dump_and_revalidate_round_trip() -> None:
    """``Config.model_validate(config.model_dump())`` is how a caller overrides one field (the
    ``worker`` CLI command does it for --worker-id/--state-dir); the secret must survive it
    rather than turn into the mask ``**********``."""
    config = secret_config()
    again = Config.model_validate(config.model_dump())
    assert again.kafka.client_settings()["sasl.password"] == SECRET


# -- compact tiers and durations ------------------------------------------------------------------


def test_compact_tiers_mapping_form() -> None:
    config = build({"tiers": {"500ms": "500ms", "5s": "5s", "2m": 120, "1h": "1h"}})
    assert [(t.name, t.span) for t in config.tiers] == [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
    ]


def test_compact_tiers_bad_span_names_the_key() -> None:
    message = config_error({"tiers": {"1s": "1s", "10s": "ten"}})
    assert "tiers.1.span:" in message


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (0.25, 0.25),
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("1.5", 1.5),
        (" 3 s ", 3.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "soon", "5 weeks", "-1s", True, None, [1]])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)
