"""``ensync-kafka broker start|stop|restart|status|node|tool``: a local Kafka broker, or a local
cluster of several (``start --nodes 3``) whose nodes can be killed, stopped and started.

Either runs detached and is recorded in ``$ENSYNC_HOME`` (``broker.json``, ``cluster.json``);
configs that name no cluster use it automatically. ``status``, ``start`` and ``restart`` print its
bootstrap addresses alone on the last line, so scripts can take them with ``tail -n 1``.
"""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

import click

from .._kafkadist import KAFKA_TOOLS, KAFKA_VERSION, tool_command
from ..localbroker import (
    DEFAULT_HEAP,
    DEFAULT_START_TIMEOUT_S,
    DEFAULT_STOP_TIMEOUT_S,
    ENV_HOME,
    BrokerInfo,
    LocalBroker,
    default_home,
)
from ..localcluster import NODE_HEAP, LocalCluster, locked
from ._common import CONTEXT_SETTINGS

MAX_NODES = 5
"""Every node of a local cluster is also a controller: a KRaft quorum of more is unusual."""


def _local(at: datetime) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _describe(info: BrokerInfo) -> str:
    started = _local(info.started_at)
    return f"pid {info.pid}, started {started}\n  data: {info.data_dir}\n  log:  {info.log_file}"


def _describe_cluster(cluster: LocalCluster) -> str:
    lines = []
    for node_id, node in sorted(cluster.nodes.items()):
        pid = cluster.pid(node_id)
        state = f"pid {pid}" if pid is not None else "down"
        lines.append(f"  node {node_id}: {node.bootstrap}  {state}  log: {node.log_file}")
    return "\n".join(lines)


def _home(home: Path | None) -> Path:
    return home if home is not None else default_home()


def _cluster(home: Path | None) -> LocalCluster:
    """The detached cluster recorded in the home, or a ClickException saying what runs instead."""
    cluster = LocalCluster.running(_home(home))
    if cluster is None:
        raise click.ClickException(
            "no local cluster is running (start one: ensync-kafka broker start --nodes 3)"
        )
    return cluster


@click.group(context_settings={**CONTEXT_SETTINGS, "auto_envvar_prefix": "ENSYNC_BROKER"})
@click.option(
    "--home",
    envvar=ENV_HOME,
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where broker.json or cluster.json, the logs and the data live "
    "[default: ${XDG_STATE_HOME:-~/.local/state}/ensync-kafka/broker]",
)
@click.pass_context
def broker(ctx: click.Context, home: Path | None) -> None:
    """Run a local Apache Kafka broker for development, or a cluster of several (`start --nodes
    3`) to fail one node at a time (Java and Maven, no Docker).

    The first start fetches the Kafka jars from Maven Central into
    ${ENSYNC_KAFKA_CACHE:-~/.cache/ensync-kafka/kafka-4.4.0}; later starts are offline.
    """
    ctx.obj = home


@broker.command()
@click.option(
    "--nodes",
    type=click.IntRange(1, MAX_NODES),
    default=1,
    show_default=True,
    show_envvar=True,
    help="How many nodes: more than one makes a cluster (replication up to 3, "
    "minimum ISR one below) whose nodes `broker node` kills, stops and starts.",
)
@click.option(
    "--heap",
    default=None,
    show_envvar=True,
    help=f"JVM maximum heap (-Xmx) of each node  "
    f"[default: {DEFAULT_HEAP}; {NODE_HEAP} for a node of a cluster]",
)
@click.option("--timeout", type=float, default=DEFAULT_START_TIMEOUT_S,
              show_default=True, show_envvar=True,
              help="Seconds to wait for the broker to serve clients.")  # fmt: skip
@click.pass_obj
def start(home: Path | None, nodes: int, heap: str | None, timeout: float) -> None:
    """Start the broker (or a cluster), or report the one already running."""
    with locked(_home(home)) as where:
        cluster = LocalCluster.running(where)
        size = cluster.size if cluster else 1 if LocalBroker(where).status() else nodes
        if size != nodes:
            running = f"a local cluster of {size} nodes" if cluster else "a local broker"
            raise click.ClickException(
                f"{running} is running in {where}: stop it first (ensync-kafka broker stop)"
            )
        if nodes > 1:
            verb = "already running" if cluster else "started"
            if cluster is None:
                cluster = LocalCluster(
                    where, nodes=nodes, heap=heap or NODE_HEAP, start_timeout=timeout
                )
                cluster.start()
            click.echo(f"Kafka {KAFKA_VERSION} cluster of {nodes} nodes {verb} in {where}")
            click.echo(_describe_cluster(cluster))
            click.echo(cluster.bootstrap)
            return
    info, started = LocalBroker(home, heap=heap or DEFAULT_HEAP, start_timeout=timeout).start()
    verb = "started" if started else "already running:"
    click.echo(f"Kafka {info.kafka_version} broker {verb} {_describe(info)}")
    click.echo(info.bootstrap)


@broker.command()
@click.option("--keep-data", is_flag=True, show_envvar=True,
              help="Keep the broker's data directory instead of deleting it.")  # fmt: skip
@click.option("--timeout", type=float, default=DEFAULT_STOP_TIMEOUT_S,
              show_default=True, show_envvar=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")  # fmt: skip
@click.pass_obj
def stop(home: Path | None, keep_data: bool, timeout: float) -> None:
    """Stop the broker (SIGTERM, then SIGKILL) and delete its data unless --keep-data.
    A cluster's nodes are all killed at once (stopped one by one, the last would wait for a
    quorum)."""
    with locked(_home(home)) as where:
        cluster = LocalCluster.running(where)
        if cluster is not None:
            bootstrap = cluster.bootstrap
            cluster.stop(keep_data=keep_data)
            kept = f"data kept in {where}" if keep_data else "data removed"
            click.echo(f"stopped the Kafka cluster at {bootstrap} ({kept})")
            return
    info = LocalBroker(home).stop(keep_data=keep_data, timeout=timeout)
    if info is None:
        click.echo("no local broker was running")
        return
    kept = f"data kept in {info.data_dir}" if keep_data else "data removed"
    click.echo(f"stopped Kafka broker pid {info.pid} at {info.bootstrap} ({kept})")


@broker.command()
@click.option("--timeout", type=float, default=DEFAULT_STOP_TIMEOUT_S,
              show_default=True, show_envvar=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")  # fmt: skip
@click.pass_obj
def restart(home: Path | None, timeout: float) -> None:
    """Stop the broker and start it again on its data and address: topics and offsets stay.
    A cluster's nodes are restarted one after another (a rolling restart)."""
    with locked(_home(home)) as where:
        cluster = LocalCluster.running(where)
        if cluster is not None:
            cluster.restart(timeout, lambda n: click.echo(f"node {n} restarted"))
            click.echo(f"Kafka {KAFKA_VERSION} cluster restarted in {where}")
            click.echo(_describe_cluster(cluster))
            click.echo(cluster.bootstrap)
            return
    info = LocalBroker(home).restart(timeout=timeout)
    click.echo(f"Kafka {info.kafka_version} broker restarted {_describe(info)}")
    click.echo(info.bootstrap)


@broker.command()
@click.pass_obj
def status(home: Path | None) -> None:
    """Print the running broker or cluster; its bootstrap addresses are the last line. Exit 1
    if none runs."""
    cluster = LocalCluster.running(_home(home))
    if cluster is not None:
        up = sum(cluster.pid(n) is not None for n in cluster.nodes)
        since = f" since {_local(cluster.started_at)}" if cluster.started_at else ""
        click.echo(f"Kafka {KAFKA_VERSION} cluster running{since}: {up} of {cluster.size} nodes up")
        click.echo(_describe_cluster(cluster))
        click.echo(cluster.bootstrap)
        return
    info = LocalBroker(home).status()
    if info is None:
        # A ClickException (not ctx.exit) so the exit status survives standalone_mode=False.
        raise click.ClickException(
            "no local broker is running (start one: ensync-kafka broker start)"
        )
    click.echo(f"Kafka {info.kafka_version} broker running: {_describe(info)}")
    click.echo(info.bootstrap)


NODE_ACTIONS = ("kill", "stop", "start")


@broker.command()
@click.argument("action", type=click.Choice(NODE_ACTIONS))
@click.argument("node_id", metavar="NODE", type=int)
@click.option("--timeout", type=float, default=DEFAULT_STOP_TIMEOUT_S,
              show_default=True, show_envvar=True,
              help="stop: seconds to wait after SIGTERM before SIGKILL.")  # fmt: skip
@click.pass_obj
def node(home: Path | None, action: str, node_id: int, timeout: float) -> None:
    """Fail or mend one node of a local cluster: `kill` (SIGKILL, a crash: its partitions wait
    until the controller fences it, about 9 s), `stop` (a controlled shutdown: its leaderships
    move first) or `start` (again on its data, once it serves clients)."""
    with locked(_home(home)):
        cluster = _cluster(home)
        if action == "kill":
            cluster.kill(node_id)
        elif action == "stop":
            cluster.stop_node(node_id, timeout)
        else:
            cluster.start_node(node_id)
        past = {"kill": "killed", "stop": "stopped", "start": "started"}[action]
        click.echo(f"node {node_id} {past}")
        click.echo(_describe_cluster(cluster))
        click.echo(cluster.bootstrap)


@broker.command(
    context_settings={
        **CONTEXT_SETTINGS,
        "ignore_unknown_options": True,
        "allow_interspersed_args": False,  # after NAME, everything is the tool's
    }
)
@click.argument("name", type=click.Choice(sorted(KAFKA_TOOLS)))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def tool(name: str, args: tuple[str, ...]) -> None:
    """Run Kafka's own kafka-NAME.sh tool (from the jars the broker uses) with ARGS, against
    any cluster ARGS name: e.g. `tool transactions --bootstrap-server H:P abort ...`, the
    remedies `ensync-kafka topics hanging` prints. `tool NAME --help` shows the tool's help."""
    command = tool_command(name, args)
    raise SystemExit(subprocess.run(command, check=False).returncode)


COMMANDS: list[click.Command] = [broker]

__all__ = ["COMMANDS", "broker"]
