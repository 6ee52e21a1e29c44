"""The worker's Kafka sink: outputs produced in batches per output partition with aiokafka's batch API.

One :class:`~aiokafka.producer.message_accumulator.BatchBuilder` per output partition and call, sent with
``send_batch``: no per-record future or task. Records are partitioned like every Kafka client's default
partitioner (murmur2 of the key, so one conversation stays in one partition of each output topic), with
the partition of each key remembered in a bounded map (murmur2 is pure Python in aiokafka).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnsupportedForMessageFormatError,
)
from aiokafka.partitioner import murmur2

from stream_app.core.slots import OutRecord
from stream_app.errors import OutputRejectedError

__all__ = ["REJECTED_ERRORS", "KafkaSink"]

REJECTED_ERRORS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidTimestampError,
    UnsupportedForMessageFormatError,
)
"""Broker refusals that are about the records of a batch, not the broker: the batch is split and retried."""

_KEY_CACHE_MAX = 100_000


class KafkaSink:
    """Implements :class:`stream_app.core.emitter.Sink` over a started :class:`AIOKafkaProducer`."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self._partition_of: dict[tuple[bytes, int], int] = {}
        self._tracked: set[str] = set()

    async def track(self, topic: str) -> None:
        """Make the producer's metadata name ``topic`` from now on.

        aiokafka's client fetches metadata for every topic until one topic is added by name (a send to a topic
        its first metadata did not hold, e.g. a changelog created after the producer started); from then on
        it asks only for the topics added by name, and batches already queued for the others find no leader
        and wait until they expire (found as a worker stopped by ``KafkaTimeoutError`` 120 s after its first
        events, when the conversation changelog was created a moment after the producer). Naming every
        topic this sink produces to before its first send keeps them all known.
        """
        if topic in self._tracked:
            return
        self._tracked.add(topic)
        await self.producer.client.set_topics(sorted(self._tracked))

    async def send(
        self, topic: str, records: Sequence[OutRecord]
    ) -> list[tuple[list[int], asyncio.Future[int | None]]]:
        producer = self.producer
        if topic not in self._tracked:
            await self.track(topic)
        partitions = sorted(await producer.partitions_for(topic))
        explicit = {r.partition for r in records if r.partition is not None}
        if explicit - set(partitions):
            # a partition added since the producer last refreshed its metadata (a grown changelog)
            await producer.client.force_metadata_update()
            partitions = sorted(await producer.partitions_for(topic))
            if explicit - set(partitions):
                raise KafkaError(f"{topic} has no partition(s) {sorted(explicit - set(partitions))}")
        n = len(partitions)
        if n == 0:
            raise KafkaError(f"topic {topic} has no partitions")
        by_partition: dict[int, list[int]] = {}
        cache = self._partition_of
        for i, record in enumerate(records):
            key = record.key
            if record.partition is not None:
                p = record.partition
            elif key is None:
                p = partitions[random.randrange(n)]
            else:
                p = cache.get((key, n), -1)
                if p < 0:
                    if len(cache) >= _KEY_CACHE_MAX:
                        cache.clear()
                    p = cache[(key, n)] = partitions[(murmur2(key) & 0x7FFFFFFF) % n]
            by_partition.setdefault(p, []).append(i)
        out: list[tuple[list[int], asyncio.Future[int | None]]] = []
        for p, indexes in by_partition.items():
            batch = producer.create_batch()
            held: list[int] = []
            for i in indexes:
                r = records[i]
                if batch.append(key=r.key, value=r.value, timestamp=None, headers=r.headers) is None:
                    if held:
                        out.append((held, self._wrap(await producer.send_batch(batch, topic, partition=p))))
                    batch = producer.create_batch()
                    held = []
                    if batch.append(key=r.key, value=r.value, timestamp=None, headers=r.headers) is None:
                        out.append(([i], _failed(OutputRejectedError("the record alone is larger than a batch"))))
                        batch = producer.create_batch()
                        continue
                held.append(i)
            if held:
                out.append((held, self._wrap(await producer.send_batch(batch, topic, partition=p))))
        return out

    @staticmethod
    def _wrap(fut: asyncio.Future[Any]) -> asyncio.Future[int | None]:
        """The batch's delivery (its base offset), refusals about its records turned into OutputRejectedError."""
        mine: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

        def done(f: asyncio.Future[Any]) -> None:
            if mine.done():
                return
            if f.cancelled():
                mine.cancel()
                return
            exc = f.exception()
            if exc is None:
                metadata = f.result()
                mine.set_result(getattr(metadata, "offset", None))
            elif isinstance(exc, REJECTED_ERRORS):
                mine.set_exception(OutputRejectedError(f"the broker refused the batch: {exc!r}"))
            else:
                mine.set_exception(exc)

        fut.add_done_callback(done)
        return mine


def _failed(exc: BaseException) -> asyncio.Future[int | None]:
    fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut


class TransactionalKafkaSink:
    """Implements :class:`stream_app.core.emitter.TransactionalSink`: one transactional producer per input
    partition, ``transactional.id`` = ``<group>-<input topic>-<partition>``.

    The id is stable across restarts and rebalances, so when a partition's new owner starts its producer
    (``init_transactions``), the broker bumps the id's epoch: the previous owner, if it still runs (a
    zombie after a long pause), is fenced off and can commit nothing more. Offsets go into the same
    transaction (``send_offsets_to_transaction``), so outputs and the input they consumed are committed
    together or not at all.

    Args:
        make_producer: Builds an unstarted producer for a transactional id (the worker's settings).
        input_topic: The input topic whose offsets the transactions commit.
        group_id: The consumer group (Kafka commits the offsets for it).
    """

    def __init__(self, make_producer: Callable[[str], AIOKafkaProducer], input_topic: str, group_id: str) -> None:
        self._make = make_producer
        self.input_topic = input_topic
        self.group_id = group_id
        self._producers: dict[int, AIOKafkaProducer] = {}
        self._sinks: dict[int, KafkaSink] = {}

    def transactional_id(self, partition: int) -> str:
        return f"{self.group_id}-{self.input_topic}-{partition}"

    async def ensure(self, partition: int) -> None:
        """Start ``partition``'s producer (fencing any earlier holder of its transactional id)."""
        if partition in self._producers:
            return
        producer = self._make(self.transactional_id(partition))
        await producer.start()
        self._producers[partition] = producer
        self._sinks[partition] = KafkaSink(producer)

    async def close(self, partition: int) -> None:
        """Stop ``partition``'s producer (an open transaction is aborted)."""
        producer = self._producers.pop(partition, None)
        self._sinks.pop(partition, None)
        if producer is None:
            return
        try:
            if producer._txn_manager is not None and producer._txn_manager.is_in_transaction():
                await producer.abort_transaction()
        finally:
            await producer.stop()

    async def close_all(self) -> None:
        for partition in list(self._producers):
            await self.close(partition)

    def _producer(self, partition: int) -> AIOKafkaProducer:
        producer = self._producers.get(partition)
        if producer is None:
            raise KafkaError(f"no transactional producer for partition {partition} (not assigned here)")
        return producer

    async def begin(self, partition: int) -> None:
        await self._producer(partition).begin_transaction()

    async def send(
        self, partition: int, topic: str, records: Sequence[OutRecord]
    ) -> list[tuple[list[int], asyncio.Future[int | None]]]:
        self._producer(partition)
        return await self._sinks[partition].send(topic, records)

    async def commit(self, partition: int, offset: int | None) -> None:
        producer = self._producer(partition)
        if offset is not None:
            tp = TopicPartition(self.input_topic, partition)
            await producer.send_offsets_to_transaction({tp: offset}, self.group_id)
        await producer.commit_transaction()

    async def abort(self, partition: int) -> None:
        await self._producer(partition).abort_transaction()
