"""``ensync-kafka broker start|status|stop|restart|node`` as a user runs them, against a real
broker or a cluster of three.

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
from ensync_kafka.localcluster import CLUSTER_FILE
from tests.helpers import wait_until

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


def _cluster_pids(home: Path) -> dict[str, int]:
    pids = json.loads((home / CLUSTER_FILE).read_text())["pids"]
    assert isinstance(pids, dict)
    return pids


def _leaders(bootstrap: str, topic: str) -> list[int]:
    """The leader of each partition of ``topic`` (-1: none), as the broker that answers knows
    them: a topic just created reaches each broker's metadata a moment after the controller's."""
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=30)
    return [p.leader for p in metadata.topics[topic].partitions.values()]


def _led_by(bootstrap: str, topic: str, partitions: int, nodes: set[int]) -> bool:
    """Every partition has a leader among ``nodes``."""
    leaders = _leaders(bootstrap, topic)
    return len(leaders) == partitions and set(leaders) <= nodes


def test_a_cluster_of_three_its_nodes_killed_started_restarted_and_stopped(home: Path) -> None:
    started = _ok(_run(home, "broker", "start", "--nodes", "3"))
    bootstrap = _last_line(started)
    assert len(bootstrap.split(",")) == 3 and all(HOST_PORT.match(b) for b in bootstrap.split(","))
    pids = _cluster_pids(home)
    assert sorted(localbroker._kafka_pids_under(home)) == sorted(pids.values())
    assert "already running" in _ok(_run(home, "broker", "start", "--nodes", "3"))
    single = _run(home, "broker", "start")
    assert single.returncode == 1 and "a local cluster of 3 nodes is running" in single.stderr

    topic = "replicated"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 6, 3)])[topic].result(timeout=30)
    wait_until(
        lambda: _led_by(bootstrap, topic, 6, {1, 2, 3}), timeout=30, what="the topic's leaders"
    )
    assert set(_leaders(bootstrap, topic)) == {1, 2, 3}  # spread over the three

    _ok(_run(home, "broker", "node", "kill", "2"))
    assert localbroker._wait_gone(pids["2"], 10)
    assert "2 of 3 nodes up" in _ok(_run(home, "broker", "status"))
    # Its leaderships move once the controller fences it (its session, 9 s).
    wait_until(lambda: _led_by(bootstrap, topic, 6, {1, 3}), timeout=60, what="leaders to move")

    _ok(_run(home, "broker", "node", "start", "2"))
    assert "3 of 3 nodes up" in _ok(_run(home, "broker", "status"))

    restarted = _ok(_run(home, "broker", "restart"))  # one node after another
    assert [line for line in restarted.splitlines() if line.endswith(" restarted")] == [
        f"node {n} restarted" for n in (1, 2, 3)
    ]
    assert _last_line(restarted) == bootstrap
    after = _cluster_pids(home)
    assert all(localbroker._wait_gone(pid, 10) for pid in pids.values())
    # The topic is still there, every partition led.
    wait_until(lambda: _led_by(bootstrap, topic, 6, {1, 2, 3}), timeout=30, what="leaders")

    run_dirs = list(home.glob("cluster-*"))
    assert "data removed" in _ok(_run(home, "broker", "stop"))
    assert all(localbroker._wait_gone(pid, 10) for pid in after.values())
    assert not (home / CLUSTER_FILE).exists() and not any(d.exists() for d in run_dirs)
    assert _run(home, "broker", "status").returncode == 1
