"""The four sections: (a) raw Kafka, (b) throughput, (c) lateness at load, (d) held RSS."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import pickle
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ensync_kafka import DeferClient, TopicNames, ensure_topics
from ensync_kafka.config import Config

from . import floor
from .common import (
    HELD_DELAY_S,
    LOAD_DELAY_S,
    PACE_TICK_S,
    RECEIVER_READY_TIMEOUT_S,
    STALL_TIMEOUT_S,
    THROUGHPUT_CATCHUP_RATE,
    THROUGHPUT_DELAY_S,
    Bench,
    delivery_summary,
    log,
    rate_per_s,
    sample_request,
)
from .machine import cpu_s
from .procs import (
    ReceiverProc,
    WorkerProc,
    cpu_sum,
    finish_receiver,
    rss_mb,
    start_receiver,
    start_worker,
    start_workers,
    stop_worker,
)
from .receiver import percentiles
from .samples import sample_deferral_value

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
    cpu0, broker0 = time.process_time(), cpu_s(bench.broker_pid)
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
    broker1 = cpu_s(bench.broker_pid)
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
        "produce_per_s": rate_per_s(n, t_produced - t0),
        "consume_per_s": rate_per_s(n, drain_s),
        "consume_s": round(drain_s, 3),
        "e2e_s": round(e2e_s, 3),
        "e2e_per_s": rate_per_s(n, e2e_s),
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
            sample_request(i, rng.uniform(*THROUGHPUT_DELAY_S), rng.randint(1, 5)) for i in range(n)
        ]
        client = DeferClient(config)
        sent_ids: set[str] = set()
        cpu0, wcpu0, bcpu0 = time.process_time(), cpu_sum(workers), cpu_s(bench.broker_pid)
        t0 = time.time()
        for i in range(0, n, batch):
            for receipt in client.defer_many(requests[i : i + batch]):
                sent_ids.add(receipt.defer_id)
        t_sent = time.time()
        cpu_send = time.process_time() - cpu0
        log(f"({section}) sent {n} in {t_sent - t0:.1f}s ({n / (t_sent - t0):.0f}/s)")
        client.close()
        got = finish_receiver(pipeline.rx, sending_done=t_sent, timeout_s=max(600.0, n / 500))
        wcpu1, bcpu1 = cpu_sum(workers), cpu_s(bench.broker_pid)
        rss = rss_mb(workers)
    worker_info = pipeline.worker_info
    delivered = delivery_summary(got, sent_ids)
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
        "send_per_s": rate_per_s(n, t_sent - t0),
        "e2e_s": round(e2e_s, 3),
        "e2e_per_s": rate_per_s(n, e2e_s),
        "delivery_window_per_s": rate_per_s(
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
        wcpu0 = cpu_sum(workers)
        t0 = time.time()
        while sent < total:
            target = min(total, int(rate * (time.time() - t0)) + 1)
            k = target - sent
            if k <= 0:
                time.sleep(PACE_TICK_S)
                continue
            max_behind = max(max_behind, k)
            reqs = [
                sample_request(sent + j, rng.uniform(*LOAD_DELAY_S), rng.randint(1, 5))
                for j in range(k)
            ]
            for receipt in client.defer_many(reqs):
                sent_ids.add(receipt.defer_id)
            sent += k
            batches += 1
        t_sent = time.time()
        client.close()
        got = finish_receiver(pipeline.rx, sending_done=t_sent, timeout_s=seconds + 300)
        wcpu1 = cpu_sum(workers)
        rss = rss_mb(workers)
    worker_info = pipeline.worker_info
    delivered = delivery_summary(got, sent_ids)
    result = {
        "profiled": profile is not None,
        "offered_rate_per_s": rate,
        "achieved_rate_per_s": rate_per_s(total, t_sent - t0),
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
    delivered = delivery_summary(got, {floor.floor_id(i) for i in range(n)})
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
            [sample_request(i + j, rng.uniform(*HELD_DELAY_S), rng.randint(1, 5)) for j in range(k)]
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
        "send_per_s": rate_per_s(n, t_sent - t0),
        "worker_start_to_ready_s": round(worker.ready_at - worker.started, 2),
        "intake_s": round(intake_s, 2),
        "intake_per_s": rate_per_s(n, intake_s),
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
