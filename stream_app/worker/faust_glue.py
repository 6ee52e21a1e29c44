"""Every use of Faust's (and aiokafka's) internals, in one place.

Faust gives the worker its consumer group membership, the co-partitioning assignor, the RocksDB tables
with their changelogs and recovery, and timers. It would also move every record through a per-message
path (a ``Message`` object, a channel queue, an ``Event``, a stream iterator, an ack) that costs more event
loop time per message than classifying it; so the input topic is taken off that path here, a fetched
chunk at a time. What this module relies on, and ``tests/unit/worker/test_faust_contract.py`` checks
against the installed versions so that an upgrade fails loudly instead of silently:

* the aiokafka consumer's cluster metadata (``_client.cluster``) for partition counts, and the app's
  ``consumer_generation_id`` (which assignment a fetched chunk belongs to);
* ``Consumer.seek``, ``earliest_offsets`` and the consumer thread's ``call_thread`` with aiokafka's
  ``committed`` (a newly assigned partition's start, read from the broker);
* the consumer thread's ``seek_to_committed`` (what Faust's ``perform_seek`` calls after a rebalance), with
  aiokafka's ``seek_to_committed``, ``seek``, ``beginning_offsets``, ``end_offsets`` and the fetcher's
  ``_default_reset_strategy``;
* the consumer thread's ``verify_event_path`` (Faust's livelock detector) with aiokafka's subscription
  state (``_subscription.subscription.assignment``, ``state_value``, ``has_valid_position``);
* ``Consumer._drain_messages`` (the fetch loop), ``_wait_next_records``, ``_to_message``, ``callback``,
  ``_read_offset``, ``_committed_offset``, ``_buffered_partitions``, ``flow_active``, ``_commit`` and the
  thread delegate ``_thread`` with its aiokafka consumer ``_consumer``;
* ``AIOKafkaConsumerThread._create_worker_consumer`` and aiokafka's ``AIOKafkaConsumer._isolation_level``
  (the input is read ``read_committed``, which Faust only does for its own transactions);
* ``App._new_transport`` and ``App.on_start`` (mode's service hook); the ``faust.stores`` registry
  (``STORES.aliases``); the RocksDB store's
  ``_dbs``, ``offset_key``, ``partition_path``, ``assign_partitions`` and ``_key_index``;
* ``Table.send_changelog``, ``Table.changelog_topic_name`` and the store's ``set_persisted_offset``;
  Faust's ``Producer._producer`` (the aiokafka producer that sends changelog records) with its
  ``_metadata`` and ``client.force_metadata_update``;
* the assignor's ``_tps_url`` (which worker's ``canonical_url`` holds a table partition);
* mode's ``Worker._schedule_shutdown`` (signals) for the bounded stop;
* aiokafka's fetcher looks up ``MemoryRecords`` per fetch response (``tolerant_records``);
* the recovery service's ``in_recovery``, ``active_highwaters``, ``active_offsets``, ``need_recovery``,
  ``flush_buffers``, ``_set_recovery_ended`` and ``signal_recovery_end`` and the table manager's
  ``changelog_queue`` (recovery over transactional changelogs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import faust
from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import OffsetResetStrategy
from aiokafka.structs import TopicPartition
from faust.stores import STORES
from faust.stores.rocksdb import Store as RocksStore
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from stream_app.core.slots import RecordLike
from stream_app.worker import tolerant_records

__all__ = [
    "ChunkHandler",
    "EmotionApp",
    "EmotionWorker",
    "FaustTableStore",
    "StoreDiscardHook",
    "broker_committed_offsets",
    "commit",
    "committed_offset",
    "lag_positions",
    "log_start_offsets",
    "register_store",
    "seek",
    "seek_to_committed_or_reset",
    "settle_transactional_recovery",
    "table_owner_url",
    "table_owner_urls",
    "topic_partition_count",
]

_log = logging.getLogger(__name__)

ChunkHandler = Callable[[str, Mapping[int, Sequence[RecordLike]], int], Awaitable[None]]
"""``handler(topic, {partition: records}, generation_id)``: takes one fetched chunk of an input topic."""

StoreDiscardHook = Callable[[str, int, str], None]
"""``hook(table_name, partition, reason)``: a local table partition was discarded to be rebuilt."""

STORE_SCHEME = "emotion-rocksdb"


# ---------------------------------------------------------------------------------------- consumer
def _assignment(consumer: AIOKafkaConsumer | None) -> Any:
    """aiokafka's partition state of ``consumer``'s current assignment (None before one, or without a
    consumer): ``state_value(tp)`` per partition, ``tps``."""
    subscription = consumer._subscription.subscription if consumer is not None else None
    return subscription.assignment if subscription is not None else None


class EmotionConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread, reading ``read_committed``: aborted and open transactions are
    never read ahead of their outcome."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._isolation_level = "read_committed"
        return consumer

    def verify_event_path(self, now: float, tp: TP) -> None:
        """Faust's livelock detector, skipping a partition that has no position yet.

        aiokafka's ``position`` asserts that one exists, and a partition is without one between its
        assignment (or a reset to the log start or end) and the fetcher's offset lookup. Faust's check reads
        it from the event loop's thread while the consumer thread resets, and the assertion crashed the
        worker (found as a worker exiting 0.8 s after its post-rebalance seek). There is nothing to verify
        for such a partition yet: no fetch can be due before it has a position.
        """
        assignment = _assignment(self._consumer)
        if assignment is not None:
            state = assignment.state_value(TopicPartition(tp.topic, tp.partition))
            if state is not None and not state.has_valid_position:
                return None
        super().verify_event_path(now, tp)
        return None

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Faust's seek of every assigned partition after a rebalance, with the input partitions that
        aiokafka's ``seek_to_committed`` leaves where they are moved too (:func:`seek_to_committed_or_reset`)."""
        consumer = self._ensure_consumer()
        topics: frozenset[str] = getattr(self.consumer, "chunk_topics", frozenset())
        return cast(Mapping[TP, int], await self.call_thread(seek_to_committed_or_reset, consumer, topics))


async def seek_to_committed_or_reset(
    consumer: AIOKafkaConsumer, topics: frozenset[str]
) -> dict[TopicPartition, int | None]:
    """Seek every assigned partition of ``consumer`` to its committed offset, and one of ``topics`` without a
    committed offset to where ``auto.offset.reset`` puts it (the log start, for ``earliest``).

    ``topics`` are those whose offsets the group commits (the input). Table changelogs are assigned too, but
    their positions are the recovery's and the standbys' own (the group commits none): moving them to the log
    start would replay whole changelogs.

    Faust drops the records it fetched for a partition while a rebalance or table recovery was in progress,
    and relies on this seek to read them again. aiokafka's own ``seek_to_committed`` only moves partitions
    whose committed offset is above 0, so a partition without one (a new group, a new partition) or at 0
    kept its position past the dropped records; when nothing more arrived for it, they were never read
    (found as a whole input partition without outcomes after a fenced zombie's partitions moved twice).

    Returns:
        partition -> committed offset (None where the group has none), as aiokafka's method does.

    Raises:
        KafkaError: the group coordinator did not answer.
    """
    committed: dict[TopicPartition, int | None] = await consumer.seek_to_committed()
    unset: list[TopicPartition] = []
    for tp, offset in committed.items():
        if tp.topic not in topics:
            continue
        if offset is None or offset < 0:
            unset.append(tp)
        elif offset == 0:
            consumer.seek(tp, 0)
    if unset:
        # The offsets are looked up first and then set with a plain seek, never with seek_to_beginning or
        # seek_to_end: those leave the partition without a position until the fetcher gets round to the
        # reset (up to a fetch's wait later), and Faust's livelock detector, reading the position from
        # another thread meanwhile, crashed the worker on aiokafka's assertion.
        strategy = consumer._fetcher._default_reset_strategy
        starts: dict[TopicPartition, int] = {}
        if strategy == OffsetResetStrategy.EARLIEST:
            starts = await consumer.beginning_offsets(unset)
        elif strategy == OffsetResetStrategy.LATEST:
            starts = await consumer.end_offsets(unset)  # the last stable offset, read_committed
        assigned = consumer.assignment()
        for tp, offset in starts.items():
            if tp in assigned:  # a rebalance may have taken it meanwhile
                consumer.seek(tp, offset)
    return committed


class EmotionConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with the input topics taken off the per-message path.

    ``chunk_topics`` are handed to ``chunk_handler`` one fetched chunk at a time; records of every other
    topic (table changelogs during recovery) go through Faust's own path unchanged.
    """

    chunk_topics: frozenset[str] = frozenset()
    chunk_handler: ChunkHandler | None = None

    def _new_consumer_thread(self) -> Any:
        return EmotionConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # the Fetcher service's loop
        callback = self.callback
        to_message = self._to_message
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        chunk_topics = self.chunk_topics
        read_offset = self._read_offset
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                records, active = await self._wait_next_records(1.0)
                if not records or self.should_stop:
                    continue
                generation = self.app.consumer_generation_id
                chunks: dict[str, dict[int, Sequence[RecordLike]]] = {}
                for tp, recs in records.items():
                    if not recs or (active is not None and tp not in active and tp not in self._buffered_partitions):
                        continue
                    if tp.topic in chunk_topics:
                        chunks.setdefault(tp.topic, {})[tp.partition] = recs
                        read_offset[tp] = recs[-1].offset
                        continue
                    for record in recs:  # Faust's own path (changelogs)
                        if not self.flow_active:
                            break
                        await callback(to_message(tp, record))
                        read_offset[tp] = record.offset
                handler = self.chunk_handler
                if handler is None or not self.flow_active:
                    continue
                for topic, parts in chunks.items():
                    await handler(topic, parts, generation)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise


class EmotionTransport(faust_aiokafka.Transport):
    Consumer = EmotionConsumer


class EmotionApp(faust.App):
    """``faust.App`` whose consumer takes the input topics a chunk at a time (see the module docstring).

    ``early_tasks`` start with the app, not after the first table recovery as Faust's own ``app.task`` and
    ``app.timer`` do: the worker's health beat, broker check and pipeline start-up must run while a long
    recovery is in progress (a liveness probe that fails during recovery would restart it for ever).
    """

    early_tasks: list[Callable[[], Awaitable[None]]]

    def _new_transport(self) -> Any:
        tolerant_records.install()  # a header name that is not UTF-8 must not kill the fetcher
        return EmotionTransport(self.conf.broker_consumer, self)

    async def on_start(self) -> None:
        await super().on_start()
        for task in getattr(self, "early_tasks", ()):
            self.add_future(task())

    @property
    def emotion_consumer(self) -> EmotionConsumer:
        consumer = self.consumer
        assert isinstance(consumer, EmotionConsumer)
        return consumer


def generation(app: faust.App) -> int:
    """The consumer group generation of the current assignment (Faust's ``consumer_generation_id``, set at
    every assignment; the chunk handler is given the one its records were fetched in)."""
    return int(app.consumer_generation_id)


def committed_offset(app: faust.App, topic: str, partition: int) -> int | None:
    """The committed offset Faust read for this partition at its last seek (None when there is none)."""
    consumer: Any = app.consumer
    value = consumer._committed_offset.get(TP(topic, partition))
    return int(value) if value is not None else None


async def broker_committed_offsets(app: faust.App, topic: str, partitions: Sequence[int]) -> dict[int, int | None]:
    """The group's committed offsets of ``topic``'s ``partitions``, read from the broker now (through Faust's
    consumer thread); None where the group has none. Unlike :func:`committed_offset`, never stale: under
    exactly-once output the transactions commit offsets without Faust seeing them.

    Raises:
        KafkaError: the group coordinator did not answer.
    """
    thread: Any = app.consumer._thread  # type: ignore[attr-defined]
    consumer = thread._ensure_consumer()

    async def read() -> dict[int, int | None]:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in partitions}

    return cast(dict[int, int | None], await thread.call_thread(read))


async def log_start_offsets(app: faust.App, topic: str, partitions: Sequence[int]) -> dict[int, int]:
    """The log start offset of each of ``topic``'s ``partitions`` (retention may have moved it past 0).

    Raises:
        KafkaError: no broker answered.
    """
    earliest = await app.consumer.earliest_offsets(*(TP(topic, p) for p in partitions))
    return {tp.partition: int(offset) for tp, offset in earliest.items() if offset is not None}


async def seek(app: faust.App, topic: str, partition: int, offset: int) -> None:
    """Move the consumer's fetch position of ``topic[partition]`` to ``offset`` (records already fetched for
    it are discarded by aiokafka), the way Faust's own seeks do it."""
    await app.consumer.seek(TP(topic, partition), offset)


async def commit(app: faust.App, topic: str, offsets: Mapping[int, int]) -> bool:
    """Commit ``offsets`` (partition -> next offset to read) of ``topic`` through Faust's consumer thread.

    Returns False when nothing was committed (a rebalance took the partitions away meanwhile).
    """
    consumer: Any = app.consumer
    tps = {TP(topic, p): o for p, o in offsets.items()}
    ok = bool(await consumer._commit(tps))
    if ok:
        consumer._committed_offset.update(tps)
    return ok


def settle_transactional_recovery(app: faust.App, quiet: dict[Any, int]) -> int:
    """Let table recovery finish over changelogs written in transactions (exactly-once output).

    Recovery waits until it applied a record at the changelog's end offset - 1, but a transactional
    changelog ends with a commit marker (and may hold aborted records) that no reader ever receives, so
    it would wait forever. Faust handles this only for its own exactly-once mode (``detect_aborted_tx``);
    this does the same for ours: a partition whose changelog queue is drained and whose consumer position
    reached the end offset, twice in a row (``quiet`` keeps the count between calls), counts as recovered;
    when nothing else remains, the recovery is ended at once. Returns how many partitions were settled.
    """
    recovery: Any = getattr(app.tables, "recovery", None)
    if recovery is None or not recovery.in_recovery or not cast(Any, app.tables).changelog_queue.empty():
        quiet.clear()
        return 0
    assignment = _assignment(getattr(cast(Any, app.consumer)._thread, "_consumer", None))
    if assignment is None:
        return 0
    settled = 0
    for tp, highwater in list(recovery.active_highwaters.items()):
        offset = recovery.active_offsets.get(tp)
        if highwater is None or offset is None or offset >= highwater:
            quiet.pop(tp, None)
            continue
        atp = TopicPartition(tp.topic, tp.partition)
        if atp not in assignment.tps:
            continue
        state = assignment.state_value(atp)
        if not state.has_valid_position or state.position < highwater:
            quiet.pop(tp, None)
            continue
        quiet[tp] = quiet.get(tp, 0) + 1
        if quiet[tp] >= 2:
            recovery.active_offsets[tp] = highwater
            settled += 1
            quiet.pop(tp, None)
    if settled and recovery.in_recovery and not recovery.need_recovery():
        # End the recovery now, as Faust's own changelog loop does once nothing remains. That loop would
        # notice only when its wait for the next changelog record times out (5 s): under exactly-once
        # every rebalance paused every partition of the group that much longer (found in a rolling restart).
        recovery.flush_buffers()
        recovery._set_recovery_ended()
        recovery.signal_recovery_end.set()
    return settled


def topic_partition_count(app: faust.App, topic: str) -> int | None:
    """Partitions of ``topic`` in the consumer's cluster metadata (None while unknown).

    Not Faust's ``Consumer.topic_partitions``: that reads the group coordinator's metadata snapshot, which
    aiokafka keeps on the group leader only, so every other worker got None.
    """
    consumer: Any = getattr(cast(Any, app.consumer)._thread, "_consumer", None)
    if consumer is None:
        return None
    partitions = consumer._client.cluster.partitions_for_topic(topic)
    return len(partitions) if partitions else None


def lag_positions(app: faust.App, topic: str, partitions: Sequence[int]) -> dict[int, tuple[int | None, int | None]]:
    """Per partition: (last stable offset, fetch position) as the aiokafka consumer knows them now.

    The last stable offset is where ``read_committed`` reading ends (past a committed transaction's
    marker), so ``lso - position`` never counts a marker. Values may be None before the first fetch.
    """
    out: dict[int, tuple[int | None, int | None]] = {}
    assignment = _assignment(getattr(cast(Any, app.consumer)._thread, "_consumer", None))
    if assignment is None:
        return out
    tps = assignment.tps
    for p in partitions:
        tp = TopicPartition(topic, p)
        if tp not in tps:
            continue
        state = assignment.state_value(tp)
        position = state.position if state.has_valid_position else None
        out[p] = (state.lso, position)
    return out


# ---------------------------------------------------------------------------------------- tables
class ConsistentRocksStore(RocksStore):
    """Faust's RocksDB store that discards a local partition disagreeing with its changelog.

    Local state is a copy of the changelog. When the changelog was emptied, re-created or restored from
    elsewhere, the offset persisted with the local copy is beyond the changelog's end (or before its
    start, with records missing in between), and Faust's recovery stops the worker with
    ``ConsistencyError`` at every start. Before recovery reads a newly assigned partition, this store
    compares the two and deletes such a partition's local folder, so recovery rebuilds it from the
    changelog. ``discard_hook`` is told about each discard (a WARNING and a metric in the worker).
    """

    discard_hook: StoreDiscardHook | None = None

    async def assign_partitions(self, table: Any, tps: set[TP], generation_id: int = 0) -> None:
        mine = [tp for tp in tps if tp.topic in table.changelog_topic.topics]
        if mine:
            await self._discard_inconsistent(table, mine)
        await super().assign_partitions(table, tps, generation_id)

    async def _discard_inconsistent(self, table: Any, tps: list[TP]) -> None:
        consumer = self.app.consumer
        try:
            earliest = await consumer.earliest_offsets(*tps)
            latest = await consumer.highwaters(*tps)
        except Exception as exc:  # noqa: BLE001 -- no answer: let Faust's own recovery decide
            _log.warning("cannot check local state of %s against its changelog: %r", table.name, exc)
            return
        for tp in tps:
            reason = self._inconsistency(tp, earliest.get(tp), latest.get(tp))
            if reason is not None:
                self._discard(tp.partition, reason)
                hook = type(self).discard_hook
                if hook is not None:
                    hook(table.name, tp.partition, reason)

    def _inconsistency(self, tp: TP, earliest: int | None, latest: int | None) -> str | None:
        path = self.partition_path(tp.partition)
        try:
            persisted = self.persisted_offset(tp)
        except Exception as exc:  # noqa: BLE001 -- an unreadable local copy is discarded like any other
            _log.warning("local state %s is unreadable (%r)", path, exc)
            return "unreadable"
        if persisted is None or latest is None:
            return None
        if persisted >= latest:
            return "ahead_of_changelog"
        if earliest is not None and persisted < earliest - 1:
            return "behind_changelog_start"
        return None

    def _discard(self, partition: int, reason: str) -> None:
        path = self.partition_path(partition)
        db = self._dbs.pop(partition, None)
        if db is not None:
            try:
                db.close()
            except Exception as exc:  # noqa: BLE001 -- closing a copy we are about to delete
                _log.debug("closing %s: %r", path, exc)
        self._key_index.clear()
        shutil.rmtree(path, ignore_errors=True)
        _log.warning("discarded local table state %s (%s); rebuilding it from the changelog", path, reason)


def register_store() -> str:
    """Make ``emotion-rocksdb://`` name :class:`ConsistentRocksStore`; returns the URL to give a table."""
    STORES.aliases[STORE_SCHEME] = f"{__name__}:ConsistentRocksStore"
    return f"{STORE_SCHEME}://"


class FaustTableStore:
    """A Faust table's RocksDB partitions as plain partitioned byte stores (no current event needed).

    Two users: the L2 cache (``cache.tiered.L2Store``: :meth:`get_many`, :meth:`put`, :meth:`delete`, whose
    writes go to the changelog through Faust's producer first, as ``table[key] = value`` does) and the
    conversation state (``conversations.stage.StateStore``: the stage produces the changelog records
    itself, in order after their alerts, and writes here with :meth:`put_local` once they are
    acknowledged). A partition this worker does not hold, or one past the changelog's partition count (the
    input grew and the changelog not yet), is skipped: a miss on read, no write.

    An L2 changelog record is sent by Faust's producer, whose metadata is refreshed on its own schedule
    (metadata.max.age, 5 minutes): right after the changelog grew, the consumer already holds the new
    partitions while that producer still knows the old count, and aiokafka's ``send`` to a partition it
    does not know fails an assertion that crashes Faust's producer buffer and stops the worker. So an L2
    write is also skipped until the producer knows the partition, and the producer is asked to refresh.
    """

    def __init__(self, table: Any, changelog_partitions: Callable[[], int | None]) -> None:
        self.table = table
        self.changelog_topic: str = table.changelog_topic_name
        self._changelog_partitions = changelog_partitions
        self.skipped_writes = 0
        self._refreshing: Any = None

    def _db(self, partition: int) -> Any | None:
        return self.table.data._dbs.get(partition)

    def holds(self, partition: int) -> bool:
        n = self._changelog_partitions()
        return self._db(partition) is not None and n is not None and partition < n

    def get(self, partition: int, key: bytes) -> bytes | None:
        db = self._db(partition)
        return None if db is None else db.get(key)

    def _writable(self, partition: int) -> bool:
        """We hold ``partition`` and Faust's producer, which sends the L2 changelog records, knows it."""
        if not self.holds(partition):
            return False
        producer = getattr(self.table.app.producer, "_producer", None)  # Faust's aiokafka producer
        if producer is None:
            return False
        known = producer._metadata.partitions_for_topic(self.changelog_topic)
        if known is None or partition in known:
            return True  # None: not sent to yet; aiokafka's send fetches the topic's metadata first
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = producer.client.force_metadata_update()
            self._refreshing.add_done_callback(_retrieve)
        return False

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        db = self._db(partition)
        if db is None:
            return [None] * len(keys)
        get = db.get
        return [get(k) for k in keys]

    def put(self, partition: int, key: bytes, value: bytes) -> bool:
        if not self._writable(partition):
            self.skipped_writes += 1
            return False
        self.table.send_changelog(partition, key, value, key_serializer="raw", value_serializer="raw")
        self._db(partition).put(key, value)  # type: ignore[union-attr]
        return True

    def delete(self, partition: int, key: bytes) -> None:
        if not self._writable(partition):
            return
        self.table.send_changelog(partition, key, None, key_serializer="raw", value_serializer="raw")
        self._db(partition).delete(key)  # type: ignore[union-attr]

    def put_local(self, partition: int, key: bytes, value: bytes | None) -> None:
        db = self._db(partition)
        if db is None:
            return
        if value is None:
            db.delete(key)
        else:
            db.put(key, value)

    def set_persisted_offset(self, partition: int, offset: int) -> None:
        if self._db(partition) is not None:
            self.table.data.set_persisted_offset(TP(self.changelog_topic, partition), offset)

    def partitions(self) -> list[int]:
        return list(self.table.data._dbs)

    def items(self, partition: int) -> Any:
        db = self._db(partition)
        return iter(()) if db is None else db.items()


def table_owner_url(app: faust.App, changelog_topic: str, partition: int) -> str | None:
    """The advertised URL (``canonical_url``) of the worker holding ``partition`` of a table, per the
    assignor's last assignment; None while unknown (during a rebalance)."""
    urls = getattr(app.assignor, "_tps_url", {})
    url = urls.get(TP(changelog_topic, partition))
    return str(url) if url else None


def table_owner_urls(app: faust.App, changelog_topic: str) -> set[str]:
    """The advertised URLs of every worker holding a partition of a table, per the last assignment."""
    urls = getattr(app.assignor, "_tps_url", {})
    return {str(url) for tp, url in urls.items() if tp.topic == changelog_topic and url}


def _retrieve(fut: Any) -> None:
    """Read a background metadata refresh's outcome, so a failed one is not logged as never retrieved."""
    if not fut.cancelled() and fut.exception() is not None:
        _log.debug("metadata refresh failed: %r", fut.exception())


# ---------------------------------------------------------------------------------------- stopping
class EmotionWorker(faust.Worker):
    """``faust.Worker`` whose SIGTERM/SIGINT also arm the bounded-stop watchdog (``on_stop_signal``)."""

    on_stop_signal: Callable[[], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spinner = None  # Faust's start-up spinner writes terminal escapes into the worker's log

    def _schedule_shutdown(self, signal: Any) -> None:
        hook = self.on_stop_signal
        if hook is not None:
            hook()
        super()._schedule_shutdown(signal)


class Watchdog:
    """Ends the process with ``os._exit`` if an orderly stop takes longer than ``timeout_s``.

    Armed once the worker decided to stop (a signal, a crash, a lost broker). Uncommitted work stays
    uncommitted: the next owner of the partitions reads it again.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.exit_code = 0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def arm(self, exit_code: int, why: str) -> None:
        with self._lock:
            self.exit_code = max(self.exit_code, exit_code)
            if self._timer is not None:
                return
            _log.warning("stopping (%s); the process exits within %.0f s whatever happens", why, self.timeout_s)
            self._timer = threading.Timer(self.timeout_s, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        code = self.exit_code or 1
        _log.critical("orderly stop took over %.0f s: exiting now with %d, nothing more committed",
                      self.timeout_s, code)  # fmt: skip
        logging.shutdown()
        os._exit(code)

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
