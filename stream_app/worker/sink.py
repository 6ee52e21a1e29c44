"""The worker's Kafka sink: outputs produced in batches per output partition with aiokafka's batch API.

One :class:`~aiokafka.producer.message_accumulator.BatchBuilder` per output partition and call, sent with
``send_batch``: no per-record future or task. Records are partitioned like every Kafka client's default
partitioner (murmur2 of the key, so one conversation stays in one partition of each output topic), with
the partition of each key remembered in a bounded map (murmur2 is pure Python in aiokafka).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
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

    async def send(
        self, topic: str, records: Sequence[OutRecord]
    ) -> list[tuple[list[int], asyncio.Future[int | None]]]:
        producer = self.producer
        partitions = sorted(await producer.partitions_for(topic))
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
