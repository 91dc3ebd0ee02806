"""Shared fixtures: a real Kafka broker for the tests that ask for one, and per-test names.

``kafka_bootstrap`` picks, in order:

1. ``$ENSYNC_KAFKA_BOOTSTRAP`` (a cluster you run yourself);
2. the repository's ``docker-compose.yml`` through pytest-docker, when a Docker engine answers;
3. a :class:`~ensync_kafka.localbroker.LocalBroker` for this session, killed with this process.

If none can be had the tests that need it fail with the reason; they never skip. Only tests
that request the fixture start a broker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from ensync_kafka.exceptions import LocalBrokerError
from ensync_kafka.localbroker import LocalBroker, ensure_jars, reap_stale_test_brokers

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_SERVICE = "kafka"
COMPOSE_PORT = 9092
ENV_BOOTSTRAP = "ENSYNC_KAFKA_BOOTSTRAP"
BROKER_WAIT_S = 120.0
DOCKER_PROBE_TIMEOUT_S = 20.0
_MARKERS_BY_DIR = {"unit": "unit", "integration": "integration", "e2e": "e2e"}


def pytest_sessionstart(session: pytest.Session) -> None:
    """Reap brokers that killed test runs left behind (cheap: one directory scan)."""
    reap_stale_test_brokers()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its directory: tests/unit -> unit, tests/integration -> integration..."""
    for item in items:
        try:
            first = Path(str(item.path)).resolve().relative_to(TESTS).parts[0]
        except (ValueError, IndexError):
            continue
        marker = _MARKERS_BY_DIR.get(first)
        if marker:
            item.add_marker(marker)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fetch the broker jars before the first test, outside any per-test timeout.

    Only when a selected test will need them; a failure is left for the fixture to report.
    """
    if session.config.option.collectonly or not session.items:
        return
    needs_local = any(item.get_closest_marker("e2e") for item in session.items) or (
        any("kafka_bootstrap" in getattr(item, "fixturenames", ()) for item in session.items)
        and not os.environ.get(ENV_BOOTSTRAP)
        and not _docker_engine()
    )
    if needs_local:
        with contextlib.suppress(LocalBrokerError):
            ensure_jars()


@cache
def _docker_engine() -> bool:
    """True when a Docker engine (not just the client) and Compose v2 answer."""
    if not shutil.which("docker"):
        return False
    for probe in (["docker", "info"], ["docker", "compose", "version"]):
        try:
            result = subprocess.run(probe, capture_output=True, timeout=DOCKER_PROBE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if result.returncode != 0:
            return False
    return True


def _broker_answers(bootstrap: str, timeout: float = 5.0) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError):
        return False
    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


def _wait_for(bootstrap: str, timeout: float = BROKER_WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not _broker_answers(bootstrap):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    """pytest-docker: the repository's compose file (one KRaft Kafka service)."""
    return str(COMPOSE_FILE)


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    """``host:port`` of a real Kafka broker for this test session."""
    configured = os.environ.get(ENV_BOOTSTRAP)
    if configured:
        if not _wait_for(configured, timeout=30.0):
            pytest.fail(f"{ENV_BOOTSTRAP}={configured}: no Kafka broker answers there")
        yield configured
        return

    reasons: list[str] = []
    if _docker_engine():
        try:
            services: Any = request.getfixturevalue("docker_services")
            port = services.port_for(COMPOSE_SERVICE, COMPOSE_PORT)
            bootstrap = f"{request.getfixturevalue('docker_ip')}:{port}"
            services.wait_until_responsive(
                check=lambda: _broker_answers(bootstrap), timeout=BROKER_WAIT_S, pause=0.5
            )
        except Exception as exc:  # fall back to the local broker, keep the reason
            reasons.append(f"docker compose ({COMPOSE_FILE.name}): {exc}")
        else:
            yield bootstrap
            return
    else:
        reasons.append("docker: no Docker engine answers `docker info` / `docker compose`")

    broker = LocalBroker.ephemeral()
    try:
        info, _ = broker.start()
    except LocalBrokerError as exc:
        shutil.rmtree(broker.home, ignore_errors=True)
        reasons.append(f"local broker: {exc}")
    else:
        reasons.clear()
    if reasons:
        pytest.fail("no Kafka broker for the tests:\n  " + "\n  ".join(reasons), pytrace=False)
    try:
        yield info.bootstrap
    finally:
        broker.stop()
        shutil.rmtree(broker.home, ignore_errors=True)


@pytest.fixture
def unique_prefix() -> str:
    """A fresh topic prefix per test (``t`` + 10 hex digits), so tests never share topics."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def admin(kafka_bootstrap: str) -> AdminClient:
    """An Admin API client on the test broker."""
    return AdminClient({"bootstrap.servers": kafka_bootstrap})
