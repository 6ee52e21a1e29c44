"""The worker: Faust for the group, the cache table and timers; the core pipeline for everything else.

```
EmotionConsumer (Faust's aiokafka consumer, read_committed) ── a fetched chunk ──► on_chunk
    └─► Pipeline.feed (core: intake, cache, classifier, emitter) ──► KafkaSink (aiokafka batches)
timers: commit acknowledged offsets · lag gauges · health snapshot · L2 sweep · broker check
signals: partitions assigned / revoked (bounded drain, final commit)
```

Start-up overlaps the slow parts: the model loads in a thread (:func:`stream_app.service.build_runtime`)
while Faust joins the group and recovers the table; chunks wait for the pipeline, never the reverse.
Stopping is bounded (:class:`~stream_app.worker.faust_glue.Watchdog`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from stream_app.assembly import build_pipeline
from stream_app.cache.keys import ModelIdentity, cache_key, normalise
from stream_app.cache.lru import TtlLru
from stream_app.cache.tiered import L1Entry, SweepPlanner
from stream_app.conversations.stage import ConversationStage
from stream_app.core.pipeline import Pipeline
from stream_app.core.slots import RecordLike, Result
from stream_app.errors import InfrastructureError
from stream_app.kafka_config import aiokafka_client_kwargs
from stream_app.metrics import Metrics
from stream_app.service import Runtime
from stream_app.settings import Settings
from stream_app.tracing import BatchTracer
from stream_app.worker import faust_glue
from stream_app.worker.credentials import faust_credentials
from stream_app.worker.faust_glue import EmotionApp, FaustTableStore, Watchdog
from stream_app.worker.health import Health
from stream_app.worker.sink import KafkaSink, TransactionalKafkaSink

__all__ = ["CACHE_TABLE", "CONVERSATION_TABLE", "Worker", "changelog_topic", "faust_broker_urls"]

_log = logging.getLogger(__name__)

CACHE_TABLE = "emotion-cache-v1"
CONVERSATION_TABLE = "emotion-conversations-v1"


def faust_broker_urls(bootstrap_servers: str) -> list[str]:
    """``host1:9092,host2:9092`` as the URL list Faust expects."""
    hosts = [h.strip() for h in bootstrap_servers.split(",") if h.strip()]
    if not hosts:
        raise InfrastructureError("no Kafka bootstrap servers given (EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS)")
    return [h if "://" in h else f"kafka://{h}" for h in hosts]


def changelog_topic(settings: Settings, table: str = CACHE_TABLE) -> str:
    """The changelog topic Faust names for ``table`` of this app."""
    return f"{settings.worker.app_id}-{table}-changelog"


@dataclass
class _Partitions:
    assigned: set[int] = field(default_factory=set)
    initialised: set[int] = field(default_factory=set)
    rewound: set[int] = field(default_factory=set)  # rewound to their start once in this assignment
    epoch: int = 0  # moves at every assignment and revocation


def plan_start(committed: int | None, log_start: int | None) -> int | None:
    """Where a newly assigned partition's processing must begin: its committed offset, or the log start
    when the group has none (``auto.offset.reset=earliest``) or the committed one was deleted; None when
    neither is known. A committed offset beyond the log end is the consumer's reset to handle (it reads
    from the log start, and the pipeline counts the reset)."""
    if committed is None:
        return log_start
    if log_start is not None and committed < log_start:
        return log_start
    return committed


class Worker:
    """One worker process: builds the Faust app and drives the pipeline from it.

    Args:
        settings: The frozen settings.
        metrics: The collectors (served by the health server).
        health: The probe snapshot this worker keeps current.
        input_partitions: The input topic's partition count, read at start-up (the cache table gets as
            many, so it is co-partitioned with the input).
        runtime: The model being loaded in a thread.
        watchdog: Bounds the stop once it begins.
        started_at: Monotonic time of the process start (for the start-up phase gauges).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        metrics: Metrics,
        health: Health,
        input_partitions: int,
        runtime: concurrent.futures.Future[Runtime],
        watchdog: Watchdog,
        started_at: float,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.input_partitions = input_partitions
        self.runtime_future = runtime
        self.watchdog = watchdog
        self.started_at = started_at
        self.topic = settings.topics.input
        port = settings.metrics.port
        self.advertised_url = settings.worker.advertised_url or f"http://{socket.gethostname()}:{port}"
        self.pipeline: Pipeline | None = None
        self.tracer: BatchTracer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.l2: FaustTableStore | None = None
        self.transactions: TransactionalKafkaSink | None = None
        if settings.worker.delivery == "exactly_once":
            self.transactions = TransactionalKafkaSink(self._make_producer, self.topic, settings.worker.app_id)
        self.conversation_store: FaustTableStore | None = None
        self.conversations: ConversationStage | None = None
        self._ready = asyncio.Event()
        self._recovery_quiet: dict[Any, int] = {}
        self._warm: tuple[Runtime, TtlLru[bytes, L1Entry], ModelIdentity] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parts = _Partitions()
        self._lag_partitions: set[int] = set()  # partitions whose lag gauges this worker exports
        self._generation = -1
        self._last_broker_ok = time.monotonic()
        self._first_event_logged = False
        self._stopping = False
        self.app = self._build_app()

    # ------------------------------------------------------------------ Faust app
    def _build_app(self) -> EmotionApp:
        s = self.settings
        kafka = s.kafka
        store_url = faust_glue.register_store()
        faust_glue.ConsistentRocksStore.discard_hook = self._on_store_discard
        app = EmotionApp(
            s.worker.app_id,
            broker=faust_broker_urls(kafka.bootstrap_servers),
            broker_client_id=kafka.client_id,
            broker_credentials=faust_credentials(kafka),
            store=store_url,
            datadir=str(s.worker.state_dir),
            processing_guarantee="at_least_once",
            web_enabled=False,
            topic_partitions=self.input_partitions,
            topic_replication_factor=s.topics.replication_factor,
            topic_allow_declare=True,
            topic_disable_leader=False,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=kafka.session_timeout_s,
            broker_heartbeat_interval=kafka.heartbeat_interval_s,
            broker_commit_interval=kafka.commit_interval_s,
            broker_max_poll_records=min(kafka.max_poll_records, s.batching.queue_capacity),
            consumer_metadata_max_age_ms=int(kafka.metadata_max_age_s * 1000),
            producer_acks=-1 if kafka.producer_acks == "all" else 1,
            producer_linger_ms=kafka.producer_linger_ms,
            producer_max_request_size=kafka.max_request_size_bytes,
            stream_wait_empty=False,
            table_standby_replicas=0,
            canonical_url=self.advertised_url,
            logging_config=None,
        )
        consumer_cls = faust_glue.EmotionConsumer
        consumer_cls.chunk_topics = frozenset({self.topic})
        consumer_cls.chunk_handler = self._on_chunk
        input_topic = app.topic(
            self.topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw", acks=False
        )
        app.topics.add(input_topic)
        if s.cache.l2_enabled:
            table: Any = app.Table(
                CACHE_TABLE,
                default=None,
                partitions=self.input_partitions,
                key_type=bytes,  # bytes key and value types make Faust use the raw codec
                value_type=bytes,
                store=store_url,
                options={"driver": "rocksdict"},
                help="L2 result cache: key = hash(normalised text + model identity), value = codec bytes",
            )
            changelog = table.changelog_topic_name
            self.l2 = FaustTableStore(table, lambda: faust_glue.topic_partition_count(app, changelog))
        if s.conversations.enabled:
            states: Any = app.Table(
                CONVERSATION_TABLE,
                default=None,
                partitions=self.input_partitions,
                key_type=bytes,
                value_type=bytes,
                store=store_url,
                options={"driver": "rocksdict"},
                help="Conversation state: key = conversation_id, value = conversations.codec bytes",
            )
            states_changelog = states.changelog_topic_name
            self.conversation_store = FaustTableStore(
                states, lambda: faust_glue.topic_partition_count(app, states_changelog)
            )
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_before_shutdown.connect(self._on_shutdown)
        # started with the app, not after the first table recovery (see EmotionApp)
        app.early_tasks = [
            self._startup,
            _every(s.kafka.commit_interval_s, self._commit_tick),
            _every(1.0, self._observe_tick),
            _every(5.0, self._broker_tick),
            _every(s.cache.sweep_interval_s, self._sweep_tick),
        ]
        if s.conversations.enabled:
            app.early_tasks.append(_every(s.conversations.sweep_interval_s, self._conversation_sweep_tick))
        # changelogs end in transaction markers under exactly-once, and also after a switch back from it
        app.early_tasks.append(_every(0.25, self._recovery_tick))
        return app

    # ------------------------------------------------------------------ start-up
    async def _startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.producer = self._make_producer(None)
        await self.producer.start()
        runtime = await asyncio.wrap_future(self.runtime_future)
        self.pipeline = self._build_pipeline(runtime)
        if self._warm is not None:  # model work: off the loop, so probes and heartbeats go on meanwhile
            rt, l1, identity = self._warm
            await asyncio.get_running_loop().run_in_executor(
                None, self._warm_l1, rt, l1, identity, rt.warm_file_phrases
            )
        await self.pipeline.start()
        gc.collect()
        gc.freeze()  # the model, modules and Faust's objects: never scanned again by the collector
        self._ready.set()
        _log.info("pipeline ready %.2f s after launch", time.monotonic() - self.started_at)

    def _make_producer(self, transactional_id: str | None) -> AIOKafkaProducer:
        kafka = self.settings.kafka
        client_id = f"{kafka.client_id}-out" if transactional_id is None else f"{kafka.client_id}-{transactional_id}"
        extra: dict[str, Any] = {}
        if transactional_id is not None:
            # a zombie's open transaction is aborted by the coordinator after this long at the latest
            extra = {"transactional_id": transactional_id, "transaction_timeout_ms": 60_000}
        return AIOKafkaProducer(
            **aiokafka_client_kwargs(kafka, client_id=client_id),
            acks="all" if kafka.producer_acks == "all" or transactional_id is not None else 1,
            linger_ms=kafka.producer_linger_ms,
            max_batch_size=min(512 * 1024, kafka.max_request_size_bytes),
            max_request_size=kafka.max_request_size_bytes,
            compression_type=None if kafka.compression_type == "none" else kafka.compression_type,
            enable_idempotence=kafka.producer_acks == "all" or transactional_id is not None,
            # also how long aiokafka retries a batch the broker answers with a retriable error (no leader
            # during an election, a topic just created) before failing it: as long as the worker's own bound
            # on an unreachable broker, so a slow election never stops the worker sooner than a dead broker
            request_timeout_ms=int(max(30.0, kafka.session_timeout_s, kafka.unavailable_timeout_s) * 1000),
            **extra,
        )

    def _build_pipeline(self, rt: Runtime) -> Pipeline:
        assert self.producer is not None
        built = build_pipeline(
            self.settings,
            rt,
            sink=KafkaSink(self.producer),
            metrics=self.metrics,
            on_fatal=self.fatal,
            l2=self.l2,
            conversation_store=self.conversation_store,
        )
        self._warm = (rt, built.l1, built.identity) if built.l1 is not None and rt.warm_file_phrases else None
        self.tracer = built.tracer
        self.conversations = built.conversations
        built.pipeline.emitter.transactions = self.transactions
        return built.pipeline

    @staticmethod
    def _warm_l1(rt: Runtime, l1: TtlLru[bytes, L1Entry], identity: ModelIdentity, phrases: list[str]) -> None:
        texts = list(dict.fromkeys(normalise(p) for p in phrases if p.strip()))
        step = rt.settings.batching.max_batch_size
        for start in range(0, len(texts), step):
            chunk = texts[start : start + step]
            encoded = rt.encoder.encode(chunk)
            probs = rt.engine.predict(rt.encoder.pad(encoded))
            for text, enc, row in zip(chunk, encoded, probs.tolist(), strict=True):
                result = Result(max(range(len(row)), key=row.__getitem__), tuple(row), enc.truncated)
                l1.put(cache_key(text, identity), L1Entry(result))
        _log.info("warmed L1 with %d phrase(s)", len(texts))

    # ------------------------------------------------------------------ the hot path
    async def _on_chunk(self, topic: str, parts: Mapping[int, Sequence[RecordLike]], generation: int) -> None:
        if not self._ready.is_set():
            await self._ready.wait()
        pipeline = self.pipeline
        assert pipeline is not None
        if pipeline.failed is not None or self._stopping:
            await asyncio.sleep(0.1)  # stopping: nothing more is taken
            return
        current = faust_glue.generation(self.app)
        if generation != current:
            # Fetched under an assignment that has ended (it waited for the model meanwhile). Faust's own
            # streams drop such records too (a message of another generation), and seek every partition to
            # its committed offset, so whoever owns them now, this worker too, reads these records again.
            # Taking both copies emitted each record of a kept partition twice, and under exactly-once
            # committed both.
            _log.info("dropping a chunk of partitions %s fetched before the rebalance to generation %s; "
                      "they are read again from their committed offsets", sorted(parts), current)  # fmt: skip
            return
        if generation != self._generation:
            self._generation = generation
            self._parts.initialised.clear()
            self._parts.rewound.clear()
        epoch = self._parts.epoch
        parts = self._still_assigned(parts)
        fresh = [p for p in parts if p not in self._parts.initialised]
        if fresh:
            rewound = await self._init_lanes(topic, fresh, parts)
            if rewound:
                parts = {p: records for p, records in parts.items() if p not in rewound}
        await pipeline.wait_for_space(sum(len(r) for r in parts.values()))
        if self._parts.epoch != epoch:
            # a rebalance while this chunk waited: the lanes of the partitions it moved were dropped, and
            # whoever owns them now (this worker too) reads them again from the committed offset
            live = self._parts.initialised & self._parts.assigned
            if any(p not in live for p in parts):
                _log.debug("dropping records of partitions %s: moved by a rebalance meanwhile",
                           sorted(set(parts) - live))  # fmt: skip
                parts = {p: records for p, records in parts.items() if p in live}
        await pipeline.feed(topic, parts)
        if not self._first_event_logged:
            self._first_event_logged = True
            self.metrics.cold_start_seconds.labels("first_chunk").set(time.monotonic() - self.started_at)

    def _still_assigned(self, parts: Mapping[int, Sequence[RecordLike]]) -> Mapping[int, Sequence[RecordLike]]:
        """``parts`` without partitions not assigned here now: records fetched for a previous assignment and
        delivered after the rebalance belong to another worker (or to this one again, from its committed
        offset, and a first record past it is rewound)."""
        assigned = self._parts.assigned
        if all(p in assigned for p in parts):
            return parts
        _log.debug("dropping records of partitions %s: not assigned here now", sorted(set(parts) - assigned))
        return {p: records for p, records in parts.items() if p in assigned}

    async def _init_lanes(self, topic: str, fresh: list[int], parts: Mapping[int, Sequence[RecordLike]]) -> set[int]:
        """First chunk of a partition in this assignment: tell the pipeline where the partition starts.

        Returns the partitions not taken (their records in this chunk are dropped): those rewound, or all of
        them when a rebalance happened while the offsets were read. Records fetched
        while a partition was being assigned or recovered are dropped by Faust, which relies on seeking every
        partition to its committed offset afterwards. aiokafka's seek skips a partition without a committed
        offset (or at 0), so its position stayed past the dropped records (found as a loss under
        exactly-once); the glue's seek now moves those too (``faust_glue.seek_to_committed_or_reset``), and
        this check of the first record stays as the second guard, for a seek that timed out or failed (Faust
        goes on without it). The start is the committed offset, or the log start when
        there is none or it is below the log start (retention deleted what it pointed at: counted and
        warned); a first record past it is rewound to it, once per assignment, since the gap can be real
        (aborted transactions and their markers, compaction).
        """
        assert self.pipeline is not None
        epoch = self._parts.epoch
        if self.transactions is not None:  # normally done at assignment already
            await asyncio.gather(*(self.transactions.ensure(p) for p in fresh))
        committed = {p: faust_glue.committed_offset(self.app, topic, p) for p in fresh}
        starts: dict[int, int] = {}
        known = True
        # A first record at Faust's committed offset leaves no gap: the common path costs no broker round
        # trip (two of them delayed a partition's first message by tens of ms). Otherwise ask the broker:
        # Faust's value may be stale (exactly-once commits bypass it) or not read yet (a chunk can come
        # before Faust's post-rebalance seek reads it), and a committed offset beyond the log end, which the
        # consumer resets to the log start, must be known to be counted and warned about.
        suspect = [p for p in fresh if (known_c := committed[p]) is None or parts[p][0].offset > known_c]
        if suspect:
            try:
                read = faust_glue.broker_committed_offsets(self.app, topic, suspect)
                committed.update(await asyncio.wait_for(read, 10.0))
                starts = await asyncio.wait_for(faust_glue.log_start_offsets(self.app, topic, suspect), 10.0)
            except Exception as exc:  # noqa: BLE001 -- then Faust's last read guides, and nothing is rewound
                _log.warning("cannot read the committed and log start offsets of %s: %r", topic, exc)
                known = False
        if self._parts.epoch != epoch:  # a rebalance meanwhile: the next chunk of each starts afresh
            return set(fresh)
        rewound: set[int] = set()
        for p in fresh:
            first = parts[p][0].offset
            c = committed.get(p)
            start = starts.get(p)
            target = plan_start(c, start) if known else None
            lane = self.pipeline.emitter.lanes.get(p)
            untouched = lane is None or lane.expected_offset is None  # never rewind a lane that took records
            if target is not None and first > target and untouched and p not in self._parts.rewound:
                self._parts.rewound.add(p)
                rewound.add(p)
                _log.info("partition %d: first record %d is past its start %d (committed %s): records fetched "
                          "before the partition was ready were dropped; reading from %d again",
                          p, first, target, c, target)  # fmt: skip
                await faust_glue.seek(self.app, topic, p, target)
                continue
            _log.info("partition %d: committed offset %s, log start %s, first record %d", p, c, start, first)
            if c is not None and start is not None and c < start:
                self.metrics.offset_resets_total.labels(str(p)).inc()
                _log.warning(
                    "partition %d: committed offset %d is below the log start %d (records %d..%d were deleted "
                    "before this group processed them); resuming at %d",
                    p, c, start, c, start - 1, first,
                )  # fmt: skip
        taken = {p: committed.get(p) for p in fresh if p not in rewound}
        self.pipeline.assigned(taken)
        self._parts.initialised.update(taken)
        return rewound

    # ------------------------------------------------------------------ rebalances
    async def _on_assigned(self, sender: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        assigned = args[0] if args else kwargs.get("assigned", ())
        mine = {tp.partition for tp in assigned if tp.topic == self.topic}
        self._parts.assigned = mine
        if mine:
            self._parts.epoch += 1
        if self.transactions is not None and mine:
            # Fence the previous owners now: starting a partition's transactional producer aborts whatever
            # transaction a dead or paused owner left open, and until then read_committed readers, table
            # recovery of our own changelogs among them, cannot read past it.
            try:
                await asyncio.gather(*(self.transactions.ensure(p) for p in mine))
            except Exception as exc:  # noqa: BLE001 -- without its producer a partition cannot be served
                self.fatal(InfrastructureError(f"cannot start the transactional producers: {exc!r}"))
        self._parts.initialised -= mine  # their lanes start afresh (committed offset read on first chunk)
        self._parts.rewound -= mine
        self.metrics.assigned_partitions.set(len(mine))
        known = faust_glue.topic_partition_count(self.app, self.topic)
        if known is not None and known != self.input_partitions:
            self.metrics.partition_changes_total.inc()
            _log.warning("input topic %s now has %d partitions (was %d)", self.topic, known, self.input_partitions)
            self.input_partitions = known
        if known is None:
            return
        for store in (self.l2, self.conversation_store):
            if store is None:
                continue
            changelog_n = faust_glue.topic_partition_count(self.app, store.changelog_topic)
            if changelog_n is not None and changelog_n < known:
                self.app.add_future(self._grow_changelog(store, known))

    async def _grow_changelog(self, store: faust_glue.FaustTableStore, partitions: int) -> None:
        """The input grew: grow a table's changelog to match, so that the assignor co-partitions them again.

        The consumer sees the changelog's new partitions at its next metadata refresh and rejoins the group;
        until then the new input partitions run without their table partitions (L2 writes are skipped and
        counted; conversation state waits, and the read API answers 503 for those partitions).
        """
        from stream_app.worker.startup import align_changelog

        is_cache = store is self.l2
        try:
            await align_changelog(self.settings, store.changelog_topic, partitions, disposable=is_cache)
            if is_cache:
                self.metrics.l2_rebuilds_total.labels("partitions_added").inc()
        except Exception as exc:  # noqa: BLE001 -- the tables work without the new partitions meanwhile
            _log.warning("cannot add partitions to %s: %r", store.changelog_topic, exc)

    async def _on_revoked(self, sender: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        revoked = args[0] if args else kwargs.get("revoked", ())
        mine = sorted(tp.partition for tp in revoked if tp.topic == self.topic)
        self._parts.assigned -= set(mine)  # readiness and the lag gauges stop counting them at once
        if mine:
            self._parts.epoch += 1
        self.metrics.assigned_partitions.set(len(self._parts.assigned))
        if not mine:
            return
        pipeline = self.pipeline
        if pipeline is not None:
            timeout = min(self.settings.worker.revoke_timeout_s, self.settings.kafka.session_timeout_s / 3)
            final = await pipeline.revoke(mine, timeout)
            if final and pipeline.failed is None and self.transactions is None:
                try:
                    await faust_glue.commit(self.app, self.topic, final)
                except Exception as exc:  # noqa: BLE001 -- not committing only means re-reading them
                    _log.warning("final commit of revoked partitions failed: %r", exc)
        self._parts.initialised -= set(mine)
        if self.transactions is not None:
            for p in mine:
                try:
                    await self.transactions.close(p)
                except Exception as exc:  # noqa: BLE001 -- the next owner fences it anyway
                    _log.warning("closing the transactional producer of partition %d: %r", p, exc)
        if self.conversations is not None:
            self.conversations.forget(mine)

    # ------------------------------------------------------------------ timers
    async def _commit_tick(self) -> None:
        pipeline = self.pipeline
        if pipeline is None or pipeline.failed is not None or self.app.rebalancing or self.transactions is not None:
            return  # with exactly-once output the transactions commit the offsets
        offsets = pipeline.committable()
        if offsets and await faust_glue.commit(self.app, self.topic, offsets):
            pipeline.mark_committed(offsets)

    async def _observe_tick(self) -> None:
        pipeline = self.pipeline
        now = time.monotonic()
        reasons: list[str] = []
        if pipeline is None:
            reasons.append("model loading" if not self.runtime_future.done() else "pipeline starting")
        elif pipeline.failed is not None:
            reasons.append(f"pipeline failed: {pipeline.failed!r}")
        if not self._parts.assigned:
            reasons.append("no input partitions assigned (joining the group, or more workers than partitions)")
        if self.app.rebalancing:
            reasons.append("rebalancing")
        recovery = getattr(self.app.tables, "recovery", None)
        if recovery is not None and not recovery.completed.is_set():
            reasons.append("table recovery in progress")
        broker_age = now - self._last_broker_ok
        if broker_age > 15.0:
            reasons.append(
                f"no Kafka broker answered for {broker_age:.0f} s (bootstrap {self.settings.kafka.bootstrap_servers})"
            )
        if self._stopping:
            reasons.append("stopping")
        self.metrics.ready.set(0 if reasons else 1)
        if not reasons and self.metrics.cold_start_seconds.labels("ready")._value.get() == 0:
            self.metrics.cold_start_seconds.labels("ready").set(now - self.started_at)
        if pipeline is not None and pipeline.cache is not None and pipeline.cache.l1 is not None:
            self.metrics.cache_entries.labels("l1").set(len(pipeline.cache.l1))
        if pipeline is not None:
            classifier = pipeline.classifier
            self.metrics.in_flight.set(pipeline.in_flight)
            self.metrics.queue_depth.set(classifier.queued)
            self.health.update(
                not_ready=reasons,
                inference_queued=classifier.queued + classifier.running,
                last_inference=classifier.last_progress,
            )
            self._observe_lag(pipeline)
        else:
            self.health.update(not_ready=reasons, inference_queued=0, last_inference=now)

    def _observe_lag(self, pipeline: Pipeline) -> None:
        status = pipeline.lane_status()
        positions = faust_glue.lag_positions(self.app, self.topic, sorted(self._parts.assigned))
        now_wall = time.time()
        now = time.monotonic()
        for p in self._lag_partitions - self._parts.assigned:
            # a partition this worker no longer holds: its owner reports its lag; a frozen last value here
            # would keep a lag alert firing (and skew a sum) forever
            for gauge in (self.metrics.consumer_lag_messages, self.metrics.consumer_lag_seconds):
                with contextlib.suppress(KeyError):
                    gauge.remove(str(p))
        self._lag_partitions = set(self._parts.assigned)
        for p in self._parts.assigned:
            lane = status.get(p)
            lso, position = positions.get(p, (None, None))
            unread = max(0, lso - position) if lso is not None and position is not None and lso >= 0 else 0
            in_flight = lane.in_flight if lane is not None else 0
            self.metrics.consumer_lag_messages.labels(str(p)).set(in_flight + unread)
            if lane is not None and lane.oldest_timestamp_ms is not None:
                age = max(0.0, now_wall - lane.oldest_timestamp_ms / 1000.0)
            elif unread and lane is not None and lane.caught_up_since is not None:
                age = now - lane.caught_up_since
            else:
                age = 0.0
            self.metrics.consumer_lag_seconds.labels(str(p)).set(age)

    async def _broker_tick(self) -> None:
        producer = self.producer
        if producer is None:
            return
        try:
            ok = await asyncio.wait_for(producer.client.force_metadata_update(), 10.0)
        except (TimeoutError, Exception) as exc:  # noqa: BLE001 -- any failure means "no answer"
            _log.debug("broker check failed: %r", exc)
            ok = False
        now = time.monotonic()
        if ok:
            self._last_broker_ok = now
            return
        silent = now - self._last_broker_ok
        if silent > self.settings.kafka.unavailable_timeout_s:
            self.fatal(InfrastructureError(f"no Kafka broker answered for {silent:.0f} s"))

    async def _sweep_tick(self) -> None:
        l2 = self.l2
        if l2 is None or self.pipeline is None:
            return
        now = time.time()
        held = 0
        for partition in l2.partitions():
            planner = SweepPlanner(now=now, max_entries=self.settings.cache.l2_max_entries_per_partition)
            items = l2.items(partition)
            while l2.holds(partition):  # the scan yields to the loop; the partition may leave meanwhile
                piece = list(islice(items, 2000))
                planner.add(piece)
                if len(piece) < 2000:
                    break
                await asyncio.sleep(0)
            else:
                continue
            plan = planner.plan()
            held += plan.kept
            for reason, keys in (("expired", plan.expired), ("size", plan.size)):
                for n, key in enumerate(keys):
                    l2.delete(partition, key)
                    if n % 2000 == 1999:
                        await asyncio.sleep(0)  # keep the loop responsive on a big partition
                if keys:
                    self.metrics.cache_evictions_total.labels("l2", reason).inc(len(keys))
        self.metrics.cache_entries.labels("l2").set(held)

    async def _recovery_tick(self) -> None:
        settled = faust_glue.settle_transactional_recovery(self.app, self._recovery_quiet)
        if settled:
            _log.info("table recovery: %d changelog partition(s) end in transaction markers; recovered", settled)

    async def _conversation_sweep_tick(self) -> None:
        if self.conversations is None or self.pipeline is None or self.app.rebalancing:
            return
        if self.conversations.sweep():
            self.pipeline.emitter.request_flush()

    # ------------------------------------------------------------------ read API
    def conversation_route(self, match: re.Match[str], environ: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``GET /conversations/{id}`` (HTTP thread; ``id`` percent-encoded, so it may hold ``/``, ``?``, ``#``).

        Any worker answers. The state lives in the partition the producer put the conversation's messages
        in: with Kafka's default partitioner (murmur2: the Java client, Kafka Streams) the one the id hashes
        to; with another (librdkafka's default ``consistent_random``, a custom key) elsewhere. So each
        partition held here is looked at (that one first), then the other workers of the group are asked,
        the one holding that partition first, each looking only at its own (``?scope=local``).
        """
        raw_id = urllib.parse.unquote(match.group("id"), errors="replace")
        local_only = "scope=local" in environ.get("QUERY_STRING", "").split("&")
        loop = self._loop
        if loop is None or self.conversations is None:
            return 503, {"status": "fail", "reasons": ["conversation state is off or the worker is starting"]}
        future = asyncio.run_coroutine_threadsafe(self._conversation(raw_id, local_only), loop)
        try:
            status, body, others = future.result(timeout=5.0)
        except (TimeoutError, concurrent.futures.TimeoutError):
            return 503, {"status": "fail", "reasons": ["the worker did not answer in 5 s"]}
        path = environ.get("RAW_PATH") or environ.get("PATH_INFO", "")
        failed: list[tuple[int, dict[str, Any]]] = []
        for url in others:
            answer = _forward(f"{url}{path}?scope=local")
            if answer[0] == 200:
                return answer
            if answer[0] != 404:
                failed.append(answer)
        # no one has it: unless a worker could not answer (it may hold the state), this worker's verdict
        return failed[0] if failed and status == 404 else (status, body)

    async def _conversation(self, conversation_id: str, local_only: bool) -> tuple[int, dict[str, Any], list[str]]:
        """(status, body, other workers to ask in turn): 200 when held here, else 404 (or 503 while the
        id's partition has no owner) unless one of the others has it."""
        store, stage = self.conversation_store, self.conversations
        assert store is not None and stage is not None
        key = conversation_id.encode()
        partition = (murmur2(key) & 0x7FFFFFFF) % self.input_partitions
        held = [p for p in store.partitions() if store.holds(p)]
        for p in sorted(held, key=lambda p: p != partition):  # the default partitioner's choice first
            doc = stage.snapshot(p, key)
            if doc is not None:
                return 200, orjson.loads(doc), []
        missing = {"status": "fail", "reasons": [f"no state for conversation {conversation_id!r}"]}
        if local_only:
            return 404, missing, []
        me = self.advertised_url.rstrip("/")
        owner = faust_glue.table_owner_url(self.app, store.changelog_topic, partition)
        owner = owner.rstrip("/") if owner else None
        others = sorted({u.rstrip("/") for u in faust_glue.table_owner_urls(self.app, store.changelog_topic)} - {me})
        others.sort(key=lambda u: u != owner)
        if partition not in held and owner in (None, me):
            why = f"partition {partition} is not held anywhere yet (a rebalance?)"
            return 503, {"status": "fail", "reasons": [why]}, others
        return 404, missing, others

    # ------------------------------------------------------------------ stopping
    def fatal(self, exc: BaseException) -> None:
        """The infrastructure is broken: stop without committing anything more, exit non-zero, bounded."""
        if self._stopping:
            return
        self._stopping = True
        _log.critical("stopping the worker: %r", exc)
        self.watchdog.arm(1, f"fatal: {exc!r}")
        self.app.add_future(self.app.crash(exc))

    def on_stop_signal(self) -> None:
        self._stopping = True
        self.watchdog.arm(0, "signal")

    async def _on_shutdown(self, sender: Any, /, *args: Any, **kwargs: Any) -> None:
        self._stopping = True
        self.watchdog.arm(self.watchdog.exit_code, "shutdown")
        pipeline = self.pipeline
        if pipeline is not None:
            if pipeline.failed is None:
                await pipeline.drain(min(5.0, self.settings.worker.shutdown_timeout_s / 3))
                offsets = pipeline.committable() if self.transactions is None else {}
                if offsets:
                    try:
                        await asyncio.wait_for(faust_glue.commit(self.app, self.topic, offsets), 5.0)
                    except Exception as exc:  # noqa: BLE001 -- not committing only means re-reading
                        _log.warning("final commit failed: %r", exc)
            await pipeline.stop()
        if self.transactions is not None:
            try:
                await asyncio.wait_for(self.transactions.close_all(), 5.0)
            except Exception as exc:  # noqa: BLE001 -- stopping anyway; open transactions time out
                _log.warning("closing transactional producers: %r", exc)
        if self.tracer is not None:  # export the last spans, bounded by the export timeout
            try:
                await asyncio.wait_for(asyncio.to_thread(self.tracer.shutdown), 5.0)
            except TimeoutError:
                _log.warning("tracing: the last spans were not exported in time")
        if self.producer is not None:
            try:
                await asyncio.wait_for(self.producer.stop(), 5.0)
            except Exception as exc:  # noqa: BLE001 -- stopping anyway
                _log.warning("producer stop: %r", exc)

    def _on_store_discard(self, table: str, partition: int, reason: str) -> None:
        self.metrics.l2_rebuilds_total.labels(reason).inc()


def _forward(url: str) -> tuple[int, dict[str, Any]]:
    """GET ``url`` on another worker of the group."""
    request = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(request, timeout=5.0) as resp:
            return int(resp.status), dict(orjson.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        try:
            return int(exc.code), dict(orjson.loads(exc.read()))
        except orjson.JSONDecodeError:
            return 502, {"status": "fail", "reasons": [f"{url} answered {exc.code}"]}
    except (OSError, orjson.JSONDecodeError) as exc:
        return 502, {"status": "fail", "reasons": [f"forwarding to {url} failed: {exc}"]}


def _every(interval_s: float, tick: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """A task running ``tick`` every ``interval_s`` (a failing tick is logged; the next one runs anyway)."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await tick()
            except Exception as exc:  # noqa: BLE001 -- one failed tick (a timeout, a rebalance) is not fatal
                _log.warning("%s failed: %r", getattr(tick, "__name__", tick), exc)

    return loop
