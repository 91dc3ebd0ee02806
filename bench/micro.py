"""Micro-benchmarks of the worker's per-deferral hot path, no broker needed.

    .venv/bin/python -m bench.micro [--n 50000]

Prints microseconds per operation for what the tier worker does to every deferral (Avro encode
and decode of each record it writes, the audit records, the RocksDB state operations), plus two
candidate shortcuts measured side by side with what the library does now:

* a DeliveredEvent built by appending ``delivered_at`` and ``tier`` to the Deferral bytes
  (DeliveredEvent's fields are Deferral's fields plus those two, in order, so schemaless Avro
  bytes concatenate), checked byte-for-byte against ``DELIVERED.encode``;
* finding the next due timer with ``seek(floor)`` instead of ``seek_to_first()`` once many
  timers were released (their tombstones sit before the first live key).

``--rss`` adds the resident memory of 6 ``PartitionStore`` s holding 1,000,000 timers between
them (what a 1h tier worker with 6 partitions holds in section (d) of ``bench.run``), each
variant in a fresh process: the library's options as they are, and smaller RocksDB memtables.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro

from ensync_kafka import audit
from ensync_kafka.codec import DEFERRAL, DELIVERED, MAGIC, MARKER
from ensync_kafka.state import _DUE, MARKER_PREFIX, TIMER, PartitionStore, timer_key


def _per_op_us(fn: Callable[[], Any], n: int) -> float:
    fn()  # warm
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def _deferral(i: int, now: int) -> dict[str, Any]:
    return {
        "defer_id": uuid.uuid4().hex,
        "name": "bench.event",
        "payload": json.dumps({"seq": i, "tag": "ensync-kafka-bench"}).encode(),
        "content_type": "application/json",
        "key": None,
        "headers": [],
        "priority": 1 + i % 5,
        "queue": "default",
        "deferred_at": now,
        "due_at": now + 1000 + i,
        "reason": "bench",
        "attempt": 1,
        "history": [],
    }


def _zigzag_long(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def delivered_by_append(deferral_value: bytes, delivered_at: int, tier: str) -> bytes:
    """DeliveredEvent bytes from Deferral bytes: the two extra fields appended."""
    t = tier.encode()
    return deferral_value + _zigzag_long(delivered_at) + _zigzag_long(len(t)) + t


def codec_costs(n: int) -> dict[str, float]:
    now = int(time.time() * 1000)
    rec = _deferral(7, now)
    value = DEFERRAL.encode(rec)
    delivered = {**rec, "delivered_at": now, "tier": "10s"}
    assert delivered_by_append(value, now, "10s") == DELIVERED.encode(delivered)
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
        "Deferral encode (client only)": _per_op_us(lambda: DEFERRAL.encode(rec), n),
        "Deferral encode, reused BytesIO (alternative)": _per_op_us(reuse_buffer, n),
        "Deferral decode (worker: intake, fire)": _per_op_us(lambda: DEFERRAL.decode(value), n),
        "DeliveredEvent encode (worker: fire)": _per_op_us(lambda: DELIVERED.encode(delivered), n),
        "DeliveredEvent by appending to Deferral bytes (alternative)": _per_op_us(
            lambda: delivered_by_append(value, now, "10s"), n
        ),
        "AuditRecord audit_value (worker: intake and fire)": _per_op_us(audit_record, n),
        "StateMarker encode (worker: fire)": _per_op_us(lambda: MARKER.encode(marker), n),
        "StateMarker decode (PartitionStore.apply)": _per_op_us(
            lambda: MARKER.decode(marker_value), n
        ),
    }


def tombstone_costs(released: int) -> dict[str, float]:
    """Release ``released`` timers (tombstones), keep 1,000 live ones later, time the lookups."""
    tmp = Path(tempfile.mkdtemp(prefix="ensync-micro-"))
    try:
        store = PartitionStore(tmp / "p0")
        now = int(time.time() * 1000)
        value = DEFERRAL.encode(_deferral(1, now))
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
        floor = _DUE.pack(now + released)
        timers = store._cf["timers"]

        def seek_floor() -> int | None:
            it = timers.iter()
            it.seek(floor)
            return int(_DUE.unpack_from(it.key())[0]) if it.valid() else None

        assert seek_floor() == store.next_due_ms()
        reps = 50
        result = {
            "next_due_ms (seek_to_first)": _per_op_us(store.next_due_ms, reps),
            "next_due_ms via seek(floor) (alternative)": _per_op_us(seek_floor, reps),
            "due(now - 1 s, now) with nothing due": _per_op_us(
                lambda: store.due(now + released - 1000, now + released, 5000), reps
            ),
            "overdue(priority 1) with nothing overdue": _per_op_us(
                lambda: store.overdue(1, now + released, 5000), reps
            ),
        }
        store.close()
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


RSS_VARIANTS = {
    "library options as they are": None,
    "write_buffer_size 8 MB per column family": 8 << 20,
    "write_buffer_size 2 MB per column family": 2 << 20,
}


def held_rss(held: int, partitions: int, write_buffer_size: int | None) -> dict[str, float]:
    """Fill ``partitions`` stores with ``held`` timers in 5,000-record batches; RSS in MB."""
    import psutil
    from rocksdict import Options

    from ensync_kafka import state

    if write_buffer_size is not None:
        # The library builds every store's options with ``state.Options``: swap in a factory.
        def options(*args: Any, **kwargs: Any) -> Any:
            opts = Options(*args, **kwargs)
            opts.set_write_buffer_size(write_buffer_size)
            return opts

        setattr(state, "Options", options)  # noqa: B010
    proc = psutil.Process()
    tmp = Path(tempfile.mkdtemp(prefix="ensync-micro-rss-"))
    try:
        stores = [PartitionStore(tmp / str(p)) for p in range(partitions)]
        before = proc.memory_info().rss / 2**20
        now = int(time.time() * 1000)
        value = DEFERRAL.encode(_deferral(1, now))
        per = held // partitions
        started = time.perf_counter()
        for store in stores:
            for i in range(0, per, 5000):
                store.apply(
                    [
                        (TIMER + timer_key(now + 3_600_000 + j, 1 + j % 5, uuid.uuid4().hex), value)
                        for j in range(i, min(per, i + 5000))
                    ],
                    None,
                )
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
    args = parser.parse_args(argv)
    if args.rss:
        rss_table(args.held, 6)
        print()
    print("| codec operation | µs per op |\n|---|---|")
    for name, us in codec_costs(args.n).items():
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
