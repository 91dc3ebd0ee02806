"""The ``ensync-kafka`` command: a thin layer over the library.

Every option is also read from an ``ENSYNC_<OPTION>`` environment variable (shown in ``--help``).
Command groups live one per module in this package and register themselves in ``main``.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys

import click

from ..exceptions import EnsyncKafkaError
from ._common import CONTEXT_SETTINGS


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    show_envvar=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def cli(log_level: str) -> None:
    """ensync-kafka: defer Kafka events to a later time, delivered once, by priority."""
    # `kill -USR1 <pid>` prints every thread's stack to stderr: where a process that will not
    # stop (or will not progress) is waiting, usually inside a Kafka client call.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _register() -> None:
    from . import broker, consumer, monitor, pipeline

    for module in (broker, pipeline, consumer, monitor):
        for command in module.COMMANDS:
            cli.add_command(command)


def main() -> None:
    _register()
    try:
        # standalone_mode=False returns ctx.exit(n)'s code instead of exiting: pass it on.
        code = cli.main(prog_name="ensync-kafka", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EnsyncKafkaError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    if isinstance(code, int) and code:
        sys.exit(code)
