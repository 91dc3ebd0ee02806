"""Avro binary encoders generated from a schema, for the hot paths.

fastavro's ``schemaless_writer`` spends most of a small record's cost on its per-call dispatch;
a function generated once per schema, with each field's encoding written out inline, is several
times cheaper for the records the client and the workers write per deferral. Output is
byte-identical to fastavro's (tests/unit/test_codec.py checks every schema against it).

Supported: records of string, bytes, int, long, enum, boolean, ``["null", X]`` unions, arrays
of such records, and nested records. Anything else: :func:`compile_record` returns None and the
caller keeps fastavro.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._codegen import SourceGenerator

_TABLE_BITS = 14
_TABLE_SIZE = 1 << _TABLE_BITS
_TABLE_MASK = _TABLE_SIZE - 1


def _varint_slow(z: int) -> bytes:
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_V1 = tuple(_varint_slow(z) for z in range(_TABLE_SIZE))
"""The varint of every z below 2**14 (one or two bytes)."""
_V2 = tuple(bytes(((z & 0x7F) | 0x80, (z >> 7) | 0x80)) for z in range(_TABLE_SIZE))
"""14 low bits of a longer varint: two bytes, both with the continuation bit."""


def zigzag_long(n: int) -> bytes:
    """Avro's zigzag varint; table lookups instead of a byte loop up to 42 bits (timestamps in
    milliseconds are 41)."""
    z = (n << 1) ^ (n >> 63)
    if z < _TABLE_SIZE:
        return _V1[z]
    if z < 1 << 28:
        return _V2[z & _TABLE_MASK] + _V1[z >> 14]
    if z < 1 << 42:
        return _V2[z & _TABLE_MASK] + _V2[(z >> 14) & _TABLE_MASK] + _V1[z >> 28]
    return _varint_slow(z)


def avro_string(value: str) -> bytes:
    data = value.encode()
    return zigzag_long(len(data)) + data


def _bytes(value: bytes) -> bytes:
    return zigzag_long(len(value)) + value


def _boolean(value: bool) -> bytes:
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not a boolean")
    return b"\x01" if value else b"\x00"


def _bad_enum(name: str, value: object) -> bytes:
    raise ValueError(f"{value!r} is not a symbol of {name}")


_PRIMITIVE = {
    "string": "_string",
    "bytes": "_bytes",
    "int": "_zz",
    "long": "_zz",
    "boolean": "_boolean",
}


class _Generator(SourceGenerator):
    """Writes one Python function per record schema into a shared namespace."""

    def __init__(self) -> None:
        super().__init__(
            {
                "_string": avro_string,
                "_bytes": _bytes,
                "_zz": zigzag_long,
                "_boolean": _boolean,
                "_bad_enum": _bad_enum,
            }
        )

    def value(self, avro_type: Any, expr: str) -> str | None:
        """A Python expression encoding ``expr`` as ``avro_type``; None if unsupported."""
        if isinstance(avro_type, str):
            fn = _PRIMITIVE.get(avro_type)
            return None if fn is None else f"{fn}({expr})"
        if isinstance(avro_type, list):
            if len(avro_type) != 2 or avro_type[0] != "null":
                return None
            inner = self.value(avro_type[1], "_u")
            if inner is None:
                return None
            helper = self._name("union")
            self.sources.append(
                f"def {helper}(_u):\n    return b'\\x00' if _u is None else b'\\x02' + {inner}\n"
            )
            return f"{helper}({expr})"
        if not isinstance(avro_type, dict):
            return None
        kind = avro_type.get("type")
        if kind == "enum":
            table = self._name("symbols")
            self.namespace[table] = {s: zigzag_long(i) for i, s in enumerate(avro_type["symbols"])}
            enum_name = avro_type["name"]
            return f"({table}.get({expr}) or _bad_enum({enum_name!r}, {expr}))"
        if kind == "array":
            item = self.value(avro_type["items"], "_i")
            if item is None:
                return None
            helper = self._name("array")
            self.sources.append(
                f"def {helper}(_a):\n"
                f"    if not _a:\n"
                f"        return b'\\x00'\n"
                f"    return _zz(len(_a)) + b''.join([{item} for _i in _a]) + b'\\x00'\n"
            )
            return f"{helper}({expr})"
        if kind == "record":
            record = self.record(avro_type)
            return None if record is None else f"{record}({expr})"
        return self.value(kind, expr)  # a logical type over a primitive

    def record(self, schema: dict[str, Any], prefix: bytes = b"") -> str | None:
        parts = []
        for f in schema["fields"]:
            get = f"_r[{f['name']!r}]"
            if "default" in f:
                default = self._name("default")
                self.namespace[default] = f["default"]
                get = f"_r.get({f['name']!r}, {default})"
            expr = self.value(f["type"], get)
            if expr is None:
                return None
            parts.append(expr)
        fn = self._name("record")
        head = f"{prefix!r}, " if prefix else ""
        self.sources.append(f"def {fn}(_r):\n    return b''.join(({head}{', '.join(parts)},))\n")
        return fn


def compile_record(
    schema: dict[str, Any], prefix: bytes = b""
) -> Callable[[dict[str, Any]], bytes] | None:
    """An encoder for records of ``schema`` returning ``prefix`` + Avro binary, or None."""
    gen = _Generator()
    fn = gen.record(schema, prefix)
    if fn is None:
        return None
    encoder: Callable[[dict[str, Any]], bytes] = gen.build(fn, f"avro encoder {schema.get('name')}")
    return encoder
