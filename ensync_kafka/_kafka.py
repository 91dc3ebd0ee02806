"""Small helpers at the confluent-kafka boundary."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from .config import Config
from .exceptions import BrokerError

log = logging.getLogger("ensync_kafka.kafka")

ADMIN_TIMEOUT_S = 30.0
"""How long an admin request (topics, group configs) may take before provisioning gives up."""
BROKER_WATCH_INTERVAL_MS = 5000
"""How often a watched client reports the brokers it knows (librdkafka statistics)."""
STRANDED_REPORTS = 2
"""Consecutive reports without a broker that make a watched client stranded."""
OVERRUN_GRACE_S = 5.0
"""How long past its own timeout a bounded librdkafka call may take before it is abandoned."""
GROUP_REJOIN_SESSIONS = 2
GROUP_REJOIN_MIN_S = 30.0
"""A watched consumer whose group has waited on its coordinator this long (this many session
timeouts, at least GROUP_REJOIN_MIN_S) is stranded (BrokerWatch)."""
GROUP_JOIN_WAITING_STATES = frozenset({"wait-join", "wait-sync"})
"""librdkafka's join states (``cgrp.join_state``) that wait on the group coordinator. The others
wait on our rebalance callbacks (a tier's restore can take minutes), are ``steady``, or are
``init`` and ``wait-metadata``: where a consumer sits, its coordinator found, before it subscribes
and for as long as none of the topics it subscribed to exists (it joins once one is created)."""
GIVE_UP_CHECK_S = 0.1
"""How often a bounded call's waiter serves its client and asks whether to give up."""
STRANDED = "its client knows no broker"
"""Why a bounded call is given up when its client's BrokerWatch says stranded."""


class CallAbandoned(KafkaException):
    """A librdkafka call that did not return within its timeout (plus OVERRUN_GRACE_S) and was
    left running in a thread of its own: its client must not be closed until it returns."""


def where(msg: Message) -> tuple[int, int]:
    """(partition, offset) of a consumed record; librdkafka sets both on every one."""
    p, offset = msg.partition(), msg.offset()
    assert p is not None and offset is not None
    return p, offset


TXN_CALL_ATTEMPTS = 3
"""How many times ``retrying`` makes a transactional call that keeps failing retriably."""


def retrying(
    call: Callable[[], None],
    attempts: int = TXN_CALL_ATTEMPTS,
    give_up: Callable[[], bool] | None = None,
    serve: Callable[[], object] | None = None,
) -> None:
    """Repeat a transactional call on a retriable error, as librdkafka asks; an abortable or
    fatal error propagates (a commit that timed out may have succeeded: it must not be aborted),
    and so does a retriable one once ``give_up()`` says retrying cannot help. ``serve()`` runs
    first: a blocked transactional call serves none of its client's callbacks, so the statistics
    ``give_up`` reads (BrokerWatch) may still be waiting to be delivered."""
    for attempt in range(attempts):
        try:
            call()
            return
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if not err.retriable() or attempt == attempts - 1:
                raise
            if serve is not None:
                serve()
            if give_up is not None and give_up():
                raise


class BoundedCall:
    """``call``, librdkafka calls given ``timeout`` in all, running in a thread of its own from
    construction on. :meth:`result` returns by ``timeout`` + OVERRUN_GRACE_S after the start
    even when librdkafka overruns its own timeout, as abort_transaction (librdkafka #3779) and
    send_offsets_to_transaction (#5456, #5511) can while a coordinator is unreachable: it
    raises CallAbandoned then, and ``abandon()`` (closing the client, say) runs once the call
    has returned. Meanwhile the caller may do other work with the client.

    With ``give_up``, :meth:`result` abandons the call as soon as ``give_up()`` says why
    waiting cannot help (its client is stranded: BrokerWatch; an attempt overran its own
    timeout: TimedAttempts), calling ``serve()`` meanwhile: a blocked transactional call serves
    none of the client's callbacks, so without it the statistics that tell a stranded client
    never arrive, and the caller would wait out the whole bound with the tier standing still."""

    def __init__(
        self,
        call: Callable[[], None],
        timeout: float,
        what: str,
        abandon: Callable[[], None],
        *,
        give_up: Callable[[], str | None] | None = None,
        serve: Callable[[], object] | None = None,
    ) -> None:
        self._call, self._what, self._abandon = call, what, abandon
        self._give_up, self._serve = give_up, serve
        self._limit_s = timeout + OVERRUN_GRACE_S
        self._deadline = time.monotonic() + self._limit_s
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._raised: BaseException | None = None
        self._abandoned = False
        threading.Thread(target=self._run, name=f"bounded-{what}", daemon=True).start()

    def _run(self) -> None:
        try:
            self._call()
        except BaseException as exc:  # re-raised in the caller's thread, or dropped if late
            self._raised = exc
        finally:
            with self._lock:
                self._done.set()
                late = self._abandoned
            if late:
                self._abandon()

    def result(self) -> None:
        """Wait for the call; raise what it raised, or CallAbandoned past the deadline (or once
        ``give_up()``)."""
        step = None if self._give_up is None else GIVE_UP_CHECK_S
        while True:
            remaining = max(0.0, self._deadline - time.monotonic())
            if self._done.wait(remaining if step is None else min(step, remaining)):
                break
            if self._serve is not None:
                self._serve()
            reason = self._give_up() if self._give_up is not None else None
            if reason or time.monotonic() >= self._deadline:
                with self._lock:
                    self._abandoned = not self._done.is_set()
                if self._abandoned:
                    elapsed = self._limit_s - (self._deadline - time.monotonic())
                    why = (
                        f"{reason}; given up after {elapsed:.0f} s"
                        if reason
                        else f"no return in {self._limit_s:.0f} s"
                    )
                    raise CallAbandoned(KafkaError(KafkaError._TIMED_OUT, f"{self._what}: {why}"))
                break
        if self._raised is not None:
            raise self._raised


class TimedAttempts:
    """A librdkafka call given ``timeout`` per attempt, to repeat with :func:`retrying`.
    :meth:`overrun` says when the attempt under way has outlasted its timeout by OVERRUN_GRACE_S:
    librdkafka is ignoring it (send_offsets_to_transaction, #5456), and no later attempt comes
    while this one blocks."""

    def __init__(self, call: Callable[[float], None], timeout: float) -> None:
        self._call, self.timeout = call, timeout
        self._started: float | None = None

    def __call__(self) -> None:
        self._started = time.monotonic()
        try:
            self._call(self.timeout)
        finally:
            self._started = None

    def overrun(self) -> str | None:
        started = self._started
        if started is None:
            return None
        waited = time.monotonic() - started
        if waited <= self.timeout + OVERRUN_GRACE_S:
            return None
        return f"an attempt had no answer in {waited:.0f} s, past its {self.timeout:.0f} s timeout"


def bounded(
    call: Callable[[], None], timeout: float, what: str, abandon: Callable[[], None]
) -> None:
    """Run ``call`` as a :class:`BoundedCall` and wait for it."""
    BoundedCall(call, timeout, what, abandon).result()


def reader(config: Config, purpose: str, settings: Mapping[str, Any] | None = None) -> Consumer:
    """A consumer for reading with ``assign()``: it never joins a group nor commits, but
    librdkafka wants a group.id all the same, so it gets a throwaway one. read_committed (also
    librdkafka's default): aborted transactions' records are never seen."""
    return Consumer(
        {
            **config.kafka.client_settings(),
            "group.id": f"{config.prefix}.{purpose}.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            **(settings or {}),
        }
    )


READ_TIMEOUT_S = 60.0
"""How long :func:`read_partition` may take to reach the end of what it reads."""


def read_partition(
    consumer: Consumer, tp: TopicPartition, end: int | None = None
) -> Iterator[Message]:
    """The records of ``tp`` from its offset up to ``end``, or to the partition's end as
    ``consumer`` sees it (it needs ``enable.partition.eof``); ``consumer`` is assigned ``tp``."""
    consumer.assign([tp])
    deadline = time.monotonic() + READ_TIMEOUT_S
    while time.monotonic() < deadline:
        for msg in consumer.consume(1000, 0.5):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return
                raise BrokerError(f"reading {tp.topic}[{tp.partition}]: {err.str()}")
            if end is not None and where(msg)[1] >= end:
                return
            yield msg
    raise BrokerError(f"reading {tp.topic}[{tp.partition}] took over {READ_TIMEOUT_S:.0f} s")


class BrokerWatch:
    """Tells whether a librdkafka client is stranded: it will not get going again by itself, and
    its owner replaces it. Merge :meth:`settings` into the client's configuration and poll it.

    - It knows no broker. A Metadata response that lists no brokers makes librdkafka 2.10+ drop
      every broker it knows, and it never looks for one again (librdkafka #5301). A KRaft broker
      sends one while it is fenced, as a single broker is on waking from a stall longer than its
      session: its clients then wait for good, and a consumer's group session times out and it
      never rejoins. Such a client's statistics list only logical brokers (its coordinator
      handles).
    - Given ``group_session_s`` (a subscribed consumer's session timeout): its group does not
      come back up. After a broker stall a consumer can know its broker yet never look for its
      group coordinator again (seen about once in 25 stalls of 12 s: librdkafka's group state
      ``query-coord`` for minutes, its broker in state ``INIT``, never reconnected, while every
      other client of the process worked), as the transactional coordinator handle can wedge
      (#5456, #5511): it polls and is assigned nothing. A rejoin waits at most for the members
      that left to time out (a session) and two rounds of join and sync (cooperative-sticky).
      A client replaced during a real outage only waits as its predecessor would have.
    """

    def __init__(self, name: str, *, group_session_s: float | None = None) -> None:
        self.name = name
        self.stranded = False
        self.group: dict[str, Any] | None = None
        """The latest report's consumer-group state (librdkafka's ``cgrp``: state, join_state,
        stateage, …)."""
        self.brokers: dict[str, str] = {}
        """The latest report's brokers and their states (``UP``, ``DOWN``, …), for diagnosis."""
        self._empty_reports = 0
        self._group_limit_s = (
            None
            if group_session_s is None
            else max(GROUP_REJOIN_MIN_S, GROUP_REJOIN_SESSIONS * group_session_s)
        )
        self._group_waiting_since_s: float | None = None

    def settings(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """What to merge over ``given`` (the client's settings): a ``stats_cb`` and interval
        there keep receiving every report."""
        chained = given.get("stats_cb")
        if chained is None:
            callback = self.report
        else:

            def callback(stats_json: str) -> None:
                self.report(stats_json)
                chained(stats_json)

        interval = given.get("statistics.interval.ms", BROKER_WATCH_INTERVAL_MS)
        return {"statistics.interval.ms": interval, "stats_cb": callback}

    def report(self, stats_json: str) -> None:
        stats = json.loads(stats_json)
        self.group = stats.get("cgrp")
        brokers = stats.get("brokers", {}).values()
        self.brokers = {b.get("name", "?"): b.get("state", "?") for b in brokers}
        if any(b.get("source") != "logical" for b in brokers):
            self._empty_reports = 0
            # ts: librdkafka's clock when it made the report, which may be served late.
            self._watch_group(stats.get("ts", 0) / 1e6)
            return
        self._empty_reports += 1
        if self._empty_reports >= STRANDED_REPORTS:
            self._strand("the Kafka client knows no broker any more (librdkafka #5301)")

    def _watch_group(self, now_s: float) -> None:
        if self._group_limit_s is None or self.group is None:
            return
        waiting = (
            self.group.get("state") != "up"
            or self.group.get("join_state") in GROUP_JOIN_WAITING_STATES
        )
        if not waiting:  # see GROUP_JOIN_WAITING_STATES
            self._group_waiting_since_s = None
            return
        if self._group_waiting_since_s is None:
            self._group_waiting_since_s = now_s
        elif now_s - self._group_waiting_since_s >= self._group_limit_s:
            self._strand(
                f"its consumer group has not come back up in {self._group_limit_s:.0f} s "
                f"(librdkafka group state {self.group.get('state')}, join state "
                f"{self.group.get('join_state')}; brokers {self.brokers})"
            )

    def _strand(self, why: str) -> None:
        if not self.stranded:
            self.stranded = True
            log.warning("%s: %s", self.name, why)


def retire(client: Producer | Consumer, name: str) -> None:
    """Close a replaced client in a daemon thread of its own: closing one that is fenced,
    wedged or stranded can block, and its owner must not wait for it."""

    def close() -> None:
        try:
            if isinstance(client, Producer):
                client.purge()
            client.close()
        # It is being thrown away. A fenced producer's close() can return with the abort's
        # KafkaException still set, which Python reports as a SystemError (confluent-kafka 2.16).
        except (KafkaException, RuntimeError, SystemError) as exc:
            log.debug("%s: closing: %s", name, exc)

    threading.Thread(target=close, name=f"retire-{name}", daemon=True).start()
