"""The machine, the versions and the processes' CPU time, for the report's header."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import confluent_kafka
import fastavro
import psutil
import rocksdict

from .common import ROOT, per_op_us
from .samples import sample_deferral_value

SPEED_PROBE_CALLS = 20_000

# -- machine and versions ---------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def listener_pid(bootstrap: str) -> int | None:
    """The local process listening on the bootstrap port, if the broker runs on this machine."""
    try:
        port = int(bootstrap.split(",")[0].rsplit(":", 1)[1])
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return int(conn.pid) if conn.pid else None
    except (ValueError, IndexError, psutil.Error, OSError):
        return None
    return None


def _kafka_version(broker_pid: int | None) -> str:
    """From the broker's classpath (``kafka_2.13-X.jar`` / ``kafka-server-X.jar``)."""
    if broker_pid is None:
        return "unknown (broker not on this machine; pass --kafka-version)"
    try:
        cmdline = psutil.Process(broker_pid).cmdline()
        cwd = psutil.Process(broker_pid).cwd()
    except psutil.Error:
        return "unknown"
    pattern = re.compile(r"^kafka(?:_\d+\.\d+|-server)-(\d+\.\d+\.\d+[\w.-]*)\.jar$")
    for i, arg in enumerate(cmdline):
        if arg in ("-cp", "-classpath", "--class-path") and i + 1 < len(cmdline):
            for entry in cmdline[i + 1].split(os.pathsep):
                folder = Path(cwd, entry.rstrip("*")) if not entry.endswith(".jar") else None
                names = (
                    [p.name for p in folder.iterdir()]
                    if folder and folder.is_dir()
                    else [Path(entry).name]
                )
                for name in names:
                    match = pattern.match(name)
                    if match:
                        return match.group(1)
    return "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def speed_probe_us(calls: int = SPEED_PROBE_CALLS) -> float:
    """Microseconds per fastavro decode of a sample Deferral, the best of three rounds.

    The machines these runs land on differ in per-core speed by 2x and more from day to day
    (2026-11-30: every figure of bench.micro doubled). This call depends on no code of ours, so
    it tells a slower machine from a slower commit."""
    from ensync_kafka.codec import DEFERRAL, MAGIC

    body = sample_deferral_value()[len(MAGIC) :]
    schema = DEFERRAL._parsed
    best = min(
        per_op_us(lambda: fastavro.schemaless_reader(io.BytesIO(body), schema, None), calls)
        for _ in range(3)
    )
    return round(best, 2)


def environment(
    bootstrap: str, broker_pid: int | None, kafka_version: str | None, git_sha: str | None
) -> dict[str, Any]:
    import ensync_kafka

    sha = git_sha or _git("rev-parse", "--short", "HEAD") or "nogit"
    dirty = not git_sha and bool(
        _git("status", "--porcelain", "--", "ensync_kafka", "bench", "schemas", ":!bench/results")
    )
    load1, load5, _ = os.getloadavg()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": sha,
        "git_dirty": dirty,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "speed_probe_us": speed_probe_us(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(load1, 2), round(load5, 2)],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "confluent_kafka": _dist_version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "kafka": kafka_version or _kafka_version(broker_pid),
        "fastavro": fastavro.__version__,
        "rocksdict": getattr(rocksdict, "__version__", _dist_version("rocksdict")),
        "library": str(Path(ensync_kafka.__file__).parent),
        "bootstrap": bootstrap,
        "broker_on_this_machine": broker_pid is not None,
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)
