"""ensync-kafka benchmark: raw Kafka baseline, deferral throughput, lateness at load, held RSS.

    .venv/bin/python -m bench.run [--quick] [--profile] [--sections a,b,c,d]

Everything runs against one broker in one run (``--bootstrap``, else $ENSYNC_KAFKA_BOOTSTRAP,
else the running ``ensync-kafka broker``). Each section gets a fresh topic prefix, its own
topics (``ensure_topics``, 6 partitions for the defer and priority families), its own worker
process with a state directory under a temporary directory, and its own receiving process.
Topics, consumer groups and the temporary directory are removed at the end (``--keep-topics``
keeps the topics). See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import multiprocessing as mp
import os
import pickle
import platform
import pstats
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import confluent_kafka
import fastavro
import psutil
import rocksdict
import yaml
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ensync_kafka import DeferClient, DeferRequest, TopicNames, ensure_topics
from ensync_kafka.config import Config, config_from_mapping

from . import floor
from .receiver import percentiles, receive
from .samples import EVENT_NAME, PAYLOAD_TAG, sample_deferral_value

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


def _bench_environ() -> dict[str, str]:
    """The caller's environment minus what would redirect a section's prefix or config."""
    return {k: v for k, v in os.environ.items() if k not in ("ENSYNC_PREFIX", "ENSYNC_CONFIG")}


# -- machine and versions ---------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _listener_pid(bootstrap: str) -> int | None:
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


def _cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


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
                **worker,
            },
        }
        path = self.tmp / f"{section}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        config = config_from_mapping(data, environ=_bench_environ(), source=str(path))
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


# -- worker process ---------------------------------------------------------------------------


@dataclass
class WorkerProc:
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float
    commit_stats: Path
    ready_at: float = 0.0
    cpu_at_ready: float = 0.0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_worker(
    bench: Bench,
    config_path: Path,
    tiers: list[str],
    section: str,
    profile: Path | None = None,
    profile_clock: str = "cpu",
    *,
    worker_id: str | None = None,
) -> WorkerProc:
    ready = bench.tmp / f"{section}.ready"
    log_path = bench.tmp / f"{section}.worker.log"
    cmd = [sys.executable, "-m", "bench.worker_proc", "--config", str(config_path)]
    cmd += ["--tiers", ",".join(tiers), "--ready", str(ready)]
    cmd += ["--commit-stats", str(bench.tmp / f"{section}.commits.json")]
    if profile is not None:
        cmd += ["--profile", str(profile), "--profile-clock", profile_clock]
    env = _bench_environ()
    if worker_id is not None:  # one of several processes sharing the tiers' groups
        cmd.append("--ready-share")
        env["ENSYNC_WORKER__ID"] = worker_id
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    proc = WorkerProc(
        popen=popen,
        log_path=log_path,
        started=time.time(),
        commit_stats=bench.tmp / f"{section}.commits.json",
    )
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    while not ready.exists():
        if popen.poll() is not None:
            raise RuntimeError(f"worker exited with {popen.returncode}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            stop_worker(proc)
            raise RuntimeError(f"worker not ready after {WORKER_READY_TIMEOUT_S}s:\n{proc.tail()}")
        time.sleep(0.05)
    proc.ready_at = time.time()
    proc.cpu_at_ready = _cpu_s(proc.pid) or 0.0
    log(f"worker {tiers} ready in {proc.ready_at - proc.started:.1f}s (pid {proc.pid})")
    return proc


def stop_worker(proc: WorkerProc) -> dict[str, Any]:
    info: dict[str, Any] = {}
    with contextlib.suppress(psutil.Error):
        p = psutil.Process(proc.pid)
        t = p.cpu_times()
        info["cpu_s_since_ready"] = round(t.user + t.system - proc.cpu_at_ready, 2)
        info["rss_mb_at_stop"] = round(p.memory_info().rss / 2**20, 1)
        info["threads"] = p.num_threads()
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log(f"worker {proc.pid} ignored SIGTERM for {WORKER_STOP_TIMEOUT_S}s: SIGKILL")
            proc.popen.kill()
            proc.popen.wait()
    info["exit_code"] = proc.popen.returncode
    with contextlib.suppress(OSError, ValueError):
        info["transactions"] = json.loads(proc.commit_stats.read_text())
        # Read by _commit_lateness and _turn_phases, too long to keep in the results.
        info["commit_lateness_ms"] = info["transactions"].pop("commit_lateness_ms", {})
        info["turn_phases_ms"] = info["transactions"].pop("turn_phases_ms", {})
    text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
    info["stats"] = re.findall(r"tier (\S+): worker stopped \((.*)\)", text)
    info["warnings"] = len(re.findall(r" WARNING ", text))
    info["errors"] = len(re.findall(r" (?:ERROR|CRITICAL) ", text))
    if info["errors"] or proc.popen.returncode not in (0, -signal.SIGTERM):
        info["log_tail"] = proc.tail()
    return info


def start_workers(
    bench: Bench,
    config_path: Path,
    tiers: list[str],
    section: str,
    *,
    profile: Path | None,
    profile_clock: str,
) -> list[WorkerProc]:
    """One worker process for all ``tiers``, one per tier (``--worker-per-tier``), or
    ``bench.workers`` processes that all run every tier and share its partitions."""
    if not bench.per_tier and bench.workers == 1:
        return [start_worker(bench, config_path, tiers, section, profile, profile_clock)]
    # (name suffix, tiers it runs, worker id) of each process
    layout: list[tuple[str, list[str], str | None]]
    if bench.per_tier:
        layout = [(tier, [tier], None) for tier in tiers]
    else:
        layout = [(f"w{n}", tiers, f"bench-{n}") for n in range(bench.workers)]
    procs: list[WorkerProc] = []
    try:
        for suffix, its_tiers, worker_id in layout:
            prof = profile.with_name(f"{profile.stem}-{suffix}.prof") if profile else None
            procs.append(
                start_worker(
                    bench,
                    config_path,
                    its_tiers,
                    f"{section}-{suffix}",
                    prof,
                    profile_clock,
                    worker_id=worker_id,
                )
            )
    except BaseException:
        for proc in procs:
            stop_worker(proc)
        raise
    return procs


def _cpu_sum(procs: list[WorkerProc]) -> float | None:
    values = [_cpu_s(p.pid) for p in procs]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _rss_mb(procs: list[WorkerProc]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(proc.pid).memory_info().rss / 2**20
    return round(total, 1)


# -- receiving process ------------------------------------------------------------------------


@dataclass
class ReceiverProc:
    process: Any
    stop: Any
    progress: Any
    out_path: Path
    expected: int


def start_receiver(
    bench: Bench,
    name: str,
    topics: list[str],
    expected: int,
    mode: str,
    *,
    partitions: int,
    linger_s: float = 1.0,
) -> ReceiverProc:
    ctx = mp.get_context("spawn")  # never fork a process that runs librdkafka threads
    ready, stop = ctx.Event(), ctx.Event()
    progress = ctx.Value("q", 0)
    out_path = bench.tmp / f"{name}.receiver.pickle"
    group = f"bench-{bench.run_id}-{name}-receiver"
    bench.groups.append(group)
    spec = {
        "bootstrap": bench.bootstrap,
        "group": group,
        "topics": topics,
        "partitions": partitions,
        "expected": expected,
        "mode": mode,
        "linger_s": linger_s,
        "fetch_wait_ms": bench.fetch_wait_ms,
    }
    process = ctx.Process(
        target=receive, args=(spec, ready, stop, progress, str(out_path)), name=f"recv-{name}"
    )
    process.start()
    if not ready.wait(RECEIVER_READY_TIMEOUT_S):
        stop.set()
        process.join(10)
        raise RuntimeError(f"receiver {name} not ready after {RECEIVER_READY_TIMEOUT_S}s")
    return ReceiverProc(process, stop, progress, out_path, expected)


def finish_receiver(rx: ReceiverProc, *, sending_done: float, timeout_s: float) -> dict[str, Any]:
    """Wait for the expected count (or a stall of STALL_TIMEOUT_S, or ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    last_count, last_change = -1, time.monotonic()
    while rx.process.is_alive():
        count = rx.progress.value
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        stalled = time.time() > sending_done and time.monotonic() - last_change > STALL_TIMEOUT_S
        if stalled or time.monotonic() > deadline:
            why = "stalled" if stalled else "timed out"
            log(f"receiver {why} at {count}/{rx.expected}: stopping it")
            rx.stop.set()
            break
        rx.process.join(0.2)
    rx.process.join(60)
    if rx.process.is_alive():
        rx.process.terminate()
        rx.process.join(10)
        raise RuntimeError("receiver did not exit")
    if not rx.out_path.exists():
        raise RuntimeError(f"receiver exited with {rx.process.exitcode} and no result")
    with open(rx.out_path, "rb") as fh:
        result: dict[str, Any] = pickle.load(fh)
    return result


# -- helpers ----------------------------------------------------------------------------------


def _request(i: int, delay: float, priority: int) -> DeferRequest:
    return DeferRequest(
        name=EVENT_NAME,
        payload={"seq": i, "tag": PAYLOAD_TAG},
        delay=delay,
        priority=priority,
        reason="bench",
    )


def _rate(n: int, seconds: float | None) -> float | None:
    return round(n / seconds, 1) if seconds and seconds > 0 else None


def _delivery_summary(rx: dict[str, Any], sent_ids: set[str]) -> dict[str, Any]:
    ids: set[str] = rx.pop("ids", set())
    out = {k: v for k, v in rx.items()}
    out["missing"] = len(sent_ids - ids)
    out["unexpected"] = len(ids - sent_ids)
    return out


# -- (a) raw Kafka baseline -------------------------------------------------------------------


def section_a(bench: Bench, n: int) -> dict[str, Any]:
    prefix = bench.prefix("a")
    topic = f"{prefix}.baseline"
    assert bench.admin is not None
    for future in bench.admin.create_topics(
        [NewTopic(topic, bench.partitions, 1)], operation_timeout=30
    ).values():
        future.result()
    log(f"(a) raw Kafka baseline: {n} records to {topic}")
    records = [(uuid.uuid4().hex.encode(), sample_deferral_value(i)) for i in range(n)]
    value_bytes = sum(len(v) for _, v in records) / n
    rx = start_receiver(bench, "a", [topic], n, "raw", partitions=bench.partitions)
    producer = Producer(
        {
            "bootstrap.servers": bench.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
        }
    )
    cpu0, broker0 = time.process_time(), _cpu_s(bench.broker_pid)
    t0 = time.time()
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    remaining = producer.flush(60)
    t_produced = time.time()
    cpu_produce = time.process_time() - cpu0
    if remaining:
        raise RuntimeError(f"(a) {remaining} records not acknowledged")
    live = finish_receiver(rx, sending_done=t_produced, timeout_s=300)
    broker1 = _cpu_s(bench.broker_pid)
    # A second, isolated consumer drains the full topic: the consumer's own rate.
    drain_rx = start_receiver(
        bench, "a-drain", [topic], n, "raw", partitions=bench.partitions, linger_s=0.0
    )
    drain = finish_receiver(drain_rx, sending_done=time.time(), timeout_s=300)
    e2e_s = (live["last_receive"] or t0) - t0
    drain_s = (drain["last_receive"] or drain["assigned_at"]) - drain["assigned_at"]
    result = {
        "n": n,
        "topic_partitions": bench.partitions,
        "value_bytes_mean": round(value_bytes, 1),
        "producer": "idempotent, acks=all, linger.ms=5, lz4 (DeferClient's settings)",
        "produce_s": round(t_produced - t0, 3),
        "produce_per_s": _rate(n, t_produced - t0),
        "consume_per_s": _rate(n, drain_s),
        "consume_s": round(drain_s, 3),
        "e2e_s": round(e2e_s, 3),
        "e2e_per_s": _rate(n, e2e_s),
        "received": live["received"],
        "complete": live["complete"] and drain["complete"],
        "cpu_s": {
            "producer_process": round(cpu_produce, 2),
            "receiver_process": round(live["cpu_s"], 2),
            "broker": None if broker0 is None or broker1 is None else round(broker1 - broker0, 2),
        },
    }
    log(
        f"(a) produce {result['produce_per_s']}/s, consume {result['consume_per_s']}/s, "
        f"end to end {result['e2e_per_s']}/s"
    )
    return result


# -- (b) and (c): a worker and a receiver around the sending -----------------------------------

PIPELINE_TIERS = ["1s", "10s"]


@dataclass
class PipelineRun:
    """What :func:`pipeline_run` started; ``worker_info`` is filled as it stops them."""

    workers: list[WorkerProc]
    rx: ReceiverProc
    worker_info: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def pipeline_run(
    bench: Bench,
    config: Config,
    config_path: Path,
    section: str,
    expected: int,
    *,
    profile: Path | None,
    profile_clock: str,
) -> Iterator[PipelineRun]:
    """Worker process(es) for tiers 1s and 10s and a receiving process awaiting ``expected``
    deliveries; both are stopped on the way out, whatever happened."""
    workers = start_workers(
        bench,
        config_path,
        PIPELINE_TIERS,
        section,
        profile=profile,
        profile_clock=profile_clock,
    )
    rx = None
    run = None
    try:
        rx = start_receiver(
            bench,
            section,
            TopicNames(config.prefix).queue("default"),
            expected,
            "delivered",
            partitions=config.topics.priority.partitions,
        )
        run = PipelineRun(workers=workers, rx=rx)
        yield run
    finally:
        if rx is not None and rx.process.is_alive():
            rx.stop.set()
            rx.process.join(30)
        info = [stop_worker(w) for w in workers]
        if run is not None:
            run.worker_info = info


# -- (b) deferral throughput ------------------------------------------------------------------


def section_b(
    bench: Bench,
    n: int,
    batch: int,
    *,
    seed: int,
    profile: Path | None = None,
    profile_clock: str = "cpu",
) -> dict[str, Any]:
    section = "b-profiled" if profile else "b"
    prefix = bench.prefix("bp" if profile else "b")
    config, path = bench.config(prefix, section, catchup_rate=THROUGHPUT_CATCHUP_RATE)
    ensure_topics(config)
    log(f"(b{' profiled' if profile else ''}) {n} deferrals, delays U{THROUGHPUT_DELAY_S}s")
    with pipeline_run(
        bench,
        config,
        path,
        section,
        n,
        profile=profile,
        profile_clock=profile_clock,
    ) as pipeline:
        workers = pipeline.workers
        rng = random.Random(seed)
        requests = [
            _request(i, rng.uniform(*THROUGHPUT_DELAY_S), rng.randint(1, 5)) for i in range(n)
        ]
        client = DeferClient(config)
        sent_ids: set[str] = set()
        cpu0, wcpu0, bcpu0 = time.process_time(), _cpu_sum(workers), _cpu_s(bench.broker_pid)
        t0 = time.time()
        for i in range(0, n, batch):
            for receipt in client.defer_many(requests[i : i + batch]):
                sent_ids.add(receipt.defer_id)
        t_sent = time.time()
        cpu_send = time.process_time() - cpu0
        log(f"({section}) sent {n} in {t_sent - t0:.1f}s ({n / (t_sent - t0):.0f}/s)")
        client.close()
        got = finish_receiver(pipeline.rx, sending_done=t_sent, timeout_s=max(600.0, n / 500))
        wcpu1, bcpu1 = _cpu_sum(workers), _cpu_s(bench.broker_pid)
        rss = _rss_mb(workers)
    worker_info = pipeline.worker_info
    delivered = _delivery_summary(got, sent_ids)
    commit_lateness = _commit_lateness(worker_info)
    e2e_s = (delivered["last_receive"] or t0) - t0
    first_rx = delivered["first_receive"]
    result = {
        "n": n,
        "defer_many_batch": batch,
        "delays_s": list(THROUGHPUT_DELAY_S),
        "priorities": "uniform 1..5",
        "worker_tiers": PIPELINE_TIERS,
        "worker_processes": len(workers),
        "worker_catchup_rate": THROUGHPUT_CATCHUP_RATE,
        "profiled": profile is not None,
        "send_s": round(t_sent - t0, 3),
        "send_per_s": _rate(n, t_sent - t0),
        "e2e_s": round(e2e_s, 3),
        "e2e_per_s": _rate(n, e2e_s),
        "delivery_window_per_s": _rate(
            n, (delivered["last_receive"] - first_rx) if first_rx else None
        ),
        "worker_rss_mb": rss,
        "cpu_s": {
            "client_process": round(cpu_send, 2),
            "client_us_per_deferral": round(cpu_send / n * 1e6, 1),
            "worker": _delta(wcpu0, wcpu1),
            "worker_us_per_deferral": _per(wcpu0, wcpu1, n),
            "receiver_process": round(delivered["cpu_s"], 2),
            "broker": _delta(bcpu0, bcpu1),
            "broker_us_per_deferral": _per(bcpu0, bcpu1, n),
        },
        "delivery": delivered,
        "commit_lateness_ms": commit_lateness,
        "turn_phases_ms": _turn_phases(worker_info),
        "workers": worker_info,
    }
    log(
        f"({section}) end to end {result['e2e_per_s']}/s over {e2e_s:.1f}s; "
        f"delivered {delivered['unique']}/{n}, dup {delivered['duplicates']}, "
        f"missing {delivered['missing']}"
    )
    return result


def _commit_lateness(worker_info: list[dict[str, Any]]) -> dict[str, float | None]:
    """Due time -> the worker's commit_transaction() returned, over every release of every
    worker process (histograms from bench.worker_proc, merged, then dropped from the info)."""
    values: list[float] = []
    for info in worker_info:
        for ms, count in info.pop("commit_lateness_ms", {}).items():
            values.extend([float(ms)] * count)
    return percentiles(values)


def _turn_phases(worker_info: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Where the committed turns' time went (``TurnPhases``, milliseconds), over every turn of
    every worker process (lists from bench.worker_proc, merged, then dropped from the info)."""
    merged: dict[str, list[float]] = {}
    for info in worker_info:
        for name, values in info.pop("turn_phases_ms", {}).items():
            merged.setdefault(name, []).extend(values)
    return {name: percentiles(values) for name, values in merged.items()}


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 2)


def _per(a: float | None, b: float | None, n: int) -> float | None:
    return None if a is None or b is None or not n else round((b - a) / n * 1e6, 1)


# -- (c) lateness at a fixed offered load -----------------------------------------------------


def section_c(
    bench: Bench,
    rate: int,
    seconds: float,
    *,
    seed: int,
    profile: Path | None = None,
    profile_clock: str = "cpu",
) -> dict[str, Any]:
    section = "c-profiled" if profile else "c"
    prefix = bench.prefix("cp" if profile else "c")
    config, path = bench.config(prefix, section)
    ensure_topics(config)
    total = int(rate * seconds)
    log(f"(c) lateness: {rate}/s for {seconds:.0f}s ({total} deferrals), delays U{LOAD_DELAY_S}s")
    with pipeline_run(
        bench,
        config,
        path,
        section,
        total,
        profile=profile,
        profile_clock=profile_clock,
    ) as pipeline:
        workers = pipeline.workers
        rng = random.Random(seed)
        client = DeferClient(config)
        sent_ids: set[str] = set()
        sent = 0
        max_behind = 0
        batches = 0
        wcpu0 = _cpu_sum(workers)
        t0 = time.time()
        while sent < total:
            target = min(total, int(rate * (time.time() - t0)) + 1)
            k = target - sent
            if k <= 0:
                time.sleep(PACE_TICK_S)
                continue
            max_behind = max(max_behind, k)
            reqs = [
                _request(sent + j, rng.uniform(*LOAD_DELAY_S), rng.randint(1, 5)) for j in range(k)
            ]
            for receipt in client.defer_many(reqs):
                sent_ids.add(receipt.defer_id)
            sent += k
            batches += 1
        t_sent = time.time()
        client.close()
        got = finish_receiver(pipeline.rx, sending_done=t_sent, timeout_s=seconds + 300)
        wcpu1 = _cpu_sum(workers)
        rss = _rss_mb(workers)
    worker_info = pipeline.worker_info
    delivered = _delivery_summary(got, sent_ids)
    result = {
        "profiled": profile is not None,
        "offered_rate_per_s": rate,
        "achieved_rate_per_s": _rate(total, t_sent - t0),
        "seconds": round(t_sent - t0, 2),
        "n": total,
        "delays_s": list(LOAD_DELAY_S),
        "defer_many_calls": batches,
        "max_batch": max_behind,
        "worker_tiers": PIPELINE_TIERS,
        "worker_processes": len(workers),
        "worker_catchup_rate": config.worker.catchup_rate,
        "worker_rss_mb": rss,
        "worker_cpu_s": _delta(wcpu0, wcpu1),
        "worker_cpu_share_of_one_core": (
            round((wcpu1 - wcpu0) / (time.time() - t0), 3)
            if wcpu0 is not None and wcpu1 is not None
            else None
        ),
        "delivery": delivered,
        "commit_lateness_ms": _commit_lateness(worker_info),
        "turn_phases_ms": _turn_phases(worker_info),
        "workers": worker_info,
    }
    lat = delivered["release_lateness_ms"]
    log(
        f"(c) release lateness p50 {lat['p50']} p99 {lat['p99']} max {lat['max']} ms; "
        f"early {delivered['early_release']}"
    )
    if not profile:
        result["floor"] = section_c_floor(bench, rate, seconds)
    return result


def section_c_floor(bench: Bench, rate: int, seconds: float) -> dict[str, Any]:
    """(c)'s floor (bench/floor.py) on topics of its own, once the pipeline has stopped."""
    prefix = bench.prefix("cf")
    config, _ = bench.config(prefix, "cf")
    ensure_topics(config)
    n = int(rate * seconds)
    topics = TopicNames(prefix).queue("default")
    log(f"(c) floor: a bare transactional releaser, {rate}/s for {seconds:.0f}s")
    rx = start_receiver(
        bench, "cf", topics, n, "delivered", partitions=config.topics.priority.partitions
    )
    out = bench.tmp / "cf.floor.pickle"
    spec = {"bootstrap": bench.bootstrap, "prefix": prefix, "n": n, "rate": rate}
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=floor.release, args=(spec, ready, str(out)), name="floor")
    proc.start()
    try:
        if not ready.wait(RECEIVER_READY_TIMEOUT_S):
            raise RuntimeError(f"floor releaser not ready after {RECEIVER_READY_TIMEOUT_S}s")
        proc.join(seconds + STALL_TIMEOUT_S)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
        got = finish_receiver(rx, sending_done=time.time(), timeout_s=STALL_TIMEOUT_S)
    if proc.exitcode != 0 or not out.exists():
        raise RuntimeError(f"floor releaser exited with {proc.exitcode}")
    with open(out, "rb") as fh:
        done = pickle.load(fh)
    delivered = _delivery_summary(got, {floor.floor_id(i) for i in range(n)})
    lat = delivered["release_lateness_ms"]
    log(f"(c) floor: release lateness p50 {lat['p50']} p99 {lat['p99']} max {lat['max']} ms")
    return {
        "n": n,
        "transactions": done["transactions"],
        "delivery": delivered,
        "commit_lateness_ms": percentiles(done["commit_lateness_ms"]),
    }


# -- (d) worker RSS with many held deferrals --------------------------------------------------


def _group_lag(
    admin: AdminClient, group: str, topic: str, parts: int, highs: dict[int, int]
) -> int:
    """Records of ``topic`` not yet committed by ``group`` (``highs``: the end offsets)."""
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(parts)])
    futures = admin.list_consumer_group_offsets([request], require_stable=False)
    committed = {
        tp.partition: tp.offset for tp in futures[group].result(timeout=30).topic_partitions
    }
    lag = 0
    for p in range(parts):
        c = committed.get(p, -1)
        lag += highs[p] - (c if c >= 0 else 0)
    return lag


def section_d(bench: Bench, n: int, batch: int, *, seed: int) -> dict[str, Any]:
    prefix = bench.prefix("d")
    config, path = bench.config(prefix, "d")
    ensure_topics(config)
    names = TopicNames(prefix)
    topic = names.defer("1h")
    log(f"(d) held RSS: sending {n} deferrals with delays U{HELD_DELAY_S}s to {topic}")
    rng = random.Random(seed)
    client = DeferClient(config)
    t0 = time.time()
    for i in range(0, n, batch):
        k = min(batch, n - i)
        receipts = client.defer_many(
            [_request(i + j, rng.uniform(*HELD_DELAY_S), rng.randint(1, 5)) for j in range(k)]
        )
        if receipts[0].tier != "1h":
            raise RuntimeError(f"(d) expected tier 1h, got {receipts[0].tier}")
    t_sent = time.time()
    client.close()
    log(f"(d) sent {n} in {t_sent - t0:.1f}s ({n / (t_sent - t0):.0f}/s); starting the worker")

    probe = Consumer({"bootstrap.servers": bench.bootstrap, "group.id": f"{prefix}.probe"})
    parts = config.topics.defer.partitions
    highs = {
        p: probe.get_watermark_offsets(TopicPartition(topic, p), timeout=30, cached=False)[1]
        for p in range(parts)
    }
    if sum(highs.values()) != n:
        raise RuntimeError(f"(d) {topic} holds {sum(highs.values())} records, expected {n}")
    assert bench.admin is not None
    group = f"{prefix}.worker.1h"
    worker = start_worker(bench, path, ["1h"], "d")
    peak = 0.0
    samples: list[tuple[float, float, int]] = []
    try:
        proc = psutil.Process(worker.pid)
        last_lag, last_change = n, time.monotonic()
        while True:
            rss = proc.memory_info().rss / 2**20
            peak = max(peak, rss)
            lag = _group_lag(bench.admin, group, topic, parts, highs)
            samples.append((round(time.time() - worker.ready_at, 2), round(rss, 1), lag))
            if lag != last_lag:
                last_lag, last_change = lag, time.monotonic()
            if lag == 0:
                break
            if time.monotonic() - last_change > STALL_TIMEOUT_S:
                raise RuntimeError(f"(d) intake stalled at lag {lag}:\n{worker.tail()}")
            if worker.popen.poll() is not None:
                raise RuntimeError(f"(d) worker exited:\n{worker.tail()}")
            time.sleep(0.5)
        t_intake = time.time()
        rss_intake = proc.memory_info().rss / 2**20
        time.sleep(5.0)  # let RocksDB flushes and the consumer queue settle
        mem = proc.memory_info()
        rss_settled = mem.rss / 2**20
        peak = max(peak, rss_intake, rss_settled)
    finally:
        probe.close()
        worker_info = stop_worker(worker)
    intake_s = t_intake - worker.ready_at
    result = {
        "n": n,
        "delays_s": list(HELD_DELAY_S),
        "worker_tiers": ["1h"],
        "send_s": round(t_sent - t0, 2),
        "send_per_s": _rate(n, t_sent - t0),
        "worker_start_to_ready_s": round(worker.ready_at - worker.started, 2),
        "intake_s": round(intake_s, 2),
        "intake_per_s": _rate(n, intake_s),
        "rss_mb_at_intake_done": round(rss_intake, 1),
        "rss_mb_settled": round(rss_settled, 1),
        "rss_mb_peak_sampled": round(peak, 1),
        "rss_samples_s_mb_lag": samples[:: max(1, len(samples) // 60)],
        "turn_phases_ms": _turn_phases([worker_info]),
        "worker": worker_info,
    }
    log(
        f"(d) intake of {n} took {intake_s:.1f}s ({result['intake_per_s']}/s); "
        f"RSS {rss_settled:.0f} MB (peak {peak:.0f} MB)"
    )
    return result


# -- profile ----------------------------------------------------------------------------------


def profile_report(prof_paths: list[Path], section: str, clock: str, top: int = PROFILE_TOP) -> str:
    out = io.StringIO()
    stats = pstats.Stats(*(str(p) for p in prof_paths), stream=out)
    stats.strip_dirs()
    what = "CPU time per thread (time.thread_time)" if clock == "cpu" else "elapsed time"
    out.write(
        f"# worker profile, section ({section}), tier threads merged, {what}: "
        f"top {top} cumulative\n"
    )
    stats.sort_stats("cumulative").print_stats(top)
    out.write(f"\n# same profile: top {top} by own time (tottime)\n")
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- report -----------------------------------------------------------------------------------


def _fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}" if isinstance(value, float | int) else str(value)
    return f"{text}{unit}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    mode = results["mode"]
    lines = [
        f"# ensync-kafka benchmark — {env['date']} — {env['git_sha']}"
        f"{' (uncommitted changes)' if env['git_dirty'] else ''} — {mode['name']} mode",
        "",
        f"- Machine: {env['cpu_count']} cores (os.cpu_count()), {env['memory_gb']} GB RAM, "
        f"load average at start {env['load_average_at_start'][0]} / "
        f"{env['load_average_at_start'][1]} (1 / 5 min); broker on this machine: "
        f"{'yes' if env['broker_on_this_machine'] else 'no'}",
        f"- Python {env['python']}, confluent-kafka {env['confluent_kafka']}, "
        f"librdkafka {env['librdkafka']}, Kafka {env['kafka']}, fastavro {env['fastavro']}, "
        f"rocksdict {env['rocksdict']}",
        f"- N: (a)/(b) {mode['n']:,}; (c) {mode['load_rate']:,}/s for {mode['load_seconds']:.0f} s;"
        f" (d) {mode['held']:,} held; defer_many batch {mode['batch']:,}; "
        f"{results['partitions']} partitions per defer/priority topic; (b)/(c) worker: "
        f"{_layout(results)}",
        f"- Wall time of the run: {results.get('wall_s', 0):.0f} s",
        "",
        "| figure | measured | target | result |",
        "|---|---|---|---|",
    ]
    rows: list[tuple[str, str, str, str]] = []
    s = results["sections"]
    a = s.get("a")
    if a:
        rows += [
            ("(a) raw Kafka produce, records/s", _fmt(a["produce_per_s"]), "—", ""),
            ("(a) raw Kafka consume, records/s", _fmt(a["consume_per_s"]), "—", ""),
            ("(a) raw Kafka end to end, records/s", _fmt(a["e2e_per_s"]), "—", ""),
            ("(a) record value size, bytes", _fmt(a["value_bytes_mean"]), "—", ""),
        ]
    b = s.get("b")
    if b:
        full_n = mode["name"] == "full"
        ok = b["e2e_per_s"] is not None and b["e2e_per_s"] >= TARGET_E2E_PER_S
        d = b["delivery"]
        rows += [
            (
                "(b) deferrals/s end to end (first send → last receipt)",
                _fmt(b["e2e_per_s"]),
                f"≥ {TARGET_E2E_PER_S:,}",
                _verdict(ok if full_n else None),
            ),
            (
                "(b) ratio to raw Kafka end to end",
                _fmt(100 * b["e2e_per_s"] / a["e2e_per_s"], " %", 1)
                if a and a["e2e_per_s"] and b["e2e_per_s"]
                else "n/a",
                "—",
                "",
            ),
            ("(b) client send rate (defer_many), deferrals/s", _fmt(b["send_per_s"]), "—", ""),
            (
                "(b) delivery rate, first → last receipt, deferrals/s",
                _fmt(b["delivery_window_per_s"]),
                "—",
                "",
            ),
            (
                "(b) CPU µs per deferral: client / worker / broker",
                f"{_fmt(b['cpu_s']['client_us_per_deferral'])} / "
                f"{_fmt(b['cpu_s']['worker_us_per_deferral'])} / "
                f"{_fmt(b['cpu_s']['broker_us_per_deferral'])}",
                "—",
                "",
            ),
            (
                "(b) delivered once: unique / duplicates / missing",
                f"{d['unique']:,} / {d['duplicates']} / {d['missing']}",
                f"{b['n']:,} / 0 / 0",
                _verdict(d["unique"] == b["n"] and not d["duplicates"] and not d["missing"]),
            ),
        ]
    c = s.get("c")
    if c:
        d = c["delivery"]
        rel, rec = d["release_lateness_ms"], d["receive_lateness_ms"]
        p99_ok = rel["p99"] is not None and rel["p99"] <= TARGET_LATENESS_P99_MS
        max_ok = rel["max"] is not None and rel["max"] <= TARGET_LATENESS_MAX_MS
        rows += [
            (
                "(c) offered load achieved, deferrals/s",
                _fmt(c["achieved_rate_per_s"]),
                f"{TARGET_LOAD_PER_S:,}",
                "",
            ),
            ("(c) release lateness p50 (delivered_at - due_at)", _fmt(rel["p50"], " ms"), "—", ""),
            (
                "(c) release lateness p99",
                _fmt(rel["p99"], " ms"),
                f"≤ {TARGET_LATENESS_P99_MS:.0f} ms",
                _verdict(p99_ok),
            ),
            (
                "(c) release lateness max",
                _fmt(rel["max"], " ms"),
                f"≤ {TARGET_LATENESS_MAX_MS:.0f} ms",
                _verdict(max_ok),
            ),
            (
                "(c) commit lateness p50 / p99 / max (the worker's commit returned - due_at)",
                " / ".join(_fmt(c["commit_lateness_ms"][k], "", 0) for k in ("p50", "p99"))
                + f" / {_fmt(c['commit_lateness_ms']['max'], ' ms', 0)}",
                "—",
                "",
            ),
            (
                "(c) receive lateness p50 / p99 / max (receive - due_at)",
                f"{_fmt(rec['p50'], '', 1)} / {_fmt(rec['p99'], '', 1)} / "
                f"{_fmt(rec['max'], ' ms', 1)}",
                "—",
                "",
            ),
            *_phase_rows(c.get("turn_phases_ms")),
            *_floor_rows(c.get("floor")),
            (
                "(c) early: released / received before due",
                f"{d['early_release']} / {d['early_receive']}",
                "0",
                _verdict(d["early_release"] == 0 and d["early_receive"] == 0),
            ),
            (
                "(c) delivered once: unique / duplicates / missing",
                f"{d['unique']:,} / {d['duplicates']} / {d['missing']}",
                f"{c['n']:,} / 0 / 0",
                _verdict(d["unique"] == c["n"] and not d["duplicates"] and not d["missing"]),
            ),
        ]
    dd = s.get("d")
    if dd:
        full_held = dd["n"] >= TARGET_HELD
        rows += [
            (
                f"(d) worker RSS with {dd['n']:,} held (settled)",
                _fmt(dd["rss_mb_settled"], " MB"),
                f"≤ {TARGET_RSS_MB:.0f} MB with {TARGET_HELD:,}",
                _verdict(dd["rss_mb_settled"] <= TARGET_RSS_MB if full_held else None),
            ),
            ("(d) worker RSS peak during intake", _fmt(dd["rss_mb_peak_sampled"], " MB"), "—", ""),
            (
                "(d) intake time (worker ready → group lag 0)",
                f"{_fmt(dd['intake_s'], ' s', 1)} ({_fmt(dd['intake_per_s'])}/s)",
                "—",
                "",
            ),
            (
                "(d) client send of the held deferrals, deferrals/s",
                _fmt(dd["send_per_s"]),
                "—",
                "",
            ),
        ]
    bp = s.get("b_profiled")
    if bp:
        rows.append(
            (
                "(b, worker under cProfile) deferrals/s end to end — not a target figure",
                _fmt(bp["e2e_per_s"]),
                "—",
                "",
            )
        )
    cp = s.get("c_profiled")
    if cp:
        rel = cp["delivery"]["release_lateness_ms"]
        rows.append(
            (
                "(c, worker under cProfile) release lateness p50 / p99 / max — not a target",
                f"{_fmt(rel['p50'])} / {_fmt(rel['p99'])} / {_fmt(rel['max'], ' ms')}",
                "—",
                "",
            )
        )
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    notes = [
        "",
        "Notes:",
        f"- (b) runs the worker with `worker.catchup_rate = {THROUGHPUT_CATCHUP_RATE:,.0f}` so the "
        "overdue-backlog cap does not throttle the throughput test; (c) and (d) use the "
        "default configuration.",
        "- (b) end to end includes the deferrals' own delays (up to "
        f"{THROUGHPUT_DELAY_S[1]:.0f} s) after the last send: with small N this tail dominates.",
        "- Quick mode judges only (c), at the target rate for 5 s instead of 20 s; (b) and (d) "
        "are judged in full mode only (N and the held count are too small to mean anything).",
    ]
    if results.get("errors"):
        notes.append(f"- Sections that failed: {', '.join(results['errors'])} (see the JSON).")
    if results.get("profile_file"):
        notes.append(f"- Worker profile (same directory): `{results['profile_file']}`")
    return "\n".join(lines + notes) + "\n"


def _floor_rows(f: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    if not f:
        return []
    d = f["delivery"]
    rel, com, rec = d["release_lateness_ms"], f["commit_lateness_ms"], d["receive_lateness_ms"]

    def three(q: dict[str, Any]) -> str:
        return f"{_fmt(q['p50'])} / {_fmt(q['p99'])} / {_fmt(q['max'], ' ms')}"

    once = d["unique"] == f["n"] and not d["duplicates"] and not d["missing"]
    return [
        (
            "(c) floor, same load and run (bench/floor.py): release / commit / receive lateness "
            "p50 / p99 / max",
            f"{three(rel)}; {three(com)}; {three(rec)}",
            "—",
            "" if once else f"**{d['unique']:,} unique, {d['missing']} missing**",
        )
    ]


def _phase_rows(phases: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    if not phases or "turn" not in phases:
        return []
    names = [n for n in phases if n != "turn"] + ["turn"]
    return [
        (
            "(c) a worker turn, p50 / p99 ms (`TurnPhases`): " + ", ".join(names),
            ", ".join(
                f"{_fmt(phases[n]['p50'], '', 1)} / {_fmt(phases[n]['p99'], '', 1)}" for n in names
            ),
            "—",
            "",
        )
    ]


def _layout(results: dict[str, Any]) -> str:
    if results.get("worker_per_tier"):
        return "one process per tier"
    n = results.get("workers", 1)
    return "one process" if n == 1 else f"{n} processes, each running every tier"


def _json_default(value: Any) -> Any:
    if isinstance(value, set | tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


# -- main -------------------------------------------------------------------------------------


def _bootstrap(arg: str | None) -> str:
    if arg:
        return arg
    if os.environ.get("ENSYNC_KAFKA_BOOTSTRAP"):
        return os.environ["ENSYNC_KAFKA_BOOTSTRAP"]
    from ensync_kafka.localbroker import running_bootstrap

    found = running_bootstrap()
    if not found:
        raise SystemExit(
            "no broker: pass --bootstrap, export ENSYNC_KAFKA_BOOTSTRAP, or run "
            "`ensync-kafka broker start`"
        )
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small N, about a minute in all")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="b",
        choices=("b", "c"),
        default=None,
        help="also run section (b) (or the one named) once more with the worker under "
        "cProfile, and write its top functions to the results directory",
    )
    parser.add_argument(
        "--profile-clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="what the profile counts: each thread's CPU time [cpu], or elapsed time",
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help="subset of a,b,c,d [all]")
    parser.add_argument(
        "--worker-per-tier",
        action="store_true",
        help="(b) and (c): one worker process per tier instead of one process for both",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="(b) and (c): this many worker processes, each running every tier, sharing the "
        "partitions through the tiers' consumer groups [1]",
    )
    parser.add_argument("--bootstrap", default=None, help="[$ENSYNC_KAFKA_BOOTSTRAP]")
    parser.add_argument("--n", type=int, default=None, help="records for (a) and (b)")
    parser.add_argument("--held", type=int, default=None, help="held deferrals for (d)")
    parser.add_argument("--load-seconds", type=float, default=None, help="duration of (c)")
    parser.add_argument("--load-rate", type=int, default=None, help="offered load of (c)")
    parser.add_argument("--batch", type=int, default=None, help="defer_many batch size")
    parser.add_argument(
        "--partitions", type=int, default=PARTITIONS, help="per defer and priority topic [6]"
    )
    parser.add_argument(
        "--priority-partitions", type=int, default=None, help="per priority topic [--partitions]"
    )
    parser.add_argument(
        "--audit-partitions", type=int, default=None, help="of the audit topic [the default, 3]"
    )
    parser.add_argument(
        "--fetch-wait-ms",
        type=int,
        default=50,
        help="fetch.wait.max.ms of the receiving consumer [50]",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--kafka-version", default=None, help="when the broker is remote")
    parser.add_argument(
        "--git-sha", default=None, help="label results with this commit (exported trees)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-save", action="store_true", help="print only; write no files")
    parser.add_argument("--keep-topics", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    mode = Mode(
        base.name,
        n=args.n or base.n,
        load_seconds=args.load_seconds or base.load_seconds,
        load_rate=args.load_rate or base.load_rate,
        held=args.held or base.held,
        batch=args.batch or base.batch,
    )
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"a", "b", "c", "d"}
    if unknown:
        raise SystemExit(f"unknown sections: {sorted(unknown)}")
    bootstrap = _bootstrap(args.bootstrap)
    broker_pid = _listener_pid(bootstrap)
    env = environment(bootstrap, broker_pid, args.kafka_version, args.git_sha)
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="ensync-bench-"))
    bench = Bench(
        bootstrap=bootstrap,
        partitions=args.partitions,
        tmp=tmp,
        broker_pid=broker_pid,
        fetch_wait_ms=args.fetch_wait_ms,
        priority_partitions=args.priority_partitions,
        audit_partitions=args.audit_partitions,
        workers=args.workers,
        per_tier=args.worker_per_tier,
    )
    log(
        f"{mode.name} mode on {bootstrap} ({env['cpu_count']} cores, Kafka {env['kafka']}); "
        f"run {bench.run_id}; temp {tmp}"
    )
    results: dict[str, Any] = {
        "environment": env,
        "mode": mode.__dict__,
        "partitions": args.partitions,
        "worker_per_tier": args.worker_per_tier,
        "workers": args.workers,
        "receiver_fetch_wait_ms": args.fetch_wait_ms,
        "sections": {},
        "errors": [],
    }
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    suffix = "" if mode.name == "full" else f"-{mode.name}"
    if args.partitions != PARTITIONS:
        suffix += f"-partitions{args.partitions}"
    if args.priority_partitions:
        suffix += f"-priority{args.priority_partitions}"
    if args.audit_partitions:
        suffix += f"-audit{args.audit_partitions}"
    if args.worker_per_tier:
        suffix += "-per-tier"
    elif args.workers > 1:
        suffix += f"-workers{args.workers}"
    if sorted(sections) != list(SECTIONS):  # a partial run never overwrites a full one
        suffix += "-" + "".join(sorted(sections))
    stem = f"{stamp}-{env['git_sha']}{suffix}"
    runs: list[tuple[str, Any]] = []
    if "a" in sections:
        runs.append(("a", lambda: section_a(bench, mode.n)))
    if "b" in sections:
        runs.append(("b", lambda: section_b(bench, mode.n, mode.batch, seed=args.seed)))
    if "c" in sections:
        runs.append(
            (
                "c",
                lambda: section_c(bench, mode.load_rate, mode.load_seconds, seed=args.seed),
            )
        )
    if "d" in sections:
        runs.append(("d", lambda: section_d(bench, mode.held, 10_000, seed=args.seed)))
    prof_path = tmp / f"worker-{args.profile}.prof"
    clock = args.profile_clock
    if args.profile == "b":
        runs.append(
            (
                "b_profiled",
                lambda: section_b(
                    bench,
                    mode.n,
                    mode.batch,
                    seed=args.seed,
                    profile=prof_path,
                    profile_clock=clock,
                ),
            )
        )
    elif args.profile == "c":
        runs.append(
            (
                "c_profiled",
                lambda: section_c(
                    bench,
                    mode.load_rate,
                    mode.load_seconds,
                    seed=args.seed,
                    profile=prof_path,
                    profile_clock=clock,
                ),
            )
        )
    try:
        for name, run in runs:
            try:
                results["sections"][name] = run()
            except Exception as exc:  # record and go on: one section must not hide the others
                log(f"section {name} failed: {exc!r}")
                results["errors"].append(name)
                results["sections"][f"{name}_error"] = repr(exc)
        prof_files = sorted(tmp.glob(f"{prof_path.stem}*.prof"))
        if args.profile and prof_files:
            text = profile_report(prof_files, args.profile, clock)
            if args.no_save:
                print(text)
            else:
                args.results_dir.mkdir(parents=True, exist_ok=True)
                out = args.results_dir / f"{stem}-worker-profile-{args.profile}.txt"
                out.write_text(text)
                results["profile_file"] = out.name
                log(f"worker profile: {out}")
    finally:
        bench.cleanup(args.keep_topics)
        shutil.rmtree(tmp, ignore_errors=True)
    results["wall_s"] = round(time.time() - started, 1)
    report = markdown(results)
    print(report)
    if not args.no_save:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / f"{stem}.md").write_text(report)
        (args.results_dir / f"{stem}.json").write_text(
            json.dumps(results, indent=2, default=_json_default) + "\n"
        )
        log(f"wrote {args.results_dir / stem}.md and .json")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
