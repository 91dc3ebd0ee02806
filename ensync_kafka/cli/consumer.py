"""Consumer-side commands: ``dead list``, ``dead redrive``, ``defer-file``, ``consume``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import click

from ..client import DeferClient
from ..config import Config, parse_duration
from ..consumer import PriorityConsumer, load_callable
from ..dead import DeadLetter, read_dead_letters, redrive_dead_letters
from ..exceptions import ValidationError
from ..models import DeferRequest
from ._common import CONTEXT_SETTINGS, config_option, load

DEFAULT_BATCH_SIZE = 1000
MAX_REJECTIONS_SHOWN = 50
_LINE_KEYS = frozenset(
    {"name", "payload", "delay", "at", "priority", "reason", "queue", "key", "defer_id", "headers"}
)


def _since(raw: str | None) -> datetime | None:
    """``--since``: a duration back from now (``2h``) or an ISO 8601 time."""
    if raw is None:
        return None
    try:
        return datetime.now(tz=UTC) - timedelta(seconds=parse_duration(raw))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise click.BadParameter(
            "expected a duration back from now (30m, 2h, 7d) or an ISO 8601 time",
            param_hint="--since",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _since_option(func: Any) -> Any:
    return click.option(
        "--since",
        default=None,
        show_envvar=True,
        help="Only events that died since: a duration back from now (2h, 7d) or ISO 8601",
    )(func)


@click.group(context_settings=CONTEXT_SETTINGS)
def dead() -> None:
    """Dead letters: events whose handler failed every attempt ({prefix}.dead)."""


@dead.command("list", context_settings=CONTEXT_SETTINGS)
@config_option
@click.option("--name", default=None, show_envvar=True, help="Only this event name")
@_since_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line")
def dead_list(config_path: str | None, name: str | None, since: str | None, as_json: bool) -> None:
    """List dead events, oldest first, one per defer_id."""
    letters = read_dead_letters(load(config_path), name=name, since=_since(since))
    if as_json:
        for letter in letters:
            click.echo(json.dumps(_as_dict(letter)))
        return
    if not letters:
        click.echo("no dead letters")
        return
    click.echo(f"{'dead at (UTC)':<19}  {'prio':>4}  {'tries':>5}  {'name':<24}  defer_id / error")
    for d in letters:
        stamp = d.dead_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        copies = f"  ({d.copies} copies)" if d.copies > 1 else ""
        line = f"{stamp:<19}  {d.priority:>4}  {d.attempt:>5}  {d.name:<24}  {d.defer_id}"
        click.echo(line + copies)
        click.echo(f"{'':<58}  {_one_line(d.error, 100)}")
    click.echo(f"{len(letters)} dead event(s)")


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _as_dict(d: DeadLetter) -> dict[str, Any]:
    return {
        "defer_id": d.defer_id,
        "name": d.name,
        "priority": d.priority,
        "queue": d.queue,
        "attempt": d.attempt,
        "error": d.error,
        "dead_at": d.dead_at.isoformat(),
        "group": d.group,
        "history": [
            {"attempt": a.attempt, "at": a.at.isoformat(), "reason": a.reason} for a in d.history
        ],
        "traceback": d.traceback,
        "payload": d.payload.decode(errors="replace"),
        "content_type": d.content_type,
        "partition": d.partition,
        "offset": d.offset,
        "copies": d.copies,
    }


@dead.command("redrive", context_settings=CONTEXT_SETTINGS)
@config_option
@click.option("--name", default=None, show_envvar=True, help="Only this event name")
@click.option("--id", "ids", multiple=True, help="Only this defer_id (repeatable)")
@_since_option
@click.option(
    "--delay", default="0s", show_default=True, show_envvar=True, help="Deliver after (e.g. 30s)"
)
@click.option("--all", "all_", is_flag=True, help="Redrive every dead event (no filter given)")
def dead_redrive(
    config_path: str | None,
    name: str | None,
    ids: tuple[str, ...],
    since: str | None,
    delay: str,
    all_: bool,
) -> None:
    """Defer dead events again with their attempts reset (audited REDRIVEN).

    Redriving the same dead event twice delivers it once: the redrive's defer_id is derived
    from the dead event's (use the same --delay so the two land on the same tier).
    """
    try:
        seconds = parse_duration(delay)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--delay") from None
    if not (name or ids or since or all_):
        raise click.UsageError("give --name, --id or --since to choose, or --all for every one")
    config = load(config_path)
    letters = read_dead_letters(config, name=name, since=_since(since), ids=set(ids) or None)
    unknown = sorted(set(ids) - {d.defer_id for d in letters})
    for defer_id in unknown:
        click.echo(f"not found on the dead topic: {defer_id}", err=True)
    skipped = [d for d in letters if d.queue not in config.queues]
    for d in skipped:
        click.echo(f"skipped {d.defer_id}: queue {d.queue!r} is not configured", err=True)
    letters = [d for d in letters if d.queue in config.queues]
    if not letters:
        click.echo("nothing to redrive")
        return
    with (
        DeferClient(config) as client,
        click.progressbar(length=len(letters), label="redriving", file=sys.stderr) as bar,
    ):
        seen = [0]

        def progress(done: int, total: int) -> None:
            bar.update(done - seen[0])
            seen[0] = done

        receipts = redrive_dead_letters(
            config, letters, delay=seconds, client=client, progress=progress, actor="cli:redrive"
        )
    for letter, receipt in zip(letters, receipts, strict=True):
        click.echo(f"redriven {letter.defer_id} -> {receipt.defer_id} due {receipt.due_at:%X}")
    click.echo(f"{len(receipts)} dead event(s) redriven")


# -- defer-file ---------------------------------------------------------------------------------


def _request(line: str, default_queue: str) -> DeferRequest:
    """One JSON line -> a DeferRequest; ValueError says what is wrong with it."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    extra = sorted(set(data) - _LINE_KEYS)
    if extra:
        raise ValueError(f"unknown key(s): {', '.join(extra)}")
    if "name" not in data:
        raise ValueError("name: required")
    delay: Any = data.get("delay")
    if isinstance(delay, str):
        try:
            delay = parse_duration(delay)
        except ValueError as exc:
            raise ValueError(f"delay: {exc}") from None
    at: Any = data.get("at")
    if isinstance(at, str):
        try:
            at = datetime.fromisoformat(at)
        except ValueError:
            raise ValueError(f"at: not an ISO 8601 time: {at!r}") from None
    return DeferRequest(
        name=data["name"],
        payload=data.get("payload"),
        delay=delay,
        at=at,
        priority=data.get("priority", 1),
        reason=data.get("reason", ""),
        queue=data.get("queue", default_queue),
        key=data.get("key"),
        defer_id=data.get("defer_id"),
        headers=data.get("headers"),
    )


def _send(
    client: DeferClient, batch: list[tuple[int, DeferRequest]], rejected: list[tuple[int, str]]
) -> int:
    """Send what is valid in ``batch``; an invalid request is found by halving, so the valid
    ones still go (the client validates a whole call before it sends any of it)."""
    if not batch:
        return 0
    try:
        client.defer_many([req for _, req in batch])
    except ValidationError as exc:
        if len(batch) == 1:
            rejected.append((batch[0][0], str(exc).removeprefix("request 0: ")))
            return 0
        middle = len(batch) // 2
        return _send(client, batch[:middle], rejected) + _send(client, batch[middle:], rejected)
    return len(batch)


def _lines(stream: IO[str]) -> Iterator[tuple[int, str, int]]:
    """(line number, text, bytes read) of the non-blank lines."""
    for number, line in enumerate(stream, start=1):
        size = len(line.encode())
        if line.strip():
            yield number, line, size
        else:
            yield number, "", size


@click.command("defer-file", context_settings=CONTEXT_SETTINGS)
@config_option
@click.argument("path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    show_envvar=True,
    help="Deferrals per acknowledged batch",
)
def defer_file(config_path: str | None, path: Path, batch_size: int) -> None:
    """Defer one event per line of a JSON Lines file ('-' reads stdin).

    Each line: {"name": ..., "payload": ..., "delay": "5s" | seconds | "at": ISO 8601,
    "priority", "reason", "queue", "key", "defer_id", "headers"}. Invalid lines are reported
    and skipped; the rest are sent. Lines that carry a defer_id are deduplicated by the workers,
    so running the same file again delivers nothing twice (same delay -> same tier).
    """
    config: Config = load(config_path)
    stdin = str(path) == "-"
    size = None if stdin else path.stat().st_size
    accepted = 0
    rejected: list[tuple[int, str]] = []
    stream: IO[str] = sys.stdin if stdin else path.open(encoding="utf-8")
    bar: Any = click.progressbar(length=size, label="deferring", file=sys.stderr)
    try:
        with DeferClient(config) as client, bar:
            batch: list[tuple[int, DeferRequest]] = []
            read = 0
            for number, line, nbytes in _lines(stream):
                read += nbytes
                if not line:
                    continue
                try:
                    batch.append((number, _request(line, config.queues[0])))
                except ValueError as exc:
                    rejected.append((number, str(exc)))
                if len(batch) >= batch_size:
                    accepted += _send(client, batch, rejected)
                    batch = []
                    bar.update(read)
                    read = 0
            accepted += _send(client, batch, rejected)
            bar.update(read)
    finally:
        if not stdin:
            stream.close()
    rejected.sort()
    for number, reason in rejected[:MAX_REJECTIONS_SHOWN]:
        click.echo(f"line {number}: {reason}", err=True)
    if len(rejected) > MAX_REJECTIONS_SHOWN:
        click.echo(f"… and {len(rejected) - MAX_REJECTIONS_SHOWN} more", err=True)
    click.echo(f"accepted {accepted}, rejected {len(rejected)}")
    if rejected:
        raise click.ClickException(f"{len(rejected)} line(s) rejected")


# -- consume ------------------------------------------------------------------------------------


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@click.argument("handler")
@click.option("--queue", default=None, show_envvar=True, help="Queue [default: the first]")
@click.option(
    "--group", default=None, show_envvar=True, help="[default: {prefix}.consumer.{queue}]"
)
def consume(config_path: str | None, handler: str, queue: str | None, group: str | None) -> None:
    """Run HANDLER (module:function, imported from the current directory too) on every event
    delivered to a queue, highest priority first, until SIGTERM/SIGINT."""
    if "" not in sys.path:
        sys.path.insert(0, "")
    func = load_callable(handler)
    consumer = PriorityConsumer(load(config_path), queue=queue, group=group)
    consumer.run(func)
    click.echo(f"stopped: {consumer.stats}", err=True)


COMMANDS: list[click.Command] = [dead, defer_file, consume]

__all__ = ["COMMANDS", "consume", "dead", "defer_file"]
