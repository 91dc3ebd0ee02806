"""Local processes: liveness, /proc, killing and waiting, loopback ports, lock and state files.

The process-level half of :mod:`ensync_kafka.localbroker`, kept apart from provisioning and the
broker lifecycle. Linux reads ``/proc`` and uses ``prctl``; elsewhere ``ps`` stands in for the
command line and the die-with-parent hook is unavailable.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .exceptions import LocalBrokerError

KILL_WAIT_S = 10.0

_POLL_S = 0.1
_PR_SET_PDEATHSIG = 1


# --- lock and state files ----------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- the process table -------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as dead (and is reaped if it is our child)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    fields = _proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))


def _cmdline(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None
    except OSError:
        return None
    else:
        return raw.replace(b"\0", b" ").decode(errors="replace")
    result = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
    return result.stdout.strip() or None


def _is_kafka_under(pid: int, directory: Path) -> bool:
    """True when ``pid`` is a live ``kafka.Kafka`` JVM whose config lies in ``directory``.

    Reads only the command line (empty for a zombie), never waits on the pid.
    """
    cmd = _cmdline(pid) if pid > 0 else None
    return bool(cmd and "kafka.Kafka" in cmd and f"{directory}{os.sep}" in cmd)


def _kafka_pids_under(directory: Path) -> list[int]:
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    pids = (int(p.name) for p in proc.iterdir() if p.name.isdigit())
    return [pid for pid in pids if _is_kafka_under(pid, directory)]


# --- killing and waiting -----------------------------------------------------------------------


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _kill(pid: int, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pid, KILL_WAIT_S):
        raise LocalBrokerError(f"broker pid {pid} survived SIGKILL")


# --- loopback sockets --------------------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports free just now (a node's broker and controller, say)."""
    ports: list[int] = []
    while len(ports) < count:
        port = _free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def _answers(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when a TCP connection to ``host:port`` is accepted."""
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


# --- children that die with us -----------------------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when this thread dies (Linux).

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so start from a long-lived
    thread (pytest runs fixtures on the main thread). ``prctl`` is resolved here, before the
    fork, so the child only makes the call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent, sigkill = os.getpid(), int(signal.SIGKILL)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sigkill)

    return hook
