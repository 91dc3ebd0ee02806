"""Per-partition RocksDB state of a tier worker, kept as a projection of the changelog.

Nothing writes here except :meth:`PartitionStore.apply`, fed with changelog records after the
transaction that produced them committed (or while restoring). So the local database can lag the
changelog but never disagrees with it, and replaying a stretch twice is harmless.

Changelog keys (the wire contract, see ``schemas/README.md``)::

    b"T" + timer_key   value: Deferral bytes, or a tombstone once released/cancelled
    b"D" + defer_id    value: StateMarker bytes, or a tombstone once expired

``timer_key = due_ms (8 bytes big-endian) + (5 - priority) (1 byte) + defer_id``, so timers sort
by due time, then highest priority first, and a tombstone alone says what to delete.
"""

from __future__ import annotations

import shutil
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rocksdict import (
    BlockBasedOptions,
    Cache,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteBufferManager,
)

from .codec import MAGIC, MARKER
from .config import PRIORITY_MAX

TIMER = b"T"
MARKER_PREFIX = b"D"
_DUE = struct.Struct(">Q")
_MARKER_VALUE = struct.Struct(">BQ")  # status, at_ms
_OFFSET_KEY = b"changelog_offset"
_TOP = b"\xff" * 10
"""Sorts after every timer key (its first byte would be a due time past year 2^56 ms)."""

STATUS_DELIVERED = 1
STATUS_CANCELLED = 2
_STATUS_BY_NAME = {"DELIVERED": STATUS_DELIVERED, "CANCELLED": STATUS_CANCELLED}
STATUS_NAMES = {STATUS_DELIVERED: "delivered", STATUS_CANCELLED: "cancelled"}

_COLUMN_FAMILIES = ("timers", "by_priority", "ids", "marker_expiry", "meta")
"""``ids`` maps a defer_id to what is known of it: ``_HELD`` + its timer key's first 9 bytes
while held, its packed marker (status, at) once finished. One family, so the intake's duplicate
check is one lookup and a release one write."""
_POINT_LOOKUPS = frozenset({"timers", "ids"})
"""Families read by key, not only scanned: their tables get a Bloom filter."""
_HELD = b"H"
"""First byte of a held deferral's ``ids`` value; a marker's is its status (1 or 2)."""


def timer_key(due_ms: int, priority: int, defer_id: str) -> bytes:
    return _DUE.pack(due_ms) + bytes((PRIORITY_MAX - priority,)) + defer_id.encode()


def split_timer_key(key: bytes) -> tuple[int, int, str]:
    """(due_ms, priority, defer_id)."""
    return _DUE.unpack_from(key)[0], PRIORITY_MAX - key[8], key[9:].decode()


@dataclass(frozen=True, slots=True)
class Timer:
    key: bytes
    value: bytes

    @property
    def due_ms(self) -> int:
        return int(_DUE.unpack_from(self.key)[0])

    @property
    def priority(self) -> int:
        return PRIORITY_MAX - self.key[8]

    @property
    def defer_id(self) -> str:
        return self.key[9:].decode()


MEMTABLE_BYTES_PER_FAMILY = 8 * 1024 * 1024
"""RocksDB's default (64 MiB per column family, per store) would let 6 families x N partitions
reach gigabytes before the shared budget flushes them."""
BLOOM_BITS_PER_KEY = 10
"""~1 % false positives. Each intake looks its defer_id up (a duplicate?) and almost always
misses: without a filter a miss reads a block of every table file (measured with two lookups per
intake: 9.2 us against 1.8 with a filter, 300k held), for ~1.25 MB of filter per million keys."""
DEFAULT_CACHE_BYTES = 8 * 1024 * 1024
DEFAULT_MEMTABLE_BYTES = 32 * 1024 * 1024


class StateMemory:
    """One block cache and one memtable budget for every store of a worker process."""

    def __init__(
        self, cache_bytes: int = DEFAULT_CACHE_BYTES, memtable_bytes: int = DEFAULT_MEMTABLE_BYTES
    ) -> None:
        self.cache = Cache(cache_bytes)
        self.write_buffers = WriteBufferManager.new_write_buffer_manager_with_cache(
            memtable_bytes, False, self.cache
        )

    def options(self, *, point_lookups: bool = False) -> Options:
        opts = Options(raw_mode=True)
        table = BlockBasedOptions()
        table.set_block_cache(self.cache)
        if point_lookups:
            table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
        opts.set_block_based_table_factory(table)
        opts.set_write_buffer_manager(self.write_buffers)
        opts.set_write_buffer_size(MEMTABLE_BYTES_PER_FAMILY)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        return opts


class PartitionStore:
    """RocksDB for one (tier, partition): timers, a priority index, delivered markers."""

    def __init__(self, path: Path, memory: StateMemory | None = None) -> None:
        if (path / "CURRENT").exists() and set(Rdict.list_cf(str(path))) != {
            "default",
            *_COLUMN_FAMILIES,
        }:
            # Another version's layout: the state is a projection of the changelog, so it is
            # dropped and restored from there (changelog_offset() is None on the empty store).
            self.destroy(path)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        memory = memory or StateMemory()
        cfs = {
            name: memory.options(point_lookups=name in _POINT_LOOKUPS) for name in _COLUMN_FAMILIES
        }
        self._db = Rdict(str(path), options=memory.options(), column_families=cfs)
        self._cf = {name: self._db.get_column_family(name) for name in _COLUMN_FAMILIES}
        self._h = {name: self._db.get_column_family_handle(name) for name in _COLUMN_FAMILIES}
        # Released timers leave tombstones at the head of the key range until compaction, and
        # a scan from the start wades through all of them (milliseconds per seek after a few
        # thousand releases). A floor is a key below which no live entry exists: scans start
        # there, a scan raises it to the first live key it finds, a put below it lowers it.
        # Raising and lowering happen under one lock, so a reader's raise cannot hide a put.
        self._floor_lock = threading.Lock()
        self._timer_floor = b""
        self._prio_floor = {bytes((b,)): bytes((b,)) for b in range(PRIORITY_MAX)}

    # -- reads ------------------------------------------------------------------------------

    def changelog_offset(self) -> int | None:
        """The next changelog offset to read; None on an empty state directory."""
        raw = self._cf["meta"].get(_OFFSET_KEY)
        return None if raw is None else int(_DUE.unpack(raw)[0])

    def knows(self, defer_id: str) -> bool:
        """Held, or finished within the retention window: a new deferral with this id is a
        duplicate."""
        return self._cf["ids"].get(defer_id.encode()) is not None

    def held_key(self, defer_id: str) -> bytes | None:
        """The timer key of a held deferral."""
        id_bytes = defer_id.encode()
        raw = self._cf["ids"].get(id_bytes)
        return raw[1:] + id_bytes if raw is not None and raw[:1] == _HELD else None

    def marker(self, defer_id: str) -> tuple[int, int] | None:
        """(status, at_ms) of a finished deferral within the retention window."""
        raw = self._cf["ids"].get(defer_id.encode())
        return _MARKER_VALUE.unpack(raw) if raw is not None and raw[:1] != _HELD else None

    def timer(self, key: bytes) -> bytes | None:
        value: bytes | None = self._cf["timers"].get(key)
        return value

    def next_due_ms(self) -> int | None:
        with self._floor_lock:
            it = self._cf["timers"].iter()
            it.seek(self._timer_floor)
            if not it.valid():
                self._timer_floor = _TOP  # empty: the next put lowers it
                return None
            self._timer_floor = it.key()
            return int(_DUE.unpack_from(self._timer_floor)[0])

    def due(self, lower_ms: int, upper_ms: int, limit: int) -> list[Timer]:
        """Timers with ``lower_ms <= due < upper_ms`` in due order, at most ``limit``."""
        lower, upper = _DUE.pack(lower_ms), _DUE.pack(upper_ms)
        with self._floor_lock:
            floor = self._timer_floor
            found = list(self._scan("timers", max(lower, floor), upper, limit))
            if floor >= lower:  # the scan started at the floor: raise it
                self._timer_floor = found[0].key if found else max(floor, upper)
        return found

    def overdue(self, priority: int, upper_ms: int, limit: int) -> list[Timer]:
        """Timers of one priority due before ``upper_ms``, oldest first, at most ``limit``."""
        prefix = bytes((PRIORITY_MAX - priority,))
        upper = prefix + _DUE.pack(upper_ms)
        with self._floor_lock:
            floor = self._prio_floor[prefix]
            entries = list(self._scan("by_priority", floor, upper, limit))
            self._prio_floor[prefix] = entries[0].key if entries else max(floor, upper)
        out = []
        for entry in entries:
            k = entry.key  # (5 - priority) + due + defer_id  ->  due + (5 - priority) + defer_id
            key = k[1:9] + k[0:1] + k[9:]
            value = self._cf["timers"].get(key)
            if value is not None:
                out.append(Timer(key, value))
        return out

    def expired_markers(self, before_ms: int, limit: int) -> list[str]:
        entries = self._scan("marker_expiry", b"", _DUE.pack(before_ms), limit)
        return [e.key[8:].decode() for e in entries]

    def held_count(self) -> int:
        """Estimated number of held deferrals (RocksDB's estimate: cheap, close enough)."""
        value = self._cf["timers"].property_int_value("rocksdb.estimate-num-keys")
        return int(value or 0)

    def iter_timers(self, after: bytes = b"") -> Iterator[Timer]:
        """Every held timer in due order, starting after the key ``after``."""
        it = self._cf["timers"].iter()
        it.seek(after or self._timer_floor)
        while it.valid():
            if it.key() != after:
                yield Timer(it.key(), it.value())
            it.next()

    def _scan(self, cf: str, lower: bytes, upper: bytes, limit: int) -> Iterator[Timer]:
        opts = ReadOptions()
        opts.set_iterate_upper_bound(upper)
        it = self._cf[cf].iter(opts)
        it.seek(lower)
        count = 0
        while it.valid() and count < limit:
            yield Timer(it.key(), it.value())
            count += 1
            it.next()

    # -- the one write path -----------------------------------------------------------------

    def apply(self, records: Iterable[tuple[bytes, bytes | None]], next_offset: int | None) -> None:
        """Project changelog records into the database atomically, with the offset reached."""
        batch = WriteBatch(raw_mode=True)
        h = self._h
        lowest: bytes | None = None
        lowest_by_prio: dict[bytes, bytes] = {}
        markers: dict[bytes, tuple[bytes, bytes]] = {}
        # The last write to each defer_id wins, as in the batch: a release's timer tombstone
        # and marker become one write.
        ids: dict[bytes, bytes | None] = {}
        for key, value in records:
            kind, rest = key[:1], key[1:]
            if kind == TIMER:
                by_prio = rest[8:9] + rest[:8] + rest[9:]
                defer_id = rest[9:]
                if value is None:
                    batch.delete(rest, h["timers"])
                    batch.delete(by_prio, h["by_priority"])
                    ids[defer_id] = None
                else:
                    batch.put(rest, value, h["timers"])
                    batch.put(by_prio, b"", h["by_priority"])
                    if lowest is None or rest < lowest:
                        lowest = rest
                    prio = by_prio[:1]
                    if by_prio < lowest_by_prio.get(prio, _TOP):
                        lowest_by_prio[prio] = by_prio
                    ids[defer_id] = _HELD + rest[:9]
            elif kind == MARKER_PREFIX:
                if value is None:  # expired; the marker may be from this very batch (a restore)
                    old = ids[rest] if rest in ids else self._cf["ids"].get(rest)
                    if old is not None and old[:1] != _HELD:
                        ids[rest] = None
                        at = _MARKER_VALUE.unpack(old)[1]
                        batch.delete(_DUE.pack(at) + rest, h["marker_expiry"])
                else:
                    packed, at = self._marker(rest, value, markers)
                    ids[rest] = packed
                    batch.put(at + rest, b"", h["marker_expiry"])
        ids_cf = h["ids"]
        for defer_id, known in ids.items():
            if known is None:
                batch.delete(defer_id, ids_cf)
            else:
                batch.put(defer_id, known, ids_cf)
        if next_offset is not None:
            batch.put(_OFFSET_KEY, _DUE.pack(next_offset), h["meta"])
        with self._floor_lock:
            self._db.write(batch)
            if lowest is not None and lowest < self._timer_floor:
                self._timer_floor = lowest
            for prefix, key in lowest_by_prio.items():
                if key < self._prio_floor[prefix]:
                    self._prio_floor[prefix] = key

    @staticmethod
    def _marker(
        defer_id: bytes, value: bytes, seen: dict[bytes, tuple[bytes, bytes]]
    ) -> tuple[bytes, bytes]:
        """A StateMarker's (stored value, packed time). A worker's markers of one transaction
        differ only in their defer_id (``codec.marker_value``): their shared tail (status, time)
        is decoded once per batch instead of once per marker."""
        n = len(defer_id)
        head = len(MAGIC) + 1 + n  # a defer_id under 64 bytes: its length is one zigzag byte
        tail = value[head:]
        shared = n < 64 and value[:2] == MAGIC and value[2:head] == bytes((2 * n,)) + defer_id
        if shared and tail in seen:
            return seen[tail]
        marker = MARKER.decode(value)
        status = _STATUS_BY_NAME.get(marker["status"], STATUS_DELIVERED)
        result = _MARKER_VALUE.pack(status, marker["at"]), _DUE.pack(marker["at"])
        if shared:
            seen[tail] = result
        return result

    def close(self) -> None:
        # rocksdict releases the lock only when every handle is gone.
        self._cf.clear()
        self._h.clear()
        self._db.close()

    @staticmethod
    def destroy(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
