"""Several local KRaft nodes on loopback: a cluster whose brokers can fail one at a time.

A single broker cannot show what production relies on: a partition's leadership moving to another
replica, a transaction coordinator failing over, a rolling restart. ``LocalCluster`` runs ``nodes``
combined broker+controller nodes (a static quorum of all of them) from the same jars as
:class:`~ensync_kafka.localbroker.LocalBroker`, with replication 3 and a minimum ISR of 2 for
Kafka's internal topics and as the default for new ones, and lets a caller kill, stop and start
each node.

Two ways to run one, as for the single broker:

- ``LocalCluster.ephemeral().start()`` (the tests): nodes that are children of the starting
  process, killed by the kernel with it; nothing is recorded.
- ``LocalCluster(home).start()`` (``ensync-kafka broker start --nodes 3``): detached nodes recorded
  in ``<home>/cluster.json``, so that later commands (:meth:`LocalCluster.running`) can kill, stop
  and start them one by one and stop the cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._kafkadist import (
    JAVA_HINT,
    KAFKA_VERSION,
    LOCK_FILE,
    _require,
    ensure_jars,
    render_server_properties,
)
from ._processes import (
    KILL_WAIT_S,
    _free_ports,
    _is_kafka_under,
    _kill,
    _locked,
    _read_json,
    _wait_gone,
    _write_json,
)
from .exceptions import LocalBrokerError
from .localbroker import (
    _PORT_ATTEMPTS,
    DEFAULT_START_TIMEOUT_S,
    DEFAULT_STOP_TIMEOUT_S,
    HOST,
    _PortTaken,
    await_started,
    broker_command,
    ephemeral_home,
    format_storage,
    new_cluster_id,
    spawn_node,
    stop_node_process,
)

__all__ = ["CLUSTER_FILE", "DEFAULT_NODES", "LocalCluster", "Node"]

DEFAULT_NODES = 3
NODE_HEAP = "512m"
"""Per node: three JVMs share a development machine with the clients under test."""
CLUSTER_FILE = "cluster.json"
"""Where a detached cluster's nodes are recorded, in its home."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Node:
    node_id: int
    broker_port: int
    controller_port: int
    data_dir: Path

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.broker_port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"node-{self.node_id}.log"

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "broker_port": self.broker_port,
            "controller_port": self.controller_port,
            "data_dir": str(self.data_dir),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Node:
        """Raises KeyError, TypeError or ValueError on a malformed record."""
        return cls(
            node_id=int(data["node_id"]),
            broker_port=int(data["broker_port"]),
            controller_port=int(data["controller_port"]),
            data_dir=Path(data["data_dir"]),
        )


class LocalCluster:
    """Start ``nodes`` local Kafka nodes as one cluster; kill, stop and start them one by one."""

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        nodes: int = DEFAULT_NODES,
        cache: Path | None = None,
        heap: str = NODE_HEAP,
        start_timeout: float = DEFAULT_START_TIMEOUT_S,
        die_with_parent: bool = False,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, not {nodes}")
        self.home = Path(home).expanduser().absolute()
        self.size = nodes
        self.cache = cache
        self.heap = heap
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        self.started_at: datetime | None = None
        self.nodes: dict[int, Node] = {}
        self._pids: dict[int, int] = {}
        """Every running node's process; those started here are also in ``_processes``."""
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._java = ""
        self._libs: Path | None = None

    @classmethod
    def ephemeral(cls, **kwargs: Any) -> LocalCluster:
        """A cluster for one test: a fresh registered home (reaped if we die); killed with us."""
        return cls(ephemeral_home(), die_with_parent=True, **kwargs)

    @classmethod
    def running(cls, home: str | os.PathLike[str], **kwargs: Any) -> LocalCluster | None:
        """The detached cluster recorded in ``home``, or None. Its nodes that are down are
        known but have no :meth:`pid`. A cluster none of whose nodes runs is forgotten and its
        data removed, as a single broker's is: it cannot be started one node at a time (no
        quorum)."""
        cluster = cls(home, **kwargs)
        record = _read_json(cluster.state_file)
        if record is None:  # none, or unreadable: nothing in it can be trusted
            cluster.state_file.unlink(missing_ok=True)
            return None
        try:
            nodes = [Node.from_json(n) for n in record["nodes"]]
            pids = {int(n): int(pid) for n, pid in record["pids"].items()}
            started_at = datetime.fromisoformat(record["started_at"])
        except (KeyError, TypeError, ValueError, AttributeError):
            cluster.state_file.unlink(missing_ok=True)
            return None
        cluster.size, cluster.started_at = len(nodes), started_at
        cluster.nodes = {node.node_id: node for node in nodes}
        cluster._pids = {
            n: pid
            for n, pid in pids.items()
            if n in cluster.nodes and _is_kafka_under(pid, cluster.nodes[n].data_dir)
        }
        if not cluster._pids:
            cluster.stop()
            return None
        return cluster

    @property
    def state_file(self) -> Path:
        return self.home / CLUSTER_FILE

    @property
    def bootstrap(self) -> str:
        """Every node's address: a client reaches the cluster whichever nodes are down."""
        return ",".join(node.bootstrap for node in self.nodes.values())

    def pid(self, node_id: int) -> int | None:
        """The running process of a node, or None when it is down."""
        process = self._processes.get(node_id)
        if process is not None:
            return process.pid if process.poll() is None else None
        pid = self._pids.get(node_id)
        return (
            pid if pid is not None and _is_kafka_under(pid, self.nodes[node_id].data_dir) else None
        )

    def start(self) -> str:
        """Format and start every node; return the bootstrap list once all serve clients."""
        if self.nodes:
            raise LocalBrokerError(f"the cluster in {self.home} was started already")
        self._tools()
        for _attempt in range(_PORT_ATTEMPTS):
            try:
                self._launch()
                return self.bootstrap
            except _PortTaken:
                self.stop()
            except BaseException:
                self.stop()
                raise
        raise LocalBrokerError(f"no free loopback ports after {_PORT_ATTEMPTS} attempts")

    def kill(self, node_id: int) -> None:
        """SIGKILL a node, as a crash: no controlled shutdown, no leadership handed over."""
        pid = self._running(node_id)
        process = self._processes.pop(node_id, None)
        if process is not None:
            process.kill()
            process.wait(KILL_WAIT_S)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not _wait_gone(pid, KILL_WAIT_S):
                raise LocalBrokerError(f"node {node_id} (pid {pid}) survived SIGKILL")
        self._pids.pop(node_id)
        self._save()

    def stop_node(self, node_id: int, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM a node: a controlled shutdown moves its leaderships first (a rolling restart's
        step); SIGKILL after ``timeout`` s."""
        pid = self._running(node_id)
        process = self._processes.pop(node_id, None)
        if process is not None:
            stop_node_process(process, timeout)
        else:
            _kill(pid, timeout)
        self._pids.pop(node_id)
        self._save()

    def start_node(self, node_id: int) -> None:
        """Run a stopped or killed node again on its data; return once it serves clients."""
        if node_id not in self.nodes:
            raise LocalBrokerError(f"the cluster has no node {node_id} (nodes: {self._ids()})")
        if self.pid(node_id) is not None:
            raise LocalBrokerError(f"node {node_id} is running")
        self._tools()
        node = self.nodes[node_id]
        process = self._processes[node_id] = self._spawn(node)
        self._pids[node_id] = process.pid
        self._save()
        await_started(process, node.log_file, node.bootstrap, self.start_timeout)

    def restart(
        self,
        timeout: float = DEFAULT_STOP_TIMEOUT_S,
        on_restarted: Callable[[int], object] = lambda node_id: None,
    ) -> None:
        """A rolling restart: each running node stopped (controlled) and started again in turn,
        the next only once it serves clients; ``on_restarted(node_id)`` after each."""
        for node_id in self._ids():
            if self.pid(node_id) is not None:
                self.stop_node(node_id, timeout)
                self.start_node(node_id)
                on_restarted(node_id)

    def stop(self, *, keep_data: bool = False) -> None:
        """Kill every node and delete the cluster's data and logs unless ``keep_data``. Not a
        controlled shutdown: the last nodes of a cluster stopping one by one lose their quorum
        and would wait it out."""
        for node_id in list(self._pids):
            if self.pid(node_id) is not None:
                self.kill(node_id)
        self._pids.clear()
        self._processes.clear()
        if not keep_data:  # the nodes' directories and logs; never outside the home
            for run in {node.data_dir.parent for node in self.nodes.values()}:
                if (
                    run.resolve().is_relative_to(self.home.resolve())
                    and run.resolve() != self.home.resolve()
                ):
                    shutil.rmtree(run, ignore_errors=True)
        self.nodes.clear()
        if not self.die_with_parent:
            self.state_file.unlink(missing_ok=True)

    # internals

    def _ids(self) -> list[int]:
        return sorted(self.nodes)

    def _running(self, node_id: int) -> int:
        pid = self.pid(node_id) if node_id in self.nodes else None
        if pid is None:
            known = f"nodes: {self._ids()}" if self.nodes else "no cluster"
            raise LocalBrokerError(f"node {node_id} is not running ({known})")
        return pid

    def _tools(self) -> None:
        if self._libs is None:
            self._java = _require("java", JAVA_HINT)
            self._libs = ensure_jars(self.cache)

    def _save(self) -> None:
        """Record a detached cluster's nodes for later commands; a test's is not recorded."""
        if self.die_with_parent or not self.nodes:
            return
        _write_json(
            self.state_file,
            {
                "nodes": [node.to_json() for node in self.nodes.values()],
                "pids": {str(n): pid for n, pid in self._pids.items()},
                "started_at": (self.started_at or datetime.now(UTC)).isoformat(),
                "kafka_version": KAFKA_VERSION,
            },
        )

    def _launch(self) -> None:
        ports = _free_ports(HOST, 2 * self.size)
        run = self.home / f"cluster-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.nodes = {
            n: Node(
                node_id=n,
                broker_port=ports[2 * (n - 1)],
                controller_port=ports[2 * (n - 1) + 1],
                data_dir=run / f"node-{n}",
            )
            for n in range(1, self.size + 1)
        }
        controllers = {n: node.controller_port for n, node in self.nodes.items()}
        cluster_id = new_cluster_id()
        for node in self.nodes.values():
            node.data_dir.mkdir(parents=True)
            properties = node.data_dir / "server.properties"
            properties.write_text(
                render_server_properties(
                    host=HOST,
                    broker_port=node.broker_port,
                    controller_port=node.controller_port,
                    log_dir=node.data_dir / "log",
                    node_id=node.node_id,
                    controllers=controllers,
                )
            )
            format_storage(self._java, self._libs_dir, properties, cluster_id)
        # All at once: no node finishes starting before a quorum of controllers has formed.
        self.started_at = datetime.now(UTC)
        for n, node in self.nodes.items():
            self._processes[n] = self._spawn(node)
            self._pids[n] = self._processes[n].pid
        self._save()  # before waiting: a start killed meanwhile leaves nodes that can be found
        for n, node in self.nodes.items():
            await_started(self._processes[n], node.log_file, node.bootstrap, self.start_timeout)

    @property
    def _libs_dir(self) -> Path:
        assert self._libs is not None, "_tools() first"
        return self._libs

    def _spawn(self, node: Node) -> subprocess.Popen[bytes]:
        command = broker_command(
            self._java, self._libs_dir, self.heap, node.data_dir / "server.properties"
        )
        return spawn_node(
            command, node.data_dir, node.log_file, die_with_parent=self.die_with_parent
        )


@contextlib.contextmanager
def locked(home: str | os.PathLike[str]) -> Iterator[Path]:
    """The home of a detached cluster, locked against another command changing it meanwhile."""
    path = Path(home).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    with _locked(path / LOCK_FILE):
        yield path
