"""Which priority a PriorityConsumer serves next: no Kafka here, so it is tested on its own.

``strict`` serves a lower priority only once every partition of each higher priority has
reported its end (``enable.partition.eof``), or after ``consumer.strict_wait`` if one does not;
``weighted`` gives each priority in ``consumer.shares`` at least that fraction of the events
handled while it has a backlog (a credit per priority, so p1 keeps moving under a flood of p5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .config import PRIORITY_MAX, PRIORITY_MIN, ConsumerConfig


class PrioritySelector:
    """Chooses the priority to serve next from what is buffered."""

    def __init__(self, config: ConsumerConfig) -> None:
        self.ordering = config.ordering
        self.shares = dict(config.shares)
        self.strict_wait = config.strict_wait
        self._credit = dict.fromkeys(range(PRIORITY_MIN, PRIORITY_MAX + 1), 0.0)
        self._blocked_since: float | None = None

    def pick(
        self, backlog: Mapping[int, int], drained: Callable[[int], bool], now: float
    ) -> int | None:
        """The priority to take one event from, or None to wait for more fetches.

        ``backlog``: buffered events per priority. ``drained(p)``: every partition of priority
        ``p`` has reported its end (strict ordering waits for that before serving below ``p``).
        """
        available = [p for p in range(PRIORITY_MAX, PRIORITY_MIN - 1, -1) if backlog.get(p)]
        if not available:
            self._blocked_since = None
            return None
        if self.ordering == "weighted":
            return self._weighted(available)
        top = available[0]
        if all(drained(p) for p in range(PRIORITY_MAX, top, -1)):
            self._blocked_since = None
            return top
        if self._blocked_since is None:
            self._blocked_since = now
        if now - self._blocked_since >= self.strict_wait:
            return top  # a higher partition has not reported its end in time: do not stall
        return None

    def _weighted(self, available: list[int]) -> int:
        for p in self._credit:
            if p in available:
                self._credit[p] += self.shares.get(p, 0.0)
            else:
                self._credit[p] = 0.0  # no banking while idle
        owed = [p for p in available if self._credit[p] >= 1.0 - 1e-9]  # float sums
        if owed:
            chosen = max(owed, key=lambda p: (self._credit[p], p))
            self._credit[chosen] -= 1.0
            return chosen
        return available[0]
