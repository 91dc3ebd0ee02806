"""A token bucket per key for handlers that call rate-limited systems.

Over the limit, :meth:`RateLimit.acquire` does not wait: it raises
:class:`~ensync_kafka.Postpone`, and the consumer defers the event to the next free slot through
the DEFER pipeline, so the partition keeps moving and nothing sleeps in a handler::

    github = RateLimit(rate=10, per="1s", name="github")

    @consumer.handler
    def sync(event: DeliveredEvent) -> None:
        github.acquire(key=event.json()["org"])  # 10 calls per second per org
        call_github(event)

Postponed events are spread one slot apart past the last slot already handed out, so a burst
comes back as a steady stream instead of all at once. The buckets live in this process: with
several competing consumers give each ``rate / consumers``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from .config import parse_duration
from .retry import Postpone


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    promised: float
    """Monotonic time up to which slots have been handed out to postponed events."""


class RateLimit:
    """At most ``rate`` calls per ``per`` seconds per key, with bursts up to ``burst`` calls.

    Thread-safe. ``per`` is seconds or a duration string (``"1s"``, ``"1m"``).
    """

    def __init__(
        self,
        rate: float,
        per: float | str | timedelta = 1.0,
        *,
        burst: float | None = None,
        name: str = "rate limit",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        period = parse_duration(per)
        if rate <= 0 or period <= 0:
            raise ValueError("rate and per must be greater than 0")
        self.name = name
        self.rate = rate / period
        """Tokens per second."""
        self.burst = float(burst) if burst is not None else max(1.0, float(rate))
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def try_acquire(self, key: str = "") -> float:
        """Take a slot: 0.0 when taken now, else the seconds until the next free slot (which is
        then handed out, so the next caller over the limit gets the slot after it)."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(self.burst, now, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            slot = max(now + (1 - bucket.tokens) / self.rate, bucket.promised)
            bucket.promised = slot + 1 / self.rate
            return slot - now

    def acquire(self, key: str = "") -> None:
        """Take a slot or raise :class:`~ensync_kafka.Postpone` with the delay to the next one."""
        delay = self.try_acquire(key)
        if delay > 0:
            label = f"{self.name}[{key}]" if key else self.name
            raise Postpone(delay, f"{label}: over {self.rate:g}/s, next free slot in {delay:.3f}s")

    def __repr__(self) -> str:
        return f"RateLimit(name={self.name!r}, rate={self.rate:g}/s, burst={self.burst:g})"
