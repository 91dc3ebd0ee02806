"""LocalBroker logic that needs no Java: config, cache, state records, reaping, pdeathsig.

Stand-in "brokers" are Python processes whose command line looks like a broker's
(``kafka.Kafka <data dir>/server.properties``), optionally listening on a port.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from ensync_kafka import localbroker
from ensync_kafka.cli.broker import broker
from ensync_kafka.exceptions import LocalBrokerError
from ensync_kafka.localbroker import (
    KAFKA_VERSION,
    BrokerInfo,
    LocalBroker,
    cache_dir,
    default_home,
    ensure_jars,
    new_cluster_id,
    reap_stale_test_brokers,
    render_server_properties,
    running_bootstrap,
)
from ensync_kafka.localcluster import CLUSTER_FILE, LocalCluster

WAIT_S = 10.0


def _properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _gone(pid: int) -> bool:
    return not localbroker._alive(pid)


def _wait_until_gone(pid: int) -> bool:
    return localbroker._wait_gone(pid, WAIT_S)


class FakeBroker:
    """A process that looks like our broker to the pid checks; it listens when asked to."""

    def __init__(self, data_dir: Path, *, listen: bool) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        code = textwrap.dedent(
            f"""
            import socket, sys, time
            if {listen!r}:
                s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
                print(s.getsockname()[1], flush=True)
            else:
                print(0, flush=True)
            time.sleep(120)
            """
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, "kafka.Kafka", str(data_dir / "server.properties")],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())
        self.pid = self.process.pid

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(ChildProcessError):
            self.process.wait(WAIT_S)
        if self.process.stdout:
            self.process.stdout.close()


@pytest.fixture
def fakes() -> Iterator[list[FakeBroker]]:
    started: list[FakeBroker] = []
    yield started
    for fake in started:
        fake.close()


def _record(home: Path, pid: int, data_dir: Path, port: int = 1) -> BrokerInfo:
    info = BrokerInfo(
        pid=pid,
        bootstrap=f"127.0.0.1:{port}",
        data_dir=data_dir,
        log_file=home / "broker.log",
        started_at=datetime.now(UTC),
    )
    home.mkdir(parents=True, exist_ok=True)
    (home / "broker.json").write_text(json.dumps(info.to_json()))
    return info


# --- config ---------------------------------------------------------------------------------


def test_server_properties_single_node_kraft(tmp_path: Path) -> None:
    props = _properties(
        render_server_properties(
            host="127.0.0.1", broker_port=40001, controller_port=40002, log_dir=tmp_path / "log"
        )
    )
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:40002"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:40001,CONTROLLER://127.0.0.1:40002"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:40001"
    assert props["log.dirs"] == str(tmp_path / "log")
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "default.replication.factor",
        "min.insync.replicas",
    ):
        assert props[key] == "1", key
    assert int(props["offsets.topic.num.partitions"]) <= 4
    assert int(props["transaction.state.log.num.partitions"]) <= 4
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "false"
    assert not any("$" in v for v in props.values())


def test_server_properties_node_of_a_three_node_cluster(tmp_path: Path) -> None:
    controllers = {1: 40002, 2: 40004, 3: 40006}
    props = _properties(
        render_server_properties(
            host="127.0.0.1",
            broker_port=40003,
            controller_port=40004,
            log_dir=tmp_path / "log",
            node_id=2,
            controllers=controllers,
        )
    )
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == (
        "1@127.0.0.1:40002,2@127.0.0.1:40004,3@127.0.0.1:40006"
    )
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:40003,CONTROLLER://127.0.0.1:40004"
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert props[key] == "3", key
    for key in ("transaction.state.log.min.isr", "min.insync.replicas"):
        assert props[key] == "2", key
    with pytest.raises(ValueError, match="not a voter"):
        render_server_properties(
            host="127.0.0.1",
            broker_port=40003,
            controller_port=40009,
            log_dir=tmp_path / "log",
            node_id=2,
            controllers=controllers,
        )


def test_cluster_id_is_a_kafka_uuid() -> None:
    ids = {new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for value in ids:
        assert len(value) == 22 and not value.startswith("-")
        assert len(base64.urlsafe_b64decode(value + "==")) == 16


def test_the_local_broker_and_docker_compose_run_one_kafka_version() -> None:
    root = Path(__file__).resolve().parents[2]
    pom = (root / "ops" / "kafka" / "pom.xml").read_text()
    compose = (root / "docker-compose.yml").read_text()
    assert f"<kafka.version>{KAFKA_VERSION}</kafka.version>" in pom
    assert f"image: apache/kafka:{KAFKA_VERSION}\n" in compose


def test_cache_and_home_locations() -> None:
    env = {"HOME": "/h"}
    assert cache_dir(env) == Path(f"/h/.cache/ensync-kafka/kafka-{KAFKA_VERSION}")
    assert cache_dir({**env, "XDG_CACHE_HOME": "/x"}) == Path(
        f"/x/ensync-kafka/kafka-{KAFKA_VERSION}"
    )
    assert cache_dir({**env, "XDG_CACHE_HOME": "/x", "ENSYNC_KAFKA_CACHE": "/c"}) == Path("/c")
    assert default_home(env) == Path("/h/.local/state/ensync-kafka/broker")
    assert default_home({**env, "XDG_STATE_HOME": "/s"}) == Path("/s/ensync-kafka/broker")
    assert default_home({**env, "XDG_STATE_HOME": "/s", "ENSYNC_HOME": "/e"}) == Path("/e")


# --- tools and the jar cache ----------------------------------------------------------------


def _fake_mvn(bin_dir: Path, *, fail: bool) -> Path:
    """An ``mvn`` that copies a fake jar into -DoutputDirectory and counts its calls."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = bin_dir / "calls"
    script = bin_dir / "mvn"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            echo call >> {calls}
            for arg in "$@"; do
              case "$arg" in -DoutputDirectory=*) out="${{arg#-DoutputDirectory=}}";; esac
            done
            : > "$out/kafka_2.13-{KAFKA_VERSION}.jar"
            : > "$out/kafka-tools-{KAFKA_VERSION}.jar"
            {"echo 'Could not resolve dependencies' >&2; exit 1" if fail else "exit 0"}
            """
        )
    )
    script.chmod(0o755)
    return calls


def test_jar_fetch_is_atomic_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    calls = _fake_mvn(tmp_path / "bin", fail=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    libs = ensure_jars(cache)
    assert libs == cache / "libs"
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").exists()
    assert ensure_jars(cache) == libs
    assert calls.read_text().count("call") == 1  # the second call was offline
    assert not list(cache.glob(".libs-*"))


def test_failed_jar_fetch_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    _fake_mvn(tmp_path / "bin", fail=True)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    (cache / ".libs-killed").mkdir(parents=True)  # left by a fetch that was SIGKILLed
    with pytest.raises(LocalBrokerError, match="Could not resolve dependencies"):
        ensure_jars(cache)
    assert not (cache / "libs").exists()
    assert not list(cache.glob(".libs-*"))


def test_missing_tools_name_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LocalBrokerError, match=r"`mvn` not found on PATH: install") as mvn:
        ensure_jars(tmp_path / "cache")
    with pytest.raises(LocalBrokerError, match=r"`java` not found on PATH: install") as java:
        LocalBroker(tmp_path / "home").start()
    assert "\n" not in str(mvn.value) and "\n" not in str(java.value)


# --- state records --------------------------------------------------------------------------


def test_stale_record_with_dead_pid_is_cleaned(tmp_path: Path) -> None:
    home = tmp_path / "home"
    data_dir = home / "data-1"
    data_dir.mkdir(parents=True)
    _record(home, _dead_pid(), data_dir)
    assert LocalBroker(home).status() is None
    assert not (home / "broker.json").exists()
    assert not data_dir.exists()


def test_record_whose_pid_is_another_program_is_cleaned_not_killed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _record(home, os.getpid(), home / "data-1")
    assert LocalBroker(home).status() is None
    assert LocalBroker(home).stop() is None
    assert not (home / "broker.json").exists()


@pytest.mark.parametrize("content", ["{not json", '{"pid": "x"}', "[]"])
def test_unreadable_record_is_dropped(tmp_path: Path, content: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "broker.json").write_text(content)
    assert LocalBroker(home).status() is None
    assert not (home / "broker.json").exists()


def test_data_dir_outside_home_is_never_deleted(tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "precious"
    elsewhere.mkdir()
    _record(home, _dead_pid(), elsewhere)
    assert LocalBroker(home).status() is None
    assert elsewhere.exists()


def test_running_broker_is_reported_and_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fakes: list[FakeBroker]
) -> None:
    home = tmp_path / "home"
    fake = FakeBroker(home / "data-1", listen=True)
    fakes.append(fake)
    info = _record(home, fake.pid, home / "data-1", fake.port)
    assert LocalBroker(home).status() == info
    monkeypatch.setenv("ENSYNC_HOME", str(home))
    assert running_bootstrap() == info.bootstrap

    assert LocalBroker(home).stop(keep_data=True, timeout=WAIT_S) == info
    assert _wait_until_gone(fake.pid)
    assert (home / "data-1").exists()
    assert not (home / "broker.json").exists()
    assert running_bootstrap() is None
    assert LocalBroker(home).stop() is None


def test_broker_not_answering_yet_is_not_reported_but_kept(
    tmp_path: Path, fakes: list[FakeBroker]
) -> None:
    home = tmp_path / "home"
    fake = FakeBroker(home / "data-1", listen=False)
    fakes.append(fake)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _record(home, fake.pid, home / "data-1", port)
    assert LocalBroker(home).status() is None
    assert (home / "broker.json").exists()  # may still be starting: the record stays
    assert LocalBroker(home).stop(timeout=WAIT_S) is not None
    assert _wait_until_gone(fake.pid)
    assert not (home / "data-1").exists()


# --- test sessions: reaping and die-with-parent ---------------------------------------------


def _owned_home(registry: Path, name: str, owner: dict[str, object]) -> Path:
    home = registry / name
    home.mkdir(parents=True)
    (home / "owner.json").write_text(json.dumps(owner))
    return home


def test_reap_kills_brokers_of_dead_owners_only(tmp_path: Path, fakes: list[FakeBroker]) -> None:
    registry = tmp_path / "registry"
    me = {"pid": os.getpid(), "start_ticks": localbroker._start_ticks(os.getpid())}
    dead = _owned_home(registry, "run-dead", {"pid": _dead_pid(), "start_ticks": 1})
    reused = _owned_home(registry, "run-reused", {**me, "start_ticks": -1})  # pid reused
    alive = _owned_home(registry, "run-alive", me)
    orphan = FakeBroker(dead / "data-1", listen=False)
    unrecorded = FakeBroker(reused / "data-1", listen=False)  # no broker.json: found by scan
    keeper = FakeBroker(alive / "data-1", listen=False)
    fakes.extend([orphan, unrecorded, keeper])
    _record(dead, orphan.pid, dead / "data-1")

    assert sorted(reap_stale_test_brokers(registry)) == sorted([dead, reused])
    assert _wait_until_gone(orphan.pid)
    assert _wait_until_gone(unrecorded.pid)
    assert not dead.exists() and not reused.exists()
    assert alive.exists() and not _gone(keeper.pid)


def test_die_with_parent_kills_the_child_when_the_parent_is_killed() -> None:
    if not sys.platform.startswith("linux"):  # PR_SET_PDEATHSIG is Linux-only: no hook at all
        assert localbroker._die_with_parent() is None
        return
    parent_code = textwrap.dedent(
        """
        import subprocess, time
        from ensync_kafka.localbroker import _die_with_parent
        child = subprocess.Popen(["sleep", "120"], preexec_fn=_die_with_parent())
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(WAIT_S)
        assert _wait_until_gone(child_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(WAIT_S)
        if parent.stdout:
            parent.stdout.close()


# --- detached clusters (broker start --nodes N) -----------------------------------------------


def _cluster_record(
    home: Path, nodes: dict[int, FakeBroker | int], run: Path | None = None
) -> Path:
    """A cluster.json naming ``nodes`` (a stand-in broker, or the pid of none) under one run
    directory (by default in ``home``), as LocalCluster writes it; the run directory is
    returned."""
    run = home / "cluster-1" if run is None else run
    records, pids = [], {}
    for node_id, fake in nodes.items():
        data_dir = run / f"node-{node_id}"
        port = fake.port if isinstance(fake, FakeBroker) else 1
        records.append(
            {
                "node_id": node_id,
                "broker_port": port,
                "controller_port": 1,
                "data_dir": str(data_dir),
            }
        )
        pids[str(node_id)] = fake.pid if isinstance(fake, FakeBroker) else fake
    home.mkdir(parents=True, exist_ok=True)
    (home / CLUSTER_FILE).write_text(
        json.dumps({"nodes": records, "pids": pids, "started_at": datetime.now(UTC).isoformat()})
    )
    return run


def test_detached_cluster_is_found_its_nodes_killed_stopped_and_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fakes: list[FakeBroker]
) -> None:
    home = tmp_path / "home"
    fakes.extend(FakeBroker(home / "cluster-1" / f"node-{n}", listen=True) for n in (1, 2, 3))
    run = _cluster_record(home, dict(enumerate(fakes, start=1)))
    cluster = LocalCluster.running(home)
    assert cluster is not None and cluster.size == 3
    assert [cluster.pid(n) for n in (1, 2, 3)] == [f.pid for f in fakes]
    assert cluster.bootstrap == ",".join(f"127.0.0.1:{f.port}" for f in fakes)
    monkeypatch.setenv("ENSYNC_HOME", str(home))
    assert running_bootstrap() == cluster.bootstrap  # configs naming no cluster use it

    cluster.kill(2)  # SIGKILL
    assert _gone(fakes[1].pid)
    cluster.stop_node(3, timeout=WAIT_S)  # SIGTERM
    assert _wait_until_gone(fakes[2].pid)
    again = LocalCluster.running(home)  # what the next command finds
    assert again is not None and [again.pid(n) for n in (1, 2, 3)] == [fakes[0].pid, None, None]
    with pytest.raises(LocalBrokerError, match=r"node 2 is not running \(nodes: \[1, 2, 3\]\)"):
        again.kill(2)
    with pytest.raises(LocalBrokerError, match="no node 7"):
        again.start_node(7)

    again.stop()
    assert _wait_until_gone(fakes[0].pid)
    assert not run.exists() and not (home / CLUSTER_FILE).exists()
    assert LocalCluster.running(home) is None and running_bootstrap() is None


@pytest.mark.parametrize("content", ["{not json", '{"nodes": 3}', "[]", None])
def test_cluster_record_that_is_unreadable_or_names_no_running_node_is_dropped(
    tmp_path: Path, content: str | None
) -> None:
    home = tmp_path / "home"
    if content is None:  # well formed, but its nodes are gone (or another program's pids)
        run = _cluster_record(home, {1: _dead_pid(), 2: os.getpid()})
        (run / "node-1").mkdir(parents=True)
    else:
        home.mkdir()
        (home / CLUSTER_FILE).write_text(content)
    assert LocalCluster.running(home) is None
    assert not (home / CLUSTER_FILE).exists()
    assert list(home.iterdir()) == []  # a cluster with no node up is forgotten with its data
    assert localbroker._alive(os.getpid())  # a pid that is not a broker's is never signalled


def test_cluster_data_outside_home_is_never_deleted(tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "precious"
    (elsewhere / "node-1").mkdir(parents=True)
    _cluster_record(home, {1: _dead_pid()}, run=elsewhere)
    assert LocalCluster.running(home) is None
    assert (elsewhere / "node-1").is_dir()


def test_node_commands_without_a_cluster_say_how_to_start_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        broker, ["node", "kill", "1"], env={"ENSYNC_HOME": str(tmp_path / "home")}
    )
    assert result.exit_code == 1
    assert "no local cluster is running (start one: ensync-kafka broker start --nodes 3)" in (
        result.output
    )
    too_many = CliRunner().invoke(broker, ["start", "--nodes", "9"])
    assert too_many.exit_code == 2 and "--nodes" in too_many.output
