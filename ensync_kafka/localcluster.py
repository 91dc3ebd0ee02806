"""Several local KRaft nodes on loopback: a cluster whose brokers can fail one at a time.

A single broker cannot show what production relies on: a partition's leadership moving to another
replica, a transaction coordinator failing over, a rolling restart. ``LocalCluster`` runs ``nodes``
combined broker+controller nodes (a static quorum of all of them) from the same jars as
:class:`~ensync_kafka.localbroker.LocalBroker`, with replication 3 and a minimum ISR of 2 for
Kafka's internal topics and as the default for new ones, and lets a caller kill, stop and start
each node. Its nodes are children of the process that started them (``die_with_parent`` makes the
kernel kill them with it); nothing is recorded for another process to find.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._kafkadist import JAVA_HINT, _require, ensure_jars, render_server_properties
from ._processes import KILL_WAIT_S, _free_ports
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

__all__ = ["DEFAULT_NODES", "LocalCluster", "Node"]

DEFAULT_NODES = 3
NODE_HEAP = "512m"
"""Per node: three JVMs share a development machine with the clients under test."""


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
        self.nodes: dict[int, Node] = {}
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._java = ""
        self._libs = Path()

    @classmethod
    def ephemeral(cls, **kwargs: Any) -> LocalCluster:
        """A cluster for one test: a fresh registered home (reaped if we die); killed with us."""
        return cls(ephemeral_home(), die_with_parent=True, **kwargs)

    @property
    def bootstrap(self) -> str:
        """Every node's address: a client reaches the cluster whichever nodes are down."""
        return ",".join(node.bootstrap for node in self.nodes.values())

    def pid(self, node_id: int) -> int | None:
        """The running process of a node, or None when it is down."""
        process = self._processes.get(node_id)
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> str:
        """Format and start every node; return the bootstrap list once all serve clients."""
        if self.nodes:
            raise LocalBrokerError(f"the cluster in {self.home} was started already")
        self._java = _require("java", JAVA_HINT)
        self._libs = ensure_jars(self.cache)
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
        process = self._processes.pop(node_id)
        process.kill()
        process.wait(KILL_WAIT_S)

    def stop_node(self, node_id: int, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM a node: a controlled shutdown moves its leaderships first (a rolling restart's
        step); SIGKILL after ``timeout`` s."""
        stop_node_process(self._processes.pop(node_id), timeout)

    def start_node(self, node_id: int) -> None:
        """Run a stopped or killed node again on its data; return once it serves clients."""
        if self.pid(node_id) is not None:
            raise LocalBrokerError(f"node {node_id} is running")
        node = self.nodes[node_id]
        self._processes[node_id] = self._spawn(node)
        await_started(self._processes[node_id], node.log_file, node.bootstrap, self.start_timeout)

    def stop(self) -> None:
        """Kill every node and delete the cluster's data. Not a controlled shutdown: the last
        nodes of a cluster stopping one by one lose their quorum and would wait it out."""
        for node_id in list(self._processes):
            self.kill(node_id)
        for node in self.nodes.values():
            shutil.rmtree(node.data_dir, ignore_errors=True)
        self.nodes.clear()

    # internals

    def _launch(self) -> None:
        ports = _free_ports(HOST, 2 * self.size)
        self.nodes = {
            n: Node(
                node_id=n,
                broker_port=ports[2 * (n - 1)],
                controller_port=ports[2 * (n - 1) + 1],
                data_dir=self.home / f"node-{n}",
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
            format_storage(self._java, self._libs, properties, cluster_id)
        # All at once: no node finishes starting before a quorum of controllers has formed.
        for n, node in self.nodes.items():
            self._processes[n] = self._spawn(node)
        for n, node in self.nodes.items():
            await_started(self._processes[n], node.log_file, node.bootstrap, self.start_timeout)

    def _spawn(self, node: Node) -> subprocess.Popen[bytes]:
        command = broker_command(
            self._java, self._libs, self.heap, node.data_dir / "server.properties"
        )
        return spawn_node(
            command, node.data_dir, node.log_file, die_with_parent=self.die_with_parent
        )
