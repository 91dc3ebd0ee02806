"""A worker's monitoring side: HTTP server, local query views, metrics and registry announcements.

Runs beside the tier threads and never writes state. It reads the tier workers' RocksDB stores
under each tier's ``lock`` (held by the tier thread only while it adds or closes stores), so a
revoke never closes a store under a reader. ``/readyz`` answers 200 only once every tier has
been through a rebalance and no assigned partition is still restoring.
"""

from __future__ import annotations

import heapq
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .codec import DEFERRAL
from .config import Config
from .exceptions import BrokerError, ConfigError
from .hanging import HANGING_MARGIN_S, Partition, StabilityWatch
from .hooks import WorkerHooks
from .metrics import DeadLetterWatch, LagProbe, MetricsHooks, WorkerMetrics, held_count
from .models import iso_ms, now_ms
from .registry import Announcer, WorkerInfo, snapshot
from .state import STATUS_NAMES, PartitionStore, Timer
from .web import App, WebServer

if TYPE_CHECKING:
    from .runner import Worker
    from .worker import TierWorker

log = logging.getLogger("ensync_kafka.monitor")

LOOP_INTERVAL_S = 0.5
STABILITY_CHECK_INTERVAL_S = 10.0
"""How often the worker looks for a transaction left open where its tiers write."""
MAX_SCAN = 50_000
"""Timers one upcoming request reads per partition at most (filters may skip many)."""
MAX_LIMIT = 1000
_WILDCARDS = ("", "0.0.0.0", "::")


def deferral_view(rec: dict[str, Any]) -> dict[str, Any]:
    """A held deferral as JSON: everything but the payload bytes and header values."""
    return {
        "defer_id": rec["defer_id"],
        "name": rec["name"],
        "queue": rec["queue"],
        "priority": rec["priority"],
        "due_at": iso_ms(rec["due_at"]),
        "due_ms": rec["due_at"],
        "deferred_at": iso_ms(rec["deferred_at"]),
        "reason": rec["reason"],
        "attempt": rec["attempt"],
        "content_type": rec["content_type"],
        "payload_bytes": len(rec["payload"]),
        "key": None if rec["key"] is None else rec["key"].decode(errors="replace"),
        "headers": [h["key"] for h in rec["headers"]],
    }


class Monitor:
    """Everything a worker serves over HTTP, and its announcements in ``{prefix}.workers``."""

    def __init__(self, config: Config, worker: Worker) -> None:
        m = config.monitor
        self.config = config
        self.worker = worker
        self.worker_id = config.worker.id
        self.started_at_ms = now_ms()
        self.lag_probe = LagProbe(config)
        self.stability = StabilityWatch(
            config, config.worker.transaction_timeout + HANGING_MARGIN_S
        )
        self.metrics = WorkerMetrics(
            lambda: self.worker.tiers,
            lag=self.lag_probe.lag,
            ready=lambda: self.ready()[0],
            open_transactions=lambda: self.stability.ages,
        )
        port = 0 if m.port == "auto" else m.port
        try:
            self.server = WebServer(App(config, local=self), m.host, port)
        except OSError as exc:
            raise ConfigError(f"monitor: cannot listen on {m.host}:{port}: {exc}") from exc
        self.port = self.server.port
        self.host = m.advertised_host or (socket.gethostname() if m.host in _WILDCARDS else m.host)
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self._announcer: Announcer | None = None
        self._dead: DeadLetterWatch | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def wrap_hooks(self, hooks: WorkerHooks | None) -> WorkerHooks:
        return MetricsHooks(self.metrics, hooks)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.server.start()
        self._announcer = Announcer(self.config)
        self._dead = DeadLetterWatch(self.config, self.metrics.dead)
        self._loop = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._loop.start()
        log.info("worker %s: monitoring on %s", self.worker_id, self.url)

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.join(10)
        if self._announcer is not None:
            self._announcer.withdraw()
            self._announcer.close()
        if self._dead is not None:
            self._dead.close()
        self.lag_probe.close()
        self.server.stop()

    def _run(self) -> None:
        last: WorkerInfo | None = None
        next_announce = next_stability_check = 0.0
        interval = self.config.monitor.announce_interval
        while not self._stop.is_set():
            try:
                info = self.snapshot()
                changed = last is None or (info.tiers, info.restoring) != (
                    last.tiers,
                    last.restoring,
                )
                if changed or time.monotonic() >= next_announce:
                    assert self._announcer is not None
                    self._announcer.announce(info)
                    last, next_announce = info, time.monotonic() + interval
                if self._dead is not None:
                    self._dead.poll()
                if time.monotonic() >= next_stability_check:
                    next_stability_check = time.monotonic() + STABILITY_CHECK_INTERVAL_S
                    self._check_stability()
            except Exception:  # monitoring must never take the worker down
                log.exception("monitor loop")
            self._stop.wait(LOOP_INTERVAL_S)

    def _check_stability(self) -> None:
        """The changelog partitions of the tier partitions held here (each written by the one
        worker that owns it), and the priority and audit partitions every worker writes."""
        partitions: list[Partition] = []
        for tier in self.worker.tiers:
            with tier.lock:
                owned = set(tier.stores) | tier.restoring
            partitions.extend((tier.state_topic, p) for p in sorted(owned))
        try:
            self.stability.check([*partitions, *self.stability.shared_partitions()])
        except BrokerError as exc:
            log.debug("stability check: %s", exc)

    def snapshot(self) -> WorkerInfo:
        tiers: dict[str, tuple[int, ...]] = {}
        restoring: dict[str, tuple[int, ...]] = {}
        for tier in self.worker.tiers:
            with tier.lock:
                tiers[tier.tier.name] = tuple(sorted(set(tier.stores) | tier.restoring))
                restoring[tier.tier.name] = tuple(sorted(tier.restoring))
        return snapshot(
            self.worker_id, self.host, self.port, tiers, restoring, self.started_at_ms, _version()
        )

    # -- health ---------------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        errors = [repr(e) for e in self.worker.errors]
        stopping = self.worker.stop_event.is_set()
        return not errors and not stopping, {"errors": errors, "stopping": stopping}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        waiting: dict[str, Any] = {}
        for tier in self.worker.tiers:
            with tier.lock:
                restoring = sorted(tier.restoring)
            if not tier.rebalanced:
                waiting[tier.tier.name] = "waiting for the first assignment"
            elif restoring:
                waiting[tier.tier.name] = {"restoring": restoring}
        ok = not waiting and self.healthy()[0]
        return ok, {"ready": ok, "waiting": waiting}

    # -- local query views ----------------------------------------------------------------------

    def _tiers(self, tier: str | None = None) -> list[TierWorker]:
        return [t for t in self.worker.tiers if tier is None or t.tier.name == tier]

    def status(self) -> dict[str, Any]:
        now = now_ms()
        tiers = []
        for tier in self._tiers():
            lag = self.lag_probe.lag(tier)
            positions = dict(tier.positions)
            partitions = []
            with tier.lock:
                for p, store in sorted(tier.stores.items()):
                    count, exact = held_count(store)
                    due = store.next_due_ms()
                    partitions.append(
                        {
                            "partition": p,
                            "held": count,
                            "held_exact": exact,
                            "next_due": iso_ms(due),
                            "next_due_ms": due,
                            "overdue_s": max(0, now - due) / 1000 if due is not None else 0.0,
                            "restoring": False,
                            "position": positions.get(p),
                            "lag": lag.get(p),
                        }
                    )
                for p in sorted(tier.restoring):
                    partitions.append({"partition": p, "restoring": True, "lag": lag.get(p)})
            tiers.append(
                {
                    "tier": tier.tier.name,
                    "topic": tier.topic,
                    "partitions": partitions,
                    "stats": asdict(tier.stats),
                }
            )
        return {
            "worker_id": self.worker_id,
            "url": self.url,
            "now": iso_ms(now),
            "started_at": iso_ms(self.started_at_ms),
            "healthy": self.healthy()[0],
            "ready": self.ready()[0],
            "tiers": tiers,
        }

    def upcoming(
        self,
        *,
        tier: str | None = None,
        queue: str | None = None,
        limit: int = 20,
        after: bytes = b"",
    ) -> dict[str, Any]:
        """Held deferrals in due order (then highest priority), ``limit`` per page; ``after`` is
        the ``cursor`` of the last item of the previous page."""
        limit = max(1, min(limit, MAX_LIMIT))
        found: list[tuple[bytes, str, int, Timer]] = []
        truncated = False
        for tw in self._tiers(tier):
            with tw.lock:
                for p, store in sorted(tw.stores.items()):
                    items, cut = _scan(store, after, queue, limit)
                    truncated = truncated or cut
                    found.extend((t.key, tw.tier.name, p, t) for t in items)
        page = heapq.nsmallest(limit, found, key=lambda item: item[0])
        views = []
        for key, tier_name, p, timer in page:
            view = deferral_view(DEFERRAL.decode(timer.value))
            views.append({**view, "tier": tier_name, "partition": p, "cursor": key.hex()})
        more = truncated or len(found) > len(page)
        return {
            "worker_id": self.worker_id,
            "items": views,
            "next": views[-1]["cursor"] if views and more else None,
        }

    def lookup(self, defer_id: str) -> dict[str, Any] | None:
        """This worker's knowledge of one deferral, None when it has none."""
        for tw in self._tiers():
            with tw.lock:
                for p, store in tw.stores.items():
                    where = {"tier": tw.tier.name, "partition": p, "worker_id": self.worker_id}
                    key = store.held_key(defer_id)
                    value = store.timer(key) if key is not None else None
                    if value is not None:
                        return {"state": "held", **where, **deferral_view(DEFERRAL.decode(value))}
                    marker = store.marker(defer_id)
                    if marker is not None:
                        status, at = marker
                        return {
                            "state": STATUS_NAMES.get(status, "finished"),
                            "at": iso_ms(at),
                            "defer_id": defer_id,
                            **where,
                        }
        return None


def _scan(
    store: PartitionStore, after: bytes, queue: str | None, limit: int
) -> tuple[list[Timer], bool]:
    """Up to ``limit`` timers after ``after`` (of ``queue``); True when more may follow."""
    out: list[Timer] = []
    timers: Iterator[Timer] = store.iter_timers(after)
    for scanned, timer in enumerate(timers, 1):
        if queue is None or DEFERRAL.decode(timer.value)["queue"] == queue:
            out.append(timer)
            if len(out) >= limit:
                return out, True  # there may be more
        if scanned >= MAX_SCAN:
            return out, True
    return out, False


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ensync-kafka")
    except PackageNotFoundError:
        return ""
