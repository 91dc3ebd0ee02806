"""What a Kafka transaction costs per partition it touches, on the broker at hand.

    .venv/bin/python -m bench.txn_probe [--bootstrap HOST:PORT] [--rounds 200]

A tier worker's turn is one transaction writing every priority, changelog and audit partition
its releases and intake land on (up to ~40 with 6 partitions per topic). This probe times that
shape of transaction with nothing else running, to separate the broker's and the client's share
from the worker's:

* **idempotent produce**: one record to each of P partitions, then ``flush()``, no transaction.
  librdkafka sends one ProduceRequest per partition (confluentinc/librdkafka#1700) and an
  idempotent producer keeps at most 5 in flight per broker, so P partitions take ~P/5 round trips.
* **transaction**: ``begin``, 3 records to each of P partitions, ``flush`` (this includes the
  AddPartitionsToTxn round trip), ``send_offsets_to_transaction``, ``commit_transaction``: each
  phase's median, and the whole transaction's p50/p99. Two producers alternate, as the worker's do.
* **lanes**: the same P partitions split between L producers whose transactions run at once (one
  thread each): the time until all L committed, i.e. what a worker committing each tier
  partition's releases in a transaction of its own would wait per turn.
* **paced lanes**: records falling due at ``--rate``/s for ``--seconds`` over 30 partitions (the
  five priority topics of 6 partitions), released by L independent loops (one thread each) that
  own the partitions ``p % L == k``, as tier partitions keyed like the priority topics would.
  Each loop, as soon as something of its own is due, produces it, sends a consumer offset and
  commits, alternating two producers: the commit lateness (commit returned - due) of a bare
  keyed-layout releaser under load. The row "5 partitions, 1 lane" is the same load on topics of
  one partition.

Prints a markdown table; every topic and consumer group it makes is deleted at the end.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ensync_kafka._txn import TRANSACTIONAL_PRODUCER_SETTINGS
from ensync_kafka.models import now_ms

from .floor import due_runs
from .receiver import percentiles
from .run import resolve_bootstrap

VALUE = b"x" * 200
RECORDS_PER_PARTITION = 3
TIMEOUT_S = 30.0
PACED_START_MS = 1000
"""The first paced record falls due this long after its producers are ready."""
PRIORITY_TOPICS = 5
PRIORITY_PARTITIONS = PRIORITY_TOPICS * 6
"""Five priority topics of 6 partitions, as one topic: a transaction costs per partition."""


def _ms(seconds: float) -> float:
    return seconds * 1000


class Probe:
    def __init__(self, bootstrap: str, width: int) -> None:
        self.bootstrap = bootstrap
        self.run = uuid.uuid4().hex[:8]
        self.topic = f"txn-probe-{self.run}"
        self.source = f"{self.topic}-src"
        self.group = f"txn-probe-{self.run}"
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        for future in self.admin.create_topics(
            [NewTopic(self.topic, width, 1), NewTopic(self.source, width, 1)]
        ).values():
            future.result()
        # A group member's metadata, so send_offsets_to_transaction does what the worker's does.
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": self.group})
        self.consumer.subscribe([self.source])
        deadline = time.monotonic() + TIMEOUT_S
        while not self.consumer.assignment() and time.monotonic() < deadline:
            self.consumer.poll(0.1)
        self.metadata = self.consumer.consumer_group_metadata()
        self._producers = 0

    def producer(self, **extra: Any) -> Producer:
        self._producers += 1
        return Producer(
            {"bootstrap.servers": self.bootstrap, **TRANSACTIONAL_PRODUCER_SETTINGS, **extra}
        )

    def transactional(self) -> Producer:
        producer = self.producer(**{"transactional.id": f"{self.group}-{self._producers}"})
        producer.init_transactions(TIMEOUT_S)
        return producer

    def idempotent_flush(self, partitions: int, rounds: int) -> list[float]:
        producer = self.producer(**{"enable.idempotence": True})
        producer.produce(self.topic, VALUE, partition=0)
        producer.flush(TIMEOUT_S)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for p in range(partitions):
                producer.produce(self.topic, VALUE, partition=p)
            producer.flush(TIMEOUT_S)
            times.append(_ms(time.perf_counter() - start))
        return times

    def _stage(self, producer: Producer, partitions: range) -> None:
        producer.begin_transaction()
        for _ in range(RECORDS_PER_PARTITION):
            for p in partitions:
                producer.produce(self.topic, VALUE, partition=p)

    def _finish(self, producer: Producer, lane: int, offset: int) -> tuple[float, float, float]:
        start = time.perf_counter()
        producer.flush(TIMEOUT_S)
        flushed = time.perf_counter()
        offsets = [TopicPartition(self.source, lane, offset)]
        producer.send_offsets_to_transaction(offsets, self.metadata, TIMEOUT_S)
        sent = time.perf_counter()
        producer.commit_transaction(TIMEOUT_S)
        return _ms(flushed - start), _ms(sent - flushed), _ms(time.perf_counter() - sent)

    def transactions(self, partitions: int, rounds: int) -> dict[str, Any]:
        producers = [self.transactional(), self.transactional()]
        phases, totals = [], []
        for n in range(rounds):
            start = time.perf_counter()
            producer = producers[n % 2]
            self._stage(producer, range(partitions))
            phases.append(self._finish(producer, 0, n))
            totals.append(_ms(time.perf_counter() - start))
        flush, offsets, commit = (statistics.median(x) for x in zip(*phases, strict=True))
        return {"flush": flush, "offsets": offsets, "commit": commit, **percentiles(totals)}

    def lanes(self, partitions: int, lanes: int, rounds: int) -> list[float]:
        share = partitions // lanes
        producers = [[self.transactional(), self.transactional()] for _ in range(lanes)]
        times = []
        with ThreadPoolExecutor(lanes) as pool:
            for n in range(rounds):
                start = time.perf_counter()
                futures = []
                for lane in range(lanes):
                    producer = producers[lane][n % 2]
                    self._stage(producer, range(lane * share, (lane + 1) * share))
                    futures.append(pool.submit(self._finish, producer, lane, n))
                for future in futures:
                    future.result()
                times.append(_ms(time.perf_counter() - start))
        return times

    def paced(self, partitions: int, lanes: int, rate: int, seconds: float) -> list[float]:
        """Commit lateness (ms) of every record released by ``lanes`` paced loops."""
        producers = [[self.transactional(), self.transactional()] for _ in range(lanes)]
        for producer in (p for pair in producers for p in pair):
            producer.list_topics(self.topic, timeout=TIMEOUT_S)
        rng = random.Random(partitions * 100 + lanes)
        start = now_ms() + PACED_START_MS
        due = [
            (start + i * 1000 // rate, rng.randrange(partitions))
            for i in range(int(rate * seconds))
        ]

        def lane(k: int) -> list[float]:
            mine = [(d, p) for d, p in due if p % lanes == k]
            lateness: list[float] = []
            for turns, (i, j, _) in enumerate(due_runs([d for d, _ in mine])):
                producer = producers[k][turns % 2]
                producer.begin_transaction()
                for _, p in mine[i:j]:
                    producer.produce(self.topic, VALUE, partition=p)
                offsets = [TopicPartition(self.source, k, turns)]
                producer.send_offsets_to_transaction(offsets, self.metadata, TIMEOUT_S)
                producer.commit_transaction(TIMEOUT_S)
                committed = now_ms()
                lateness.extend(committed - d for d, _ in mine[i:j])
            return lateness

        with ThreadPoolExecutor(lanes) as pool:
            return [ms for part in pool.map(lane, range(lanes)) for ms in part]

    def close(self) -> None:
        self.consumer.close()
        for future in self.admin.delete_topics([self.topic, self.source]).values():
            future.result()
        for future in self.admin.delete_consumer_groups([self.group]).values():
            future.result()


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default=None, help="[$ENSYNC_KAFKA_BOOTSTRAP]")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--partitions", default="1,8,20,40", help="partitions per transaction")
    parser.add_argument("--lanes", default="1,2,3,6", help="lane counts splitting 36 partitions")
    parser.add_argument("--paced-lanes", default="1,3,6", help="lane counts of the paced releaser")
    parser.add_argument("--rate", type=int, default=5000, help="paced records/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="paced duration")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.partitions.split(",")]
    lane_counts = [int(s) for s in args.lanes.split(",")]
    probe = Probe(resolve_bootstrap(args.bootstrap), max(*sizes, 36))
    fmt: Callable[[Any], str] = "{:.1f}".format
    try:
        print(_row("partitions", "idempotent produce, flush p50", "txn: flush / offsets / commit "
                   "(p50 each)", "txn p50", "txn p99"))  # fmt: skip
        print(_row(*["---"] * 5))
        for size in sizes:
            flush = probe.idempotent_flush(size, args.rounds)
            txn = probe.transactions(size, args.rounds)
            phases = " / ".join(fmt(txn[k]) for k in ("flush", "offsets", "commit"))
            p50 = percentiles(flush)["p50"]
            print(_row(size, fmt(p50), phases, fmt(txn["p50"]), fmt(txn["p99"])))
        print()
        print(_row("36 partitions in L concurrent transactions", "round p50", "p90", "p99"))
        print(_row(*["---"] * 4))
        for lanes in lane_counts:
            q = percentiles(probe.lanes(36, lanes, args.rounds))
            print(_row(f"L = {lanes}", *(fmt(q[k]) for k in ("p50", "p90", "p99"))))
        print()
        print(_row(f"paced, {args.rate}/s for {args.seconds:g} s", "commit lateness p50", "p99",
                   "max"))  # fmt: skip
        print(_row(*["---"] * 4))
        runs = [(PRIORITY_PARTITIONS, int(s)) for s in args.paced_lanes.split(",") if s]
        for partitions, lanes in [*runs, (PRIORITY_TOPICS, 1)]:
            q = percentiles(probe.paced(partitions, lanes, args.rate, args.seconds))
            label = f"{partitions} partitions, {lanes} lane{'s' if lanes > 1 else ''}"
            print(_row(label, *(fmt(q[k]) for k in ("p50", "p99", "max"))))
    finally:
        probe.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
