"""Extension points of a worker: subclass :class:`WorkerHooks` and override what you need.

Called from the tier's own thread after the step has committed; keep them quick.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class TurnPhases:
    """Where one committed turn's time went, in seconds, in the order the phases run.

    A timer due while a turn runs waits for the next one, so release lateness follows the
    length of a turn; this says which part of it to look at: the worker's own work (``stage``,
    ``produce``, ``apply``) or the broker's round trips (``offsets``, ``acks``, ``commit``).
    """

    NAMES: ClassVar[tuple[str, ...]]
    """The phases' names, in order."""

    stage: float
    """Consume returned -> transaction begun: due timers staged, the intake decoded and checked."""
    produce: float
    """begin_transaction() and the turn's produce() calls."""
    acks: float
    """flush(): the broker acknowledging every record of the transaction, while the offsets go
    out beside it."""
    offsets: float
    """What is left after that of send_offsets_to_transaction (AddOffsetsToTxn and
    TxnOffsetCommit round trips, in a thread of its own since the produce calls ended)."""
    hold: float
    """Waiting for the latest pre-staged due time, so that nothing is visible early."""
    commit: float
    """commit_transaction()."""
    apply: float
    """Local state (RocksDB) written after the commit."""

    def items(self) -> list[tuple[str, float]]:
        return [(name, getattr(self, name)) for name in self.NAMES]

    @property
    def total(self) -> float:
        return sum(seconds for _, seconds in self.items())


TurnPhases.NAMES = tuple(f.name for f in fields(TurnPhases))


class WorkerHooks:
    def on_assigned(self, tier: str, partitions: list[int]) -> None:
        """Partitions were assigned and their state restored; they may now fire."""

    def on_revoked(self, tier: str, partitions: list[int]) -> None:
        """Partitions were revoked or lost; their state is closed."""

    def on_commit(self, tier: str, accepted: int, duplicates: int, invalid: int) -> None:
        """A transaction committed with this much intake."""

    def on_delivered(self, tier: str, deferral: dict[str, Any], delivered_at_ms: int) -> None:
        """A deferral was released; ``delivered_at_ms`` is when its commit returned (which can
        be a little after the ``delivered_at`` stamped in the record: see WorkerConfig)."""

    def on_accepted(self, tier: str, deferral: dict[str, Any]) -> None:
        """A deferral was accepted and is held (its transaction committed)."""

    def on_batch(
        self,
        tier: str,
        accepted: list[dict[str, Any]],
        delivered: list[dict[str, Any]],
        delivered_at_ms: int,
    ) -> None:
        """Everything one committed transaction accepted and released, in one call.

        By default it calls :meth:`on_accepted` and :meth:`on_delivered` per deferral; override
        it instead of those to count in bulk (the worker's own metrics do).
        """
        for deferral in accepted:
            self.on_accepted(tier, deferral)
        for deferral in delivered:
            self.on_delivered(tier, deferral, delivered_at_ms)

    def on_control(self, tier: str, op: str, outcome: str, deferral: dict[str, Any] | None) -> None:
        """A cancel or reschedule request was answered (its transaction committed).

        ``op`` is CANCEL or RESCHEDULE; ``outcome`` one of ``control``'s outcomes; ``deferral``
        is the held deferral it acted on (with the new due time after a reschedule), else None.
        """

    def on_transaction(self, tier: str, seconds: float, committed: bool) -> None:
        """A transaction finished after ``seconds``: committed, or failed and aborted."""

    def on_phases(self, tier: str, phases: TurnPhases) -> None:
        """A turn committed and its local state is written; ``phases`` is where its time went."""
