"""A tier worker's transactional producers: they take turns, are watched, and are replaced when
a transaction leaves one fenced, failed, wedged or of unknown outcome.

What a transaction holds is the worker's business (worker.py); how it reaches Kafka whatever
the broker does meanwhile is this module's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from ._kafka import (
    STRANDED,
    TXN_CALL_ATTEMPTS,
    BoundedCall,
    BrokerWatch,
    CallAbandoned,
    TimedAttempts,
    retire,
    retrying,
)
from .config import Config
from .exceptions import BrokerError

log = logging.getLogger("ensync_kafka.worker")

TXN_TIMEOUT_S = 30.0
"""librdkafka's timeout for each transactional call (and a commit's flush)."""
SEND_OFFSETS_TIMEOUT_S = 10.0
"""librdkafka's timeout for each attempt of send_offsets_to_transaction. A healthy one takes
milliseconds, and one whose group coordinator moved (a broker of a cluster failing: fenced after
its 9 s session, its partitions led by others at once) finds the new one within this. One still
blocked OVERRUN_GRACE_S past it will not return (librdkafka #5456 ignores the timeout, #5511 keeps
a coordinator that left): it is abandoned then, and the tier starts over. Given the 95 s bound of
all attempts instead, a tier stood still for 95 s after a broker of three was killed."""
ABORT_TIMEOUT_S = 10.0
"""librdkafka's timeout for an abort. A healthy one takes milliseconds; one still waiting after
this waits on a coordinator that is away or a handle that is wedged (seen after a broker stall:
30 s, then "retry call to resume"), and a new producer's init_transactions (the start-over that
follows) aborts the transaction as well."""
TRANSACTIONAL_PRODUCERS = 2
"""Transactions alternate between this many producers. The coordinator finishes a commit (the
markers on every partition it touched) after commit_transaction returns; the same producer's
next AddPartitionsToTxn meanwhile gets CONCURRENT_TRANSACTIONS, which librdkafka retries after
a fixed 20 ms. Measured: 8-10 of 400 back-to-back 40-partition transactions hit it with one
producer, none with two. Both send the consumer group's offsets, so both are fenced alike."""
PRODUCER_RENEWALS_MAX = 5
PRODUCER_RENEWAL_WINDOW_S = 600.0
"""A transactional producer that is fenced, failed, wedged or left a transaction of unknown outcome
is replaced (TransactionalProducers.replace) at most this often in this window. A broker that
stalls past the transaction timeout aborts what was open and bumps the producer's epoch, fencing
a producer caught mid-abort; a single broker that comes back from a stall can leave librdkafka's
coordinator handle wedged. A new producer is all either needs. More often than this, something
else is wrong (two processes with one worker.id fencing each other, a broker that stays away):
the worker stops, to be restarted."""
TRANSACTIONAL_PRODUCER_SETTINGS: dict[str, Any] = {
    "linger.ms": 1,
    "queue.buffering.max.messages": 500_000,
    # Back-to-back transactions meet CONCURRENT_TRANSACTIONS while the previous commit's markers
    # are written; the default 100 ms backoff caps a worker at ~10 transactions/s
    # (confluent-kafka-python #967, KAFKA-5477).
    "retry.backoff.ms": 2,
    "retry.backoff.max.ms": 20,
    # Several small requests per transaction go out back to back: without TCP_NODELAY one can
    # wait for the broker's delayed ACK.
    "socket.nagle.disable": True,
}
"""A tier worker's transactional producers' settings beside the client's and its id (the
benchmark's floor and txn_probe use them too, so they measure the worker's kind of producer)."""


def transactional_id(prefix: str, tier: str, worker_id: str, n: int) -> str:
    """Stable across restarts, so a restarted worker fences its previous incarnation."""
    base = f"{prefix}.{tier}.{worker_id}"
    return base if n == 0 else f"{base}.{n}"


class TransactionalProducers:
    """The producers of one tier worker. ``current`` makes the next transaction; :meth:`advance`
    hands the one after it to the next producer."""

    def __init__(self, config: Config, tier: str) -> None:
        self._config = config
        self._tier = tier
        self._watches: dict[int, BrokerWatch] = {}
        self._producers = tuple(self._new(n) for n in range(TRANSACTIONAL_PRODUCERS))
        self._n = 0
        self.renewals: list[float] = []
        """When producers were replaced, within PRODUCER_RENEWAL_WINDOW_S."""

    def _new(self, n: int) -> Producer:
        client = self._config.kafka.client_settings()
        w = self._config.worker
        watch = self._watches[n] = BrokerWatch(f"tier {self._tier}: producer {n}")
        return Producer(
            {
                **client,
                "transactional.id": transactional_id(self._config.prefix, self._tier, w.id, n),
                "transaction.timeout.ms": int(w.transaction_timeout * 1000),
                **TRANSACTIONAL_PRODUCER_SETTINGS,
                **watch.settings(client),
            }
        )

    @property
    def current(self) -> Producer:
        return self._producers[self._n]

    @property
    def producers(self) -> tuple[Producer, ...]:
        return self._producers

    @property
    def stranded(self) -> bool:
        """The current producer knows no broker any more (BrokerWatch): it would wait for good."""
        return self._watches[self._n].stranded

    def init(self) -> None:
        try:
            for producer in self._producers:
                producer.init_transactions(TXN_TIMEOUT_S)
        except KafkaException as exc:
            raise BrokerError(f"tier {self._tier}: init_transactions: {exc}") from exc

    def list_topics(self, timeout: float) -> dict[str, Any]:
        """Every topic's metadata, asked by each producer: connects them all now rather than in
        a first transaction's critical path."""
        topics: dict[str, Any] = {}
        for producer in self._producers:
            topics = producer.list_topics(timeout=timeout).topics
        return topics

    def advance(self) -> None:
        self._n = (self._n + 1) % len(self._producers)

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        partition: int = -1,
        headers: Any = None,
        on_delivery: Any = None,
    ) -> None:
        """``produce`` on the current producer, waiting while its queue is full."""
        producer = self.current
        while True:
            try:
                producer.produce(
                    topic,
                    value=value,
                    key=key,
                    partition=partition,
                    headers=headers,
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                producer.poll(0.01)

    def send_offsets(self, offsets: list[TopicPartition], metadata: Any) -> BoundedCall:
        """send_offsets_to_transaction in a thread of its own, started now, so that its round
        trips overlap the acknowledgements instead of following them, and bounded: it can block
        past its timeout while the group coordinator is unreachable or forgotten (librdkafka
        #5456, #5511), which would stop the tier for good; abandoned, the worker aborts and
        :meth:`replace` starts over with a new producer. (commit_transaction is called directly:
        no overrun of it is known, and a thread handoff after the hold measured 0.8 ms per
        turn.)"""
        producer, watch = self.current, self._watches[self._n]
        attempts = TimedAttempts(
            lambda timeout: producer.send_offsets_to_transaction(offsets, metadata, timeout),
            SEND_OFFSETS_TIMEOUT_S,
        )
        return self._bounded(
            "send-offsets",
            lambda: retrying(attempts, give_up=lambda: watch.stranded),
            TXN_CALL_ATTEMPTS * SEND_OFFSETS_TIMEOUT_S,
            overrun=attempts.overrun,
        )

    def commit(self) -> None:
        """commit_transaction, repeated on a retriable error; one that timed out may have
        committed, so it is never followed by an abort here (``retrying``). A stranded producer
        would time out every attempt: its watch stops the retries after the first."""
        producer, watch = self.current, self._watches[self._n]
        retrying(
            lambda: producer.commit_transaction(TXN_TIMEOUT_S),
            give_up=lambda: watch.stranded,
            serve=lambda: producer.poll(0),
        )

    def abort(self) -> None:
        """abort_transaction, bounded: it can hang while the coordinator is unreachable
        (librdkafka #3779)."""
        producer = self.current
        self._bounded(
            "abort", lambda: producer.abort_transaction(ABORT_TIMEOUT_S), ABORT_TIMEOUT_S
        ).result()

    def _bounded(
        self,
        what: str,
        call: Callable[[], None],
        timeout: float,
        overrun: Callable[[], str | None] = lambda: None,
    ) -> BoundedCall:
        """``call`` on the current producer as a BoundedCall, given up as soon as the producer
        is stranded (its watch, bound to this producer: a replacement's fresh watch must not
        answer for it) or ``overrun()`` says why. Abandoned, the producer is closed once the
        call returns, not by :meth:`replace` (which replaces it)."""
        producer, watch, name = self.current, self._watches[self._n], f"{self._tier}-{what}"
        return BoundedCall(
            call,
            timeout,
            name,
            abandon=lambda: retire(producer, name),
            give_up=lambda: STRANDED if watch.stranded else overrun(),
            serve=lambda: producer.poll(0),
        )

    def replace(self, exc: KafkaException) -> None:
        """Do what a restart would: new producers with the same transactional ids, whose
        init_transactions fences the old ones and completes or aborts what they left open. At
        most PRODUCER_RENEWALS_MAX times in the window; then BrokerError."""
        err: KafkaError = exc.args[0]
        now = time.monotonic()
        self.renewals = [t for t in self.renewals if now - t < PRODUCER_RENEWAL_WINDOW_S]
        if len(self.renewals) >= PRODUCER_RENEWALS_MAX:
            raise BrokerError(
                f"tier {self._tier}: transaction failed ({err.str()}) after "
                f"{len(self.renewals)} producer replacements in "
                f"{PRODUCER_RENEWAL_WINDOW_S:.0f} s",
                code=err.code(),
            ) from exc
        self.renewals.append(now)
        log.warning("tier %s: producer %d: %s; replacing it", self._tier, self._n, err.str())
        try:
            # An abandoned call's producer is closed once the call returns (_bounded). The
            # others are replaced too, as a restart would: what stranded or wedged this one
            # (a coordinator that left, cached: librdkafka #5511) is likely in them as well.
            for n in range(len(self._producers)):
                self._swap(n, retire_old=n != self._n or not isinstance(exc, CallAbandoned))
        except KafkaException as init_exc:
            raise BrokerError(
                f"tier {self._tier}: replacing producer {self._n}: {init_exc}"
            ) from init_exc

    def renew(self, why: str) -> None:
        """Replace every producer by a new one, outside the failure budget of :meth:`replace`;
        between transactions only. For a cause that is not the producers' fault but that they
        would not get over: ``why`` is logged."""
        log.info("tier %s: new transactional producers: %s", self._tier, why)
        for n in range(len(self._producers)):
            self._swap(n, retire_old=True)

    def _swap(self, n: int, *, retire_old: bool) -> None:
        """Producer ``n`` replaced by a new one with its transactional id, whose
        init_transactions fences the old one and completes or aborts what it left open."""
        old, fresh = self._producers[n], self._new(n)
        try:
            fresh.init_transactions(TXN_TIMEOUT_S)
        except KafkaException:
            retire(fresh, f"{self._tier}-producer-{n}")
            raise
        self._producers = (*self._producers[:n], fresh, *self._producers[n + 1 :])
        if retire_old:
            retire(old, f"{self._tier}-producer-{n}")

    def flush_all(self, timeout: float) -> None:
        for producer in self._producers:
            try:
                producer.flush(timeout)
            except KafkaException as exc:  # fenced or failed: not the error to report
                log.warning("tier %s: producer flush at stop: %s", self._tier, exc)
