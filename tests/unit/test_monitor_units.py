"""Monitoring and control pieces that need no broker: control decoding and state overlay,
outcome precedence, show's state rules, the web routes, config, and schema compatibility."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import Message

from ensync_kafka.codec import AUDIT, DEFERRAL, MAGIC, MARKER, schema_dir
from ensync_kafka.config import config_from_mapping
from ensync_kafka.control import (
    CONTROL,
    OP_HEADER,
    apply,
    control_op,
    decode,
    overall,
)
from ensync_kafka.exceptions import ConfigError, SerializationError
from ensync_kafka.query import describe
from ensync_kafka.state import MARKER_PREFIX, TIMER, PartitionStore, timer_key
from ensync_kafka.web import App

CONFIG = config_from_mapping(
    {"kafka": {"bootstrap_servers": "127.0.0.1:1"}, "tiers": {"1s": 1, "1m": 60}}, environ={}
)


def _control(op: str = "CANCEL", defer_id: str = "d1", due_at: int | None = None) -> bytes:
    return CONTROL.encode(
        {"op": op, "defer_id": defer_id, "request_id": "r1", "due_at": due_at, "at": 1,
         "reason": "why", "actor": "tester"}
    )  # fmt: skip


def _msg(value: bytes | None, *, key: bytes | None = b"d1", op: bytes | None = b"cancel") -> Any:
    headers = None if op is None else [(OP_HEADER, op)]
    return Message(topic="p.defer.1m", partition=0, offset=7, key=key, value=value, headers=headers)


def _deferral(defer_id: str = "d1", due: int = 5_000, priority: int = 3) -> dict[str, Any]:
    return {
        "defer_id": defer_id, "name": "n", "payload": b"{}", "content_type": "application/json",
        "key": None, "headers": [], "priority": priority, "queue": "default", "deferred_at": 1,
        "due_at": due, "reason": "r", "attempt": 1, "history": [],
    }  # fmt: skip


# -- control records --------------------------------------------------------------------------


def test_control_op_reads_the_header_only() -> None:
    assert control_op(_msg(b"x", op=None)) is None
    assert control_op(_msg(b"x", op=b"cancel")) == b"cancel"


@pytest.mark.parametrize(
    ("value", "key", "op", "why"),
    [
        (b"garbage", b"d1", b"cancel", "not an ensync Control"),
        (_control(), b"d1", b"explode", "unknown control op"),
        (_control(), b"other", b"cancel", "key must be its defer_id"),
        (_control(), None, b"cancel", "key must be its defer_id"),
        (_control("RESCHEDULE"), b"d1", b"cancel", "header says CANCEL"),
        (_control("RESCHEDULE"), b"d1", b"reschedule", "without a valid due_at"),
    ],
)
def test_malformed_controls_are_rejected(
    value: bytes, key: bytes | None, op: bytes, why: str
) -> None:
    with pytest.raises(SerializationError, match=why):
        decode(op, _msg(value, key=key, op=op))


def _store(tmp_path: Path, *deferrals: dict[str, Any]) -> PartitionStore:
    store = PartitionStore(tmp_path / "p0")
    store.apply(
        [(TIMER + timer_key(d["due_at"], d["priority"], d["defer_id"]), DEFERRAL.encode(d))
         for d in deferrals],
        None,
    )  # fmt: skip
    return store


def test_cancel_of_a_held_deferral(tmp_path: Path) -> None:
    store = _store(tmp_path, _deferral())
    rec = decode(b"cancel", _msg(_control()))
    effect = apply(rec, store, [], now=9, tier="1m", actor="worker:w")
    key = timer_key(5_000, 3, "d1")
    assert effect.outcome == "cancelled"
    assert effect.changes[0] == (TIMER + key, None)
    marker_key, marker = effect.changes[1]
    assert marker_key == MARKER_PREFIX + b"d1" and marker is not None
    assert MARKER.decode(marker)["status"] == "CANCELLED"
    audit = AUDIT.decode(effect.audit)
    assert (audit["event"], audit["outcome"], audit["request_id"]) == (
        "CANCELLED",
        "cancelled",
        "r1",
    )
    assert audit["actor"] == "tester" and audit["reason"] == "why"
    store.apply(effect.changes, None)
    assert store.held_key("d1") is None
    again = apply(rec, store, [], now=10, tier="1m", actor="w")
    assert again.outcome == "already_cancelled" and not again.changes
    store.close()


def test_controls_see_what_the_same_turn_did(tmp_path: Path) -> None:
    store = _store(tmp_path)
    d = _deferral()
    pending: list[tuple[bytes, bytes | None]] = [
        (TIMER + timer_key(d["due_at"], 3, "d1"), DEFERRAL.encode(d))
    ]
    request = _msg(_control("RESCHEDULE", due_at=9_000), op=b"reschedule")
    moved = apply(decode(b"reschedule", request), store, pending, now=1, tier="1m", actor="w")
    assert moved.outcome == "rescheduled"
    pending += moved.changes
    new_key = timer_key(9_000, 3, "d1")
    assert pending[-1][0] == TIMER + new_key
    assert DEFERRAL.decode(pending[-1][1])["due_at"] == 9_000  # type: ignore[arg-type]
    cancelled = apply(decode(b"cancel", _msg(_control())), store, pending, now=2, tier="1m",
                      actor="w")  # fmt: skip
    assert cancelled.outcome == "cancelled"
    assert cancelled.changes[0] == (TIMER + new_key, None)
    store.apply(pending + cancelled.changes, None)
    assert store.held_key("d1") is None and store.marker("d1") is not None
    store.close()


def test_unknown_and_delivered(tmp_path: Path) -> None:
    store = _store(tmp_path)
    rec = decode(b"cancel", _msg(_control()))
    assert apply(rec, store, [], now=1, tier="1s", actor="w").outcome == "unknown"
    marker = MARKER.encode({"defer_id": "d1", "status": "DELIVERED", "at": 5})
    assert apply(rec, store, [(MARKER_PREFIX + b"d1", marker)], now=1, tier="1s",
                 actor="w").outcome == "already_delivered"  # fmt: skip
    store.close()


def test_overall_outcome_precedence() -> None:
    tiers = ["1s", "1m"]
    assert overall({"1s": "unknown", "1m": "cancelled"}, tiers) == "cancelled"
    assert overall({"1s": "already_delivered", "1m": "unknown"}, tiers) == "already_delivered"
    assert overall({"1s": "unknown"}, tiers) == "pending"
    assert overall({"1s": "unknown", "1m": "unknown"}, tiers) == "unknown"
    assert overall({"1s": "cancelled"}, tiers) == "cancelled"


# -- show -------------------------------------------------------------------------------------


def _event(event: str, at: int, **extra: Any) -> dict[str, Any]:
    return {"event": event, "at_ms": at, "at": str(at), "tier": "1m", **extra}


def test_describe_combines_live_state_and_history() -> None:
    deferred = _event("DEFERRED", 1, name="n", priority=2, reason="r", due_at="D")
    held = {"state": "held", "tier": "1m", "priority": 2, "due_at": "D2", "partition": 0}
    assert describe("x", [held], [deferred])["state"] == "held"
    assert describe("x", [held], [deferred])["due_at"] == "D2"
    assert describe("x", [], [deferred, _event("DELIVERED", 2)])["state"] == "delivered"
    dead = [deferred, _event("DELIVERED", 2), _event("DEAD", 3)]
    assert describe("x", [{"state": "delivered"}], dead)["state"] == "dead"
    assert describe("x", [{"state": "cancelled"}], [deferred])["state"] == "cancelled"
    assert describe("x", [], [])["state"] == "unknown"
    assert describe("x", [], [deferred])["reason"] == "r"


# -- web routes without a broker --------------------------------------------------------------


def test_routes_that_need_no_broker() -> None:
    app = App(CONFIG)
    assert app.handle("/healthz", {})[0] == 200
    assert app.handle("/readyz", {})[0] == 200
    assert app.handle("/metrics", {})[0] == 404
    status, content_type, body = app.handle("/", {})
    assert status == 200 and content_type.startswith("text/html") and b"Upcoming" in body
    assert app.handle("/dashboard/app.js", {})[1].startswith("text/javascript")
    assert app.handle("/dashboard/../../etc/passwd", {})[0] == 404
    assert app.handle("/api/v1/local/status", {})[0] == 404
    assert app.handle("/api/v1/upcoming", {"tier": "nope"})[0] == 400
    assert app.handle("/api/v1/upcoming", {"limit": "many"})[0] == 400
    assert json.loads(app.handle("/nope", {})[2])["error"].startswith("no such path")


# -- config and schemas -----------------------------------------------------------------------


def test_monitor_config() -> None:
    base = {"kafka": {"bootstrap_servers": "h:1"}}
    assert config_from_mapping(base, environ={}).monitor.port == "auto"
    env = {"ENSYNC_MONITOR__PORT": "0"}
    assert config_from_mapping(base, environ=env).monitor.port == 0
    assert config_from_mapping({**base, "monitor": {"port": 9464}}, environ={}).monitor.port == 9464
    with pytest.raises(ConfigError, match=r"monitor\.port"):
        config_from_mapping({**base, "monitor": {"port": 70000}}, environ={})
    secret = config_from_mapping(
        {**base, "audit_store": {"dsn": "postgresql://u:pw@h/db"}}, environ={}
    )
    assert "pw" not in repr(secret)


def test_a_v1_reader_sees_the_new_audit_answers_as_other() -> None:
    record = AUDIT.encode(
        {"defer_id": "d", "event": "UNCHANGED", "at": 1, "reason": "", "actor": "",
         "request_id": "r", "outcome": "unknown"}
    )  # fmt: skip
    v1 = json.loads((schema_dir() / "v1" / "AuditRecord.avsc").read_text())
    new = json.loads((schema_dir() / "AuditRecord.avsc").read_text())
    assert record[:2] == MAGIC
    old = fastavro.schemaless_reader(io.BytesIO(record[2:]), new, v1)
    assert isinstance(old, dict) and old["event"] == "OTHER" and "request_id" not in old
