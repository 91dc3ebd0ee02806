"""A turn's releases: the due timers staged as deliveries, tombstones, markers and audit records.

Every release of a turn becomes visible when the turn commits, which is not before the latest
due time among them (pre-staged ones: see WorkerConfig.release_lookahead), so that instant is
the honest ``delivered_at`` of all of them, and the commit waits for it
(``Turn.commit_not_before_ms``).
"""

from __future__ import annotations

from collections.abc import Iterable

from . import audit
from ._sticky import StickyPartitions
from ._turn import Turn
from .codec import DEFERRAL, delivered_suffix, marker_tail, marker_value
from .config import PRIORITY_MAX, PRIORITY_MIN
from .state import MARKER_PREFIX, TIMER, Timer
from .topics import TopicNames


class Release:
    """One tier worker's staging of what is due."""

    def __init__(
        self, names: TopicNames, queues: Iterable[str], *, tier: str, audit_of: audit.DeferralAudit
    ) -> None:
        self.names = names
        self.tier = tier
        self.audit = audit_of
        self.topics = {
            (q, prio): names.priority(q, prio)
            for q in queues
            for prio in range(PRIORITY_MIN, PRIORITY_MAX + 1)
        }
        """The priority topic of each (queue, priority) of the configuration."""
        self.sticky = StickyPartitions({})
        """Partitions for keyless releases; the worker learns the topics' partitions at start."""

    def stage(self, due: list[tuple[int, Timer]], now: int, turn: Turn) -> None:
        """Stage ``due`` ((partition, timer), in release order) into ``turn``."""
        if not due:
            return
        released_at = max(now, max(timer.due_ms for _, timer in due))
        turn.commit_not_before_ms = released_at
        # What every record of this release shares, encoded once.
        delivered_tail = delivered_suffix(released_at, self.tier)
        marker_delivered = marker_tail("DELIVERED", released_at)
        records, changelog, released = turn.records, turn.changelog, turn.released
        audit_topic, topics, names = self.names.audit, self.topics, self.names
        decode, audit_of, DELIVERED = DEFERRAL.decode, self.audit, audit.DELIVERED
        sticky = self.sticky
        sticky.new_turn()
        for p, timer in due:
            value = timer.value
            rec = decode(value)
            id_bytes = timer.key[9:]
            headers = rec["headers"]
            queue, priority = rec["queue"], rec["priority"]
            # A queue dropped from the config since intake still gets its delivery.
            topic = topics.get((queue, priority)) or names.priority(queue, priority)
            key = rec["key"]
            records.append(
                (
                    topic,
                    key or id_bytes,
                    value + delivered_tail,
                    [(h["key"], h["value"]) for h in headers] if headers else None,
                    -1 if key else sticky.partition(topic),
                )
            )
            delivered = audit_of(DELIVERED, rec, released_at, rec["reason"])
            records.append((audit_topic, id_bytes, delivered, None, -1))
            changes = changelog.get(p)
            if changes is None:
                changes = changelog[p] = []
            changes.append((TIMER + timer.key, None))
            changes.append((MARKER_PREFIX + id_bytes, marker_value(id_bytes, marker_delivered)))
            released.append(rec)
