"""Shared helpers for the pipeline tests: configs, bounded waits, a worker in a thread, readers.

Everything here talks to a real Kafka broker; nothing is mocked. Every wait is a bounded polling
loop that fails with a message saying what it was waiting for.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from ensync_kafka._kafka import STRANDED_REPORTS, BrokerWatch, retire
from ensync_kafka.codec import AUDIT, DEFERRAL, DELIVERED, INVALID
from ensync_kafka.config import Config, config_from_mapping
from ensync_kafka.consumer import PriorityConsumer
from ensync_kafka.models import DeliveredEvent, now_ms
from ensync_kafka.runner import Worker
from ensync_kafka.topics import TopicNames

T = TypeVar("T")

POLL_S = 0.2
WORKER_READY_TIMEOUT_S = 60.0
WORKER_STOP_TIMEOUT_S = 30.0
CONSUMER_STOP_S = 30.0
STALL_CHECK_S = 5.0
FAST_GROUP_CLIENT = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
"""Group clients whose session ends quickly (the broker's minimum is 6 s): a killed worker's
membership lingers only that long, and a broker outage past it loses the assignment."""
FAST_GROUP_WORKER = {"session_timeout": FAST_GROUP_CLIENT["session.timeout.ms"] / 1000}
"""The same for tier workers, whose group session is ``worker.session_timeout``."""
COMMITTED_TIMEOUT_S = 10.0
DEFAULT_TIERS = ({"name": "1s", "span": 1}, {"name": "10s", "span": 10})


# -- configuration --------------------------------------------------------------------------------


def pipeline_mapping(
    prefix: str,
    bootstrap: str,
    state_dir: Path,
    *,
    worker_id: str = "w1",
    tiers: Iterable[Mapping[str, Any]] = DEFAULT_TIERS,
    partitions: int = 3,
    queues: Iterable[str] | None = None,
    worker: Mapping[str, Any] | None = None,
    client: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config mapping every pipeline test starts from: own topics, few partitions."""
    data: dict[str, Any] = {
        "prefix": prefix,
        "kafka": {"bootstrap_servers": bootstrap},
        "worker": {"state_dir": str(state_dir), "id": worker_id, **(worker or {})},
        "tiers": [dict(t) for t in tiers],
        "topics": {
            "defer": {"partitions": partitions},
            "priority": {"partitions": partitions},
            "audit": {"partitions": 1},
            "invalid": {"partitions": 1},
            "dead": {"partitions": 1},
        },
    }
    if "monitor" in Config.model_fields:
        # The worker's HTTP server is not what these tests are about, and several workers of
        # one test would fight over its default port.
        data["monitor"] = {"port": 0}
    if queues is not None:
        data["queues"] = list(queues)
    if client:
        data["kafka"]["client"] = dict(client)
    return data


def pipeline_config(prefix: str, bootstrap: str, state_dir: Path, **kwargs: Any) -> Config:
    return config_from_mapping(pipeline_mapping(prefix, bootstrap, state_dir, **kwargs), environ={})


def raw_deferral(defer_id: str, **changes: Any) -> bytes:
    """A Deferral's bytes as the client writes them, due 200 ms after now."""
    now = now_ms()
    record = {
        "defer_id": defer_id,
        "name": "raw",
        "payload": b"{}",
        "content_type": "application/json",
        "key": None,
        "headers": [],
        "priority": 1,
        "queue": "default",
        "deferred_at": now,
        "due_at": now + 200,
        "reason": "",
        "attempt": 1,
        "history": [],
    }
    return DEFERRAL.encode({**record, **changes})


def kafka_script(line: str) -> tuple[str, list[str]]:
    """A printed ``kafka-<tool>.sh ARGS`` command as (tool, ARGS), for ``broker tool``."""
    script, *args = line.split()
    return script.removeprefix("kafka-").removesuffix(".sh"), args


OPEN_TXN_TIMEOUT_MS = 120_000
"""A test's transaction left open is not ended by its coordinator for this long."""


def transactional_producer(bootstrap: str) -> Producer:
    """A transactional producer with an id of its own, ready to begin a transaction that a test
    leaves open (a hanging transaction, as a broker restart can leave one)."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"test-{uuid.uuid4().hex}",
            "transaction.timeout.ms": OPEN_TXN_TIMEOUT_MS,
        }
    )
    producer.init_transactions(30)
    return producer


# -- waiting --------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail the test
    after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() >= deadline:
            detail = f": {describe()}" if describe else f"; last: {result!r}"
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)
    return result


# -- an in-process worker -------------------------------------------------------------------------


class WorkerThread:
    """``Worker(config, tiers).run(install_signal_handlers=False)`` in a thread.

    ``start()`` returns once every tier worker has restored and holds its partitions;
    ``stop()`` stops it, joins the thread and re-raises anything the worker raised.
    """

    def __init__(self, config: Config, tiers: Iterable[str] | None = None, **kwargs: Any):
        self.worker = Worker(config, list(tiers) if tiers is not None else None, **kwargs)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run(install_signal_handlers=False)
        except BaseException as exc:
            self.error = exc

    def ready(self) -> bool:
        if self.error is not None or not self._thread.is_alive():
            raise AssertionError(f"the worker stopped before it was ready: {self.error!r}")
        return all(tier.stores for tier in self.worker.tiers)

    def start(self, timeout: float = WORKER_READY_TIMEOUT_S) -> WorkerThread:
        self._thread.start()
        wait_until(
            self.ready,
            timeout=timeout,
            what="every tier worker to be assigned and restored",
            describe=lambda: ", ".join(
                f"{t.tier.name}: {sorted(t.stores)}" for t in self.worker.tiers
            ),
        )
        return self

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT_S) -> None:
        self.worker.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"the worker did not stop within {timeout:.0f}s of stop()")
        if self.error is not None:
            raise self.error

    def stats(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for tier in self.worker.tiers:
            for name in ("accepted", "delivered", "duplicates", "invalid", "aborts"):
                totals[name] += getattr(tier.stats, name)
        return dict(totals)

    def __enter__(self) -> WorkerThread:
        return self.start()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.stop()
        else:  # the test already failed: stop, but do not mask its error
            self.worker.stop()
            self._thread.join(WORKER_STOP_TIMEOUT_S)


def strand(watch: BrokerWatch) -> None:
    """Make ``watch`` report its client stranded, as librdkafka's statistics do after librdkafka
    #5301: only the logical coordinator handle is left (tests/unit/test_stranded_clients.py)."""
    logical = {"name": "GroupCoordinator", "nodeid": -1, "source": "logical"}
    stats = json.dumps({"brokers": {"GroupCoordinator": {**logical, "state": "TRY_CONNECT"}}})
    for _ in range(STRANDED_REPORTS):
        watch.report(stats)


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block, as a stalled broker is: requests to it hang
    instead of being refused. Resumed whatever the block raises."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class ConsumerThread:
    """``PriorityConsumer.run`` in a thread; ``stop()`` re-raises what it raised."""

    def __init__(self, consumer: PriorityConsumer, handler: Callable[[DeliveredEvent], Any]):
        self.consumer = consumer
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(handler,), daemon=True)

    def _run(self, handler: Callable[[DeliveredEvent], Any]) -> None:
        try:
            self.consumer.run(handler, install_signal_handlers=False)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def alive(self) -> bool:
        if self.error is not None:
            raise AssertionError(f"the consumer failed: {self.error!r}") from self.error
        return self._thread.is_alive()

    def stack(self) -> str:
        """Where the consumer's thread is now, for a failure message: polling, or stuck."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        if frame is None:
            return "the consumer thread has ended"
        return "the consumer thread is at:\n" + "".join(traceback.format_stack(frame)[-8:])

    def __enter__(self) -> ConsumerThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.stop()
        self._thread.join(CONSUMER_STOP_S)
        assert not self._thread.is_alive(), "the consumer did not stop"
        if self.error is not None and exc[0] is None:
            raise self.error


def short_tp(topic: str, partition: int) -> str:
    """``p3[1]`` for ``<prefix>.<queue>.p3`` partition 1: for failure messages."""
    return f"{topic.rsplit('.', 1)[-1]}[{partition}]"


def consumer_state(consumer: PriorityConsumer) -> str:
    """What a PriorityConsumer holds, for a failure message: why it is not handling more."""

    def tps(keys: Iterable[tuple[str, int]]) -> list[str]:
        return sorted(short_tp(*key) for key in keys)

    buffered = {p: len(b) for p, b in consumer._buffers.items() if b}
    group = consumer._watch.group or {}
    group_state = {k: group.get(k) for k in ("state", "stateage", "join_state", "rebalance_age")}
    return (
        f"assigned {tps(consumer._assigned)}, at end {tps(consumer._eof)}, "
        f"paused {tps(consumer._paused)}, buffered {buffered}, {consumer.stats}, "
        f"librdkafka group {group_state}, brokers {consumer._watch.brokers}"
    )


# -- reading topics -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_ms: int
    received_ms: int


class TopicReader:
    """A ``read_committed`` consumer assigned to every partition of ``topics`` from the start.

    No consumer group membership (assign, not subscribe), so reading starts at once. Watched as
    the product's consumers are (BrokerWatch): one stranded by a broker's restart (librdkafka
    #5301) is replaced and reads on after the last record it got.
    """

    def __init__(self, bootstrap: str, topics: Iterable[str]) -> None:
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.records: list[Received] = []
        self.replaced = 0
        self._next: dict[tuple[str, int], int] = {}
        self.consumer = self._new_consumer()
        metadata = self.consumer.list_topics(timeout=30).topics
        self._partitions: list[tuple[str, int]] = []
        for topic in self.topics:
            if topic not in metadata or metadata[topic].error is not None:
                raise AssertionError(f"topic {topic} does not exist")
            self._partitions.extend((topic, p) for p in metadata[topic].partitions)
        self._assign()

    def _new_consumer(self) -> Consumer:
        self._watch = BrokerWatch("test reader")
        return Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"test-reader-{uuid.uuid4().hex[:8]}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 50,
                **self._watch.settings({}),
            }
        )

    def _assign(self) -> None:
        self.consumer.assign(
            [
                TopicPartition(t, p, self._next.get((t, p), OFFSET_BEGINNING))
                for t, p in self._partitions
            ]
        )

    def state(self) -> str:
        """For a failure message: what the reader knows of its broker."""
        return f"reader replaced {self.replaced} times, brokers {self._watch.brokers}"

    def poll_once(self, timeout: float = POLL_S) -> None:
        if self._watch.stranded:
            stranded, self.consumer = self.consumer, self._new_consumer()
            self.replaced += 1
            self._assign()
            retire(stranded, "test reader")
        for msg in self.consumer.consume(1000, timeout):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            received = Received(
                topic=msg.topic(),
                partition=msg.partition(),
                offset=msg.offset(),
                key=msg.key(),
                value=msg.value(),
                headers=tuple(msg.headers() or ()),
                timestamp_ms=msg.timestamp()[1],
                received_ms=now_ms(),
            )
            self.records.append(received)
            self._next[(received.topic, received.partition)] = received.offset + 1

    def poll_until(
        self,
        done: Callable[[list[Received]], bool],
        *,
        timeout: float,
        what: str,
        describe: Callable[[list[Received]], str] | None = None,
    ) -> list[Received]:
        deadline = time.monotonic() + timeout
        while not done(self.records):
            if time.monotonic() >= deadline:
                detail = describe(self.records) if describe else f"{len(self.records)} records"
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; got {detail}")
            self.poll_once()
        return self.records

    def drain(self, seconds: float) -> list[Received]:
        """Keep reading for ``seconds`` more, to catch records that should not come."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll_once(min(POLL_S, max(0.0, deadline - time.monotonic())))
        return self.records

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Delivery:
    event: DeliveredEvent
    record: Received


def delivered(records: Iterable[Received]) -> list[Delivery]:
    return [Delivery(DeliveredEvent.from_record(DELIVERED.decode(r.value)), r) for r in records]


def audit_records(records: Iterable[Received]) -> list[dict[str, Any]]:
    return [AUDIT.decode(r.value) for r in records]


def invalid_records(records: Iterable[Received]) -> list[dict[str, Any]]:
    return [INVALID.decode(r.value) for r in records]


def queue_reader(bootstrap: str, prefix: str, queue: str = "default") -> TopicReader:
    return TopicReader(bootstrap, TopicNames(prefix).queue(queue))


# -- the exactly-once ledger ----------------------------------------------------------------------


@dataclass
class Ledger:
    """Every delivery seen, by defer_id, against the ids that were deferred."""

    expected: dict[str, int]
    """defer_id -> due_at (ms)."""
    deliveries: dict[str, list[Delivery]] = field(default_factory=dict)
    rereads: int = 0
    """Records the reader returned again (the same offset): the reader's doing, not a second
    delivery."""
    _seen: set[tuple[str, int, int]] = field(default_factory=set)

    def add(self, delivery: Delivery) -> None:
        r = delivery.record
        if (r.topic, r.partition, r.offset) in self._seen:
            self.rereads += 1
            return
        self._seen.add((r.topic, r.partition, r.offset))
        self.deliveries.setdefault(delivery.event.defer_id, []).append(delivery)

    @property
    def missing(self) -> list[str]:
        return sorted(i for i in self.expected if i not in self.deliveries)

    @property
    def duplicated(self) -> dict[str, int]:
        return {i: len(d) for i, d in self.deliveries.items() if len(d) > 1}

    @property
    def unexpected(self) -> list[str]:
        return sorted(i for i in self.deliveries if i not in self.expected)

    @property
    def early(self) -> list[str]:
        """Delivered (stamped, or seen by the reader) before they were due."""
        out = []
        for defer_id, deliveries in self.deliveries.items():
            for d in deliveries:
                due = self.expected.get(defer_id, int(d.event.due_at.timestamp() * 1000))
                delivered_ms = int(d.event.delivered_at.timestamp() * 1000)
                if delivered_ms < due or d.record.received_ms < due:
                    out.append(defer_id)
        return sorted(out)

    def lateness_ms(self) -> list[int]:
        return sorted(
            int(d.event.delivered_at.timestamp() * 1000) - self.expected[i]
            for i, ds in self.deliveries.items()
            if i in self.expected
            for d in ds
        )

    def summary(self) -> str:
        return (
            f"{len(self.expected)} deferred, {len(self.deliveries)} distinct delivered, "
            f"{len(self.missing)} missing (e.g. {self.missing[:5]}), "
            f"{len(self.duplicated)} duplicated (e.g. {self._copies(list(self.duplicated)[:5])}), "
            f"{len(self.unexpected)} unexpected, {len(self.early)} early "
            f"(e.g. {self.early[:5]}), {self.rereads} read again"
        )

    def _copies(self, ids: Iterable[str]) -> dict[str, list[str]]:
        """Where each delivery of ``ids`` sits, and when its turn stamped it."""
        return {
            i: [
                f"{d.record.topic}[{d.record.partition}]@{d.record.offset} "
                f"{d.event.delivered_at.timestamp():.3f}"
                for d in self.deliveries[i]
            ]
            for i in ids
        }

    def where(self, ids: Iterable[str], group: str | None = None, bootstrap: str = "") -> str:
        """Where the deliveries of ``ids`` sit (per partition: how many, first and last offset)
        and, given a consumer group, its committed offsets there: for a failure message."""
        offsets: dict[tuple[str, int], list[int]] = {}
        for defer_id in ids:
            for d in self.deliveries.get(defer_id, []):
                offsets.setdefault((d.record.topic, d.record.partition), []).append(d.record.offset)
        committed: dict[tuple[str, int], int] = {}
        if group is not None and offsets:
            consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
            try:
                tps = [TopicPartition(t, p) for t, p in offsets]
                found = consumer.committed(tps, timeout=COMMITTED_TIMEOUT_S)
                committed = {(tp.topic, tp.partition): tp.offset for tp in found}
            except KafkaException as exc:
                return f"{sorted(offsets)} (committed offsets: {exc})"
            finally:
                consumer.close()
        return ", ".join(
            f"{short_tp(t, p)} {len(o)} at {min(o)}-{max(o)}"
            + (f" (committed {committed[(t, p)]})" if (t, p) in committed else "")
            for (t, p), o in sorted(offsets.items())
        )

    def assert_exactly_once(self) -> None:
        problems = self.missing or self.duplicated or self.unexpected or self.early
        assert not problems, f"exactly-once ledger violated: {self.summary()}"


def collect_ledger(
    bootstrap: str,
    topics: Iterable[str],
    expected: Mapping[str, int],
    *,
    timeout: float,
    drain_s: float = 3.0,
    reader: TopicReader | None = None,
    stalled: Callable[[], bool] | None = None,
) -> Ledger:
    """Read ``topics`` (read_committed) until every expected id was delivered, ``timeout``
    passed or ``stalled()`` (asked every STALL_CHECK_S) says nothing more will come, then
    ``drain_s`` seconds more to catch duplicates."""
    ledger = Ledger(expected=dict(expected))
    own = reader is None
    reader = reader or TopicReader(bootstrap, topics)
    seen = 0
    try:
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + STALL_CHECK_S
        while ledger.missing and time.monotonic() < deadline:
            if stalled is not None and time.monotonic() >= next_check:
                if stalled():
                    break
                next_check = time.monotonic() + STALL_CHECK_S
            reader.poll_once()
            for record in reader.records[seen:]:
                ledger.add(delivered([record])[0])
            seen = len(reader.records)
        reader.drain(drain_s)
        for record in reader.records[seen:]:
            ledger.add(delivered([record])[0])
    finally:
        if own:
            reader.close()
    return ledger


# -- processes ------------------------------------------------------------------------------------


def cli_env(bootstrap: str) -> dict[str, str]:
    """The environment for an ``ensync-kafka`` process: no stray ENSYNC_* from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSYNC_")}
    env["ENSYNC_KAFKA_BOOTSTRAP"] = bootstrap
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ensync_kafka", *args]


CLI_STOP_TIMEOUT_S = 30.0
STACK_DUMP_WAIT_S = 2.0


class CliProcess:
    """A long-running ``ensync-kafka`` process whose stderr lines are collected as they come.

    :meth:`stop` never leaves it running: one that does not exit in time is asked for its
    threads' stacks (SIGUSR1, see the CLI), killed, and the test fails with its last lines."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: Path | None = None,
        *,
        sigint_ignored: bool = False,
    ) -> None:
        """``sigint_ignored``: start it as a non-interactive shell starts a background job,
        with SIGINT ignored (which a process inherits)."""
        self.lines: list[str] = []
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint_ignored else None
        try:
            self.proc = subprocess.Popen(
                cli_command(*args),
                env=env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        finally:
            if sigint_ignored:
                signal.signal(signal.SIGINT, previous)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in list(self.lines) if regex.search(line)]

    def wait_for(self, pattern: str, times: int = 1, timeout: float = 60.0) -> str:
        """Wait until ``pattern`` has appeared ``times`` times; the last such line."""

        def seen() -> bool:
            if self.proc.poll() is not None:
                tail = "\n".join(self.lines[-20:])
                raise AssertionError(f"exited {self.proc.returncode} early:\n{tail}")
            return len(self.matching(pattern)) >= times

        wait_until(
            seen,
            timeout=timeout,
            what=f"{times} x {pattern!r}",
            describe=lambda: "\n".join(self.lines[-10:]),
        )
        return self.matching(pattern)[-1]

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(CLI_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(STACK_DUMP_WAIT_S)
            self.proc.kill()
            self.proc.wait()
            self._reader.join(CLI_STOP_TIMEOUT_S)
            tail = "\n".join(self.lines[-80:])
            pytest.fail(
                f"{self.proc.args!r} did not exit within {CLI_STOP_TIMEOUT_S:.0f}s of "
                f"{sig.name}; its threads then, and its last lines:\n{tail}"
            )
        finally:
            self._reader.join(CLI_STOP_TIMEOUT_S)
            assert self.proc.stderr is not None
            self.proc.stderr.close()


def write_config(path: Path, mapping: Mapping[str, Any], *, with_bootstrap: bool = False) -> Path:
    """Write a config YAML for a CLI process; the bootstrap comes from the environment unless
    ``with_bootstrap``."""
    import yaml

    data = json.loads(json.dumps(mapping))  # plain types only
    if not with_bootstrap:
        data.get("kafka", {}).pop("bootstrap_servers", None)
        if not data.get("kafka"):
            data.pop("kafka", None)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class WorkerProcess:
    """``ensync-kafka worker`` as a real process, its stderr in a log file."""

    def __init__(
        self,
        bootstrap: str,
        config_path: Path,
        *,
        worker_id: str,
        state_dir: Path,
        log_dir: Path,
        tiers: Iterable[str] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.log_path = log_dir / f"worker-{worker_id}-{uuid.uuid4().hex[:6]}.log"
        args = ["worker", "--config", str(config_path), "--worker-id", worker_id]
        args += ["--state-dir", str(state_dir)]
        if tiers is not None:
            args += ["--tiers", ",".join(tiers)]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cli_command(*args),
            env=cli_env(bootstrap),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def assigned_tiers(self) -> set[str]:
        return set(re.findall(r"tier (\S+): assigned \[", self.log()))

    def wait_assigned(self, tiers: Iterable[str], timeout: float = WORKER_READY_TIMEOUT_S) -> None:
        wanted = set(tiers)

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"worker {self.worker_id} exited with {self.proc.returncode}:\n"
                    + self.log()[-3000:]
                )
            return wanted <= self.assigned_tiers()

        wait_until(
            ready,
            timeout=timeout,
            interval=0.1,
            what=f"worker {self.worker_id} to be assigned partitions of {sorted(wanted)}",
            describe=lambda: self.log()[-3000:],
        )

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"worker {self.worker_id} still running {timeout:.0f}s after the signal:\n"
                + self.log()[-3000:]
            )

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT_S) -> int:
        """SIGTERM, as a supervisor stops it; its exit code."""
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def close(self) -> None:
        """Kill it if it still runs (this test started it) and close the log."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()
