"""Codec: round trips of every schema, malformed input, and interop with the Apache avro package.

The Apache ``avro`` package (the reference implementation other languages follow) must decode
what fastavro writes, given nothing but the .avsc file and "strip the two-byte marker".
"""

from __future__ import annotations

import io
import json
import random
from datetime import UTC, datetime
from typing import Any

import avro.io
import avro.schema
import pytest

from ensync_kafka import SerializationError
from ensync_kafka.audit import EVENTS, DeferralAudit
from ensync_kafka.codec import (
    AUDIT,
    DEAD,
    DEFERRAL,
    DELIVERED,
    INVALID,
    MAGIC,
    MARKER,
    SCHEMA_NAMES,
    Codec,
    schema_dir,
    schema_json,
)

T0 = 1_700_000_000_123  # ms
HEADERS = [{"key": "trace-id", "value": b"abc"}, {"key": "empty", "value": None}]
HISTORY = [{"attempt": 1, "at": T0 - 5000, "reason": "timeout"}]

DEFERRAL_RECORD: dict[str, Any] = {
    "defer_id": "d-1",
    "name": "order.retry",
    "payload": b'{"order":42}',
    "content_type": "application/json",
    "key": b"order-42",
    "headers": HEADERS,
    "priority": 4,
    "queue": "default",
    "deferred_at": T0,
    "due_at": T0 + 1500,
    "reason": "payment gateway down",
    "attempt": 2,
    "history": HISTORY,
}

RECORDS: dict[str, dict[str, Any]] = {
    "Deferral": DEFERRAL_RECORD,
    "DeliveredEvent": {**DEFERRAL_RECORD, "delivered_at": T0 + 1503, "tier": "10s"},
    "AuditRecord": {
        "defer_id": "d-1",
        "event": "DELIVERED",
        "at": T0 + 1503,
        "reason": "payment gateway down",
        "name": "order.retry",
        "queue": "default",
        "priority": 4,
        "tier": "10s",
        "due_at": T0 + 1500,
        "attempt": 2,
        "actor": "worker:w1",
    },
    "DeadLetter": {
        **DEFERRAL_RECORD,
        "error": "ValueError: bad order",
        "traceback": "Traceback (most recent call last): ...",
        "dead_at": T0 + 9000,
        "group": "billing-consumers",
    },
    "StateMarker": {"defer_id": "d-1", "status": "DELIVERED", "at": T0 + 1503},
    "InvalidRecord": {
        "source_topic": "ensync.defer.1s",
        "source_partition": 2,
        "source_offset": 12345678901,
        "key": b"k",
        "value": b"\x00garbage",
        "reason": "not an ensync Deferral record",
        "rejected_at": T0,
    },
}
CODECS = {
    "Deferral": DEFERRAL,
    "DeliveredEvent": DELIVERED,
    "AuditRecord": AUDIT,
    "DeadLetter": DEAD,
    "StateMarker": MARKER,
    "InvalidRecord": INVALID,
}


def sample(schema: Any, field: str = "x") -> Any:
    """A value for any schema, non-null and non-default wherever possible, so a round trip
    exercises every field (schemas added later are covered too)."""
    if isinstance(schema, list):  # a union: the first non-null branch
        return sample(next(s for s in schema if s != "null"), field)
    if isinstance(schema, dict):
        kind = schema["type"]
        if isinstance(kind, dict | list):
            return sample(kind, field)
        if schema.get("logicalType") == "timestamp-millis":
            return T0
        if kind == "record":
            return {f["name"]: sample(f["type"], f["name"]) for f in schema["fields"]}
        if kind == "enum":
            return schema["symbols"][0]
        if kind == "array":
            return [sample(schema["items"], field)]
        if kind == "map":
            return {"k": sample(schema["values"], field)}
        if kind == "fixed":
            return b"\x01" * schema["size"]
        return sample(kind, field)
    primitives: dict[str, Any] = {
        "string": f"{field}-value",
        "bytes": f"{field}-bytes".encode(),
        "int": 3,
        "long": 12_345_678_901,
        "float": 1.5,
        "double": 2.25,
        "boolean": True,
    }
    return primitives[schema]


def record_for(name: str) -> dict[str, Any]:
    return {**sample(schema_json(name)), **RECORDS.get(name, {})}


def timestamp_fields(node: Any, out: set[str] | None = None) -> set[str]:
    out = set() if out is None else out
    if isinstance(node, dict):
        for f in node.get("fields", ()):
            t = f["type"]
            branches = t if isinstance(t, list) else [t]
            if any(
                isinstance(b, dict) and b.get("logicalType") == "timestamp-millis" for b in branches
            ):
                out.add(f["name"])
            timestamp_fields(t, out)
        for value in node.values():
            if isinstance(value, dict | list):
                timestamp_fields(value, out)
    elif isinstance(node, list):
        for value in node:
            timestamp_fields(value, out)
    return out


TIMESTAMP_FIELDS = set().union(*(timestamp_fields(schema_json(n)) for n in SCHEMA_NAMES))


def test_every_schema_file_has_a_codec() -> None:
    files = {p.stem for p in schema_dir().glob("*.avsc")}
    assert files == set(SCHEMA_NAMES)
    assert set(CODECS) <= files
    for name, codec in CODECS.items():
        assert codec.name == name


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_round_trip(name: str) -> None:
    codec = Codec(name)
    record = record_for(name)
    data = codec.encode(record)
    assert data[:2] == MAGIC == b"E\x01"
    assert codec.decode(data) == record


@pytest.mark.parametrize("name", sorted(CODECS))
def test_module_codecs_round_trip(name: str) -> None:
    record = record_for(name)
    assert CODECS[name].decode(CODECS[name].encode(record)) == record


def test_defaults_are_filled_on_encode() -> None:
    minimal = {k: v for k, v in DEFERRAL_RECORD.items() if k not in ("reason", "history")}
    minimal.update(key=None, headers=[])
    decoded = DEFERRAL.decode(DEFERRAL.encode(minimal))
    assert decoded["reason"] == ""
    assert decoded["history"] == []
    assert decoded["key"] is None


def test_audit_optional_fields_may_be_null() -> None:
    record = {"defer_id": "", "event": "REJECTED", "at": T0, "reason": "garbage"}
    decoded = AUDIT.decode(AUDIT.encode(record))
    assert decoded["name"] is None
    assert decoded["priority"] is None
    assert decoded["event"] == "REJECTED"


@pytest.mark.parametrize("event", EVENTS)
def test_deferral_audit_matches_the_general_encoder(event: str) -> None:
    encode = DeferralAudit(tier="10s", actor="worker:w-é")
    rec = {**DEFERRAL_RECORD, "due_at": T0 + 10**9, "attempt": 300, "defer_id": "d-" + "x" * 200}
    general = AUDIT.encode(
        {
            "defer_id": rec["defer_id"],
            "event": event,
            "at": T0,
            "reason": "why ünïcode",
            "name": rec["name"],
            "queue": rec["queue"],
            "priority": rec["priority"],
            "tier": "10s",
            "due_at": rec["due_at"],
            "attempt": rec["attempt"],
            "actor": "worker:w-é",
        }
    )
    assert encode(event, rec, T0, "why ünïcode") == general


def test_deferral_audit_caches_stay_byte_identical() -> None:
    from ensync_kafka.audit import MAX_CACHED_MIDDLE_BYTES, MAX_CACHED_MIDDLES

    encode = DeferralAudit(tier="1m", actor="worker:w")
    for i in range(MAX_CACHED_MIDDLES + 50):  # past the cache's limit, so it starts over once
        rec = {
            **DEFERRAL_RECORD,
            "defer_id": f"d-{i}",
            "priority": 1 + i % 5,
            "attempt": i % 70,  # above and below the precomputed attempts
            "due_at": T0 + i,
        }
        reason = f"retry {i % 3}" if i % 2 else f"unique {i}" + "." * (i % 7 * 100)
        general = AUDIT.encode(
            {
                "defer_id": rec["defer_id"], "event": "DEFERRED", "at": T0, "reason": reason,
                "name": rec["name"], "queue": rec["queue"], "priority": rec["priority"],
                "tier": "1m", "due_at": rec["due_at"], "attempt": rec["attempt"],
                "actor": "worker:w",
            }
        )  # fmt: skip
        assert encode("DEFERRED", rec, T0, reason) == general, i
    cached = encode._middle
    assert 0 < len(cached) <= MAX_CACHED_MIDDLES
    assert max(map(len, cached.values())) <= MAX_CACHED_MIDDLE_BYTES  # long reasons: not kept


def test_timestamps_stay_int_milliseconds_in_python() -> None:
    decoded = DELIVERED.decode(DELIVERED.encode(RECORDS["DeliveredEvent"]))
    assert decoded["due_at"] == T0 + 1500
    assert isinstance(decoded["delivered_at"], int)


# -- malformed input ------------------------------------------------------------------------------

GOOD = DEFERRAL.encode(DEFERRAL_RECORD)


@pytest.mark.parametrize(
    "data",
    [
        None,
        b"",
        b"E",
        b"xx" + GOOD[2:],  # wrong marker
        b"E\x02" + GOOD[2:],  # unknown wire version
        GOOD[2:],  # no marker at all
        MAGIC,  # marker, no value
        GOOD[:-3],  # truncated
        GOOD + b"\x00\x01",  # trailing bytes
        MAGIC + b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # varint overflow
        MAGIC + b"\xff" * 10 + b"\x7f",  # a varint past 64 bits that ends
        MAGIC + b"\x02\xff\xfe",  # a string that is not UTF-8
        MAGIC + b"\xff\x01" + b"x" * 10,  # a string longer than the value
    ],
)
def test_decode_malformed_raises_serialization_error(data: bytes | None) -> None:
    with pytest.raises(SerializationError, match="Deferral"):
        DEFERRAL.decode(data)


def test_decode_record_of_another_schema_is_an_error() -> None:
    marker = MARKER.encode(RECORDS["StateMarker"])
    with pytest.raises(SerializationError):
        DEFERRAL.decode(marker)


def test_bad_enum_index_is_an_error() -> None:
    data = bytearray(MARKER.encode(RECORDS["StateMarker"]))
    # defer_id "d-1" is 1 length byte + 3 bytes after the marker; then the enum index.
    data[2 + 4] = 0x7E  # zigzag 63: no such symbol
    with pytest.raises(SerializationError):
        MARKER.decode(bytes(data))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"priority": "high"}, "priority"),
        ({"payload": 5}, "payload"),
        ({"due_at": None}, "due_at"),
        ({"headers": [{"key": 1, "value": b"v"}]}, ""),
        ({"history": [{"attempt": 1}]}, ""),
        ({"name": None}, ""),
    ],
)
def test_encode_invalid_record_raises_serialization_error(
    change: dict[str, Any], field: str
) -> None:
    with pytest.raises(SerializationError, match=f"cannot encode Deferral.*{field}"):
        DEFERRAL.encode({**DEFERRAL_RECORD, **change})


def test_encode_missing_required_field() -> None:
    record = {k: v for k, v in DEFERRAL_RECORD.items() if k != "name"}
    with pytest.raises(SerializationError, match="name"):
        DEFERRAL.encode(record)


def test_encode_unknown_enum_symbol() -> None:
    with pytest.raises(SerializationError):
        MARKER.encode({**RECORDS["StateMarker"], "status": "EXPLODED"})


def test_unknown_schema_name() -> None:
    with pytest.raises(SerializationError, match="unknown schema"):
        Codec("NoSuchSchema")
    with pytest.raises(SerializationError):
        schema_json("../pyproject")


# -- interop with the Apache avro package ---------------------------------------------------------


def apache_schema(name: str) -> avro.schema.Schema:
    """Parsed by the reference implementation from the .avsc file alone, logical types kept."""
    return avro.schema.parse((schema_dir() / f"{name}.avsc").read_text())


def apache_decode(name: str, data: bytes) -> Any:
    assert data[:2] == MAGIC
    decoder = avro.io.BinaryDecoder(io.BytesIO(data[2:]))
    return avro.io.DatumReader(apache_schema(name)).read(decoder)


def as_apache(value: Any, key: str = "") -> Any:
    """What the reference implementation yields for a fastavro-side record: datetimes for
    timestamp-millis fields."""
    if isinstance(value, dict):
        return {k: as_apache(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [as_apache(v) for v in value]
    if key in TIMESTAMP_FIELDS and isinstance(value, int):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    return value


def normalise_tz(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: normalise_tz(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise_tz(v) for v in value]
    if isinstance(value, datetime):
        assert value.utcoffset() is not None and value.utcoffset().total_seconds() == 0
        return value.astimezone(UTC)
    return value


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_apache_avro_decodes_what_fastavro_wrote(name: str) -> None:
    record = record_for(name)
    data = Codec(name).encode(record)
    decoded = normalise_tz(apache_decode(name, data))
    assert decoded == as_apache(record)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_codec_decodes_what_apache_avro_wrote(name: str) -> None:
    buf = io.BytesIO()
    buf.write(MAGIC)
    record = record_for(name)
    avro.io.DatumWriter(apache_schema(name)).write(as_apache(record), avro.io.BinaryEncoder(buf))
    assert Codec(name).decode(buf.getvalue()) == record


def test_apache_avro_reads_the_schema_json_the_codec_uses() -> None:
    for name in SCHEMA_NAMES:
        parsed = avro.schema.parse(json.dumps(schema_json(name)))
        assert parsed.fullname == f"io.ensync.kafka.{name}"


def test_delivered_from_deferral_equals_encoding_the_delivered_event() -> None:
    from ensync_kafka.codec import DEFERRAL, DELIVERED, delivered_from_deferral

    for due, tier in ((0, "1s"), (1_795_000_000_123, "10m"), (2**40 + 7, "t" * 200)):
        rec = {
            "defer_id": "d-1",
            "name": "n",
            "payload": b"\x00\xffpayload",
            "content_type": "application/octet-stream",
            "key": b"k",
            "headers": [{"key": "h", "value": None}],
            "priority": 4,
            "queue": "default",
            "deferred_at": due - 5,
            "due_at": due,
            "reason": "r",
            "attempt": 3,
            "history": [{"attempt": 1, "at": 1, "reason": "x"}],
        }
        appended = delivered_from_deferral(DEFERRAL.encode(rec), due + 1, tier)
        assert appended == DELIVERED.encode({**rec, "delivered_at": due + 1, "tier": tier})
        assert DELIVERED.decode(appended)["tier"] == tier


def _random_value(avro_type: object, rng: random.Random) -> object:
    if isinstance(avro_type, list):  # ["null", X]
        return None if rng.random() < 0.3 else _random_value(avro_type[1], rng)
    if isinstance(avro_type, dict):
        kind = avro_type["type"]
        if kind == "enum":
            return rng.choice(avro_type["symbols"])
        if kind == "array":
            return [_random_value(avro_type["items"], rng) for _ in range(rng.choice((0, 1, 3)))]
        if kind == "record":
            return {f["name"]: _random_value(f["type"], rng) for f in avro_type["fields"]}
        return _random_value(kind, rng)
    if avro_type == "string":
        return "".join(rng.choice("aZ9 é€🙂-") for _ in range(rng.randrange(0, 40)))
    if avro_type == "bytes":
        return rng.randbytes(rng.randrange(0, 40))
    if avro_type == "int":
        return rng.randrange(-(2**31), 2**31)
    if avro_type == "long":
        return rng.choice(
            [0, -1, 1, 63, 64, -65, 8191, 8192, 2**27, 2**40, 1_795_000_000_123, -(2**63)]
        )
    if avro_type == "boolean":
        return rng.random() < 0.5
    raise AssertionError(f"unexpected type {avro_type!r}")


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_generated_encoders_match_fastavro_byte_for_byte(name: str) -> None:
    import io

    import fastavro

    from ensync_kafka._avroenc import compile_record
    from ensync_kafka.codec import MAGIC, _strip_logical, schema_json

    schema = schema_json(name)
    fast = compile_record(schema, MAGIC)
    assert fast is not None, f"{name} fell back to fastavro's writer"
    parsed = fastavro.parse_schema(_strip_logical(schema))
    rng = random.Random(name)
    for _ in range(300):
        record = _random_value(schema, rng)
        assert isinstance(record, dict)
        if rng.random() < 0.3:  # leave out a field that has a default
            defaults = [f["name"] for f in schema["fields"] if "default" in f]
            if defaults:
                del record[rng.choice(defaults)]
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, record)
        assert fast(record) == MAGIC + buf.getvalue(), record


def test_zigzag_long_matches_the_byte_loop_at_every_table_boundary() -> None:
    from ensync_kafka._avroenc import _varint_slow, zigzag_long

    edges = [0, 1, 2**13, 2**14, 2**27, 2**28, 2**41, 2**42, 2**62]
    values = {v + d for e in edges for v in (e, -e) for d in (-2, -1, 0, 1, 2)}
    for n in values:
        if -(2**63) <= n < 2**63:
            assert zigzag_long(n) == _varint_slow((n << 1) ^ (n >> 63)), n


def test_an_unknown_enum_symbol_is_a_serialization_error() -> None:
    from ensync_kafka.codec import AUDIT

    with pytest.raises(SerializationError, match="cannot encode AuditRecord"):
        AUDIT.encode({"defer_id": "d", "event": "NOPE", "at": 1, "actor": "a"})


def test_marker_value_equals_encoding_the_state_marker() -> None:
    from ensync_kafka.codec import MARKER, marker_tail, marker_value

    for defer_id, status, at in (("d", "DELIVERED", 0), ("é" * 80, "CANCELLED", 1_795_000_000_123)):
        expected = MARKER.encode({"defer_id": defer_id, "status": status, "at": at})
        assert marker_value(defer_id.encode(), marker_tail(status, at)) == expected


def _fastavro_read(name: str, data: bytes) -> object:
    import fastavro

    from ensync_kafka.codec import _strip_logical

    buf = io.BytesIO(data)
    parsed = fastavro.parse_schema(_strip_logical(schema_json(name)))
    record = fastavro.schemaless_reader(buf, parsed, None)
    if buf.tell() != len(data):
        raise ValueError(f"{len(data) - buf.tell()} bytes left over")
    return record


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_generated_decoders_match_fastavro(name: str) -> None:
    from ensync_kafka._avrodec import compile_decoder
    from ensync_kafka.codec import _strip_logical

    schema = schema_json(name)
    read = compile_decoder(_strip_logical(schema))
    assert read is not None, f"{name} fell back to fastavro's reader"
    codec = Codec(name)
    rng = random.Random(name)
    for _ in range(300):
        record = _random_value(schema, rng)
        assert isinstance(record, dict)
        data = codec.encode(record)
        assert read(data, len(MAGIC)) == (_fastavro_read(name, data[len(MAGIC) :]), len(data))


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_generated_decoders_accept_nothing_fastavro_rejects(name: str) -> None:
    """Corrupted records: where the codec returns a record, fastavro returns the same one;
    otherwise the codec raises SerializationError, never anything else."""
    codec = Codec(name)
    rng = random.Random(f"corrupt {name}")
    rejected = 0
    for _ in range(500):
        data = bytearray(codec.encode(_random_value(schema_json(name), rng)))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(MAGIC), len(data))] = rng.randrange(256)
        try:
            record = codec.decode(bytes(data))
        except SerializationError:
            rejected += 1
            continue
        assert record == _fastavro_read(name, bytes(data[len(MAGIC) :]))
    assert rejected > 0  # the corruption did corrupt
