"""See and steer what is deferred: ``status``, ``upcoming``, ``show``, ``cancel``,
``reschedule``, ``audit``, ``dashboard``.

``status``/``upcoming``/``show`` ask the running workers (found in ``{prefix}.workers``) over
HTTP; ``audit`` reads the audit store (synced from ``{prefix}.audit`` first); ``cancel`` and
``reschedule`` go through the workers' transactional path and wait for every tier's answer.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from .._signals import stop_on_signals
from ..auditstore import AuditStore
from ..client import DeferClient
from ..config import parse_duration
from ..control import ControlResult
from ..query import Cluster
from ..web import App, WebServer
from ._common import CONTEXT_SETTINGS, config_option, load

log = logging.getLogger("ensync_kafka.dashboard")

SIGNAL_POLL_S = 1.0
"""How often the dashboard's main thread looks at its stop event besides being woken by it."""

EXIT_NOT_DONE = 1
"""cancel/reschedule: the deferral was already delivered, already cancelled, or is unknown."""
EXIT_PENDING = 3
"""cancel/reschedule: a tier did not answer in time; the request stays queued for it."""
DEFAULT_DASHBOARD_PORT = 8470


def _json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table")(
        func
    )


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    moment = datetime.fromisoformat(iso).astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _span(seconds: float) -> str:
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    if s < 1:
        return f"{sign}{s * 1000:.0f}ms"
    if s < 120:
        return f"{sign}{s:.1f}s"
    if s < 7200:
        return f"{sign}{s / 60:.1f}m"
    if s < 172800:
        return f"{sign}{s / 3600:.1f}h"
    return f"{sign}{s / 86400:.1f}d"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _moment(value: str | None, name: str) -> int | None:
    """ISO 8601 (a naive time is UTC), or a duration meaning that long ago (``2h``)."""
    if value is None:
        return None
    try:
        return int(
            (datetime.now(tz=UTC) - timedelta(seconds=parse_duration(value))).timestamp() * 1000
        )
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            "ISO 8601 time or a duration ago (e.g. 2h)", param_hint=name
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# -- status / upcoming / show ---------------------------------------------------------------


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@_json_option
def status(config_path: str | None, as_json: bool) -> None:
    """Per tier: held, next due, oldest overdue, consumer lag, partitions covered, workers."""
    cluster = Cluster(load(config_path))
    try:
        data = cluster.status()
    finally:
        cluster.close()
    if as_json:
        _emit_json(data)
        return
    now = datetime.now(tz=UTC).timestamp() * 1000
    rows = []
    for t in data["tiers"]:
        held = f"{'' if t['held_exact'] else '~'}{t['held']}"
        due = (
            "-"
            if t["next_due_ms"] is None
            else f"{_when(t['next_due'])} ({_span((t['next_due_ms'] - now) / 1000)})"
        )
        overdue = _span(t["oldest_overdue_s"]) if t["oldest_overdue_s"] > 0 else "-"
        covered = f"{t['covered']}/{t['partitions']}"
        if t["restoring"]:
            covered += f" restoring {','.join(map(str, t['restoring']))}"
        rows.append(
            [t["tier"], held, due, overdue, t["lag"], covered, ",".join(t["workers"]) or "-"]
        )
    _table(["TIER", "HELD", "NEXT DUE", "OLDEST OVERDUE", "LAG", "PARTITIONS", "WORKERS"], rows)
    click.echo()
    if not data["workers"]:
        click.echo("no workers announced (is a worker running with monitor.port != 0?)")
        return
    wrows = []
    for w in data["workers"]:
        state = "unreachable" if not w["reachable"] else ("ready" if w["ready"] else "not ready")
        tiers = " ".join(f"{t}:{','.join(map(str, ps)) or '-'}" for t, ps in w["tiers"].items())
        wrows.append([w["worker_id"], w["url"], state, tiers])
    _table(["WORKER", "URL", "STATE", "PARTITIONS"], wrows)


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@click.option("--tier", default=None, show_envvar=True, help="Only this tier")
@click.option("--queue", default=None, show_envvar=True, help="Only this queue")
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=20, show_default=True, show_envvar=True
)
@click.option("--after", default=None, help="Cursor: the 'next' of the previous page")
@_json_option
def upcoming(
    config_path: str | None,
    tier: str | None,
    queue: str | None,
    limit: int,
    after: str | None,
    as_json: bool,
) -> None:
    """The next deliveries across all workers, in due order (then highest priority)."""
    config = load(config_path)
    if tier is not None:
        config.tier(tier)
    cluster = Cluster(config)
    try:
        page = cluster.upcoming(tier=tier, queue=queue, limit=limit, after=after)
    finally:
        cluster.close()
    if as_json:
        _emit_json(page)
        return
    now = datetime.now(tz=UTC).timestamp() * 1000
    rows = [
        [
            _when(i["due_at"]),
            _span((i["due_ms"] - now) / 1000),
            i["priority"],
            i["tier"],
            i["queue"],
            i["name"],
            i["defer_id"],
            i["reason"],
        ]
        for i in page["items"]
    ]
    if not rows:
        click.echo("nothing is deferred")
    else:
        _table(["DUE", "IN", "PRIO", "TIER", "QUEUE", "NAME", "DEFER ID", "REASON"], rows)
    for gone in page["unreachable"]:
        click.echo(f"warning: worker {gone['worker_id']} did not answer: {gone['error']}", err=True)
    if page["next"]:
        click.echo(f"more: --after {page['next']}")


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@click.argument("defer_id")
@click.option("--no-sync", is_flag=True, help="Do not read new audit records first")
@_json_option
def show(config_path: str | None, defer_id: str, no_sync: bool, as_json: bool) -> None:
    """State (held / delivered / cancelled / dead / unknown), due time, priority, reason and
    audit history of one deferral."""
    config = load(config_path)
    with AuditStore(config) as store:
        if not no_sync:
            store.sync()
        history = store.history(defer_id)
    cluster = Cluster(config)
    try:
        data = cluster.show(defer_id, history)
    finally:
        cluster.close()
    if as_json:
        _emit_json(data)
        return
    click.echo(f"defer_id  {data['defer_id']}")
    click.echo(f"state     {data['state']}")
    for key in ("tier", "partition", "worker_id", "name", "queue", "priority", "reason"):
        if data.get(key) is not None:
            click.echo(f"{key:<9} {data[key]}")
    if data.get("due_at"):
        click.echo(f"due_at    {_when(data['due_at'])}")
    if data.get("finished_at"):
        click.echo(f"finished  {_when(data['finished_at'])}")
    # The other tiers' "unknown here" answers to a cancel/reschedule are noise in a table.
    shown = [h for h in data["history"] if h.get("outcome") != "unknown"]
    if shown:
        click.echo("history")
        for h in shown:
            click.echo(f"  {_when(h['at'])}  {h['event']:<11} {h['tier'] or '-':<5} {h['reason']}")
    if len(shown) < len(data["history"]):
        omitted = len(data["history"]) - len(shown)
        click.echo(f"  ({omitted} 'unknown here' answers of other tiers omitted; see --json)")


# -- cancel / reschedule --------------------------------------------------------------------


def _report(result: ControlResult, as_json: bool, tiers: Sequence[str]) -> None:
    if as_json:
        _emit_json(result.as_dict())
    else:
        answers = ", ".join(f"{t}: {result.tiers[t]}" for t in tiers if t in result.tiers)
        due = f" (due {result.due_at.isoformat()})" if result.due_at and result.done else ""
        click.echo(f"{result.defer_id}: {result.outcome.replace('_', ' ')}{due}  [{answers}]")
    # sys.exit, not ctx.exit: the status must survive main()'s standalone_mode=False.
    if result.outcome == "pending":
        missing = ", ".join(result.missing)
        click.echo(f"no answer from tier(s) {missing}: the request stays queued", err=True)
        sys.exit(EXIT_PENDING)
    if not result.done:
        sys.exit(EXIT_NOT_DONE)


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@click.argument("defer_id")
@click.option("--reason", default="", show_envvar=True, help="Why (audited)")
@click.option("--timeout", type=float, default=None, show_envvar=True,
              help="Seconds to wait for every tier [default: monitor.control_timeout]")  # fmt: skip
@_json_option
def cancel(
    config_path: str | None, defer_id: str, reason: str, timeout: float | None, as_json: bool
) -> None:
    """Cancel a pending deferral. Exit 0 cancelled, 1 already delivered/cancelled or unknown,
    3 a tier did not answer in time (the request stays queued)."""
    config = load(config_path)
    with DeferClient(config) as client:
        _report(client.cancel(defer_id, reason=reason, timeout=timeout), as_json, config.tier_names)


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@click.argument("defer_id")
@click.option("--delay", default=None, help="New delay from now, e.g. 30s, 10m, 2h")
@click.option("--at", "at", default=None, help="New due time, ISO 8601 with a timezone")
@click.option("--reason", default="", show_envvar=True, help="Why (audited)")
@click.option("--timeout", type=float, default=None, show_envvar=True,
              help="Seconds to wait for every tier [default: monitor.control_timeout]")  # fmt: skip
@_json_option
def reschedule(
    config_path: str | None,
    defer_id: str,
    delay: str | None,
    at: str | None,
    reason: str,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Move a pending deferral to a new due time (exactly one of --delay, --at). Exit codes as
    for cancel."""
    if (delay is None) == (at is None):
        raise click.UsageError("exactly one of --delay and --at is required")
    kwargs: dict[str, Any] = {}
    try:
        if delay is not None:
            kwargs["delay"] = parse_duration(delay)
        else:
            kwargs["at"] = datetime.fromisoformat(str(at))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--delay/--at") from None
    config = load(config_path)
    with DeferClient(config) as client:
        result = client.reschedule(defer_id, reason=reason, timeout=timeout, **kwargs)
        _report(result, as_json, config.tier_names)


# -- audit ----------------------------------------------------------------------------------


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@click.option("--id", "defer_id", default=None, help="Only this defer_id")
@click.option("--reason", default=None, help="Reason contains TEXT (case-insensitive)")
@click.option("--name", default=None, help="Only this event name")
@click.option("--event", default=None, help="Only this audit event (DEFERRED, DELIVERED, ...)")
@click.option("--since", default=None, help="ISO 8601 time, or a duration ago (2h)")
@click.option("--until", default=None, help="ISO 8601 time, or a duration ago (exclusive)")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option("--no-sync", is_flag=True, help="Query without reading new records first")
@click.option("--rebuild", is_flag=True, help="Empty the store and read the topic again")
@_json_option
def audit(
    config_path: str | None,
    defer_id: str | None,
    reason: str | None,
    name: str | None,
    event: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    no_sync: bool,
    rebuild: bool,
    as_json: bool,
) -> None:
    """Query the audit trail, materialized into SQLite (audit_store.path) or PostgreSQL
    (audit_store.dsn); new records are read in first."""
    config = load(config_path)
    with AuditStore(config) as store:
        if rebuild:
            click.echo(f"rebuilt {store.where}: {store.rebuild()} records", err=True)
        elif not no_sync:
            store.sync()
        found = store.query(
            defer_id=defer_id,
            reason=reason,
            name=name,
            event=event,
            since_ms=_moment(since, "--since"),
            until_ms=_moment(until, "--until"),
            limit=limit,
        )
    if as_json:
        _emit_json(found)
        return
    rows = [
        [_when(r["at"]), r["event"], r["tier"] or "-", r["name"] or "-", r["defer_id"], r["reason"]]
        for r in found
    ]
    if rows:
        _table(["AT", "EVENT", "TIER", "NAME", "DEFER ID", "REASON"], rows)
    click.echo(f"{len(found)} record(s)", err=True)


# -- dashboard ------------------------------------------------------------------------------


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@click.option("--host", default="127.0.0.1", show_default=True, show_envvar=True)
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_DASHBOARD_PORT,
              show_default=True, show_envvar=True, help="0 picks a free port")  # fmt: skip
def dashboard(config_path: str | None, host: str, port: int) -> None:
    """Serve the web dashboard (tiers, upcoming deliveries, audit, dead letters) until SIGTERM
    or Ctrl-C.

    Workers serve the same page on their own monitor port.
    """
    server = WebServer(App(load(config_path)), host, port)
    stop = threading.Event()
    stop_on_signals(stop, log, "stopping the dashboard")
    server.start()
    click.echo(f"dashboard: http://{host}:{server.port}/", err=True)
    try:
        while not stop.wait(SIGNAL_POLL_S):
            pass
    finally:
        server.stop()


COMMANDS: list[click.Command] = [status, upcoming, show, cancel, reschedule, audit, dashboard]

__all__ = ["COMMANDS"]
