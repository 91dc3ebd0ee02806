"""The demo behind ``make demo``: real deferrals through a real broker and a worker process.

Uses ``$ENSYNC_KAFKA_BOOTSTRAP`` when set, else starts (or reuses) the local broker. Creates
topics under a fresh prefix, starts ``ensync-kafka worker`` as a child process, defers a handful
of events with different delays, priorities and reasons, prints each as it arrives on its
priority topic with its lateness, then stops the worker and removes what it created.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from .client import DeferClient
from .codec import DELIVERED
from .config import ENV_BOOTSTRAP, Config, config_from_mapping
from .localbroker import LocalBroker
from .models import DeliveredEvent, Receipt, now_ms
from .topics import TopicNames, ensure_topics, topic_specs

READY_TIMEOUT_S = 90.0
DELIVERY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

_Event = tuple[str, dict[str, Any], float, int, str]
"""name, payload, delay (s), priority, reason"""

EVENTS: list[_Event] = [
    ("webhook.deliver", {"url": "https://hooks.example/orders"}, 0.5, 3, "HTTP 503: retry"),
    ("email.send", {"to": "ana@example.com"}, 1.0, 1, "provider rate limit: 10/s"),
    ("payment.capture", {"order": 1041}, 2.0, 5, "gateway timeout: backoff attempt 2"),
    ("fraud.review", {"order": 1042}, 2.0, 4, "wait for more signals"),
    ("inventory.sync", {"sku": "A-17"}, 3.5, 2, "load shedding: non-critical"),
    ("report.generate", {"day": "2026-11-22"}, 6.0, 3, "scheduled: nightly report"),
    ("cart.expire", {"cart": 77}, 12.0, 2, "scheduled: cart expiry"),
]
SCHEDULED: _Event = (
    "invoice.send",
    {"invoice": "F-2026-118"},
    4.0,
    5,
    "scheduled: send at 09:00 local",
)
LONG: _Event = ("trial.expiry", {"account": 311}, 2 * 3600.0, 2, "trial ends in two hours")
"""Held in the top tier: shown by ``upcoming``, then cancelled by the demo."""


def _say(text: str) -> None:
    print(text, flush=True)


class _WorkerProcess:
    """``ensync-kafka worker`` as a child, its log watched for each tier's assignment."""

    def __init__(self, config_file: Path, tiers: tuple[str, ...], env: dict[str, str]) -> None:
        self.tiers = tiers
        self.assigned: set[str] = set()
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ensync_kafka", "worker", "--config", str(config_file)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            for tier in self.tiers:
                if f"tier {tier}: assigned" in line:
                    self.assigned.add(tier)
            if self.assigned >= set(self.tiers):
                self.ready.set()
            if " ERROR " in line or " WARNING " in line:
                print(f"  [worker] {line.rstrip()}", file=sys.stderr, flush=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.lines[-20:])
                raise SystemExit(f"the worker did not become ready:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _broker() -> tuple[str, LocalBroker | None]:
    bootstrap = os.environ.get(ENV_BOOTSTRAP)
    if bootstrap:
        _say(f"Kafka: {bootstrap} (from {ENV_BOOTSTRAP})")
        return bootstrap, None
    broker = LocalBroker()
    info, started = broker.start()
    _say(f"Kafka: local broker at {info.bootstrap} ({'started' if started else 'already running'})")
    return info.bootstrap, broker if started else None


def _send(config: Config) -> tuple[list[Receipt], Receipt]:
    """The demo's deferrals, and the long one it cancels at the end. The client lives only
    here, so its connections are gone before the broker stops."""
    with DeferClient(config) as client:
        receipts = [
            client.defer(name, payload, delay=delay, priority=prio, reason=reason)
            for name, payload, delay, prio, reason in EVENTS
        ]
        name, payload, delay, prio, reason = SCHEDULED
        at = datetime.now(tz=UTC) + timedelta(seconds=delay)
        receipts.append(client.schedule(name, payload, at=at, priority=prio, reason=reason))
        name, payload, delay, prio, reason = LONG
        long = client.defer(name, payload, delay=delay, priority=prio, reason=reason)
    return receipts, long


def _subscribe(config: Config) -> Consumer:
    """A read_committed consumer of the priority topics, assigned before anything is sent."""
    consumer = Consumer(
        {
            **config.kafka.client_settings(),
            "group.id": f"{config.prefix}.demo",
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe(TopicNames(config.prefix).queue(config.queues[0]))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise SystemExit("the demo consumer got no partitions")
        consumer.poll(0.05)
    return consumer


class _Arrivals(threading.Thread):
    """Reads the priority topics and stamps each arrival as it comes, so the demo's own
    commands in the meantime cannot distort the lateness it reports."""

    def __init__(self, consumer: Consumer, receipts: list[Receipt]) -> None:
        super().__init__(daemon=True)
        self.consumer = consumer
        self.expected = {r.defer_id for r in receipts}
        self.started = time.monotonic()
        self.lines: list[str] = []
        self.early = 0
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        try:
            while self.expected and time.monotonic() < deadline:
                msg = self.consumer.poll(0.02)
                if msg is None or msg.error() is not None:
                    continue
                received = now_ms()
                event = DeliveredEvent.from_record(DELIVERED.decode(msg.value()))
                self.expected.discard(event.defer_id)
                lateness = received - int(event.due_at.timestamp() * 1000)
                self.early += lateness < 0
                self.lines.append(
                    f"  +{time.monotonic() - self.started:5.2f}s  {event.name:<16} "
                    f"{msg.topic():<28} tier {event.tier:<3}  late {lateness:>4} ms  "
                    f"reason: {event.reason}"
                )
        finally:
            self.consumer.close()
            self.done.set()

    def print_all(self) -> None:
        shown = 0
        while not (self.done.is_set() and shown == len(self.lines)):
            for line in self.lines[shown:]:
                _say(line)
                shown += 1
            time.sleep(0.05)
        if self.expected:
            raise SystemExit(f"{len(self.expected)} deferrals not delivered in time")


def _command(config_file: Path, env: dict[str, str], *args: str) -> None:
    """Run an ``ensync-kafka`` command and show its output, as a user would see it."""
    _say(f"\n$ ensync-kafka {' '.join(args)}")
    result = subprocess.run(
        [sys.executable, "-m", "ensync_kafka", *args, "--config", str(config_file)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    _say((result.stdout + result.stderr).rstrip())


def _cleanup(config: Config) -> None:
    admin = AdminClient(config.kafka.client_settings())
    futures = admin.delete_topics([s.name for s in topic_specs(config)], operation_timeout=30)
    for future in futures.values():
        future.result()


def main() -> None:
    bootstrap, started_broker = _broker()
    workdir = Path(tempfile.mkdtemp(prefix="ensync-demo-"))
    prefix = f"demo-{uuid.uuid4().hex[:6]}"
    settings = {
        "prefix": prefix,
        "worker": {"id": "demo-worker", "state_dir": str(workdir / "state")},
        "topics": {"defer": {"partitions": 3}, "priority": {"partitions": 3}},
    }
    config_file = workdir / "ensync.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    env = {**os.environ, ENV_BOOTSTRAP: bootstrap}
    config = config_from_mapping(settings, environ=env)
    worker: _WorkerProcess | None = None
    try:
        report = ensure_topics(config)
        _say(f"Topics: {len(report.created)} created under prefix {prefix!r}")
        worker = _WorkerProcess(config_file, config.tier_names, env)
        worker.wait_ready()
        _say(f"Worker: pid {worker.proc.pid}, tiers {', '.join(config.tier_names)}, ready")
        consumer = _subscribe(config)
        receipts, long = _send(config)
        arrivals = _Arrivals(consumer, receipts)
        arrivals.start()
        _say(f"\nDeferred {len(receipts) + 1} events; each was durable before defer() returned.")
        _command(config_file, env, "status")
        _command(config_file, env, "upcoming")
        _say("\nDelivered (read_committed consumer of the priority topics; late = received - due):")
        arrivals.print_all()
        _say(f"All {len(receipts)} delivered once, {arrivals.early} early.")
        _command(config_file, env, "cancel", long.defer_id, "--reason", "customer upgraded")
    finally:
        if worker is not None:
            worker.stop()
        _cleanup(config)
        shutil.rmtree(workdir, ignore_errors=True)
        if started_broker is not None:
            started_broker.stop()
            _say("Local broker stopped.")


if __name__ == "__main__":
    main()
