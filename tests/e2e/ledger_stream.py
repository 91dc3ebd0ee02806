"""A stream of deferrals sent while a test disturbs the workers or the brokers under them, and
the worker processes of one test: what the exactly-once ledgers in ``tests/e2e`` share.

A stream has random delays (0.5-4 s) and priorities over two tiers; afterwards every defer_id
must be delivered exactly once, never early, to a read_committed consumer of the priority topics
(``tests.helpers.collect_ledger``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from ensync_kafka import BrokerError, DeferClient, DeferRequest, PriorityConsumer
from ensync_kafka.config import Config
from ensync_kafka.hanging import HangingReport
from ensync_kafka.models import to_ms
from ensync_kafka.topics import TopicNames
from tests.e2e.hanging_recovery import recover
from tests.helpers import (
    FAST_GROUP_CLIENT,
    ConsumerThread,
    Ledger,
    TopicReader,
    WorkerProcess,
    collect_ledger,
    consumer_state,
    wait_until,
)

TIERS = ("1s", "10s")
DEFERRALS = 3000
CHUNKS = 12
CHUNK_INTERVAL_S = 0.5
LEDGER_TIMEOUT_S = 90.0
SEND_ATTEMPTS = 3


class Workers:
    """Worker processes of one test, all on one config; ``workers()`` closes them."""

    def __init__(self, bootstrap: str, config_path: Path, log_dir: Path) -> None:
        self.bootstrap, self.config_path, self.log_dir = bootstrap, config_path, log_dir
        self.started: list[WorkerProcess] = []

    def start(self, worker_id: str, state_dir: Path) -> WorkerProcess:
        proc = WorkerProcess(
            self.bootstrap,
            self.config_path,
            worker_id=worker_id,
            state_dir=state_dir,
            log_dir=self.log_dir,
        )
        self.started.append(proc)
        return proc


@contextmanager
def workers(bootstrap: str, config_path: Path, log_dir: Path) -> Iterator[Workers]:
    group = Workers(bootstrap, config_path, log_dir)
    try:
        yield group
    finally:
        for proc in group.started:
            proc.close()


def stream(
    client: DeferClient,
    reader: TopicReader,
    on_chunk: Callable[[int], None],
    *,
    seed: int,
) -> dict[str, int]:
    """Send DEFERRALS deferrals in CHUNKS chunks, CHUNK_INTERVAL_S apart; defer_id -> due ms.

    ``on_chunk(i)`` runs after chunk i is acknowledged: that is where a test disturbs workers.
    """
    rng = random.Random(seed)
    expected: dict[str, int] = {}
    per_chunk = DEFERRALS // CHUNKS
    for chunk in range(CHUNKS):
        started = time.monotonic()
        requests = [
            DeferRequest(
                name="ledger",
                payload={"chunk": chunk, "i": i},
                delay=round(rng.uniform(0.5, 4.0), 3),
                priority=rng.randint(1, 5),
                defer_id=f"c{chunk:02d}-{i:04d}",
            )
            for i in range(per_chunk)
        ]
        expected.update(send_until_acknowledged(client, requests))
        on_chunk(chunk)
        while time.monotonic() - started < CHUNK_INTERVAL_S:
            reader.poll_once(0.05)
    assert len(expected) == DEFERRALS
    return expected


def send_until_acknowledged(client: DeferClient, requests: list[DeferRequest]) -> dict[str, int]:
    """defer_id -> due ms, sending again as a caller does when the broker does not acknowledge
    in time (a stall outlasting DeferClient's acknowledgement timeout): the same requests, so the
    same defer_ids and tiers, and the worker drops whatever copy comes second. That copy may be
    the first send's, due earlier than the receipts say: after a re-send, the due time expected
    is the earliest any copy can have (sent at ``sent_ms`` at the earliest)."""
    sent_ms = to_ms(datetime.now(UTC))
    for attempt in range(SEND_ATTEMPTS):
        try:
            receipts = client.defer_many(requests)
        except BrokerError:
            if attempt == SEND_ATTEMPTS - 1:
                raise
            continue
        if attempt == 0:
            return {r.defer_id: to_ms(r.due_at) for r in receipts}
        return {r.defer_id: sent_ms + round(r.delay * 1000) for r in requests if r.defer_id}
    raise AssertionError("unreachable")


def delivered_count(reader: TopicReader) -> int:
    return len(reader.records)


def ride_out(
    bootstrap: str,
    config: Config,
    config_path: Path,
    tmp_path: Path,
    outage: Callable[[WorkerProcess], None],
    *,
    seed: int,
    describe: Callable[[], str],
    kafka_hung: Callable[[], HangingReport | None] | None = None,
) -> Ledger:
    """One worker process and a PriorityConsumer through a stream that ``outage`` disturbs once,
    in its middle and after the first deliveries: the same worker process must deliver every
    deferral, and the consumer handle each (at least once). The ledger is returned for the
    caller to check exactly once; ``describe`` says what a failure message needs.

    ``kafka_hung()`` says what hangs where the broker left a transaction open that no client
    can mend (hanging_recovery): the stream is then recovered as ``topics hanging`` says, with a
    new worker process, and the ledger must hold all the same."""
    handled: set[str] = set()
    consumer = PriorityConsumer(config, consumer_settings=FAST_GROUP_CLIENT)
    with (
        workers(bootstrap, config_path, tmp_path) as procs,
        TopicReader(bootstrap, TopicNames(config.prefix).queue("default")) as reader,
        DeferClient(config) as client,
        ConsumerThread(consumer, lambda event: handled.add(event.defer_id)) as consuming,
    ):
        worker = procs.start(config.worker.id, tmp_path / "state")
        worker.wait_assigned(TIERS)

        def disturb(chunk: int) -> None:
            if chunk == CHUNKS // 2:
                reader.poll_until(
                    lambda records: len(records) > 0, timeout=30, what="the first deliveries"
                )
                outage(worker)

        expected = stream(client, reader, disturb, seed=seed)
        hung = (lambda: kafka_hung() is not None) if kafka_hung is not None else None
        ledger = collect_ledger(
            bootstrap, [], expected, timeout=LEDGER_TIMEOUT_S, reader=reader, stalled=hung
        )
        report = kafka_hung() if kafka_hung is not None and ledger.missing else None
        if report is not None:
            print(f"Kafka left transactions hanging, recovering: {report.hanging}", flush=True)
            state_dir = tmp_path / "state"
            recover(config, bootstrap, report, stop_workers=worker.stop, state_dir=state_dir)
            worker = procs.start(config.worker.id, state_dir)
            ledger = collect_ledger(
                bootstrap, [], expected, timeout=LEDGER_TIMEOUT_S, reader=reader
            )
        assert worker.proc.poll() is None, worker.log()[-3000:]
        assert not ledger.missing, (
            f"{ledger.summary()}; {reader.state()}; {describe()}; "
            f"the worker's log:\n{worker.log()[-6000:]}"
        )
        wait_until(
            lambda: consuming.alive() and expected.keys() <= handled,
            timeout=LEDGER_TIMEOUT_S,
            what="the consumer to handle every event",
            describe=lambda: (
                f"{len(expected.keys() - handled)} not handled, on "
                f"{ledger.where(expected.keys() - handled, consumer.group, bootstrap)}; "
                f"{consumer_state(consumer)}; {consuming.stack()}"
            ),
        )
    return ledger
