"""Queries across every worker: status, upcoming deliveries, one deferral, recent records.

Workers are found in ``{prefix}.workers`` (registry.py) and asked over HTTP in parallel; their
answers are merged (upcoming deliveries in due order, by the timer key's byte order, which is due
time, then highest priority, then id). A worker that does not answer is listed as unreachable and
its partitions as not covered, never guessed.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from ._kafka import reader
from .codec import AUDIT, DEAD
from .config import Config
from .exceptions import BrokerError, SerializationError
from .models import iso_ms, now_ms
from .registry import RegistryReader, WorkerInfo
from .topics import TopicNames

MAX_PARALLEL = 8
TAIL_TIMEOUT_S = 5.0
_TERMINAL = {"DELIVERED": "delivered", "CANCELLED": "cancelled", "DEAD": "dead"}


def audit_view(rec: dict[str, Any]) -> dict[str, Any]:
    """An AuditRecord as JSON."""
    return {
        "defer_id": rec["defer_id"],
        "event": rec["event"],
        "at": iso_ms(rec["at"]),
        "at_ms": rec["at"],
        "reason": rec["reason"],
        "name": rec.get("name"),
        "queue": rec.get("queue"),
        "priority": rec.get("priority"),
        "tier": rec.get("tier"),
        "due_at": iso_ms(rec.get("due_at")),
        "attempt": rec.get("attempt"),
        "actor": rec.get("actor", ""),
        "request_id": rec.get("request_id"),
        "outcome": rec.get("outcome"),
    }


def dead_view(rec: dict[str, Any]) -> dict[str, Any]:
    """A DeadLetter as JSON, without its payload."""
    return {
        "defer_id": rec["defer_id"],
        "name": rec["name"],
        "queue": rec["queue"],
        "priority": rec["priority"],
        "error": rec["error"],
        "dead_at": iso_ms(rec["dead_at"]),
        "at_ms": rec["dead_at"],
        "attempt": rec["attempt"],
        "reason": rec["reason"],
        "group": rec["group"],
    }


class Cluster:
    """Asks every announced worker and merges the answers. Thread-safe; close when done."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.timeout = config.monitor.query_timeout
        self._registry = RegistryReader(config)
        self._pool = ThreadPoolExecutor(MAX_PARALLEL, thread_name_prefix="ensync-query")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._registry.close()

    def workers(self) -> list[WorkerInfo]:
        return self._registry.workers()

    def _get(self, worker: WorkerInfo, path: str, params: dict[str, Any]) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{worker.url}{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def _ask(
        self, path: str, params: dict[str, Any] | None = None
    ) -> list[tuple[WorkerInfo, Any, str | None]]:
        """(worker, answer or None, error or None) for every announced worker."""
        workers = self.workers()

        def one(worker: WorkerInfo) -> tuple[WorkerInfo, Any, str | None]:
            try:
                return worker, self._get(worker, path, params or {}), None
            except (OSError, ValueError) as exc:
                return worker, None, str(exc)

        return list(self._pool.map(one, workers))

    def status(self) -> dict[str, Any]:
        """Per tier: held, next due, oldest overdue, lag, partitions covered, workers."""
        answers = self._ask("/api/v1/local/status")
        partitions_per_tier = self.config.topics.defer.partitions
        seen: dict[str, dict[int, dict[str, Any]]] = {t: {} for t in self.config.tier_names}
        owners: dict[str, set[str]] = {t: set() for t in self.config.tier_names}
        workers = []
        for worker, answer, error in answers:
            workers.append(
                {
                    **worker.as_dict(),
                    "reachable": error is None and answer is not None,
                    "error": error,
                    "ready": bool(answer and answer.get("ready")),
                }
            )
            if not answer:
                continue
            for tier in answer["tiers"]:
                name = tier["tier"]
                if name not in seen:
                    continue
                for part in tier["partitions"]:
                    known = seen[name].get(part["partition"])
                    if known is None or (known.get("restoring") and not part.get("restoring")):
                        seen[name][part["partition"]] = part
                    owners[name].add(worker.worker_id)
        tiers = []
        for name in self.config.tier_names:
            parts = seen[name].values()
            restored = [p for p in parts if not p.get("restoring")]
            dues = [p["next_due_ms"] for p in restored if p.get("next_due_ms") is not None]
            lags = [p["lag"] for p in parts if p.get("lag") is not None]
            tiers.append(
                {
                    "tier": name,
                    "held": sum(p["held"] for p in restored),
                    "held_exact": all(p.get("held_exact", True) for p in restored),
                    "next_due": iso_ms(min(dues)) if dues else None,
                    "next_due_ms": min(dues) if dues else None,
                    "oldest_overdue_s": max((p["overdue_s"] for p in restored), default=0.0),
                    "lag": sum(lags),
                    "partitions": partitions_per_tier,
                    "covered": len(restored),
                    "restoring": sorted(p["partition"] for p in parts if p.get("restoring")),
                    "workers": sorted(owners[name]),
                }
            )
        return {"now": iso_ms(now_ms()), "tiers": tiers, "workers": workers}

    def upcoming(
        self,
        *,
        tier: str | None = None,
        queue: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> dict[str, Any]:
        """The next ``limit`` deliveries across every worker, in due order; pass ``next`` back
        as ``after`` for the following page."""
        params = {"tier": tier, "queue": queue, "limit": limit, "after": after}
        answers = self._ask("/api/v1/local/upcoming", params)
        items: dict[tuple[str, str], dict[str, Any]] = {}
        more = False
        unreachable = []
        for worker, answer, error in answers:
            if answer is None:
                unreachable.append({"worker_id": worker.worker_id, "error": error})
                continue
            more = more or answer.get("next") is not None
            for item in answer["items"]:
                key = (item["tier"], item["defer_id"])
                items.setdefault(key, {**item, "worker_id": worker.worker_id})
        ordered = sorted(items.values(), key=lambda i: i["cursor"])
        page = ordered[:limit]
        more = more or len(ordered) > limit
        return {
            "items": page,
            "next": page[-1]["cursor"] if page and more else None,
            "unreachable": unreachable,
        }

    def lookup(self, defer_id: str) -> list[dict[str, Any]]:
        """What every worker knows of one deferral (usually one answer, or none)."""
        path = "/api/v1/local/deferrals/" + urllib.parse.quote(defer_id, safe="")
        return [answer for _, answer, _ in self._ask(path) if answer]

    def show(
        self, defer_id: str, history: Sequence[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """State (held / delivered / cancelled / dead / unknown), due time, priority, reason and
        the audit history (oldest first) of one deferral."""
        found = self.lookup(defer_id)
        return describe(defer_id, found, list(history or ()))


def describe(
    defer_id: str, found: Sequence[dict[str, Any]], history: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Combine live worker state with the audit history into one answer."""
    live = next((f for f in found if f.get("state") == "held"), found[0] if found else None)
    events = sorted(history, key=lambda h: h.get("at_ms") or 0)
    last_terminal = next((e for e in reversed(events) if e["event"] in _TERMINAL), None)
    first = next((e for e in events if e["event"] == "DEFERRED"), None)
    rescheduled = next((e for e in reversed(events) if e["event"] == "RESCHEDULED"), None)
    if live is not None and live["state"] == "held":
        state = "held"
    elif last_terminal is not None and last_terminal["event"] == "DEAD":
        state = "dead"
    elif live is not None:
        state = live["state"]
    elif last_terminal is not None:
        state = _TERMINAL[last_terminal["event"]]
    else:
        state = "unknown"
    base = first or {}
    out: dict[str, Any] = {
        "defer_id": defer_id,
        "state": state,
        "tier": base.get("tier"),
        "name": base.get("name"),
        "queue": base.get("queue"),
        "priority": base.get("priority"),
        "due_at": (rescheduled or base).get("due_at"),
        "reason": base.get("reason"),
    }
    if live is not None:
        out.update({k: v for k, v in live.items() if k != "state" and v is not None})
        out["state"] = state
    if last_terminal is not None and state != "held":
        out["finished_at"] = last_terminal["at"]
    out["history"] = list(events)
    return out


class Tail:
    """The most recent records of a topic, newest first, read without a consumer group."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def _consumer(self) -> Consumer:
        return reader(self._config, "tail", {"enable.partition.eof": True, "fetch.wait.max.ms": 10})

    def recent(
        self, topic: str, limit: int, decode: Callable[[bytes | None], dict[str, Any]]
    ) -> list[dict[str, Any]]:
        consumer = self._consumer()
        try:
            meta = consumer.list_topics(topic, timeout=TAIL_TIMEOUT_S)
            parts = sorted(meta.topics[topic].partitions) if topic in meta.topics else []
            starts, ends = [], {}
            for p in parts:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=TAIL_TIMEOUT_S
                )
                if high > low:
                    starts.append(TopicPartition(topic, p, max(low, high - limit)))
                    ends[p] = high
            if not starts:
                return []
            consumer.assign(starts)
            out: list[dict[str, Any]] = []
            open_parts = set(ends)
            deadline = time.monotonic() + TAIL_TIMEOUT_S
            while open_parts and time.monotonic() < deadline:
                for msg in consumer.consume(1000, 0.2):
                    err = msg.error()
                    p = msg.partition() or 0
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            open_parts.discard(p)
                        continue
                    if (msg.offset() or 0) + 1 >= ends[p]:
                        open_parts.discard(p)
                    try:
                        out.append(decode(msg.value()))
                    except SerializationError:
                        continue
        except KafkaException as exc:
            raise BrokerError(f"{topic}: cannot read: {exc}") from exc
        finally:
            consumer.close()
        out.sort(key=lambda r: r.get("at_ms") or 0, reverse=True)
        return out[:limit]

    def audit(self, limit: int) -> list[dict[str, Any]]:
        topic = TopicNames(self._config.prefix).audit
        return self.recent(topic, limit, lambda v: audit_view(AUDIT.decode(v)))

    def dead(self, limit: int) -> list[dict[str, Any]]:
        topic = TopicNames(self._config.prefix).dead
        return self.recent(topic, limit, lambda v: dead_view(DEAD.decode(v)))
