"""Which held timers a tier worker releases next, and how long it may wait before its next turn.

On-time timers go in due order, with those due within the lookahead pre-staged beside them: a
turn's commit waits for the latest due time it carries, so it never becomes visible early, and
looking ahead by about the time a transaction takes to get ready makes that wait overlap the
turn's own work (``WorkerConfig.release_lookahead``). Past the catch-up grace a timer is backlog
(overdue at intake, or piled up while no worker ran): released highest priority first, oldest
first, at most ``catchup_rate`` a second, so a recovering tier does not flood the priority topics.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from .config import PRIORITY_MAX, PRIORITY_MIN, WorkerConfig
from .state import PartitionStore, Timer

MAX_BACKLOG_BURST_S = 0.1
"""The catch-up token bucket holds at most this many seconds' worth of releases."""
PREP_ESTIMATE_START_MS = 10.0
PREP_ESTIMATE_WEIGHT = 0.2
"""Weight of the newest sample in the moving average of a transaction's preparation time."""


class _TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def available(self) -> int:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return int(self.tokens)

    def spend(self, n: int) -> None:
        self.tokens -= n


class DueTimers:
    """The release order and pacing of one tier worker over the stores it owns."""

    def __init__(self, config: WorkerConfig) -> None:
        self.batch_size = config.fire_batch_size
        self.max_wait_s = config.max_commit_interval
        self.grace_ms = int(config.catchup_grace * 1000)
        self.max_lookahead_ms = config.release_lookahead * 1000
        self.prep_ms = PREP_ESTIMATE_START_MS
        self.bucket = _TokenBucket(config.catchup_rate, config.catchup_rate * MAX_BACKLOG_BURST_S)

    @property
    def lookahead_ms(self) -> int:
        """Pre-stage only as far ahead as a transaction takes to get ready to commit: further
        would hold earlier releases back until the latest one is due."""
        return int(min(self.max_lookahead_ms, self.prep_ms))

    def observe_prep(self, ms: float) -> None:
        """A turn took ``ms`` from its start until it was ready to commit."""
        self.prep_ms += PREP_ESTIMATE_WEIGHT * (ms - self.prep_ms)

    def wait_s(self, stores: Mapping[int, PartitionStore], now: int) -> float:
        """How long the next turn may wait for intake before something falls due."""
        due = [d for d in (s.next_due_ms() for s in stores.values()) if d is not None]
        if not due:
            return self.max_wait_s
        wait_ms = min(due) - self.lookahead_ms - now
        if wait_ms < -self.grace_ms:  # backlog: pace by the catch-up bucket
            if self.bucket.available() >= 1:
                return 0.0
            return min(self.max_wait_s, 1 / self.bucket.rate)
        return max(0.0, min(self.max_wait_s, wait_ms / 1000))

    def take(self, stores: Mapping[int, PartitionStore], now: int) -> list[tuple[int, Timer]]:
        """At most a fire batch of (partition, timer): the on-time ones (and those due within the
        lookahead) in due order per partition, then the backlog the catch-up rate allows."""
        budget = self.batch_size
        on_time_from = now - self.grace_ms
        due: list[tuple[int, Timer]] = []
        for p, store in stores.items():
            if budget <= len(due):
                return due
            timers = store.due(on_time_from, now + self.lookahead_ms + 1, budget - len(due))
            due.extend((p, t) for t in timers)
        backlog = min(budget - len(due), self.bucket.available())
        released = 0
        for priority in range(PRIORITY_MAX, PRIORITY_MIN - 1, -1):
            if released >= backlog:
                break
            candidates = sorted(
                (timer.key, p, timer)
                for p, store in stores.items()
                for timer in store.overdue(priority, on_time_from, backlog - released)
            )
            for _, p, timer in candidates[: backlog - released]:
                due.append((p, timer))
                released += 1
        self.bucket.spend(released)
        return due
