"""The worker process: a tier worker per tier, each in its own thread, until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

from .config import Config
from .hooks import WorkerHooks
from .monitor import Monitor
from .state import StateMemory
from .worker import TierWorker

log = logging.getLogger("ensync_kafka.worker")


class Worker:
    """Runs a :class:`TierWorker` per tier in threads until :meth:`stop` or SIGTERM/SIGINT."""

    def __init__(
        self,
        config: Config,
        tiers: Sequence[str] | None = None,
        *,
        hooks: WorkerHooks | None = None,
    ) -> None:
        self.config = config
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
        try:
            tier.run()
        except BaseException as exc:
            log.exception("tier %s: worker failed", tier.tier.name)
            self.errors.append(exc)
            self.stop_event.set()

    def run(self, *, install_signal_handlers: bool = True) -> None:
        if install_signal_handlers:
            self._install_signal_handlers()
        threads = [
            threading.Thread(target=self._run_tier, args=(t,), name=f"tier-{t.tier.name}")
            for t in self.tiers
        ]
        if self.monitor is not None:
            self.monitor.start()
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        finally:
            if self.monitor is not None:
                self.monitor.stop()  # withdraws this worker from {prefix}.workers
        if self.errors:
            raise self.errors[0]

    def stop(self) -> None:
        self.stop_event.set()

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: finishing the open transaction and stopping", signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
