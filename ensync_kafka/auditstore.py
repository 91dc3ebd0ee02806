"""The audit trail as a queryable table: ``{prefix}.audit`` (and ``{prefix}.dead``) materialized
into SQLite by default, or PostgreSQL when ``audit_store.dsn`` is set.

Incremental: each :meth:`AuditStore.sync` reads from the offsets stored with the rows (written in
the same database transaction as them) up to the topic's end, so a restart resumes where the last
sync stopped, and a replayed stretch is ignored (rows are keyed by partition and offset). The
topics are the source of truth: :meth:`AuditStore.rebuild` empties the tables and reads them again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from ._kafka import reader
from .codec import AUDIT, DEAD
from .config import Config
from .exceptions import BrokerError, ConfigError, SerializationError
from .models import from_ms, iso_ms
from .topics import TopicNames

log = logging.getLogger("ensync_kafka.auditstore")

SYNC_TIMEOUT_S = 60.0
SYNC_BATCH = 5000
METADATA_TIMEOUT_S = 10.0
DEFAULT_QUERY_LIMIT = 100

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit (
        kafka_partition INTEGER NOT NULL,
        kafka_offset BIGINT NOT NULL,
        defer_id TEXT NOT NULL,
        event TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        reason TEXT NOT NULL,
        name TEXT,
        queue TEXT,
        priority INTEGER,
        tier TEXT,
        due_at_ms BIGINT,
        attempt INTEGER,
        actor TEXT NOT NULL,
        request_id TEXT,
        outcome TEXT,
        PRIMARY KEY (kafka_partition, kafka_offset)
    )""",
    "CREATE INDEX IF NOT EXISTS audit_defer_id ON audit (defer_id)",
    "CREATE INDEX IF NOT EXISTS audit_at ON audit (at_ms)",
    "CREATE INDEX IF NOT EXISTS audit_name ON audit (name, at_ms)",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        kafka_partition INTEGER NOT NULL,
        kafka_offset BIGINT NOT NULL,
        defer_id TEXT NOT NULL,
        name TEXT NOT NULL,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL,
        error TEXT NOT NULL,
        reason TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        dead_at_ms BIGINT NOT NULL,
        consumer_group TEXT NOT NULL,
        PRIMARY KEY (kafka_partition, kafka_offset)
    )""",
    "CREATE INDEX IF NOT EXISTS dead_defer_id ON dead_letters (defer_id)",
    """CREATE TABLE IF NOT EXISTS offsets (
        topic TEXT NOT NULL,
        kafka_partition INTEGER NOT NULL,
        next_offset BIGINT NOT NULL,
        PRIMARY KEY (topic, kafka_partition)
    )""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_AUDIT_COLUMNS = (
    "kafka_partition", "kafka_offset", "defer_id", "event", "at_ms", "reason", "name", "queue",
    "priority", "tier", "due_at_ms", "attempt", "actor", "request_id", "outcome",
)  # fmt: skip
_DEAD_COLUMNS = (
    "kafka_partition", "kafka_offset", "defer_id", "name", "queue", "priority", "error",
    "reason", "attempt", "dead_at_ms", "consumer_group",
)  # fmt: skip


def _insert(table: str, columns: Sequence[str]) -> str:
    marks = ", ".join("?" for _ in columns)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
        "ON CONFLICT (kafka_partition, kafka_offset) DO NOTHING"
    )


_UPSERT_OFFSET = (
    "INSERT INTO offsets (topic, kafka_partition, next_offset) VALUES (?, ?, ?) "
    "ON CONFLICT (topic, kafka_partition) DO UPDATE SET next_offset = excluded.next_offset"
)


def _audit_row(p: int, offset: int, value: bytes | None) -> tuple[Any, ...]:
    r = AUDIT.decode(value)
    return (
        p, offset, r["defer_id"], r["event"], r["at"], r["reason"], r["name"], r["queue"],
        r["priority"], r["tier"], r["due_at"], r["attempt"], r["actor"], r.get("request_id"),
        r.get("outcome"),
    )  # fmt: skip


def _dead_row(p: int, offset: int, value: bytes | None) -> tuple[Any, ...]:
    r = DEAD.decode(value)
    return (
        p, offset, r["defer_id"], r["name"], r["queue"], r["priority"], r["error"], r["reason"],
        r["attempt"], r["dead_at"], r["group"],
    )  # fmt: skip


class _Connection(Protocol):
    def begin(self) -> None: ...
    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


class AuditStore:
    """Query the audit trail; :meth:`sync` first to take in what is new. Thread-safe."""

    def __init__(self, config: Config) -> None:
        self.config = config
        names = TopicNames(config.prefix)
        self.topics: dict[str, tuple[str, Sequence[str], Callable[..., tuple[Any, ...]]]] = {
            names.audit: ("audit", _AUDIT_COLUMNS, _audit_row),
            names.dead: ("dead_letters", _DEAD_COLUMNS, _dead_row),
        }
        self._lock = threading.RLock()
        dsn = config.audit_store.dsn
        if dsn is not None:
            self._conn, self._mark, self.where = _postgres(dsn.get_secret_value())
        else:
            path = Path(config.audit_store.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                str(path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
            db.execute("PRAGMA journal_mode=WAL")
            self._conn, self._mark, self.where = _SQLite(db), "?", str(path)
        with self._tx() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'prefix'").fetchone()
            if row is None:
                conn.execute(
                    self._sql("INSERT INTO meta (key, value) VALUES (?, ?)"),
                    ("prefix", config.prefix),
                )
            elif row[0] != config.prefix:
                raise ConfigError(
                    f"audit store {self.where} holds prefix {row[0]!r}, not {config.prefix!r}: "
                    "configure another audit_store.path"
                )

    def _sql(self, sql: str) -> str:
        return sql if self._mark == "?" else sql.replace("?", self._mark)

    @contextmanager
    def _tx(self) -> Iterator[_Connection]:
        with self._lock:
            self._conn.begin()
            try:
                yield self._conn
            except BaseException:
                self._conn.rollback()
                raise
            self._conn.commit()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- materialization ------------------------------------------------------------------------

    def offsets(self) -> dict[tuple[str, int], int]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT topic, kafka_partition, next_offset FROM offsets"
            ).fetchall()
        return {(t, p): o for t, p, o in rows}

    def sync(self, timeout: float = SYNC_TIMEOUT_S) -> int:
        """Take in every record added since the last sync; returns how many."""
        with self._lock:
            consumer = reader(
                self.config,
                "auditstore",
                {
                    "auto.offset.reset": "earliest",
                    "enable.partition.eof": True,
                    "fetch.wait.max.ms": 50,
                },
            )
            try:
                return self._sync(consumer, timeout)
            except KafkaException as exc:
                raise BrokerError(f"audit store sync: {exc}") from exc
            finally:
                consumer.close()

    def _sync(self, consumer: Consumer, timeout: float) -> int:
        stored = self.offsets()
        starts, ends = [], {}
        for topic in self.topics:
            meta = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
            if meta is None or meta.error is not None:
                continue  # not created yet: nothing to take in
            for p in sorted(meta.partitions):
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=METADATA_TIMEOUT_S
                )
                start = stored.get((topic, p))
                if start is not None and start > high:
                    raise ConfigError(
                        f"audit store {self.where}: {topic}[{p}] ends at {high} but the store "
                        f"has read to {start}: the topic was recreated; run a rebuild"
                    )
                if high > max(low, start or 0):
                    starts.append(
                        TopicPartition(topic, p, OFFSET_BEGINNING if start is None else start)
                    )
                    ends[(topic, p)] = high
        if not starts:
            return 0
        consumer.assign(starts)
        rows: dict[str, list[tuple[Any, ...]]] = {t: [] for t in self.topics}
        reached: dict[tuple[str, int], int] = {}
        total = 0
        deadline = time.monotonic() + timeout
        open_parts = set(ends)
        while open_parts and time.monotonic() < deadline:
            for msg in consumer.consume(SYNC_BATCH, 0.2):
                topic, p = msg.topic() or "", msg.partition() or 0
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        open_parts.discard((topic, p))
                        continue
                    raise BrokerError(f"audit store: {topic}[{p}]: {err.str()}", code=err.code())
                offset = msg.offset() or 0
                to_row = self.topics[topic][2]
                try:
                    rows[topic].append(to_row(p, offset, msg.value()))
                except SerializationError as exc:
                    log.warning("%s[%d]@%d: skipped: %s", topic, p, offset, exc)
                reached[(topic, p)] = offset + 1
                if offset + 1 >= ends[(topic, p)]:
                    open_parts.discard((topic, p))
            if sum(len(r) for r in rows.values()) >= SYNC_BATCH or not open_parts:
                total += self._write(rows, reached)
        total += self._write(rows, reached)
        return total

    def _write(
        self, rows: dict[str, list[tuple[Any, ...]]], reached: dict[tuple[str, int], int]
    ) -> int:
        count = 0
        with self._tx() as conn:
            for topic, batch in rows.items():
                table, columns, _ = self.topics[topic]
                sql = self._sql(_insert(table, columns))
                for row in batch:
                    conn.execute(sql, row)
                count += len(batch)
                batch.clear()
            for (topic, p), offset in reached.items():
                conn.execute(self._sql(_UPSERT_OFFSET), (topic, p, offset))
        return count

    def rebuild(self, timeout: float = SYNC_TIMEOUT_S) -> int:
        """Empty the store and read the topics again from their beginning."""
        with self._lock:
            with self._tx() as conn:
                for table in ("audit", "dead_letters", "offsets"):
                    conn.execute(f"DELETE FROM {table}")
            return self.sync(timeout)

    # -- queries --------------------------------------------------------------------------------

    def query(
        self,
        *,
        defer_id: str | None = None,
        reason: str | None = None,
        name: str | None = None,
        event: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int | None = DEFAULT_QUERY_LIMIT,
        newest_first: bool = False,
    ) -> list[dict[str, Any]]:
        """Audit records matching every given filter, oldest first (``reason``: substring,
        case-insensitive; ``until_ms`` exclusive)."""
        clauses, params = [], []
        for clause, value in (
            ("defer_id = ?", defer_id),
            ("LOWER(reason) LIKE ?", None if reason is None else f"%{reason.lower()}%"),
            ("name = ?", name),
            ("event = ?", None if event is None else event.upper()),
            ("at_ms >= ?", since_ms),
            ("at_ms < ?", until_ms),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT {', '.join(_AUDIT_COLUMNS)} FROM audit {where} ORDER BY at_ms {order}, "
        sql += f"kafka_partition {order}, kafka_offset {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._tx() as conn:
            found = conn.execute(self._sql(sql), params).fetchall()
        return [_audit_dict(dict(zip(_AUDIT_COLUMNS, row, strict=True))) for row in found]

    def history(self, defer_id: str) -> list[dict[str, Any]]:
        """Every audit record of one deferral, oldest first."""
        return self.query(defer_id=defer_id, limit=None)

    def dead_letters(self, limit: int = DEFAULT_QUERY_LIMIT) -> list[dict[str, Any]]:
        sql = f"SELECT {', '.join(_DEAD_COLUMNS)} FROM dead_letters ORDER BY dead_at_ms DESC"
        with self._tx() as conn:
            found = conn.execute(f"{sql} LIMIT {int(limit)}").fetchall()
        out = []
        for row in found:
            d = dict(zip(_DEAD_COLUMNS, row, strict=True))
            d["dead_at"] = from_ms(d["dead_at_ms"]).isoformat()
            out.append(d)
        return out

    def count(self) -> int:
        with self._tx() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0])


def _audit_dict(row: dict[str, Any]) -> dict[str, Any]:
    """The same shape as query.audit_view, for one answer format everywhere."""
    return {
        "defer_id": row["defer_id"],
        "event": row["event"],
        "at": from_ms(row["at_ms"]).isoformat(),
        "at_ms": row["at_ms"],
        "reason": row["reason"],
        "name": row["name"],
        "queue": row["queue"],
        "priority": row["priority"],
        "tier": row["tier"],
        "due_at": iso_ms(row["due_at_ms"]),
        "attempt": row["attempt"],
        "actor": row["actor"],
        "request_id": row["request_id"],
        "outcome": row["outcome"],
        "partition": row["kafka_partition"],
        "offset": row["kafka_offset"],
    }


class _SQLite:
    """sqlite3 in autocommit mode with explicit BEGIN/COMMIT, so DDL is transactional too."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def begin(self) -> None:
        self._conn.execute("BEGIN")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    def commit(self) -> None:
        self._conn.execute("COMMIT")

    def rollback(self) -> None:
        self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()


class _Postgres:
    """psycopg opens a transaction on the first statement; commit/rollback end it."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def begin(self) -> None:
        pass

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(sql, params)

    def commit(self) -> None:
        self._conn.commit()

    def rollback(self) -> None:
        self._conn.rollback()

    def close(self) -> None:
        self._conn.close()


def _postgres(dsn: str) -> tuple[_Connection, str, str]:
    try:
        import psycopg  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise ConfigError(
            "audit_store.dsn needs psycopg: pip install 'ensync-kafka[postgres]'"
        ) from exc
    try:
        conn = psycopg.connect(dsn)
    except psycopg.Error as exc:
        raise ConfigError(f"audit_store.dsn: cannot connect: {exc}") from exc
    info = conn.info
    return _Postgres(conn), "%s", f"postgresql://{info.host}:{info.port}/{info.dbname}"
