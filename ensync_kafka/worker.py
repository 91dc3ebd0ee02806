"""Tier workers: hold deferrals in RocksDB until due, then release them exactly once.

One :class:`TierWorker` per tier: a read_committed consumer in the tier's group, a transactional
producer, and a :class:`~ensync_kafka.state.PartitionStore` per assigned partition. Each loop
turn is one Kafka transaction holding the intake of a batch (changelog puts, audit), the release
of what is due (priority-topic records, changelog tombstones and delivered markers, audit) and
the consumer offsets. Local state is written only after the commit, so an aborted or crashed
turn leaves nothing behind that the changelog does not also say.

Every transaction carries the offsets of all assigned partitions, even a turn that consumed
nothing: the group generation in ``send_offsets_to_transaction`` is what fences a zombie that
lost its partitions (KIP-447), and on assignment ``committed()`` waits for its open transaction.

What a record read does is ``_intake.Intake``'s and what a release writes ``_release.Release``'s;
this module runs the turn, its transaction and the partitions' assignment and restore.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from ._intake import Intake
from ._kafka import BoundedCall, BrokerWatch, retire, where
from ._release import Release
from ._sticky import StickyPartitions
from ._turn import Turn
from ._txn import TXN_TIMEOUT_S, TransactionalProducers
from .audit import DeferralAudit
from .config import Config, TierConfig
from .due import DueTimers
from .exceptions import BrokerError
from .groups import tier_consumer_settings, warn_if_session_differs
from .hanging import HANGING_MARGIN_S
from .hooks import TurnPhases, WorkerHooks
from .models import now_ms
from .restore import replay_changelog
from .settle import AbortSettle
from .state import MARKER_PREFIX, PartitionStore, StateMemory
from .topics import TopicNames

log = logging.getLogger("ensync_kafka.worker")

MARKER_EXPIRY_INTERVAL_S = 30.0
STATS_LOG_INTERVAL_S = 30.0
SHUTDOWN_FLUSH_S = 5.0
"""How long a stopping tier waits for each producer's queued records (none after a commit)."""

ASSIGN_COMMITTED_TIMEOUT_S = TXN_TIMEOUT_S
"""How long an assignment's ``committed()`` waits for the group's open transactions (a previous
owner's); past it the tier joins again (TierWorker._after_rebalance_failure)."""

HANGING_HINT = (
    "; if this repeats, a transaction may be left open on the group's offsets "
    "(`ensync-kafka topics hanging` names it; README, broker restarts)"
)
COORDINATOR_MOVED = (
    "the group lost its assignment, so its coordinator may have moved; a producer that cached "
    "the old one can wait for it for good (librdkafka #5511)"
)
"""Why a tier renews its producers after a lost assignment (its group session ended unanswered,
as when the coordinator's broker of a cluster fails): the next send_offsets_to_transaction of a
producer kept would wait on the coordinator that left until given up (SEND_OFFSETS_TIMEOUT_S)."""
BROKER_GONE = (
    "a transaction's records timed out, so a broker may have gone, and with it the coordinator "
    "its producer would abort through; new producers abort it and find the coordinator afresh"
)
TIMEOUT_CODES = frozenset({KafkaError._TIMED_OUT, KafkaError._MSG_TIMED_OUT})
"""Errors of a transaction whose records got no answer. It is aborted by new producers (their
init_transactions fences the old one and aborts what it left open) rather than by its own: with
the consumer group protocol a broker's death loses no assignment, so nothing else renews the
producers, and a producer kept can wait on the coordinator that died, in its abort (10 s bound)
or its next send_offsets_to_transaction (15 s; librdkafka #5511). Killing a broker of three
(consumer protocol): aborting with the old producer, 3 of 12 runs waited 15 s in
send_offsets_to_transaction; renewing after that abort, none did in 19, but one abort waited
its 10 s; aborting by renewing, neither happened in 8 (max lateness 10-19 s, median 13)."""
RebalanceCallback = Callable[[Consumer, list[TopicPartition]], None]


@dataclass
class TierStats:
    accepted: int = 0
    delivered: int = 0
    duplicates: int = 0
    invalid: int = 0
    commits: int = 0
    aborts: int = 0
    controls: int = 0
    restored: int = 0
    restarts: int = 0
    """Times the tier let its partitions go and joined again with new clients (a start-over
    after a transaction failed, or a stranded consumer: BrokerWatch)."""


class TierWorker:
    """Holds and releases the deferrals of one tier. Runs in the calling thread."""

    def __init__(
        self,
        config: Config,
        tier: TierConfig,
        *,
        stop: threading.Event | None = None,
        hooks: WorkerHooks | None = None,
        memory: StateMemory | None = None,
    ) -> None:
        self.config = config
        w = config.worker
        self.memory = memory or StateMemory(w.state_cache_bytes, w.state_memtable_bytes)
        self.tier = tier
        self.stop_event = stop or threading.Event()
        self.hooks = hooks or WorkerHooks()
        self.stats = TierStats()
        self.names = TopicNames(config.prefix)
        self.topic = self.names.defer(tier.name)
        self.state_topic = self.names.state(tier.name)
        actor = f"worker:{w.id}"
        audit_of = DeferralAudit(tier=tier.name, actor=actor)
        self.intake = Intake(
            self.names, config.queues, tier=tier.name, actor=actor, audit_of=audit_of
        )
        self.release = Release(self.names, config.queues, tier=tier.name, audit_of=audit_of)
        self.state_root = Path(w.state_dir) / config.prefix / w.id / tier.name
        self.stores: dict[int, PartitionStore] = {}
        self.positions: dict[int, int] = {}
        self.due = DueTimers(w)
        self._next_expiry = 0.0
        self._next_stats = time.monotonic() + STATS_LOG_INTERVAL_S
        # Monitoring (monitor.py) reads the stores from its own thread: ``lock`` guards the
        # ``stores`` mapping and store closing; ``restoring`` holds partitions not yet restored.
        self.lock = threading.RLock()
        self.restoring: set[int] = set()
        self.rebalanced = False
        self._assignment_lost = False
        """Set by on_lost: step() renews the producers before the next transaction."""
        self._rebalance_failure: BaseException | None = None
        """What a rebalance callback raised, for step() to act on: never let out of the callback,
        because confluent-kafka can then raise from consume() an object no ``except`` catches
        (a failed ``committed()`` there comes out as a bare KafkaError, not an exception)."""
        self.txn = TransactionalProducers(config, tier.name)
        self._settle = AbortSettle(config, tier.name, w.transaction_timeout + HANGING_MARGIN_S)
        self._aborted = True
        """An abort of ours may not be final yet (AbortSettle): step() waits for it before the
        next transaction. True at start, since init_transactions aborts what a predecessor
        left open."""
        self.consumer, self.restorer = self._new_consumers()

    # -- lifecycle --------------------------------------------------------------------------

    def _new_consumers(self) -> tuple[Consumer, Consumer]:
        """The tier consumer (watched: see BrokerWatch) and the changelog restorer."""
        client = self.config.kafka.client_settings()
        w = self.config.worker
        self._consumer_watch = BrokerWatch(
            f"tier {self.tier.name}: consumer", group_session_s=w.session_timeout
        )
        consumer = Consumer(
            {
                **tier_consumer_settings(client, w),
                "group.id": self.names.worker_group(self.tier.name),
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "queued.max.messages.kbytes": 16384,
                "fetch.wait.max.ms": 50,
                **self._consumer_watch.settings(client),
            }
        )
        restorer = Consumer(
            {
                **client,
                "group.id": f"{self.config.prefix}.restore.{self.tier.name}.{w.id}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 10,
            }
        )
        return consumer, restorer

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            [self.topic],
            on_assign=self._guarded(self._on_assign),
            on_revoke=self._guarded(self._on_revoke),
            on_lost=self._guarded(self._on_lost),
        )

    def _guarded(self, callback: RebalanceCallback) -> RebalanceCallback:
        """``callback`` with what it raises kept for step() (see ``_rebalance_failure``), and
        never run for a replaced consumer closing in the background (_replace_consumers)."""

        def guarded(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            if consumer is not self.consumer:
                return
            try:
                callback(consumer, partitions)
            except BaseException as exc:
                if self._rebalance_failure is None:
                    self._rebalance_failure = exc

        return guarded

    def run(self) -> None:
        self.txn.init()
        # Connect the restore consumer, and learn every output topic's partitions, now rather
        # than in the first assignment's or the first release's critical path.
        self.restorer.list_topics(self.state_topic, timeout=TXN_TIMEOUT_S)
        topics = self.txn.list_topics(TXN_TIMEOUT_S)
        self.release.sticky = StickyPartitions(
            {
                topic: len(topics[topic].partitions)
                for topic in self.release.topics.values()
                if topic in topics and topics[topic].error is None
            }
        )
        warn_if_session_differs(self.config, self.names.worker_group(self.tier.name))
        self._subscribe()
        log.info("tier %s: worker %s started", self.tier.name, self.config.worker.id)
        try:
            while not self.stop_event.is_set():
                self.step()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self.consumer.close()  # leaves the group: partitions move on at once
        finally:
            self.restorer.close()
            with self.lock:
                for store in self.stores.values():
                    store.close()
                self.stores.clear()
            self.txn.flush_all(SHUTDOWN_FLUSH_S)
            log.info("tier %s: worker stopped (%s)", self.tier.name, self.stats)

    # -- one turn -----------------------------------------------------------------------------

    def step(self) -> None:
        """Consume a batch, release what is due, commit both in one transaction."""
        if self._consumer_watch.stranded:
            log.warning("tier %s: replacing the stranded consumer", self.tier.name)
            self._replace_consumers()
        if self._aborted:
            if not self._settle.wait(self.stop_event):
                return
            self._aborted = False
        wait_s = self.due.wait_s(self.stores, now_ms())
        msgs = self.consumer.consume(self.config.worker.intake_batch_size, wait_s)
        if self._rebalance_failure is not None:
            self._after_rebalance_failure()  # drops msgs: nothing of them was committed
            return
        if self._assignment_lost:
            try:
                self.txn.renew(COORDINATOR_MOVED)
                self._assignment_lost = False
            except KafkaException as exc:  # the cluster is away: the producers kept will do
                log.warning("tier %s: renewing producers: %s; next turn again", self.tier.name, exc)
        now = now_ms()
        turn = Turn(started=time.monotonic())
        # Release first: the turn's intake work then overlaps the wait for the latest due time
        # it pre-staged, and the lookahead (measured from here) accounts for it.
        self.release.stage(self.due.take(self.stores, now), now, turn)
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise BrokerError(
                        f"tier {self.tier.name}: consumer: {err.str()}", code=err.code()
                    )
                log.warning("tier %s: consumer error: %s", self.tier.name, err.str())
                continue
            self._intake(msg, turn, now)
        self._expire_markers(now, turn)
        if not turn.empty:
            self._commit(turn)
        self._log_stats()

    # -- intake -------------------------------------------------------------------------------

    def _intake(self, msg: Message, turn: Turn, now: int) -> None:
        p, _ = where(msg)
        turn.consumed(msg)
        store = self.stores.get(p)
        if store is not None:  # else not ours any more: the next owner reads it again
            self.intake.take(msg, p, store, turn, now)

    def _expire_markers(self, now: int, turn: Turn) -> None:
        if time.monotonic() < self._next_expiry:
            return
        self._next_expiry = time.monotonic() + MARKER_EXPIRY_INTERVAL_S
        before = now - int(self.config.worker.delivered_retention * 1000)
        for p, store in self.stores.items():
            for defer_id in store.expired_markers(before, self.config.worker.fire_batch_size):
                turn.change(p, MARKER_PREFIX + defer_id.encode(), None)

    # -- the transaction ----------------------------------------------------------------------

    def _commit(self, turn: Turn) -> None:
        txn = self.txn
        producer = txn.current
        last_offsets: dict[int, int] = {}

        def on_changelog(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                p, offset = where(msg)
                last_offsets[p] = offset

        started = turn.started
        produce, state_topic = producer.produce, self.state_topic
        begun = time.monotonic()
        try:
            if txn.stranded:  # it would wait for good: replace it (_abort, _start_over)
                raise KafkaException(
                    KafkaError(KafkaError._TRANSPORT, f"tier {self.tier.name}: producer stranded")
                )
            producer.begin_transaction()
            for topic, key, value, headers, partition in turn.records:
                try:
                    produce(topic, value, key, partition, headers=headers)
                except BufferError:
                    txn.produce(topic, key, value, partition=partition, headers=headers)
            for p, changes in turn.changelog.items():
                for key, value in changes[:-1]:
                    try:
                        produce(state_topic, value, key, p)
                    except BufferError:
                        txn.produce(state_topic, key, value, partition=p)
                key, value = changes[-1]  # its delivery report says how far the changelog got
                txn.produce(state_topic, key, value, partition=p, on_delivery=on_changelog)
            produced = time.monotonic()
            # The offsets go out beside the acknowledgements (TransactionalProducers.send_offsets).
            sending = self._send_offsets({**self.positions, **turn.next_offset})
            try:
                producer.flush(TXN_TIMEOUT_S)  # serves the changelog delivery reports
                acked = time.monotonic()
            finally:
                if sending is not None:  # nothing else touches the transaction before it ends
                    sending.result()
            offsets_sent = time.monotonic()
            self.due.observe_prep((offsets_sent - started) * 1000)
            wait_ms = turn.commit_not_before_ms - now_ms()
            if wait_ms > 0:  # never visible before due: see WorkerConfig.release_lookahead
                time.sleep(wait_ms / 1000)
            while now_ms() < turn.commit_not_before_ms:
                time.sleep(0.0005)
            held = time.monotonic()
            txn.commit()
            committed = time.monotonic()
            committed_at = now_ms()
        except KafkaException as exc:
            self.hooks.on_transaction(self.tier.name, time.monotonic() - begun, False)
            self._abort(turn, exc)
            txn.advance()
            return
        txn.advance()
        self.hooks.on_transaction(self.tier.name, committed - begun, True)
        self.positions.update(turn.next_offset)
        for p, changes in turn.changelog.items():
            store = self.stores.get(p)
            if store is not None:
                end = last_offsets.get(p)
                store.apply(changes, None if end is None else end + 1)
        self.hooks.on_phases(
            self.tier.name,
            TurnPhases(
                stage=begun - started,
                produce=produced - begun,
                acks=acked - produced,
                offsets=offsets_sent - acked,
                hold=held - offsets_sent,
                commit=committed - held,
                apply=time.monotonic() - committed,
            ),
        )
        st = self.stats
        st.commits += 1
        st.accepted += turn.accepted
        st.duplicates += turn.duplicates
        st.invalid += turn.invalid
        st.delivered += len(turn.released)
        st.controls += len(turn.controls)
        self.hooks.on_commit(self.tier.name, turn.accepted, turn.duplicates, turn.invalid)
        for effect in turn.controls:
            self.hooks.on_control(self.tier.name, effect.op, effect.outcome, effect.deferral)
        if turn.admitted or turn.released:
            self.hooks.on_batch(self.tier.name, turn.admitted, turn.released, committed_at)

    def _send_offsets(self, offsets: dict[int, int]) -> BoundedCall | None:
        if not offsets:
            return None
        tps = [TopicPartition(self.topic, p, o) for p, o in offsets.items()]
        return self.txn.send_offsets(tps, self.consumer.consumer_group_metadata())

    def _abort(self, turn: Turn, exc: KafkaException) -> None:
        err: KafkaError = exc.args[0]
        self.stats.aborts += 1
        if err.fatal() or not err.txn_requires_abort():
            # Fenced, failed, or the outcome is unknown: retries ran out, or the call was
            # abandoned (CallAbandoned).
            self._start_over(exc)
            return
        try:
            if err.code() in TIMEOUT_CODES:
                log.warning("tier %s: renewing producers to abort: %s", self.tier.name, err.str())
                self.txn.renew(BROKER_GONE)
            else:
                log.warning("tier %s: aborting transaction: %s", self.tier.name, err.str())
                self.txn.abort()
        except KafkaException as abort_exc:  # fenced while aborting, wedged, or abandoned
            self._start_over(abort_exc)
            return
        self._aborted = True
        # Nothing of this turn happened (RocksDB is written only after a commit): read its
        # records again.
        for p, offset in turn.first_offset.items():
            if p in self.stores:
                self.consumer.seek(TopicPartition(self.topic, p, offset))

    def _start_over(self, exc: KafkaException) -> None:
        """Do in-process what a restart would: a new producer with the same transactional id,
        whose init_transactions fences this one and completes or aborts what it left open, then
        new consumers that join the group again and read the partitions' state and positions
        from Kafka, since only the broker knows how that transaction ended (and the consumer may
        be stranded with the producer: BrokerWatch). At most PRODUCER_RENEWALS_MAX times in the
        window."""
        self.txn.replace(exc)
        self._aborted = True
        self._replace_consumers()

    def _replace_consumers(self) -> None:
        """Let the owned partitions go as a lost assignment does (nothing uncommitted is kept)
        and join the group again with a new consumer and restorer: after a start-over, or when
        the consumer knows no broker any more and would never rejoin (BrokerWatch; the same
        metadata response strands every client that asked for metadata at that moment)."""
        self.stats.restarts += 1
        owned = [TopicPartition(self.topic, p) for p in sorted(self.stores)]
        self._on_revoke(self.consumer, owned)
        old_consumer, old_restorer = self.consumer, self.restorer
        self.consumer, self.restorer = self._new_consumers()
        self._subscribe()
        # Swapped first: the old consumer's rebalance callbacks, run by its close, are ignored.
        retire(old_consumer, f"{self.tier.name}-consumer")
        retire(old_restorer, f"{self.tier.name}-restorer")

    # -- assignment and restore -----------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.rebalanced = True
        if not partitions:
            return
        # committed() waits for a previous owner's open transaction (require_stable), which is
        # also what makes the changelog below final for these partitions.
        for tp in consumer.committed(partitions, timeout=ASSIGN_COMMITTED_TIMEOUT_S):
            if tp.offset >= 0:
                self.positions[tp.partition] = tp.offset
        numbers = [tp.partition for tp in partitions]
        with self.lock:
            self.restoring.update(numbers)
        stores = {p: PartitionStore(self.state_root / str(p), self.memory) for p in numbers}
        started = time.monotonic()
        try:
            restored = replay_changelog(
                self.restorer, self.state_topic, stores, on_applied=self._count_restored
            )
        except BaseException:
            with self.lock:  # closed, so a later assignment can open them again
                for store in stores.values():
                    store.close()
                self.restoring.difference_update(numbers)
            raise
        with self.lock:
            self.stores.update(stores)
            self.restoring.difference_update(numbers)
        log.info(
            "tier %s: assigned %s, restored %d changelog records in %.2fs",
            self.tier.name,
            numbers,
            restored,
            time.monotonic() - started,
        )
        self.hooks.on_assigned(self.tier.name, numbers)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment_lost = True
        self._on_revoke(consumer, partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        with self.lock:
            for p in numbers:
                store = self.stores.pop(p, None)
                if store is not None:
                    store.close()
                self.positions.pop(p, None)
                self.restoring.discard(p)
        if numbers:
            log.info("tier %s: revoked %s", self.tier.name, numbers)
            self.hooks.on_revoked(self.tier.name, numbers)

    def _after_rebalance_failure(self) -> None:
        """A Kafka call in an assignment failed (``committed()`` or the changelog restore timed
        out while the broker recovers, say): its partitions are not held, so the consumer must
        not read on. Join again with new consumers, as a start-over does; anything else that an
        assignment raised (a state directory that cannot be opened) stops the tier."""
        exc, self._rebalance_failure = self._rebalance_failure, None
        assert exc is not None
        if not isinstance(exc, KafkaException):
            raise exc
        err: KafkaError = exc.args[0]
        hint = HANGING_HINT if err.code() == KafkaError._TIMED_OUT else ""
        log.warning(
            "tier %s: assignment failed (%s); joining the group again%s", self.tier.name, exc, hint
        )
        self._replace_consumers()

    def _count_restored(self, n: int) -> None:
        self.stats.restored += n

    def _log_stats(self) -> None:
        if time.monotonic() < self._next_stats:
            return
        self._next_stats = time.monotonic() + STATS_LOG_INTERVAL_S
        held = sum(s.held_count() for s in self.stores.values())
        log.info("tier %s: held~%d %s", self.tier.name, held, self.stats)
