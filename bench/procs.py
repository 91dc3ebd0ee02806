"""The worker and receiving processes around a section's sending."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .common import (
    RECEIVER_READY_TIMEOUT_S,
    ROOT,
    STALL_TIMEOUT_S,
    WORKER_READY_TIMEOUT_S,
    WORKER_STOP_TIMEOUT_S,
    Bench,
    bench_environ,
    log,
)
from .machine import cpu_s
from .receiver import receive

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
    env = bench_environ()
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
    proc.cpu_at_ready = cpu_s(proc.pid) or 0.0
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


def cpu_sum(procs: list[WorkerProc]) -> float | None:
    values = [cpu_s(p.pid) for p in procs]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def rss_mb(procs: list[WorkerProc]) -> float:
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
