"""``ensync-kafka broker start|status|stop`` as a user runs them, against a real broker.

The home is a registered test home, so a broker left by a killed run is reaped by the next.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from ensync_kafka import localbroker
from ensync_kafka.localbroker import ephemeral_home

CLI_TIMEOUT_S = 180.0
HOST_PORT = re.compile(r"^[\w.-]+:\d{1,5}$")

pytestmark = pytest.mark.timeout(600)


def _cli_command() -> list[str]:
    script = Path(sys.executable).with_name("ensync-kafka")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ensync_kafka"]


@pytest.fixture
def home() -> Iterator[Path]:
    path = ephemeral_home()
    try:
        yield path
    finally:
        _run(path, "broker", "stop")
        shutil.rmtree(path, ignore_errors=True)


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ENSYNC_HOME": str(home)}
    return subprocess.run(
        [*_cli_command(), *args], env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}: exit {result.returncode}\n{result.stderr}"
    return result.stdout


def _last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def _record(home: Path) -> dict[str, object]:
    data = json.loads((home / "broker.json").read_text())
    assert isinstance(data, dict)
    return data


def test_start_twice_status_stop(home: Path) -> None:
    first = _ok(_run(home, "broker", "start"))
    record = _record(home)
    pid, data_dir = record["pid"], Path(str(record["data_dir"]))
    assert isinstance(pid, int)
    bootstrap = _last_line(first)
    assert HOST_PORT.match(bootstrap), first
    assert bootstrap == record["bootstrap"]

    second = _ok(_run(home, "broker", "start"))
    assert "already running" in second
    assert f"pid {pid}" in second and _last_line(second) == bootstrap
    assert _record(home)["pid"] == pid
    assert localbroker._kafka_pids_under(home) == [pid]  # one broker, not two

    status = _ok(_run(home, "broker", "status"))
    assert _last_line(status) == bootstrap
    assert AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30) is not None
    assert data_dir.is_dir()

    stopped = _ok(_run(home, "broker", "stop"))
    assert f"pid {pid}" in stopped
    assert localbroker._wait_gone(pid, 10)
    assert not data_dir.exists()
    assert not (home / "broker.json").exists()

    after = _run(home, "broker", "status")
    assert after.returncode != 0
    assert "no local broker is running" in after.stderr


def test_stop_keep_data(home: Path) -> None:
    _ok(_run(home, "broker", "start"))
    record = _record(home)
    pid, data_dir = record["pid"], Path(str(record["data_dir"]))
    assert isinstance(pid, int)

    stopped = _ok(_run(home, "broker", "stop", "--keep-data"))
    assert "data kept" in stopped
    assert localbroker._wait_gone(pid, 10)
    assert (data_dir / "server.properties").is_file()
    assert (data_dir / "log" / "meta.properties").is_file()
    assert _run(home, "broker", "status").returncode != 0


def test_restart_keeps_address_and_topics(home: Path) -> None:
    bootstrap = _last_line(_ok(_run(home, "broker", "start")))
    before = _record(home)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = "kept-across-restart"
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(timeout=30)

    restarted = _ok(_run(home, "broker", "restart"))
    assert "restarted" in restarted
    assert _last_line(restarted) == bootstrap
    after = _record(home)
    assert after["pid"] != before["pid"] and after["data_dir"] == before["data_dir"]
    assert localbroker._wait_gone(int(str(before["pid"])), 10)
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30)
    assert len(metadata.topics[topic].partitions) == 2
    # The run before is logged beside, to its end (log4j's shutdown hook would cut it short).
    previous = (home / "broker.log.1").read_text(errors="replace")
    assert "Kafka Server started" in previous
    assert "[TransactionCoordinator id=1] Shutdown complete" in previous


def test_restart_without_a_broker_fails_clearly(home: Path) -> None:
    result = _run(home, "broker", "restart")
    assert result.returncode != 0
    assert "no local broker is running" in result.stderr
