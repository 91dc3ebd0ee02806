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
import sys
import tempfile
import uuid
from pathlib import Path

from ensync_kafka import DeferClient, ensure_topics
from ensync_kafka.config import config_from_mapping
from ensync_kafka.localbroker import LocalBroker
from ensync_kafka.topics import TopicNames
from tests.e2e.hanging_recovery import hanging, recover, skipped_markers
from tests.e2e.ledger_stream import CHUNKS, TIERS, stream
from tests.helpers import (
    TopicReader,
    WorkerProcess,
    collect_ledger,
    pipeline_mapping,
    write_config,
)

SETTLE_S = 60.0
"""How long the stream gets to finish before the transactions still open count as hanging."""


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
        report = hanging(config)
        print(
            f"try {seed}: {len(ledger.missing)} not delivered, "
            f"{len(skipped_markers(broker))} skipped-marker lines in the broker log, "
            f"{len(report.hanging) if report else 0} hanging",
            flush=True,
        )
        if report is None:
            return False
        recover(config, bootstrap, report, stop_workers=worker.stop, state_dir=work / "state")
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
