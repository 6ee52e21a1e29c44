"""The Faust wiring: topics, the L2 cache table, the agent and the timers. The only module importing faust.

Everything that decides (validation, batching, inference, caching, metrics) is in plain modules; this
one connects them to Kafka:

* the agent reads ``chat.messages.v1`` without auto-acks, builds an :class:`~stream_app.pipeline.Item`
  per message, tries L1 and then the L2 table (in the message's own partition), and submits it;
* :class:`FaustSink` produces events, dead letters and stage metrics, and acks a source event only
  after the broker acknowledged its output (at-least-once: Faust commits the contiguous acked offsets);
* a timer deletes expired or surplus L2 keys with changelog tombstones.

L2 partitioning: the table is co-partitioned with the input topic (same partition count), and a
result is stored in the partition of the message that produced it. A text that recurs in several
partitions is cached once per partition, which costs some hit rate but needs no repartition hop and
moves with its partition on a rebalance (restored from the changelog).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any

import faust
from faust.streams import _current_event
from faust.types import EventT

from stream_app.cache.codec import CachedResult, decode, encode
from stream_app.errors import InfrastructureError
from stream_app.metrics import Metrics
from stream_app.pipeline import Item, Pipeline
from stream_app.records import DeadLetter, EmotionEvent, SourceRef, StageMetrics
from stream_app.settings import Settings

__all__ = ["FaustSink", "WorkerApp", "create_app", "faust_broker_urls", "run_worker", "sweep_table"]

_log = logging.getLogger(__name__)


def faust_broker_urls(bootstrap_servers: str) -> list[str]:
    """``host1:9092,host2:9092`` as the URL list Faust expects."""
    hosts = [h.strip() for h in bootstrap_servers.split(",") if h.strip()]
    if not hosts:
        raise InfrastructureError("no Kafka bootstrap servers given (EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS)")
    return [h if "://" in h else f"kafka://{h}" for h in hosts]


@contextlib.contextmanager
def _as_current(event: EventT[Any]) -> Iterator[None]:
    """Make ``event`` Faust's current event, so a table write lands in its partition.

    Faust resolves a table's partition from the current event; our results are written after the
    batch, outside the agent's iteration, so we restore the source event's context for the write.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


@dataclass
class WorkerApp:
    """The Faust app with its topics, table and pipeline."""

    app: faust.App
    input_topic: Any
    events_topic: Any
    metrics_topic: Any
    dlq_topic: Any
    table: Any
    pipeline: Pipeline


class FaustSink:
    """Implements :class:`~stream_app.pipeline.Sink` with Faust topics and the L2 table."""

    def __init__(self, parts: WorkerApp | None = None) -> None:
        self.parts = parts
        self.stream: Any = None

    def _p(self) -> WorkerApp:
        assert self.parts is not None
        return self.parts

    async def send_event(self, item: Item, event: EmotionEvent) -> Awaitable[object]:
        key = event.conversation_id.encode()
        fut: Awaitable[object] = await self._p().events_topic.send(key=key, value=event.to_json(), force=True)
        return fut

    async def send_dead_letter(self, item: Item, dead: DeadLetter) -> Awaitable[object]:
        fut: Awaitable[object] = await self._p().dlq_topic.send(key=item.raw_key, value=dead.to_json(), force=True)
        return fut

    async def send_metrics(self, record: StageMetrics) -> None:
        await self._p().metrics_topic.send(key=record.worker_id.encode(), value=record.to_json(), force=True)

    async def ack(self, item: Item) -> None:
        await self.stream.ack(item.token)

    def cache_store(self, item: Item, key: bytes, value: CachedResult) -> None:
        with _as_current(item.token):  # type: ignore[arg-type]
            self._p().table[key] = encode(value)


def create_app(settings: Settings, pipeline_factory: Any, metrics: Metrics) -> WorkerApp:
    """Build the Faust app. ``pipeline_factory(sink)`` returns the :class:`Pipeline` (engine loaded)."""
    topics = settings.topics
    kafka = settings.kafka
    app = faust.App(
        settings.worker.app_id,
        broker=faust_broker_urls(kafka.bootstrap_servers),
        broker_client_id=kafka.client_id,
        broker_credentials=_credentials(settings),
        store="rocksdb://",
        datadir=str(settings.worker.state_dir),
        processing_guarantee="at_least_once",
        web_enabled=False,
        topic_partitions=topics.partitions,
        topic_replication_factor=topics.replication_factor,
        topic_allow_declare=True,
        topic_disable_leader=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.heartbeat_interval_s,
        broker_commit_interval=1.0,
        producer_acks=-1 if kafka.producer_acks == "all" else 1,
        producer_linger_ms=kafka.producer_linger_ms,
        stream_buffer_maxsize=max(64, settings.batching.queue_capacity),
        table_standby_replicas=0,
        logging_config=None,
    )

    def raw_topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    input_topic = raw_topic(topics.input)
    events_topic = raw_topic(topics.events)
    metrics_topic = raw_topic(topics.metrics)
    dlq_topic = raw_topic(topics.dead_letters)
    table = app.Table(
        "emotion-cache-v1",
        default=None,
        partitions=topics.partitions,
        key_type=bytes,  # bytes key and value types make Faust use the raw codec
        value_type=bytes,
        options={"driver": "rocksdict"},
        help="L2 result cache: key = hash(normalised text + model identity), value = codec bytes",
    )
    sink = FaustSink()
    pipeline: Pipeline = pipeline_factory(sink)
    parts = WorkerApp(app, input_topic, events_topic, metrics_topic, dlq_topic, table, pipeline)
    sink.parts = parts
    cache = settings.cache
    ttl_now = pipeline.wall_clock  # same wall clock as the pipeline's expiry stamps

    @app.agent(input_topic, concurrency=1)
    async def classify(stream: Any) -> None:
        noack = stream.noack()
        sink.stream = noack
        await pipeline.start()
        try:
            async for event in noack.events():
                if pipeline.failed is not None:
                    raise InfrastructureError("pipeline failed") from pipeline.failed
                msg = event.message
                source = SourceRef(topic=msg.topic, partition=msg.partition, offset=msg.offset)
                item = pipeline.make_item(event, source, msg.key, msg.value)
                if cache.l2_enabled and item.result is None and item.dead is None and item.cache_key is not None:
                    t0 = pipeline.clock()
                    found = _l2_get(table, item.cache_key, ttl_now())
                    metrics.cache_lookups_total.labels("l2", "hit" if found else "miss").inc()
                    if found is not None:
                        pipeline.remember_l2_hit(item, found)
                    item.stage_s["cache"] = item.stage_s.get("cache", 0.0) + pipeline.clock() - t0
                await pipeline.submit(item)
        except InfrastructureError as exc:
            _log.critical("stopping the worker: %r", exc)
            await app.crash(exc)
            raise
        finally:
            await pipeline.stop()

    @app.on_partitions_assigned.connect
    async def _on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned = args[0] if args else kwargs.get("assigned", ())  # Faust sends the set of TopicPartitions
        metrics.assigned_partitions.set(sum(1 for tp in assigned if tp.topic == topics.input))

    @app.timer(interval=cache.sweep_interval_s)
    async def sweep_l2() -> None:
        if cache.l2_enabled:
            removed = await sweep_table(table, now=ttl_now(), max_entries=cache.l2_max_entries_per_partition)
            for reason, n in removed.items():
                if n:
                    metrics.cache_evictions_total.labels("l2", reason).inc(n)

    @app.task
    async def watch_pipeline() -> None:
        while True:
            await asyncio.sleep(0.5)
            if pipeline.failed is not None:
                _log.critical("pipeline failed, stopping without committing: %r", pipeline.failed)
                await app.crash(pipeline.failed)
                return

    return parts


def _credentials(settings: Settings) -> Any:
    kafka = settings.kafka
    if kafka.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            mechanism=kafka.sasl_mechanism,
            ssl_context=None,
        )
    return None


def _l2_get(table: Any, key: bytes, now: float) -> CachedResult | None:
    raw = table.get(key)
    if raw is None:
        return None
    try:
        value = decode(raw)
    except ValueError:
        return None
    return value if value.expires_at > now else None


async def sweep_table(table: Any, *, now: float, max_entries: int, chunk: int = 2000) -> dict[str, int]:
    """Delete expired keys (and the soonest-to-expire surplus beyond ``max_entries``) per partition.

    Deletes go through the changelog as tombstones, so a rebuild from the changelog does not bring
    expired entries back (RocksDB's own TTL is local and would).
    """
    removed = {"expired": 0, "size": 0}
    store = table.data
    for partition, db in list(getattr(store, "_dbs", {}).items()):
        live: list[tuple[float, bytes]] = []
        doomed: list[bytes] = []
        for n, (key, raw) in enumerate(db.items()):
            if n % chunk == 0:
                await asyncio.sleep(0)  # keep the loop responsive on a big partition
            try:
                expires = decode(raw).expires_at
            except ValueError:
                doomed.append(key)
                continue
            if expires <= now:
                doomed.append(key)
            else:
                live.append((expires, key))
        removed["expired"] += len(doomed)
        if len(live) > max_entries:
            live.sort()
            surplus = [key for _, key in live[: len(live) - max_entries]]
            removed["size"] += len(surplus)
            doomed.extend(surplus)
        for key in doomed:
            table.send_changelog(partition, key, None, key_serializer="raw", value_serializer="raw")
            db.delete(key)
    return removed


def run_worker(parts: WorkerApp, log_level: str = "info") -> None:
    """Run the Faust worker in this process until SIGINT/SIGTERM (or a crash)."""
    worker = faust.Worker(parts.app, loglevel=log_level.upper(), quiet=True, override_logging=False)
    worker.execute_from_commandline()
