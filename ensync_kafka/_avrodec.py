"""Avro binary decoders generated from a schema, for the hot paths.

The decoding twin of ``_avroenc``: fastavro's ``schemaless_reader`` spends most of a small
record's cost on per-call dispatch, and a tier worker decodes every Deferral twice (intake,
release). A function generated once per schema, reading each field inline with a one-byte fast
path for short lengths and small ints, returns the same dict: 3.3 instead of 4.3 us per Deferral
through ``Codec.decode`` (``bench.micro``), worker CPU per deferral 58-62 instead of 64-65 us in
``bench.run``'s (b). tests/unit/test_codec.py checks every schema against fastavro, and that a
corrupted record it accepts is one fastavro reads alike.

Supported: what ``_avroenc`` supports (records of string, bytes, int, long, enum, boolean,
``["null", X]`` unions, arrays, nested records). Anything else: :func:`compile_decoder` returns
None and the caller keeps fastavro.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._codegen import SourceGenerator


def _long(d: bytes, i: int) -> tuple[int, int]:
    """The zigzag varint at ``d[i]`` and the index after it (IndexError if ``d`` ends first).
    A varint of many 0x80 bytes would loop only as long as ``d`` lasts."""
    b = d[i]
    z = b & 0x7F
    shift = 7
    i += 1
    while b & 0x80:
        b = d[i]
        i += 1
        z |= (b & 0x7F) << shift
        shift += 7
    if z >> 64:  # Avro's long is 64 bits (fastavro wraps such a varint around; we refuse it)
        raise ValueError("a varint longer than 64 bits")
    return (z >> 1) ^ -(z & 1), i


def _invalid(what: str, value: object) -> Any:
    raise ValueError(f"invalid {what}: {value!r}")


class _Generator(SourceGenerator):
    """Writes one ``(data, index) -> (record, index)`` function per record schema."""

    def __init__(self) -> None:
        super().__init__({"_long": _long, "_invalid": _invalid})

    def _read_long(self, target: str, indent: str) -> list[str]:
        return [
            f"{indent}b = d[i]",
            f"{indent}if b < 0x80:",
            f"{indent}    {target} = (b >> 1) ^ -(b & 1)",
            f"{indent}    i += 1",
            f"{indent}else:",
            f"{indent}    {target}, i = _long(d, i)",
        ]

    def value(self, avro_type: Any, target: str, indent: str) -> list[str] | None:
        """Statements that read one ``avro_type`` at ``d[i]`` into ``target``; None if
        unsupported."""
        if isinstance(avro_type, str):
            if avro_type in ("int", "long"):
                return self._read_long(target, indent)
            if avro_type in ("string", "bytes"):
                n = self._name("n")
                decode = ".decode()" if avro_type == "string" else ""
                return [
                    *self._read_long(n, indent),
                    f"{indent}if {n} < 0:",
                    f"{indent}    _invalid('length', {n})",
                    f"{indent}{target} = d[i : i + {n}]{decode}",
                    f"{indent}i += {n}",
                ]
            if avro_type == "boolean":
                return [
                    f"{indent}b = d[i]",
                    f"{indent}i += 1",
                    f"{indent}if b > 1:",
                    f"{indent}    _invalid('boolean', b)",
                    f"{indent}{target} = b == 1",
                ]
            return None
        if isinstance(avro_type, list):
            if len(avro_type) != 2 or avro_type[0] != "null":
                return None
            inner = self.value(avro_type[1], target, indent + "    ")
            if inner is None:
                return None
            return [
                f"{indent}b = d[i]",
                f"{indent}i += 1",
                f"{indent}if b == 0:",
                f"{indent}    {target} = None",
                f"{indent}elif b == 2:",
                *inner,
                f"{indent}else:",
                f"{indent}    _invalid('union branch', b)",
            ]
        if not isinstance(avro_type, dict):
            return None
        kind = avro_type.get("type")
        if kind == "enum":
            symbols = self._name("symbols")
            self.namespace[symbols] = tuple(avro_type["symbols"])
            n = self._name("n")
            return [
                *self._read_long(n, indent),
                f"{indent}{target} = {symbols}[{n}] if 0 <= {n} < len({symbols}) "
                f"else _invalid('enum index', {n})",
            ]
        if kind == "array":
            item, n = self._name("item"), self._name("n")
            read_item = self.value(avro_type["items"], item, indent + "        ")
            if read_item is None:
                return None
            return [
                f"{indent}{target} = []",
                f"{indent}if d[i] == 0:",  # the usual empty array: one zero byte
                f"{indent}    i += 1",
                f"{indent}else:",
                f"{indent}    {n}, i = _long(d, i)",
                f"{indent}    while {n}:",
                f"{indent}        if {n} < 0:",  # a block with its size in bytes: skip the size
                f"{indent}            {n} = -{n}",
                f"{indent}            _, i = _long(d, i)",
                f"{indent}        for _ in range({n}):",
                *[f"    {line}" for line in read_item],
                f"{indent}            {target}.append({item})",
                f"{indent}        {n}, i = _long(d, i)",
            ]
        if kind == "record":
            record = self.record(avro_type)
            return None if record is None else [f"{indent}{target}, i = {record}(d, i)"]
        return self.value(kind, target, indent)  # a logical type over a primitive

    def record(self, schema: dict[str, Any]) -> str | None:
        body: list[str] = []
        fields = []
        for f in schema["fields"]:
            var = self._name("f")
            lines = self.value(f["type"], var, "    ")
            if lines is None:
                return None
            body.extend(lines)
            fields.append(f"{f['name']!r}: {var}")
        fn = self._name("record")
        self.sources.append(
            "\n".join([f"def {fn}(d, i):", *body, f"    return {{{', '.join(fields)}}}, i", ""])
        )
        return fn


def compile_decoder(
    schema: dict[str, Any],
) -> Callable[[bytes, int], tuple[dict[str, Any], int]] | None:
    """A reader of ``schema``'s records: ``(data, index) -> (record, index after it)``, raising
    IndexError or ValueError on malformed data; None if the schema is unsupported. Checking that
    the record ends where the data does is the caller's."""
    gen = _Generator()
    fn = gen.record(schema)
    if fn is None:
        return None
    reader: Callable[[bytes, int], tuple[dict[str, Any], int]] = gen.build(
        fn, f"avro decoder {schema.get('name')}"
    )
    return reader
