"""Micro-benchmarks of the worker's per-deferral hot path, no broker needed.

    .venv/bin/python -m bench.micro [--n 50000]

Prints microseconds per operation for what the tier worker does to every deferral (Avro encode
and decode of each record it writes, the audit records, the RocksDB state operations), each
beside what it replaced:

* the DeliveredEvent appended to the held Deferral bytes (``codec.delivered_from_deferral``)
  beside encoding it in full;
* the next due timer found from the store's scan floor beside a ``seek_to_first()`` that wades
  through the tombstones of released timers.

The state table times, with 300,000 timers held (``--state-held``), the intake's duplicate
check of a new id and ``PartitionStore.apply`` of the intake's and the release's changelog
records per deferral.

``--rss`` adds the resident memory of 6 ``PartitionStore`` s sharing one ``StateMemory``, as a
worker's do, holding 1,000,000 timers between them (what a 1h tier worker with 6 partitions holds
in section (d) of ``bench.run``), each variant in a fresh process: the worker's defaults, and a
smaller memtable budget.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import fastavro

from ensync_kafka import audit
from ensync_kafka.codec import (
    DEFERRAL,
    DELIVERED,
    MAGIC,
    MARKER,
    delivered_from_deferral,
    marker_tail,
    marker_value,
)
from ensync_kafka.config import DEFAULT_STATE_CACHE_BYTES, DEFAULT_STATE_MEMTABLE_BYTES
from ensync_kafka.state import _DUE, MARKER_PREFIX, TIMER, PartitionStore, StateMemory, timer_key

from .common import per_op_us
from .samples import sample_deferral


def codec_costs(n: int) -> dict[str, float]:
    now = int(time.time() * 1000)
    rec = sample_deferral(7, now)
    value = DEFERRAL.encode(rec)
    delivered = {**rec, "delivered_at": now, "tier": "10s"}
    assert delivered_from_deferral(value, now, "10s") == DELIVERED.encode(delivered)
    marker = {"defer_id": rec["defer_id"], "status": "DELIVERED", "at": now}
    marker_value = MARKER.encode(marker)
    parsed = DEFERRAL._parsed
    buf = io.BytesIO()

    def reuse_buffer() -> bytes:
        buf.seek(0)
        buf.truncate()
        buf.write(MAGIC)
        fastavro.schemaless_writer(buf, parsed, rec)
        return buf.getvalue()

    deferral_audit = audit.DeferralAudit(tier="10s", actor="worker:bench")

    def audit_record() -> bytes:
        return audit.audit_value(
            audit.DELIVERED,
            defer_id=rec["defer_id"],
            at_ms=now,
            reason="bench",
            deferral=rec,
            tier="10s",
            actor="worker:bench",
        )

    return {
        "Deferral encode (client only)": per_op_us(lambda: DEFERRAL.encode(rec), n),
        "Deferral encode, reused BytesIO (alternative)": per_op_us(reuse_buffer, n),
        "Deferral decode (worker: intake, fire)": per_op_us(lambda: DEFERRAL.decode(value), n),
        "Deferral decode, fastavro schemaless_reader (replaced)": per_op_us(
            lambda: fastavro.schemaless_reader(io.BytesIO(value[len(MAGIC) :]), parsed, None), n
        ),
        "DeliveredEvent encode in full (replaced)": per_op_us(
            lambda: DELIVERED.encode(delivered), n
        ),
        "DeliveredEvent appended to Deferral bytes (worker: fire)": per_op_us(
            lambda: delivered_from_deferral(value, now, "10s"), n
        ),
        "AuditRecord audit_value (general; replaced in the worker)": per_op_us(audit_record, n),
        "AuditRecord DeferralAudit (worker: intake and fire)": per_op_us(
            lambda: deferral_audit(audit.DELIVERED, rec, now, "bench"), n
        ),
        "StateMarker encode (worker: fire)": per_op_us(lambda: MARKER.encode(marker), n),
        "StateMarker decode (PartitionStore.apply, once per transaction)": per_op_us(
            lambda: MARKER.decode(marker_value), n
        ),
    }


def tombstone_costs(released: int) -> dict[str, float]:
    """Release ``released`` timers (tombstones), keep 1,000 live ones later, time the lookups."""
    tmp = Path(tempfile.mkdtemp(prefix="ensync-micro-"))
    try:
        store = PartitionStore(tmp / "p0")
        now = int(time.time() * 1000)
        value = DEFERRAL.encode(sample_deferral(1, now))
        done, live = [], []
        for i in range(released):
            done.append(timer_key(now + i, 1 + i % 5, uuid.uuid4().hex))
        for i in range(1000):
            live.append(timer_key(now + released + 10_000 + i, 1 + i % 5, uuid.uuid4().hex))
        chunk = 5000
        for i in range(0, len(done), chunk):
            store.apply([(TIMER + k, value) for k in done[i : i + chunk]], None)
        store.apply([(TIMER + k, value) for k in live], None)
        marker = MARKER.encode({"defer_id": "x", "status": "DELIVERED", "at": now})
        for i in range(0, len(done), chunk):
            changes: list[tuple[bytes, bytes | None]] = []
            for k in done[i : i + chunk]:
                changes.append((TIMER + k, None))
                changes.append((MARKER_PREFIX + k[9:], marker))
            store.apply(changes, None)
        timers = store._cf["timers"]

        def seek_to_first() -> int | None:
            it = timers.iter()
            it.seek_to_first()
            return int(_DUE.unpack_from(it.key())[0]) if it.valid() else None

        assert seek_to_first() == store.next_due_ms()
        reps = 50
        result = {
            "next_due_ms (the store's scan floor)": per_op_us(store.next_due_ms, reps),
            "seek_to_first over the tombstones (no floor)": per_op_us(seek_to_first, reps),
            "due(now - 1 s, now) with nothing due": per_op_us(
                lambda: store.due(now + released - 1000, now + released, 5000), reps
            ),
            "overdue(priority 1) with nothing overdue": per_op_us(
                lambda: store.overdue(1, now + released, 5000), reps
            ),
        }
        store.close()
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


HOLD_BATCH = 5000
"""Timers per ``apply`` when filling a store: the worker's default intake batch."""


def hold(store: PartitionStore, count: int, now: int, value: bytes) -> None:
    """Put ``count`` timers, due an hour from ``now``, into ``store`` as intake would."""
    for i in range(0, count, HOLD_BATCH):
        store.apply(
            [
                (TIMER + timer_key(now + 3_600_000 + j, 1 + j % 5, uuid.uuid4().hex), value)
                for j in range(i, min(count, i + HOLD_BATCH))
            ],
            None,
        )


def state_costs(held: int, batch: int = 200, rounds: int = 100) -> dict[str, float]:
    """Per deferral, with ``held`` timers in the store: the intake's duplicate check of a new
    id, and ``apply`` of the intake's and the release's changelog records in worker-sized
    batches (a release's markers share their tail, as the worker writes them)."""
    tmp = Path(tempfile.mkdtemp(prefix="ensync-micro-state-"))
    try:
        store = PartitionStore(tmp / "p0")
        now = int(time.time() * 1000)
        value = DEFERRAL.encode(sample_deferral(1, now))
        hold(store, held, now, value)
        fresh = iter([uuid.uuid4().hex for _ in range(batch * rounds)])
        knows = per_op_us(lambda: store.knows(next(fresh)), batch * rounds - 1)
        tail = marker_tail("DELIVERED", now)
        intake = release = 0.0
        for _ in range(rounds):
            keys = [timer_key(now + j, 1 + j % 5, uuid.uuid4().hex) for j in range(batch)]
            puts: list[tuple[bytes, bytes | None]] = [(TIMER + k, value) for k in keys]
            done: list[tuple[bytes, bytes | None]] = []
            for k in keys:
                done.append((TIMER + k, None))
                done.append((MARKER_PREFIX + k[9:], marker_value(k[9:], tail)))
            started = time.perf_counter()
            store.apply(puts, None)
            intake += time.perf_counter() - started
            started = time.perf_counter()
            store.apply(done, None)
            release += time.perf_counter() - started
        store.close()
        per = 1e6 / (batch * rounds)
        return {
            "duplicate check of a new id (PartitionStore.knows)": knows,
            "apply: an intake's changelog record (3 entries)": intake * per,
            "apply: a release's tombstone and marker (4 entries)": release * per,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


RSS_VARIANTS = {
    "worker defaults (worker.state_memtable_bytes 64 MiB)": DEFAULT_STATE_MEMTABLE_BYTES,
    "worker.state_memtable_bytes 16 MiB": 16 << 20,
}


def held_rss(held: int, partitions: int, memtable_bytes: int) -> dict[str, float]:
    """Fill ``partitions`` stores sharing one StateMemory, as a worker's do, with ``held``
    timers (:func:`hold`); RSS in MB."""
    import psutil

    proc = psutil.Process()
    tmp = Path(tempfile.mkdtemp(prefix="ensync-micro-rss-"))
    memory = StateMemory(DEFAULT_STATE_CACHE_BYTES, memtable_bytes)
    try:
        stores = [PartitionStore(tmp / str(p), memory) for p in range(partitions)]
        before = proc.memory_info().rss / 2**20
        now = int(time.time() * 1000)
        value = DEFERRAL.encode(sample_deferral(1, now))
        per = held // partitions
        started = time.perf_counter()
        for store in stores:
            hold(store, per, now, value)
        elapsed = time.perf_counter() - started
        after = proc.memory_info().rss / 2**20
        time.sleep(3.0)
        settled = proc.memory_info().rss / 2**20
        for store in stores:
            store.close()
        return {
            "rss_mb_empty_stores": round(before, 1),
            "rss_mb_filled": round(after, 1),
            "rss_mb_settled": round(settled, 1),
            "apply_us_per_timer": round(elapsed / (per * partitions) * 1e6, 2),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rss_table(held: int, partitions: int) -> None:
    print(f"| {held:,} timers in {partitions} stores | RSS empty | filled | settled 3 s "
          "| apply µs/timer |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, size in RSS_VARIANTS.items():
        code = (
            "import json, sys; from bench.micro import held_rss; "
            f"print(json.dumps(held_rss({held}, {partitions}, {size!r})))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ},
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {name} | {r['rss_mb_empty_stores']} MB | {r['rss_mb_filled']} MB "
            f"| {r['rss_mb_settled']} MB | {r['apply_us_per_timer']} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro")
    parser.add_argument("--n", type=int, default=50_000, help="repetitions per codec op")
    parser.add_argument(
        "--released",
        default="0,10000,50000,100000",
        help="released timers (tombstones) per partition store to test",
    )
    parser.add_argument("--rss", action="store_true", help="also the held-timers RSS table")
    parser.add_argument("--held", type=int, default=1_000_000)
    parser.add_argument(
        "--state-held", type=int, default=300_000, help="held timers for the state write table"
    )
    args = parser.parse_args(argv)
    if args.rss:
        rss_table(args.held, 6)
        print()
    print("| codec operation | µs per op |\n|---|---|")
    for name, us in codec_costs(args.n).items():
        print(f"| {name} | {us:.2f} |")
    print()
    print(f"| state, {args.state_held:,} held: µs per deferral | |\n|---|---|")
    for name, us in state_costs(args.state_held).items():
        print(f"| {name} | {us:.2f} |")
    print()
    counts = [int(x) for x in args.released.split(",")]
    table = {c: tombstone_costs(c) for c in counts}
    ops = list(next(iter(table.values())))
    print("| state lookup, µs per call | " + " | ".join(f"{c:,} released" for c in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{table[c][op]:,.1f}" for c in counts) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
