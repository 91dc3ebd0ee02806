"""The worker process: a tier worker per tier, each in its own thread, until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from ._signals import stop_on_signals
from .config import Config
from .exceptions import BrokerError
from .hooks import WorkerHooks
from .monitor import Monitor
from .state import StateMemory
from .worker import TierWorker

log = logging.getLogger("ensync_kafka.worker")

STOP_GRACE_S = 45.0
"""How long a stopping worker waits for its tier threads to finish their open transactions. A
thread still inside a client call after that (a broker gone, a client wedged) is abandoned and
:meth:`Worker.run` raises: the process can exit and be restarted, and the restart's
``init_transactions`` fences and aborts what the abandoned thread left open. A clean exit takes
seconds with a broker that answers; without one, a commit may retry for longer and is abandoned."""
STOP_POLL_S = 0.2


class Worker:
    """Runs a :class:`TierWorker` per tier in threads until :meth:`stop` or SIGTERM/SIGINT."""

    def __init__(
        self,
        config: Config,
        tiers: Sequence[str] | None = None,
        *,
        hooks: WorkerHooks | None = None,
        stop_grace: float = STOP_GRACE_S,
    ) -> None:
        self.config = config
        self.stop_grace = stop_grace
        self.stop_event = threading.Event()
        names = tiers or config.tier_names
        # The HTTP server (metrics, health, queries) binds here, so a taken port fails at once.
        self.monitor = Monitor(config, self) if config.monitor.port != 0 else None
        if self.monitor is not None:
            hooks = self.monitor.wrap_hooks(hooks)
        memory = StateMemory(config.worker.state_cache_bytes, config.worker.state_memtable_bytes)
        self.tiers = [
            TierWorker(config, config.tier(n), stop=self.stop_event, hooks=hooks, memory=memory)
            for n in names
        ]
        self.errors: list[BaseException] = []

    def _run_tier(self, tier: TierWorker) -> None:
        """Run one tier; its end by anything but a stop stops the others, so the process exits
        (nonzero) to be restarted rather than living on without a tier."""
        outcome = "escaped"
        try:
            tier.run()
            outcome = "returned"
        except BaseException as exc:
            outcome = "failed"
            log.exception("tier %s: worker failed", tier.tier.name)
            self.errors.append(exc)
        finally:
            if outcome == "escaped":  # no ``except`` catches it: see TierWorker._guarded
                name = tier.tier.name
                self.errors.append(BrokerError(f"tier {name}: ended by a non-exception"))
            if outcome != "returned":
                self.stop_event.set()

    def run(self, *, install_signal_handlers: bool = True) -> None:
        if install_signal_handlers:
            stop_on_signals(self.stop_event, log, "finishing the open transaction and stopping")
        # Daemons: a thread stuck in a client call must not keep the process from exiting.
        threads = [
            threading.Thread(
                target=self._run_tier, args=(t,), name=f"tier-{t.tier.name}", daemon=True
            )
            for t in self.tiers
        ]
        if self.monitor is not None:
            self.monitor.start()
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads) and not self.stop_event.is_set():
                self.stop_event.wait(STOP_POLL_S)
            deadline = time.monotonic() + self.stop_grace
            for t in threads:
                while t.is_alive() and time.monotonic() < deadline:
                    t.join(STOP_POLL_S)
        finally:
            if self.monitor is not None:
                self.monitor.stop()  # withdraws this worker from {prefix}.workers
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            log.error("%s still busy %.0f s after the stop: abandoned", stuck, self.stop_grace)
        if self.errors:
            raise self.errors[0]
        if stuck:
            raise BrokerError(f"{', '.join(stuck)} did not stop within {self.stop_grace:.0f} s")

    def stop(self) -> None:
        self.stop_event.set()
