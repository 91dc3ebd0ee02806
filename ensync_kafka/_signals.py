"""SIGTERM and SIGINT as a request to stop, for the long-running commands."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(stop: threading.Event, log: logging.Logger, doing: str) -> None:
    """Set ``stop`` on SIGTERM or SIGINT, logging ``doing`` (what the process does next).

    Installed explicitly rather than left to Python's KeyboardInterrupt: a process started in
    the background by a non-interactive shell inherits SIGINT ignored, and Python then installs
    no handler of its own (seen: a dashboard that never stopped on SIGINT). Main thread only.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: %s", signum, doing)
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
