"""Pipeline commands: ``topics create|hanging|republish``, ``worker``, ``defer``, ``schedule``."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click

from ..client import DeferClient
from ..config import WorkerConfig, parse_duration
from ..hanging import OFFSETS_TOPIC, find_hanging, plan_repairs
from ..models import Receipt
from ..republish import republish
from ..runner import Worker
from ..topics import ensure_topics
from ._common import CONTEXT_SETTINGS, config_option, load


@click.group(context_settings=CONTEXT_SETTINGS)
def topics() -> None:
    """Provision and verify the topics the configuration needs."""


@topics.command("create", context_settings=CONTEXT_SETTINGS)
@config_option
def topics_create(config_path: str | None) -> None:
    """Create missing topics and check existing ones (idempotent)."""
    cfg = load(config_path)
    report = ensure_topics(cfg)
    for name in report.created:
        click.echo(f"created   {name}")
    for name in report.verified:
        click.echo(f"verified  {name}")
    for group in report.groups:
        click.echo(f"group     {group}: session {cfg.worker.session_timeout:g} s")
    for problem in report.mismatches:
        click.echo(f"MISMATCH  {problem}", err=True)
    if not report.ok:
        raise click.ClickException(f"{len(report.mismatches)} topic(s) differ from the config")


@topics.command("hanging", context_settings=CONTEXT_SETTINGS)
@config_option
@click.option(
    "--group",
    "groups",
    multiple=True,
    help="Also check this consumer group's offsets (repeatable; the tiers' groups always are)",
)
@click.option(
    "--max-age",
    default=None,
    help="An open transaction older than this is hanging, e.g. 15m "
    "[default: the broker's transaction.max.timeout.ms]",
)
def topics_hanging(config_path: str | None, groups: tuple[str, ...], max_age: str | None) -> None:
    """Find transactions left open on the topics' partitions (and the groups' offsets) for
    longer than any transaction may last, and print the steps that end them without losing a
    deferral (exit 1 when there is one)."""
    try:
        limit = None if max_age is None else parse_duration(max_age)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-age") from None
    config = load(config_path)
    report = find_hanging(config, groups=groups, max_age_s=limit)
    bootstrap = config.kafka.client_settings().get("bootstrap.servers", "BOOTSTRAP")
    hanging = report.hanging
    click.echo(
        f"checked {len(report.checked)} partitions; a transaction open longer than "
        f"{report.max_age_s:g} s is hanging"
    )
    for txn in report.open:
        age = txn.age_s(report.at_ms)
        since = "unknown" if age is None else f"{age:.1f} s"
        label = "HANGING" if txn in hanging else "open"
        click.echo(
            f"{label:8} {txn.topic}[{txn.partition}] from offset {txn.start_offset} "
            f"(end {txn.end_offset}), open for {since}"
        )
        if txn in hanging:
            click.echo(f"         {txn.abort_command(str(bootstrap))}")
            if txn.topic != OFFSETS_TOPIC:
                click.echo(
                    f"         ensync-kafka topics republish --topic {txn.topic} "
                    f"--partition {txn.partition} --from {txn.start_offset} --to {txn.end_offset}"
                )
    if not hanging:
        return
    repairs = plan_repairs(config, report)
    steps = [
        "run the aborts above, then this command again and its aborts until nothing hangs (an "
        "abort can uncover another transaction behind it)",
        "run the republishes above (each writes again what the aborts hid of turns that did "
        "commit)",
    ]
    if repairs:
        steps.insert(0, "stop the workers of the tiers below")
        steps += [
            "remove those workers' state directories (worker.state_dir/<prefix>/<worker id>/"
            "<tier>)",
            "run each tier's commands below",
            "start the workers again",
        ]
    click.echo(
        "To recover (keep this first listing: its republishes and rewinds are the ones that "
        f"count): {'; '.join(steps)}."
    )
    for repair in repairs:
        commands = repair.commands(str(bootstrap))
        click.echo(
            f"  tier {repair.tier} (group {repair.group})" + ("" if commands else ": no rewind")
        )
        for command in commands:
            click.echo(f"         {command}")
    click.echo(
        "(Without Kafka's scripts, `ensync-kafka broker tool transactions ...` and "
        "`ensync-kafka broker tool consumer-groups ...` run the same tools.)"
    )
    raise click.ClickException(
        f"{len(hanging)} hanging transaction(s): end each with the command shown (README, "
        '"A single broker\'s restart can leave a hanging transaction")'
    )


@topics.command("republish", context_settings=CONTEXT_SETTINGS)
@config_option
@click.option("--topic", required=True, help="A priority, audit or changelog topic")
@click.option("--partition", type=int, required=True)
@click.option("--from", "start", type=int, required=True, help="First offset of the range")
@click.option("--to", "end", type=int, required=True, help="Offset after the range")
def topics_republish(
    config_path: str | None, topic: str, partition: int, start: int, end: int
) -> None:
    """After a hanging transaction's abort: write again what it hid in [--from, --to) of a
    turn that committed (deliveries, DELIVERED audit records, a release's changelog records),
    matched by delivery stamp against the rest of the turn."""
    report = republish(load(config_path), topic, partition, start, end)
    click.echo(
        f"{topic}[{partition}] {start}..{end}: {report.hidden} hidden, "
        f"{len(report.republished)} written again, {len(report.left)} left (their turn did "
        "not commit, and their tier redoes them; or delivered again already)"
    )
    for defer_id in report.republished:
        click.echo(f"written again  {defer_id}")
    for item in report.left:
        click.echo(f"left           {item}")


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@click.option(
    "--tiers", default=None, show_envvar=True, help="Comma-separated tiers [default: all]"
)
@click.option("--worker-id", default=None, show_envvar=True, help="Overrides worker.id")
@click.option("--state-dir", default=None, show_envvar=True, help="Overrides worker.state_dir")
def worker(
    config_path: str | None, tiers: str | None, worker_id: str | None, state_dir: str | None
) -> None:
    """Run tier workers until SIGTERM/SIGINT."""
    config = load(config_path)
    overrides: dict[str, Any] = {}
    if worker_id:
        overrides["id"] = worker_id
    if state_dir:
        overrides["state_dir"] = state_dir
    if overrides:
        worker_config = WorkerConfig.model_validate({**config.worker.model_dump(), **overrides})
        config = config.model_copy(update={"worker": worker_config})
    names = [t.strip() for t in tiers.split(",") if t.strip()] if tiers else None
    if names:
        for name in names:
            config.tier(name)  # a clear error for an unknown tier
    Worker(config, names).run()


def _send_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option("--name", required=True, help="Event name"),
            click.option("--payload", default="null", show_default=True, help="JSON payload"),
            click.option("--priority", type=int, default=1, show_default=True, help="1..5"),
            click.option("--reason", default="", help="Why it is deferred (audited)"),
            click.option("--queue", default=None, help="Destination queue [default: first]"),
            click.option("--key", default=None, help="Event key"),
            click.option("--defer-id", default=None, help="Idempotency id [default: fresh]"),
        ]
    ):
        func = option(func)
    return config_option(func)


def _payload(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload") from None


def _print_receipt(receipt: Receipt) -> None:
    click.echo(
        json.dumps(
            {
                "defer_id": receipt.defer_id,
                "due_at": receipt.due_at.isoformat(),
                "tier": receipt.tier,
                "queue": receipt.queue,
                "priority": receipt.priority,
            }
        )
    )


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--delay", required=True, help="e.g. 500ms, 5s, 10m, 2h")
@_send_options
def defer(config_path: str | None, delay: str, payload: str, **kw: Any) -> None:
    """Defer one event by a delay; prints the receipt as JSON."""
    try:
        seconds = parse_duration(delay)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--delay") from None
    with DeferClient(load(config_path)) as client:
        _print_receipt(client.defer(payload=_payload(payload), delay=seconds, **kw))


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--at", "at", required=True, help="ISO 8601 with a timezone")
@_send_options
def schedule(config_path: str | None, at: str, payload: str, **kw: Any) -> None:
    """Deliver one event at a time; prints the receipt as JSON."""
    try:
        when = datetime.fromisoformat(at)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--at") from None
    with DeferClient(load(config_path)) as client:
        _print_receipt(client.schedule(payload=_payload(payload), at=when, **kw))


COMMANDS: list[click.Command] = [topics, worker, defer, schedule]
