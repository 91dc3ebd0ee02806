"""Extension points of a worker: subclass :class:`WorkerHooks` and override what you need.

Called from the tier's own thread after the step has committed; keep them quick.
"""

from __future__ import annotations

from typing import Any


class WorkerHooks:
    def on_assigned(self, tier: str, partitions: list[int]) -> None:
        """Partitions were assigned and their state restored; they may now fire."""

    def on_revoked(self, tier: str, partitions: list[int]) -> None:
        """Partitions were revoked or lost; their state is closed."""

    def on_commit(self, tier: str, accepted: int, duplicates: int, invalid: int) -> None:
        """A transaction committed with this much intake."""

    def on_delivered(self, tier: str, deferral: dict[str, Any], delivered_at_ms: int) -> None:
        """A deferral was released (its transaction committed)."""
