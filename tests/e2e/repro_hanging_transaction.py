"""Reproduce a hanging transaction and check the recovery ``topics hanging`` prints (not a test:
it takes several tries, about 40 s each).

    python -m tests.e2e.repro_hanging_transaction --runs 20 [--hangs 1]

Each try streams deferrals through one worker process on a broker of its own and restarts that
broker in the middle, as the outage e2e test did before it held the worker across the restart.
A single broker that stops or starts while completing a commit can skip its markers (README,
"A single broker's restart can leave a hanging transaction"): then the stream stalls. The
script then follows what ``ensync-kafka topics hanging`` prints, with Kafka's own tools run by
``ensync-kafka broker tool``: stop the worker, abort every hanging transaction and republish
what the aborts hid of committed turns, remove the state directory, rewind the tier groups, start
a worker again; and checks the exactly-once ledger.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from ensync_kafka import DeferClient, ensure_topics
from ensync_kafka._kafkadist import tool_command
from ensync_kafka.config import config_from_mapping
from ensync_kafka.hanging import OFFSETS_TOPIC, find_hanging, plan_repairs
from ensync_kafka.localbroker import LocalBroker
from ensync_kafka.republish import republish
from ensync_kafka.topics import TopicNames
from tests.e2e.ledger_stream import CHUNKS, TIERS, stream
from tests.e2e.test_pipeline_exactly_once import skipped_markers
from tests.helpers import (
    TopicReader,
    WorkerProcess,
    collect_ledger,
    kafka_script,
    pipeline_mapping,
    write_config,
)

SETTLE_S = 60.0
"""How long the stream gets to finish before the transactions still open count as hanging."""
HANGING_AFTER_S = 15.0
TOOL_TIMEOUT_S = 120.0
ABORT_ROUNDS = 5


def kafka_tool(line: str) -> None:
    """Run a printed ``kafka-<tool>.sh ...`` command with Kafka's tool from the broker's jars."""
    result = subprocess.run(
        tool_command(*kafka_script(line)), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )
    print(f"  $ {line}\n    exit {result.returncode}: {result.stdout.strip()[-300:]}", flush=True)


def attempt(seed: int, root: Path) -> bool:
    """One try; True once a hanging transaction was found (and the recovery checked)."""
    broker = LocalBroker.ephemeral()
    info, _ = broker.start()
    worker: WorkerProcess | None = None
    try:
        bootstrap = info.bootstrap
        prefix = f"r{uuid.uuid4().hex[:8]}"
        work = root / prefix
        work.mkdir()
        mapping = pipeline_mapping(prefix, bootstrap, work / "state", worker_id="steady")
        config_path = write_config(work / "ensync.yaml", mapping)
        config = config_from_mapping(mapping, environ={})
        ensure_topics(config)
        queue = TopicNames(prefix).queue("default")

        def start_worker() -> WorkerProcess:
            proc = WorkerProcess(
                bootstrap, config_path, worker_id="steady", state_dir=work / "state", log_dir=work
            )
            proc.wait_assigned(TIERS)
            return proc

        worker = start_worker()
        with TopicReader(bootstrap, queue) as reader, DeferClient(config) as client:

            def restart(chunk: int) -> None:
                if chunk == CHUNKS // 2:
                    reader.poll_until(lambda r: len(r) > 0, timeout=30, what="first deliveries")
                    broker.restart()

            expected = stream(client, reader, restart, seed=seed)
        ledger = collect_ledger(bootstrap, queue, expected, timeout=SETTLE_S)
        report = find_hanging(config, max_age_s=HANGING_AFTER_S)
        print(
            f"try {seed}: {len(ledger.missing)} not delivered, "
            f"{len(skipped_markers(broker))} skipped-marker lines in the broker log, "
            f"{len(report.hanging)} hanging",
            flush=True,
        )
        if not report.hanging:
            return False
        repairs = plan_repairs(config, report)
        worker.signal(signal.SIGTERM)
        worker.wait_exit(60)
        ranges: dict[tuple[str, int], tuple[int, int]] = {}
        hanging = report.hanging
        for _ in range(ABORT_ROUNDS):  # an abort can uncover another open transaction behind it
            for txn in hanging:
                kafka_tool(txn.abort_command(bootstrap))
                start, end = ranges.get((txn.topic, txn.partition), (txn.start_offset, 0))
                ranges[(txn.topic, txn.partition)] = (start, max(end, txn.end_offset))
            hanging = find_hanging(config, max_age_s=HANGING_AFTER_S).hanging
            if not hanging:
                break
        print(f"  hanging after the aborts: {hanging}", flush=True)
        for (topic, partition), (start, end) in sorted(ranges.items()):
            if topic != OFFSETS_TOPIC:
                again = republish(config, topic, partition, start, end)
                print(f"  republished {topic}[{partition}]: {again}", flush=True)
        shutil.rmtree(work / "state")
        for repair in repairs:
            for line in repair.commands(bootstrap):
                kafka_tool(line)
        worker = start_worker()
        ledger = collect_ledger(bootstrap, queue, expected, timeout=SETTLE_S)
        print(f"  after the recovery: {ledger.summary()}", flush=True)
        ledger.assert_exactly_once()
        return True
    finally:
        if worker is not None:
            worker.close()
        broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="tries at most")
    parser.add_argument("--hangs", type=int, default=1, help="stop after this many recoveries")
    args = parser.parse_args()
    recovered = 0
    with tempfile.TemporaryDirectory(prefix="ensync-hanging-") as root:
        for seed in range(args.runs):
            recovered += attempt(seed, Path(root))
            if recovered >= args.hangs:
                return 0
    print(f"{recovered} hanging transaction(s) recovered in {args.runs} tries")
    return 1


if __name__ == "__main__":
    sys.exit(main())
