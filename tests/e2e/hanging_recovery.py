"""The recovery ``ensync-kafka topics hanging`` prints, followed step by step with Kafka's own
tools (run by ``ensync-kafka broker tool``).

A single broker that stops, starts or is fenced while completing a commit can skip that commit's
markers (Kafka 4.4.0; README, "A single broker's restart can leave a hanging transaction"), and
no client can mend the transaction it leaves open. The outage e2e test meets this now and then
(a broker frozen past its KRaft session is fenced on waking); it then recovers as an operator
would and still checks exactly once. ``repro_hanging_transaction`` provokes it on purpose.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ensync_kafka._kafkadist import tool_command
from ensync_kafka.config import Config
from ensync_kafka.hanging import OFFSETS_TOPIC, HangingReport, find_hanging, plan_repairs
from ensync_kafka.localbroker import LocalBroker
from ensync_kafka.republish import republish
from tests.helpers import kafka_script

SKIPPED_MARKERS = "Couldn't find leader endpoint"
"""What the broker logs when its transaction coordinator skips a partition's marker."""
HANGING_AFTER_S = 30.0
"""Open this long, a transaction hangs. The coordinator aborts one past its timeout (the tests'
are at most 10 s) at its next check (every 10 s: the broker's
``transaction.abort.timed.out.transaction.cleanup.interval.ms``), and a broker frozen for 12 s
checks nothing meanwhile."""
TOOL_TIMEOUT_S = 120.0
SETTLE_AFTER_STOP_S = 180.0
"""How long after the workers stop transactions may still be open: theirs until the coordinator
aborts them, hanging ones until they count as hanging and are aborted."""
OPEN_RECHECK_S = 2.0


def skipped_markers(broker: LocalBroker) -> list[str]:
    """The broker's log lines (this run's and the one before) about markers it skipped."""
    return [
        line
        for path in (broker.previous_log_file, broker.log_file)
        if path.exists()
        for line in path.read_text(errors="replace").splitlines()
        if SKIPPED_MARKERS in line
    ]


def kafka_tool(line: str) -> None:
    """Run a printed ``kafka-<tool>.sh ...`` command with Kafka's tool from the broker's jars."""
    result = subprocess.run(
        tool_command(*kafka_script(line)), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )
    print(f"  $ {line}\n    exit {result.returncode}: {result.stdout.strip()[-300:]}", flush=True)


def hanging(config: Config) -> HangingReport | None:
    """What hangs on the configuration's partitions, or None."""
    report = find_hanging(config, max_age_s=HANGING_AFTER_S)
    return report if report.hanging else None


def skipped_and_hanging(broker: LocalBroker, config: Config) -> HangingReport | None:
    """What hangs, only where ``broker`` said it skipped markers: a transaction left open any
    other way is the code's fault, not Kafka's, and must fail the test instead."""
    return hanging(config) if skipped_markers(broker) else None


def recover(
    config: Config,
    bootstrap: str,
    report: HangingReport,
    *,
    stop_workers: Callable[[], None],
    state_dir: Path,
) -> None:
    """Stop the workers, abort every hanging transaction and republish what the aborts hid of
    committed turns, remove the state directory and rewind the tier groups; the caller then
    starts the workers again."""
    repairs = plan_repairs(config, report)  # reads the group's offsets while they still hang
    stop_workers()
    ranges: dict[tuple[str, int], tuple[int, int]] = {}
    deadline = time.monotonic() + SETTLE_AFTER_STOP_S
    while True:
        for txn in report.hanging:
            kafka_tool(txn.abort_command(bootstrap))
            start, end = ranges.get((txn.topic, txn.partition), (txn.start_offset, 0))
            ranges[(txn.topic, txn.partition)] = (start, max(end, txn.end_offset))
        report = find_hanging(config, max_age_s=HANGING_AFTER_S)
        if not report.open:
            break
        # An abort can uncover another open transaction behind it, and a request the broker
        # took in late can open one after the check (offsets of a turn aborted while it slept):
        # with the workers stopped nothing else is open for long, so go on until nothing is.
        assert time.monotonic() < deadline, f"still open after the aborts: {report.open}"
        if not report.hanging:
            time.sleep(OPEN_RECHECK_S)
    for (topic, partition), (start, end) in sorted(ranges.items()):
        if topic != OFFSETS_TOPIC:
            again = republish(config, topic, partition, start, end)
            print(f"  republished {topic}[{partition}]: {again}", flush=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    for repair in repairs:
        for line in repair.commands(bootstrap):
            kafka_tool(line)
