"""schemas/*.avsc stay backward compatible with the released schemas/v1/*.avsc.

fastavro resolves schemas but does not judge compatibility, so a small checker lives here:
- a field added since v1 needs a default (a new reader meets old records without it);
- a field is removed only if it had a default;
- a field keeps its type (Avro's promotions int->long->float->double, string<->bytes allowed;
  a union may gain branches, never lose one);
- an enum only gains symbols, and one that gains symbols carries a default.
The checker is tested on deliberately broken schemas so it cannot pass vacuously.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest

from ensync_kafka.codec import MAGIC, SCHEMA_NAMES, schema_dir

SCHEMAS = schema_dir()
V1 = SCHEMAS / "v1"
PROMOTIONS = {
    ("int", "long"),
    ("int", "float"),
    ("int", "double"),
    ("long", "float"),
    ("long", "double"),
    ("float", "double"),
    ("string", "bytes"),
    ("bytes", "string"),
}


def load(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _type_name(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        kind = schema["type"]
        return _type_name(kind) if isinstance(kind, dict | list) else str(kind)
    return str(schema)


def _logical(schema: Any) -> str | None:
    return schema.get("logicalType") if isinstance(schema, dict) else None


def _named(schema: Any) -> str | None:
    return schema.get("name") if isinstance(schema, dict) else None


def _unwrap(schema: Any) -> Any:
    """``{"type": {...}}`` and ``{"type": "string"}`` wrappers, down to the real schema."""
    while isinstance(schema, dict) and isinstance(schema["type"], dict | list):
        schema = schema["type"]
    if (
        isinstance(schema, dict)
        and schema["type"] not in ("record", "enum", "array", "map", "fixed")
        and not schema.get("logicalType")
    ):
        return schema["type"]
    return schema


def compat_problems(old: Any, new: Any, path: str) -> list[str]:
    """Why a reader using ``new`` could not read data written with ``old`` (empty: it can)."""
    old, new = _unwrap(old), _unwrap(new)
    old_kind, new_kind = _type_name(old), _type_name(new)
    if old_kind == "union" or new_kind == "union":
        old_branches = old if isinstance(old, list) else [old]
        new_branches = new if isinstance(new, list) else [new]
        problems = []
        for i, branch in enumerate(old_branches):
            if not any(not compat_problems(branch, b, path) for b in new_branches):
                problems.append(f"{path}: union branch {i} ({_type_name(branch)}) was removed")
        return problems
    if old_kind != new_kind:
        if (old_kind, new_kind) in PROMOTIONS:
            return []
        return [f"{path}: type changed from {old_kind} to {new_kind}"]
    if _logical(old) != _logical(new):
        return [f"{path}: logical type changed from {_logical(old)} to {_logical(new)}"]
    if old_kind == "record":
        return _record_problems(old, new, path)
    if old_kind == "enum":
        problems = []
        removed = [s for s in old["symbols"] if s not in new["symbols"]]
        if removed:
            problems.append(f"{path}: enum symbols removed: {removed}")
        if set(new["symbols"]) - set(old["symbols"]) and "default" not in new:
            problems.append(f"{path}: enum gained symbols without a default")
        if _named(old) != _named(new):
            problems.append(f"{path}: enum renamed from {_named(old)} to {_named(new)}")
        return problems
    if old_kind == "array":
        return compat_problems(old["items"], new["items"], f"{path}[]")
    if old_kind == "map":
        return compat_problems(old["values"], new["values"], f"{path}{{}}")
    if old_kind == "fixed" and old["size"] != new["size"]:
        return [f"{path}: fixed size changed from {old['size']} to {new['size']}"]
    return []


def _record_problems(old: dict[str, Any], new: dict[str, Any], path: str) -> list[str]:
    problems = []
    if _named(old) != _named(new) and _named(old) not in new.get("aliases", ()):
        problems.append(f"{path}: record renamed from {_named(old)} to {_named(new)}")
    new_fields = {f["name"]: f for f in new["fields"]}
    for f in new["fields"]:
        for alias in f.get("aliases", ()):
            new_fields.setdefault(alias, f)
    old_names = {f["name"] for f in old["fields"]}
    for f in old["fields"]:
        where = f"{path}.{f['name']}"
        if f["name"] not in new_fields:
            if "default" not in f:
                problems.append(f"{where}: removed, and it had no default")
            continue
        problems.extend(compat_problems(f["type"], new_fields[f["name"]]["type"], where))
    for f in new["fields"]:
        known = f["name"] in old_names or any(a in old_names for a in f.get("aliases", ()))
        if not known and "default" not in f:
            problems.append(f"{path}.{f['name']}: added without a default")
    return problems


# -- the schemas ----------------------------------------------------------------------------------


def test_v1_exists_for_the_first_released_schemas() -> None:
    released = {p.stem for p in V1.glob("*.avsc")}
    assert {
        "Deferral",
        "DeliveredEvent",
        "AuditRecord",
        "DeadLetter",
        "StateMarker",
        "InvalidRecord",
    } <= released


@pytest.mark.parametrize("path", sorted(V1.glob("*.avsc")), ids=lambda p: p.stem)
def test_backward_compatible_with_v1(path: Path) -> None:
    current = SCHEMAS / path.name
    assert current.is_file(), f"{path.name} was released in v1 and must not be deleted"
    problems = compat_problems(load(path), load(current), path.stem)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", sorted(V1.glob("*.avsc")), ids=lambda p: p.stem)
def test_v1_records_read_with_the_current_schema(path: Path) -> None:
    """fastavro's schema resolution agrees: a v1 record decodes with the current schema."""
    old = fastavro.parse_schema(load(path))
    new = fastavro.parse_schema(load(SCHEMAS / path.name))
    record = _minimal(load(path))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old, record)
    buf.seek(0)
    decoded = fastavro.schemaless_reader(buf, old, new)
    for key, value in record.items():
        if not isinstance(value, int) or isinstance(value, bool):
            assert decoded[key] == value, key


def _minimal(schema: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in schema["fields"]:
        t = _unwrap(f["type"])
        if "default" in f:
            out[f["name"]] = f["default"]
        elif isinstance(t, dict) and t["type"] == "enum":
            out[f["name"]] = t["symbols"][0]
        elif isinstance(t, dict) and t.get("logicalType") == "timestamp-millis":
            out[f["name"]] = 1_700_000_000_000
        else:
            out[f["name"]] = {"string": "s", "bytes": b"b", "int": 1, "long": 2}[t]
    return out


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_schema_parses_and_is_self_contained(name: str) -> None:
    schema = load(SCHEMAS / f"{name}.avsc")
    assert schema["type"] == "record"
    assert schema["name"] == name
    assert schema["namespace"] == "io.ensync.kafka"
    fastavro.parse_schema(schema, named_schemas={})  # no reference to another file


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_enums_carry_a_default(name: str) -> None:
    def enums(node: Any) -> list[dict[str, Any]]:
        if isinstance(node, dict):
            found = [node] if node.get("type") == "enum" else []
            return found + [e for v in node.values() for e in enums(v)]
        if isinstance(node, list):
            return [e for v in node for e in enums(v)]
        return []

    for enum in enums(load(SCHEMAS / f"{name}.avsc")):
        assert enum.get("default") in enum["symbols"], f"{name}: enum {enum['name']}"


def test_wire_marker_is_documented() -> None:
    readme = (SCHEMAS / "README.md").read_text()
    assert MAGIC == b"E\x01"
    assert "`0x45`" in readme
    assert "`0x01`" in readme


# -- the checker catches what it must -------------------------------------------------------------

BASE: dict[str, Any] = {
    "type": "record",
    "name": "R",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "n", "type": "int"},
        {"name": "opt", "type": ["null", "string"], "default": None},
        {
            "name": "color",
            "type": {"type": "enum", "name": "C", "symbols": ["RED", "BLUE"], "default": "RED"},
        },
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
    ],
}


def changed(**edits: Any) -> dict[str, Any]:
    schema = copy.deepcopy(BASE)
    fields = {f["name"]: f for f in schema["fields"]}
    for name, edit in edits.items():
        if edit is None:
            schema["fields"].remove(fields[name])
        elif name in fields:
            fields[name].update(edit)
        else:
            schema["fields"].append({"name": name, **edit})
    return schema


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        (changed(extra={"type": "string"}), "R.extra: added without a default"),
        (changed(n=None), "R.n: removed, and it had no default"),
        (changed(n={"type": "string"}), "R.n: type changed from int to string"),
        (changed(id={"type": "int"}), "R.id: type changed from string to int"),
        (changed(opt={"type": ["null", "int"]}), "R.opt: union branch 1 (string) was removed"),
        (changed(opt={"type": "string"}), "R.opt: union branch 0 (null) was removed"),
        (
            changed(
                color={"type": {"type": "enum", "name": "C", "symbols": ["RED"], "default": "RED"}}
            ),
            "R.color: enum symbols removed: ['BLUE']",
        ),
        (
            changed(
                color={"type": {"type": "enum", "name": "C", "symbols": ["RED", "BLUE", "GREEN"]}}
            ),
            "R.color: enum gained symbols without a default",
        ),
        (changed(at={"type": "long"}), "R.at: logical type changed"),
        (changed(tags={"type": {"type": "array", "items": "int"}}), "R.tags[]: type changed"),
    ],
)
def test_checker_rejects_incompatible_changes(new: dict[str, Any], expected: str) -> None:
    problems = compat_problems(BASE, new, "R")
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize(
    "new",
    [
        BASE,
        changed(extra={"type": "string", "default": ""}),
        changed(opt=None),  # had a default
        changed(n={"type": "long"}),  # promotion
        changed(id={"type": ["null", "string"], "default": None}),  # a union gained a branch
        changed(opt={"type": ["null", "string", "int"], "default": None}),
        changed(
            color={
                "type": {
                    "type": "enum",
                    "name": "C",
                    "symbols": ["RED", "BLUE", "GREEN"],
                    "default": "RED",
                }
            }
        ),
    ],
)
def test_checker_accepts_compatible_changes(new: dict[str, Any]) -> None:
    assert compat_problems(BASE, new, "R") == []
