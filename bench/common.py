"""What every part of the benchmark shares: targets, modes, the run's resources (topics,
configs, cleanup) and small helpers."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from ensync_kafka import DeferRequest
from ensync_kafka.config import Config, config_from_mapping

from .samples import EVENT_NAME, PAYLOAD_TAG

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Targets from issue 3 ("Benchmark").
TARGET_E2E_PER_S = 20_000
TARGET_LATENESS_P99_MS = 20.0
TARGET_LATENESS_MAX_MS = 200.0
TARGET_RSS_MB = 400.0
TARGET_LOAD_PER_S = 5_000
TARGET_HELD = 1_000_000

PARTITIONS = 6
SECTIONS = ("a", "b", "c", "d")
THROUGHPUT_DELAY_S = (0.5, 2.0)
LOAD_DELAY_S = (1.0, 3.0)
HELD_DELAY_S = (3300.0, 3590.0)  # past the 10m span, within the 1h span: the 1h tier
THROUGHPUT_CATCHUP_RATE = 1_000_000.0

WORKER_READY_TIMEOUT_S = 120.0
WORKER_STOP_TIMEOUT_S = 30.0
RECEIVER_READY_TIMEOUT_S = 60.0
STALL_TIMEOUT_S = 60.0
PACE_TICK_S = 0.005
PROFILE_TOP = 30


@dataclass(frozen=True)
class Mode:
    name: str
    n: int
    """Records in (a) and deferrals in (b)."""
    load_seconds: float
    load_rate: int
    held: int
    batch: int


QUICK = Mode("quick", n=20_000, load_seconds=5.0, load_rate=TARGET_LOAD_PER_S, held=50_000,
             batch=5_000)  # fmt: skip
FULL = Mode("full", n=400_000, load_seconds=20.0, load_rate=TARGET_LOAD_PER_S,
            held=TARGET_HELD, batch=5_000)  # fmt: skip


def log(msg: str) -> None:
    stamp = dt.datetime.now().strftime("%H:%M:%S")
    print(f"[bench {stamp}] {msg}", file=sys.stderr, flush=True)


def bench_environ() -> dict[str, str]:
    """The caller's environment minus what would redirect a section's prefix or config."""
    return {k: v for k, v in os.environ.items() if k not in ("ENSYNC_PREFIX", "ENSYNC_CONFIG")}


# -- the run's shared resources ---------------------------------------------------------------


@dataclass
class Bench:
    bootstrap: str
    partitions: int
    tmp: Path
    broker_pid: int | None
    fetch_wait_ms: int = 50
    priority_partitions: int | None = None
    """Partitions per priority topic; None: the same as ``partitions``."""
    audit_partitions: int | None = None
    """Partitions of the audit topic; None: the configuration's default."""
    workers: int = 1
    """(b) and (c): worker processes sharing every tier (``--workers``)."""
    per_tier: bool = False
    """(b) and (c): one worker process per tier instead (``--worker-per-tier``)."""
    group_protocol: str = "classic"
    """worker.group_protocol of every section's workers (``--group-protocol``)."""
    run_id: str = field(default_factory=lambda: f"{int(time.time())}-{uuid.uuid4().hex[:6]}")
    prefixes: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    admin: AdminClient | None = None

    def __post_init__(self) -> None:
        self.admin = AdminClient({"bootstrap.servers": self.bootstrap})

    def prefix(self, section: str) -> str:
        prefix = f"bench-{self.run_id}-{section}"
        self.prefixes.append(prefix)
        return prefix

    def config(self, prefix: str, section: str, **worker: Any) -> tuple[Config, Path]:
        data: dict[str, Any] = {
            "kafka": {"bootstrap_servers": self.bootstrap},
            "prefix": prefix,
            "topics": {
                "defer": {"partitions": self.partitions},
                "priority": {"partitions": self.priority_partitions or self.partitions},
                **(
                    {"audit": {"partitions": self.audit_partitions}}
                    if self.audit_partitions
                    else {}
                ),
            },
            "worker": {
                "id": f"bench-{section}-{os.getpid()}",
                "state_dir": str(self.tmp / "state" / section),
                "group_protocol": self.group_protocol,
                **worker,
            },
        }
        path = self.tmp / f"{section}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        config = config_from_mapping(data, environ=bench_environ(), source=str(path))
        return config, path

    def cleanup(self, keep_topics: bool) -> None:
        assert self.admin is not None
        if not keep_topics:
            try:
                existing = self.admin.list_topics(timeout=30).topics
                doomed = [t for t in existing if any(t.startswith(p + ".") for p in self.prefixes)]
                if doomed:
                    for future in self.admin.delete_topics(doomed, operation_timeout=60).values():
                        with contextlib.suppress(KafkaException):
                            future.result()
                    log(f"deleted {len(doomed)} topics")
            except KafkaException as exc:
                log(f"could not delete topics: {exc}")
        try:
            listed = self.admin.list_consumer_groups().result(timeout=30).valid
            doomed_groups = [
                g.group_id
                for g in listed
                if g.group_id in self.groups
                or any(g.group_id.startswith(p + ".") for p in self.prefixes)
            ]
            if doomed_groups:
                for future in self.admin.delete_consumer_groups(doomed_groups).values():
                    with contextlib.suppress(KafkaException):
                        future.result()
        except KafkaException as exc:
            log(f"could not delete consumer groups: {exc}")


# -- helpers ----------------------------------------------------------------------------------


def sample_request(i: int, delay: float, priority: int) -> DeferRequest:
    return DeferRequest(
        name=EVENT_NAME,
        payload={"seq": i, "tag": PAYLOAD_TAG},
        delay=delay,
        priority=priority,
        reason="bench",
    )


def per_op_us(fn: Callable[[], Any], n: int) -> float:
    """Microseconds per call of ``fn`` over ``n`` calls, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def rate_per_s(n: int, seconds: float | None) -> float | None:
    return round(n / seconds, 1) if seconds and seconds > 0 else None


def delivery_summary(rx: dict[str, Any], sent_ids: set[str]) -> dict[str, Any]:
    ids: set[str] = rx.pop("ids", set())
    out = {k: v for k, v in rx.items()}
    out["missing"] = len(sent_ids - ids)
    out["unexpected"] = len(ids - sent_ids)
    return out
