"""Python functions written out as source and compiled once: the scaffolding the generated Avro
encoders (``_avroenc``) and decoders (``_avrodec``) share."""

from __future__ import annotations

from typing import Any


class SourceGenerator:
    """Collects function sources and the namespace they run in; names never collide."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.sources: list[str] = []
        self._count = 0

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"_{stem}_{self._count}"

    def build(self, fn: str, label: str) -> Any:
        """Compile every source collected and return the function named ``fn``; ``label``
        names the code in tracebacks."""
        exec(compile("\n".join(self.sources), f"<{label}>", "exec"), self.namespace)
        return self.namespace[fn]
