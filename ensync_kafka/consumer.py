"""PriorityConsumer: competing consumers of a queue's priority topics, highest priority first.

One confluent-kafka consumer per instance, in one group per queue (cooperative-sticky, so
several processes share the partitions and a join moves only what it must), subscribed to
``{prefix}.<queue>.p5`` … ``p1`` with ``isolation.level=read_committed``.

**Priority.** Fetched records wait in a small buffer per priority (``consumer.buffer``; past it,
that priority's partitions are paused, so memory stays bounded and a backlog stays on the
broker). The next event comes from the highest priority with one buffered. ``strict`` ordering
serves a lower priority only once every partition of each higher priority has reported its end
(``enable.partition.eof``); ``weighted`` ordering gives each priority in ``consumer.shares`` at
least that fraction of the events handled while it has a backlog (a credit per priority, so p1
keeps moving under a flood of p5).

**Outcomes.** Return: handled. Raise: retried after the backoff, dead after ``max_attempts``;
:class:`~ensync_kafka.Retry`, :class:`~ensync_kafka.Postpone` and :class:`~ensync_kafka.Drop`
choose the outcome explicitly. Writing them (re-deferrals, dead letters, quarantined records,
audit records, the structured log lines) is :mod:`ensync_kafka.outcomes`.

**At least once, never lost.** An offset is committed only after its event was handled, and
after whatever the handling sent (retry, dead letter, audit) was acknowledged by the broker. A
crash in between handles the event again; the re-deferral it sends again has the same defer_id
and delay (:mod:`ensync_kafka.retry`), so the tier worker drops the copy.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from . import audit
from ._kafka import BrokerWatch, CallAbandoned, bounded, retire
from ._signals import stop_on_signals
from .client import DeferClient
from .codec import DELIVERED
from .config import PRIORITY_MAX, PRIORITY_MIN, Config
from .exceptions import BrokerError, ConfigError, SerializationError
from .models import DeliveredEvent
from .ordering import PrioritySelector
from .outcomes import FLUSH_TIMEOUT_S, AlertHook, OutcomeWriter, log_step
from .retry import Drop, Postpone, Retry
from .topics import TopicNames

log = logging.getLogger("ensync_kafka.consumer")

Handler = Callable[[DeliveredEvent], object]
H = TypeVar("H", bound=Handler)

POLL_INTERVAL_S = 0.1
FILL_INTERVAL_S = 0.005
"""While events are buffered, fetch what arrived (a higher priority, callbacks) this often."""
CONSUME_BATCH = 500
COMMIT_EVERY = 1000
"""Handled events that trigger a commit before ``consumer.commit_interval`` has passed."""
LIBRDKAFKA_SESSION_TIMEOUT_MS = 45_000
"""librdkafka's default ``session.timeout.ms``: the group session when the settings give none."""
STOP_TIMEOUT_S = 10.0
"""How long (plus _kafka.OVERRUN_GRACE_S) a stopping consumer waits for its last commit and for
leaving its group. librdkafka's close waits for a broker that does not answer (down, frozen) for
as long as it takes (librdkafka #3740); past this, run() returns and the two are left in a
thread: what was handled since the last commit is handled again by the partitions' next owner."""
WATERMARK_TIMEOUT_S = 1.0
LAG_REFRESH_S = 0.5

_TP = tuple[str, int]


@dataclass
class ConsumerStats:
    """What this consumer did since it was created."""

    handled: int = 0
    retried: int = 0
    dead: int = 0
    dropped: int = 0
    postponed: int = 0
    shed: int = 0
    invalid: int = 0
    restarts: int = 0
    """Times its Kafka clients were replaced because they would not get going again by
    themselves (BrokerWatch: stranded after a broker stall)."""


@dataclass(slots=True)
class _Item:
    msg: Message
    tp: _TP
    offset: int
    priority: int


def load_callable(spec: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function (``module:Class.method`` works too)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{spec!r}: expected 'module:callable'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{spec!r}: cannot import: {exc}") from exc
    if not callable(target):
        raise ConfigError(f"{spec!r}: not callable")
    return target  # type: ignore[no-any-return]


class PriorityConsumer:
    """Handles the events delivered to one queue, highest priority first.

    ::

        consumer = PriorityConsumer(config, queue="default")

        @consumer.handler
        def handle(event: DeliveredEvent) -> None:
            ...

        consumer.run()  # until stop(), SIGTERM or SIGINT

    Several processes with the same ``group`` share the work; each event is handled by one of
    them (at least once: a crash before the commit hands it to the next owner again).
    """

    def __init__(
        self,
        config: Config,
        queue: str | None = None,
        group: str | None = None,
        *,
        handler: Handler | None = None,
        alert: AlertHook | None = None,
        client: DeferClient | None = None,
        consumer_settings: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        """``group`` defaults to ``{prefix}.consumer.{queue}``. ``alert`` (else the
        ``consumer.alert`` callable of the config) is called once per dead letter. ``client``
        sends the re-deferrals (default: one of its own). ``consumer_settings``: librdkafka
        tuning for the consumer (the group, isolation level and commit mode stay fixed)."""
        self.config = config
        self.queue = queue or config.queues[0]
        if self.queue not in config.queues:
            raise ConfigError(
                f"queue: unknown queue {self.queue!r}; configured: {', '.join(config.queues)}"
            )
        self.group = group or f"{config.prefix}.consumer.{self.queue}"
        self.names = TopicNames(config.prefix)
        self.topics = self.names.queue(self.queue)
        self.stats = ConsumerStats()
        self._settings = dict(consumer_settings or {})
        self._cc = config.consumer
        self._handler = handler
        self._alert: AlertHook | None = alert
        if alert is None and self._cc.alert:
            self._alert = load_callable(self._cc.alert)
        self._client = client
        self._owns_client = client is None
        self._stop = threading.Event()
        self._priority_of = {self.names.priority(self.queue, p): p for p in range(1, 6)}
        self._selector = PrioritySelector(self._cc)
        self._reset_state()

    def _reset_state(self) -> None:
        self._buffers: dict[int, deque[_Item]] = {
            p: deque() for p in range(PRIORITY_MIN, PRIORITY_MAX + 1)
        }
        self._assigned: set[_TP] = set()
        self._eof: set[_TP] = set()
        self._paused: set[_TP] = set()
        self._next_offset: dict[_TP, int] = {}
        self._done: dict[_TP, int] = {}
        self._uncommitted = 0
        self._last_commit = time.monotonic()
        self._paused_high: dict[_TP, int] = {}
        self._paused_high_at = 0.0
        self._filled_at = 0.0

    # -- public -----------------------------------------------------------------------------

    def handler(self, func: H) -> H:
        """Decorator: register ``func`` as the handler (one per consumer)."""
        self._handler = func
        return func

    @property
    def assignment(self) -> list[tuple[str, int]]:
        """The (topic, partition) pairs this consumer owns now."""
        return sorted(self._assigned)

    def stop(self) -> None:
        """Finish the event in hand, commit, and return from :meth:`run`. Thread-safe."""
        self._stop.set()

    def run(self, handler: Handler | None = None, *, install_signal_handlers: bool = True) -> None:
        """Consume and handle until :meth:`stop` (or SIGTERM/SIGINT when the handlers are
        installed, which happens only in the main thread).

        Raises :class:`~ensync_kafka.BrokerError` when a retry or dead letter cannot be
        written: the failed event's offset is then not committed.
        """
        if handler is not None:
            self._handler = handler
        if self._handler is None:
            raise ConfigError("no handler: pass one to run() or decorate it with .handler")
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            stop_on_signals(self._stop, log, "finishing the event in hand and stopping")
        self._stop.clear()
        self._reset_state()
        self._open()
        log.info(
            "consumer group %s: consuming %s (%s ordering)",
            self.group,
            ", ".join(self.topics),
            self._cc.ordering,
        )
        try:
            while not self._stop.is_set():
                if self._watch.stranded:
                    self._start_over()
                item = self._next_item()
                if item is not None:
                    self._process(item)
                self._maybe_commit()
        finally:
            self._close()

    # -- Kafka clients ------------------------------------------------------------------------

    def _open(self) -> None:
        client = self.config.kafka.client_settings()
        try:
            self._producer = Producer(
                {**client, "enable.idempotence": "true", "acks": "all", "linger.ms": 5}
            )
            if self._client is None:
                self._client = DeferClient(self.config)
            self._outcomes = OutcomeWriter(
                self.config,
                names=self.names,
                group=self.group,
                producer=self._producer,
                client=self._client,
                alert=self._alert,
                stats=self.stats,
            )
            self._consumer = self._new_consumer(client)
            self._consumer.subscribe(
                self.topics,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        except KafkaException as exc:
            raise BrokerError(f"consumer group {self.group}: {exc.args[0]}") from exc

    def _new_consumer(self, client: Mapping[str, str | int | float | bool]) -> Consumer:
        settings: dict[str, Any] = {
            **client,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
            "queued.max.messages.kbytes": 8192,
            **self._settings,
            # What the guarantees rest on; not overridable.
            "group.id": self.group,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.partition.eof": True,
            "on_commit": self._on_commit,
        }
        # Only the consumer is watched: it is polled all the time (statistics are delivered by
        # polls), and a stranded producer's sends time out and raise.
        session_ms = settings.get("session.timeout.ms", LIBRDKAFKA_SESSION_TIMEOUT_MS)
        self._watch = BrokerWatch(
            f"consumer group {self.group}", group_session_s=float(session_ms) / 1000
        )
        return Consumer({**settings, **self._watch.settings(settings)})

    def _start_over(self) -> None:
        """The Kafka consumer knows no broker any more (see BrokerWatch) and would never rejoin
        the group. Drop what is buffered and uncommitted (the next owner of those partitions,
        maybe this consumer again, handles it again: at least once) and open new clients, the
        producer too (the metadata response that stranded one strands every client that asked
        then). The old ones are closed aside, as closing them can block; their rebalance
        callbacks no longer touch this consumer's state (see _current)."""
        log.warning("consumer group %s: replacing its stranded Kafka clients", self.group)
        self.stats.restarts += 1
        old_consumer, old_producer = self._consumer, self._producer
        self._reset_state()
        self._open()
        retire(old_consumer, f"{self.group}-consumer")
        retire(old_producer, f"{self.group}-producer")

    def _close(self) -> None:
        consumer = self._consumer

        def leave() -> None:
            try:
                self._commit(asynchronous=False)
            finally:
                consumer.close()  # leaves the group: the partitions move on at once

        try:
            bounded(leave, STOP_TIMEOUT_S, f"{self.group}-close", abandon=lambda: None)
        except CallAbandoned:
            log.warning(
                "consumer group %s: no answer from Kafka while committing and leaving the "
                "group; stopping without it (what was handled since the last commit will be "
                "handled again)",
                self.group,
            )
        finally:
            try:
                self._producer.flush(FLUSH_TIMEOUT_S)
            finally:
                self._producer.close()  # run() opens a new one
            if self._owns_client and self._client is not None:
                self._client.close()
                self._client = None
            log.info("consumer group %s: stopped (%s)", self.group, self.stats)

    # -- fetching and choosing ----------------------------------------------------------------

    def _next_item(self) -> _Item | None:
        if time.monotonic() - self._filled_at >= FILL_INTERVAL_S:
            self._fill(0.0)  # a consume call costs ~0.2 ms: not before every event
        priority = self._pick()
        if priority is None:
            self._fill(POLL_INTERVAL_S)
            priority = self._pick()
            if priority is None:
                return None
        item = self._buffers[priority].popleft()
        self._flow_control()
        return item

    def _pick(self) -> int | None:
        backlog = {p: len(b) for p, b in self._buffers.items()}
        return self._selector.pick(backlog, self._drained, time.monotonic())

    def _drained(self, priority: int) -> bool:
        topic = self.names.priority(self.queue, priority)
        return all(tp in self._eof for tp in self._assigned if tp[0] == topic)

    def _fill(self, timeout: float) -> None:
        # consume(n, timeout) waits for all n or the timeout: wait for one, then take the rest.
        msgs = self._consumer.consume(1, timeout) if timeout > 0 else []
        if timeout <= 0 or msgs:
            msgs += self._consumer.consume(CONSUME_BATCH, 0)
        self._filled_at = time.monotonic()
        for msg in msgs:
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            tp = (topic or "", -1 if partition is None else partition)
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if tp in self._assigned:
                        self._eof.add(tp)
                    continue
                if err.fatal():
                    raise BrokerError(f"consumer: {err.str()}", code=err.code())
                log.warning("consumer group %s: %s", self.group, err.str())
                continue
            if offset is None or tp not in self._assigned or offset < self._next_offset.get(tp, -1):
                continue  # revoked meanwhile, or already buffered (a re-fetch after resume)
            self._next_offset[tp] = offset + 1
            self._eof.discard(tp)
            priority = self._priority_of[tp[0]]
            self._buffers[priority].append(_Item(msg, tp, offset, priority))
        self._flow_control()

    def _flow_control(self) -> None:
        """Pause the partitions of a priority whose buffer is full; resume at half."""
        cap = self._cc.buffer
        pause: list[TopicPartition] = []
        resume: list[TopicPartition] = []
        for tp in self._assigned:
            size = len(self._buffers[self._priority_of[tp[0]]])
            if tp not in self._paused and size >= cap:
                pause.append(TopicPartition(*tp))
            elif tp in self._paused and size <= cap // 2:
                resume.append(TopicPartition(*tp))
        if pause:
            self._consumer.pause(pause)
            self._paused.update((t.topic, t.partition) for t in pause)
        if resume:
            self._consumer.resume(resume)
            self._paused.difference_update((t.topic, t.partition) for t in resume)
            self._wake(resume)

    def _wake(self, partitions: list[TopicPartition]) -> None:
        """Have librdkafka fetch the resumed partitions now.

        A pause drops what was prefetched, and a resumed partition is fetched again only at
        its broker thread's next turn, up to a second later. A seek to the position we read up
        to restarts the fetch at once (measured here: ~1000 ms to the first record after a
        resume without it, ~10 ms with it). Nothing is skipped or repeated: the position is
        the next offset this consumer has not buffered.
        """
        for tp in partitions:
            offset = self._next_offset.get((tp.topic, tp.partition))
            if offset is None:
                continue
            try:
                self._consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
            except KafkaException as exc:  # only a wake-up call: the fetch resumes anyway
                log.debug("consumer group %s: seek after resume: %s", self.group, exc)

    # -- rebalancing ----------------------------------------------------------------------------

    def _current(self, consumer: Consumer) -> bool:
        """Whether a rebalance callback comes from this consumer's Kafka consumer, not from one
        replaced by _start_over and closing in the background."""
        return consumer is self._consumer

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self._current(consumer):
            return
        # librdkafka keeps a pause across revocation or loss and re-assignment (librdkafka
        # #1849): a partition paused for a full buffer would come back paused for good.
        if partitions:
            try:
                consumer.resume(partitions)
            except KafkaException as exc:  # let out of a callback, no ``except`` would catch it
                log.warning("consumer group %s: resume on assignment: %s", self.group, exc)
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._assigned.add(key)
            self._eof.discard(key)
            self._next_offset.pop(key, None)
        if partitions:
            log.info("consumer group %s: assigned %s", self.group, _describe(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self._current(consumer):
            return
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._forget_buffered(keys)
        try:
            self._commit(asynchronous=False, only=keys)  # the next owner starts after them
        finally:
            self._forget(keys)
        if partitions:
            log.info("consumer group %s: revoked %s", self.group, _describe(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self._current(consumer):
            return
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._forget_buffered(keys)
        self._forget(keys)  # no commit: another member owns them already
        log.warning("consumer group %s: lost %s", self.group, _describe(partitions))

    def _forget_buffered(self, keys: set[_TP]) -> None:
        for priority, buffer in self._buffers.items():
            if any(item.tp in keys for item in buffer):
                self._buffers[priority] = deque(item for item in buffer if item.tp not in keys)

    def _forget(self, keys: set[_TP]) -> None:
        for key in keys:
            self._assigned.discard(key)
            self._eof.discard(key)
            self._paused.discard(key)
            self._next_offset.pop(key, None)
            self._done.pop(key, None)
            self._paused_high.pop(key, None)

    # -- committing -----------------------------------------------------------------------------

    def _mark_done(self, item: _Item) -> None:
        if item.tp in self._assigned:
            self._done[item.tp] = item.offset + 1
            self._uncommitted += 1

    def _maybe_commit(self) -> None:
        if not self._done:
            return
        due = time.monotonic() - self._last_commit >= self._cc.commit_interval
        if due or self._uncommitted >= COMMIT_EVERY:
            self._commit(asynchronous=True)

    def _commit(self, *, asynchronous: bool, only: set[_TP] | None = None) -> None:
        offsets = {tp: o for tp, o in self._done.items() if only is None or tp in only}
        if not offsets:
            return
        self._outcomes.flush()  # their audit records first: never commit past a lost write
        try:
            partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            if asynchronous:
                self._consumer.commit(offsets=partitions, asynchronous=True)
            else:
                self._consumer.commit(offsets=partitions, asynchronous=False)
        except KafkaException as exc:
            log.warning("consumer group %s: commit failed: %s", self.group, exc.args[0])
            return
        for tp, offset in offsets.items():
            if self._done.get(tp) == offset:  # a late commit (_close) keeps newer ones
                del self._done[tp]
        if not self._done:
            self._uncommitted = 0
        self._last_commit = time.monotonic()

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            log.warning("consumer group %s: commit failed: %s", self.group, err.str())

    # -- handling -------------------------------------------------------------------------------

    def _process(self, item: _Item) -> None:
        try:
            event = DeliveredEvent.from_record(DELIVERED.decode(item.msg.value()))
        except SerializationError as exc:
            self._outcomes.quarantine(item.msg, item.tp, item.offset, str(exc))
            self._mark_done(item)
            return
        log_step(logging.DEBUG, "attempting", event, of=self._outcomes.policy(event).max_attempts)
        shed = self._cc.shedding
        if shed.lag_threshold is not None and event.priority <= shed.max_priority:
            lag = self._lag()
            if lag > shed.lag_threshold:
                reason = f"load shedding: lag {lag} > {shed.lag_threshold}"
                self._outcomes.postpone(
                    event, shed.delay, reason, audit.SHED, partition=item.tp[1], offset=item.offset
                )
                self.stats.shed += 1
                self._mark_done(item)
                return
        log_step(logging.DEBUG, "doing", event)
        started = time.monotonic()
        assert self._handler is not None
        try:
            self._handler(event)
        except Drop as signal_:
            self._outcomes.audit(audit.DROPPED, event, signal_.reason)
            self.stats.dropped += 1
            log_step(logging.INFO, "skipping", event, outcome="dropped", reason=signal_.reason)
        except Postpone as signal_:
            self._outcomes.postpone(
                event,
                signal_.delay,
                signal_.reason,
                audit.RESCHEDULED,
                partition=item.tp[1],
                offset=item.offset,
            )
            self.stats.postponed += 1
        except Retry as signal_:
            self._outcomes.failed(event, signal_.reason, signal_, signal_.delay)
        except Exception as exc:
            self._outcomes.failed(event, f"{type(exc).__name__}: {exc}", exc, None)
        else:
            self.stats.handled += 1
            elapsed_ms = (time.monotonic() - started) * 1000
            log_step(logging.INFO, "finishing", event, ms=round(elapsed_ms, 1))
        self._mark_done(item)

    # -- lag ----------------------------------------------------------------------------------

    def _lag(self) -> int:
        """Events waiting on this consumer's partitions: buffered plus not yet fetched.

        Uses the watermarks of the last fetch responses; paused partitions are not fetched, so
        theirs are asked for at most every ``LAG_REFRESH_S``. A partition that reported its end
        counts as empty (its last offsets may be transaction markers).
        """
        total = sum(len(b) for b in self._buffers.values())
        refresh = time.monotonic() >= self._paused_high_at + LAG_REFRESH_S
        if refresh:
            self._paused_high_at = time.monotonic()
        for tp in self._assigned:
            if tp in self._eof:
                continue
            start = self._next_offset.get(tp)
            if start is None:
                continue  # nothing fetched yet: unknown
            high = self._high(tp, refresh)
            total += max(0, high - start)
        return total

    def _high(self, tp: _TP, refresh: bool) -> int:
        part = TopicPartition(*tp)
        if tp in self._paused:
            if refresh or tp not in self._paused_high:
                try:
                    _, high = self._consumer.get_watermark_offsets(
                        part, timeout=WATERMARK_TIMEOUT_S, cached=False
                    )
                    self._paused_high[tp] = int(high)
                except KafkaException:
                    pass
            cached = self._paused_high.get(tp)
            if cached is not None:
                return cached
        _, high = self._consumer.get_watermark_offsets(part, cached=True)
        return int(high) if high is not None and high >= 0 else 0


def _describe(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)


__all__ = ["AlertHook", "ConsumerStats", "Handler", "PriorityConsumer"]
