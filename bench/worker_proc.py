"""The benchmark's worker process: ``Worker(config, tiers)`` in its own interpreter.

Run by ``bench.run`` as ``python -m bench.worker_proc --config FILE --tiers 1s,10s --ready FILE``.
It is the same ``Worker`` the ``ensync-kafka worker`` command runs, plus two things the benchmark
needs and the CLI does not offer:

* ``--ready FILE`` is created once every requested tier has all of its partitions assigned and
  restored (``WorkerHooks.on_assigned``), so the clock starts on a worker that is ready; with
  ``--ready-share`` once it holds some of every tier (a process joining others in the group);
* ``--profile FILE`` runs each tier thread under its own ``cProfile.Profile`` (cProfile sees only
  the thread that enabled it) and writes the merged stats to FILE on SIGTERM; by default it
  counts each thread's CPU time (``--profile-clock cpu``), not elapsed time.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import logging
import os
import pstats
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ensync_kafka import TurnPhases, Worker, WorkerHooks
from ensync_kafka.config import load_config


class _BenchHooks(WorkerHooks):
    """Signals readiness; records when each transaction committed and what it released."""

    def __init__(
        self, tiers: list[str], partitions: int, ready: Path | None, *, share: bool = False
    ) -> None:
        self._want = {t: set(range(partitions)) for t in tiers}
        self._share = share
        self._have: dict[str, set[int]] = {t: set() for t in tiers}
        self._ready = ready
        self._lock = threading.Lock()
        # Per tier: (commit time, accepted, released) for every committed transaction.
        self.commits: dict[str, list[tuple[float, int, int]]] = {t: [] for t in tiers}
        self._released: dict[str, int] = dict.fromkeys(tiers, 0)
        self.transactions: dict[str, list[float]] = {}
        self.commit_lateness: dict[int, int] = {}
        """Milliseconds from due time to the committed release -> count, all tiers."""
        self.phases: dict[str, list[float]] = {name: [] for name in (*TurnPhases.NAMES, "turn")}
        """Each committed turn's phases in milliseconds, all tiers."""

    def on_commit(self, tier: str, accepted: int, duplicates: int, invalid: int) -> None:
        # Called right after commit_transaction returned, before the on_batch call of
        # the same turn: the released count of a turn is attributed at its next commit.
        released, self._released[tier] = self._released.get(tier, 0), 0
        self.commits.setdefault(tier, []).append((time.time(), accepted, released))

    def on_batch(
        self,
        tier: str,
        accepted: list[dict[str, Any]],
        delivered: list[dict[str, Any]],
        delivered_at_ms: int,
    ) -> None:
        self._released[tier] = self._released.get(tier, 0) + len(delivered)
        # How late each release became visible: the commit had returned by delivered_at_ms.
        late = self.commit_lateness
        for deferral in delivered:
            ms = max(0, delivered_at_ms - deferral["due_at"])
            late[ms] = late.get(ms, 0) + 1

    def on_transaction(self, tier: str, seconds: float, committed: bool) -> None:
        # Called by workers that report each transaction's duration (begin -> commit/abort).
        self.transactions.setdefault(tier, []).append(seconds)

    def on_phases(self, tier: str, phases: TurnPhases) -> None:
        for name, seconds in phases.items():
            self.phases[name].append(round(seconds * 1000, 2))
        self.phases["turn"].append(round(phases.total * 1000, 2))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "commit_lateness_ms": self.commit_lateness,
            "turn_phases_ms": self.phases,
        }
        for tier, rows in self.commits.items():
            busy = [r for r in rows if r[1] or r[2]]
            gaps = sorted(b[0] - a[0] for a, b in itertools.pairwise(rows))
            out[tier] = {
                "commits": len(rows),
                "commits_with_work": len(busy),
                "accepted": sum(r[1] for r in rows),
                "released": sum(r[2] for r in rows) + self._released.get(tier, 0),
                "max_accepted_per_commit": max((r[1] for r in rows), default=0),
                "max_released_per_commit": max((r[2] for r in rows), default=0),
                "commit_interval_ms": _quantiles([g * 1000 for g in gaps]),
                "transaction_ms": _quantiles(
                    sorted(t * 1000 for t in self.transactions.get(tier, []))
                ),
            }
        return out

    def on_assigned(self, tier: str, partitions: list[int]) -> None:
        with self._lock:
            self._have.setdefault(tier, set()).update(partitions)
            have = self._have
            if self._ready is not None and all(
                have.get(t) if self._share else self._want[t] <= have.get(t, set())
                for t in self._want
            ):
                self._ready.write_text(str(os.getpid()))

    def on_revoked(self, tier: str, partitions: list[int]) -> None:
        with self._lock:
            self._have.setdefault(tier, set()).difference_update(partitions)


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    n = len(values)
    pick = [values[min(n - 1, int(q * n))] for q in (0.5, 0.9, 0.99)]
    return {
        "p50": round(pick[0], 1),
        "p90": round(pick[1], 1),
        "p99": round(pick[2], 1),
        "max": round(values[-1], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_proc")
    parser.add_argument("--config", required=True)
    parser.add_argument("--tiers", required=True, help="comma-separated tier names")
    parser.add_argument("--ready", type=Path, default=None)
    parser.add_argument(
        "--ready-share", action="store_true", help="ready once it holds a share of every tier"
    )
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument(
        "--profile-clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: each thread's CPU time (time.thread_time), so waiting for the GIL, the "
        "broker or the next record costs nothing; wall: elapsed time, waits included",
    )
    parser.add_argument("--commit-stats", type=Path, default=None, help="write JSON on exit")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # The benchmark names its own prefix per section: an ENSYNC_PREFIX in the caller's
    # environment must not redirect the worker elsewhere.
    environ = {k: v for k, v in os.environ.items() if k not in ("ENSYNC_PREFIX", "ENSYNC_CONFIG")}
    config = load_config(args.config, environ=environ)
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    hooks = _BenchHooks(tiers, config.topics.defer.partitions, args.ready, share=args.ready_share)
    worker = Worker(config, tiers, hooks=hooks)

    profiles: list[cProfile.Profile] = []
    timer = time.thread_time if args.profile_clock == "cpu" else None
    if args.profile is not None:
        for tier_worker in worker.tiers:
            original = tier_worker.run

            def profiled_run(original=original) -> None:  # type: ignore[no-untyped-def]
                profile = cProfile.Profile(timer) if timer else cProfile.Profile()
                profile.enable()
                try:
                    original()
                finally:
                    profile.disable()
                    profiles.append(profile)

            tier_worker.run = profiled_run  # type: ignore[method-assign]

    try:
        worker.run()
    finally:
        if args.commit_stats is not None:
            args.commit_stats.write_text(json.dumps(hooks.summary(), indent=1))
        if args.profile is not None and profiles:
            stats = pstats.Stats(profiles[0])
            for extra in profiles[1:]:
                stats.add(extra)
            stats.dump_stats(str(args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
