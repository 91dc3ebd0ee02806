"""An abort made final before a tier writes again.

Kafka can complete an abort without writing its markers: a single broker that is fenced (frozen
past its KRaft session) or stopping while its coordinator completes one finds the partitions
leaderless and skips them (README, "A single broker's restart can leave a hanging
transaction"). The aborted records then stay open there, and under transactions v1, all
librdkafka speaks, a partition ends whatever transaction a producer has open with that
producer's next marker of the same or a newer epoch (Kafka's ``ProducerAppendInfo``): the
transactional id's next commit would commit the aborted releases with its own, and each would be
delivered twice. 2 of 14 runs of the outage e2e test with the broker frozen past its session
delivered 3 and 12 deferrals twice before this (the cause inferred from Kafka's code: those
runs' broker logs were gone).

So after an abort (and at start: init_transactions aborts what a predecessor left open) a tier
writes again only once the last stable offset of every partition it writes has reached the end
that partition had after the abort. Open transactions of other producers end within their
timeout; one that does not is what ``topics hanging`` ends, and the tier waits for that.
"""

from __future__ import annotations

import logging
import threading
import time

from .config import Config
from .exceptions import BrokerError
from .hanging import OffsetsProbe, Partition, shared_topics
from .topics import TopicNames

log = logging.getLogger("ensync_kafka.worker")

SETTLE_POLL_S = 0.02
"""The first wait between checks; it doubles up to SETTLE_POLL_MAX_S. After a healthy abort the
markers land within milliseconds."""
SETTLE_POLL_MAX_S = 1.0
SETTLE_CHECK_TIMEOUT_S = 2.0
"""How long one check may take. Healthy it takes milliseconds; in a broker failure a check
waiting out the default timeout for a dead leader held a tier 30 s longer than the failure."""
SETTLE_SLOW_S = 5.0
"""A wait this long is logged (once, at INFO) with the partitions holding it back."""


class AbortSettle:
    """Waits, after one of a tier's transactions was aborted, until that abort is final on every
    partition the tier writes records to: its changelog, the priority, audit and invalid topics.
    Not its group's partition of ``__consumer_offsets``, which other applications' transactions
    share: offsets an aborted turn left open there are overwritten by the next commit's, which
    carries every assigned partition's."""

    def __init__(self, config: Config, tier: str, hanging_after_s: float) -> None:
        self._config = config
        self._tier = tier
        self.hanging_after_s = hanging_after_s
        """Past this the wait is logged as an error: no transaction of ours lasts as long."""
        self._probe = OffsetsProbe(config)
        self._partitions: list[Partition] | None = None

    def _written(self) -> list[Partition]:
        if self._partitions is None:
            names = TopicNames(self._config.prefix)
            topics = [names.state(self._tier), names.invalid, *shared_topics(self._config)]
            self._partitions = self._probe.partitions(topics)
        return self._partitions

    def wait(self, stop: threading.Event) -> bool:
        """True once settled; False if ``stop`` was set first."""
        started = time.monotonic()
        baseline: dict[Partition, int] | None = None
        reported = failed = slow = False
        pause = SETTLE_POLL_S
        while not stop.is_set():
            try:
                offsets = self._probe.stable_offsets(
                    self._written(), timeout_s=SETTLE_CHECK_TIMEOUT_S, attempts=1
                )
            except BrokerError as exc:  # the broker is away still: ask again
                level = logging.DEBUG if failed else logging.WARNING
                log.log(level, "tier %s: waiting for an abort to settle: %s", self._tier, exc)
                failed = True
                stop.wait(SETTLE_POLL_MAX_S)
                continue
            if baseline is None:
                baseline = {tp: end for tp, (_, end) in offsets.items()}
            open_ = {tp: lso for tp, (lso, _) in offsets.items() if lso < baseline[tp]}
            if not open_:
                if reported:
                    log.info("tier %s: the aborted transaction ended; writing again", self._tier)
                return True
            waited = time.monotonic() - started
            if not slow and waited > SETTLE_SLOW_S:
                slow = True
                log.info(
                    "tier %s: waiting %.0f s after an abort for %s to be stable",
                    self._tier,
                    waited,
                    ", ".join(f"{t}[{p}]@{lso}<{baseline[t, p]}" for (t, p), lso in open_.items()),
                )
            if not reported and waited > self.hanging_after_s:
                reported = True
                log.error(
                    "tier %s: %.0f s after an abort, a transaction is still open on %s (from "
                    "those offsets): if it is the aborted one, Kafka skipped its markers, and "
                    "this tier's next commit would commit it, so the tier waits. `ensync-kafka "
                    "topics hanging` names what hangs and how to end it (README)",
                    self._tier,
                    waited,
                    ", ".join(f"{t}[{p}]@{lso}" for (t, p), lso in sorted(open_.items())),
                )
            stop.wait(pause)
            pause = min(pause * 2, SETTLE_POLL_MAX_S)
        return False
