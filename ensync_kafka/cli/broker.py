"""``ensync-kafka broker start|stop|restart|status|tool``: a local single-node Kafka broker.

The broker runs detached and is recorded in ``$ENSYNC_HOME/broker.json``; configs that name no
cluster use it automatically. ``status`` and ``start`` print its bootstrap address alone on the
last line, so scripts can take it with ``tail -n 1``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import click

from .._kafkadist import KAFKA_TOOLS, tool_command
from ..localbroker import (
    DEFAULT_HEAP,
    DEFAULT_START_TIMEOUT_S,
    DEFAULT_STOP_TIMEOUT_S,
    ENV_HOME,
    BrokerInfo,
    LocalBroker,
)
from ._common import CONTEXT_SETTINGS


def _describe(info: BrokerInfo) -> str:
    started = info.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"pid {info.pid}, started {started}\n  data: {info.data_dir}\n  log:  {info.log_file}"


@click.group(context_settings={**CONTEXT_SETTINGS, "auto_envvar_prefix": "ENSYNC_BROKER"})
@click.option(
    "--home",
    envvar=ENV_HOME,
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where broker.json, the log and the data live "
    "[default: ${XDG_STATE_HOME:-~/.local/state}/ensync-kafka/broker]",
)
@click.pass_context
def broker(ctx: click.Context, home: Path | None) -> None:
    """Run a local single-node Apache Kafka broker for development (Java and Maven, no Docker).

    The first start fetches the Kafka jars from Maven Central into
    ${ENSYNC_KAFKA_CACHE:-~/.cache/ensync-kafka/kafka-4.4.0}; later starts are offline.
    """
    ctx.obj = home


@broker.command()
@click.option("--heap", default=DEFAULT_HEAP, show_default=True, show_envvar=True,
              help="JVM maximum heap (-Xmx).")  # fmt: skip
@click.option("--timeout", type=float, default=DEFAULT_START_TIMEOUT_S,
              show_default=True, show_envvar=True,
              help="Seconds to wait for the broker to serve clients.")  # fmt: skip
@click.pass_obj
def start(home: Path | None, heap: str, timeout: float) -> None:
    """Start the broker, or report the one already running."""
    info, started = LocalBroker(home, heap=heap, start_timeout=timeout).start()
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
    """Stop the broker (SIGTERM, then SIGKILL) and delete its data unless --keep-data."""
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
    """Stop the broker and start it again on its data and address: topics and offsets stay."""
    info = LocalBroker(home).restart(timeout=timeout)
    click.echo(f"Kafka {info.kafka_version} broker restarted {_describe(info)}")
    click.echo(info.bootstrap)


@broker.command()
@click.pass_obj
def status(home: Path | None) -> None:
    """Print the running broker; its bootstrap address is the last line. Exit 1 if none runs."""
    info = LocalBroker(home).status()
    if info is None:
        # A ClickException (not ctx.exit) so the exit status survives standalone_mode=False.
        raise click.ClickException(
            "no local broker is running (start one: ensync-kafka broker start)"
        )
    click.echo(f"Kafka {info.kafka_version} broker running: {_describe(info)}")
    click.echo(info.bootstrap)


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
