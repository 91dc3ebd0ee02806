"""Options shared by every command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..config import Config, load_config

CONTEXT_SETTINGS = {"auto_envvar_prefix": "ENSYNC", "help_option_names": ["-h", "--help"]}

F = TypeVar("F", bound=Callable[..., Any])


def config_option(func: F) -> F:
    """``--config FILE`` (default ``$ENSYNC_CONFIG`` or ``./ensync.yaml``)."""
    return click.option(
        "--config",
        "config_path",
        envvar="ENSYNC_CONFIG",
        show_envvar=True,
        type=click.Path(dir_okay=False),
        default=None,
        help="YAML config file [default: ./ensync.yaml when present, else built-in defaults]",
    )(func)


def load(config_path: str | None) -> Config:
    return load_config(config_path)
