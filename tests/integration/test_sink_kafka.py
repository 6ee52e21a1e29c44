"""The worker's Kafka sink over the real broker: a topic created after the producer started must not strand
the batches of the topics it already produced to (aiokafka narrows its metadata to the topics added by name
once one is; found as a worker stopped by KafkaTimeoutError when the conversation changelog appeared a moment
after the producer started, in the README-steps and demo tests)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from stream_app.core.slots import OutRecord
from stream_app.topics import ensure_topics
from stream_app.worker.sink import KafkaSink

pytestmark = pytest.mark.integration


def _records(n: int, partition: int | None = None) -> list[OutRecord]:
    return [OutRecord(f"k{i}".encode(), b"{}", [], partition) for i in range(n)]


def test_a_topic_created_after_the_producer_started_keeps_the_others_in_its_metadata(kafka: Any) -> None:
    """Batches queued for a topic the producer's metadata no longer holds find no leader and wait until
    they expire; so after a send to a topic created later, the topics sent to before must still be known,
    with no new send to them (which would re-add them, and hide the loss of the batches already queued)."""
    tag = uuid.uuid4().hex[:8]
    early, other, late = f"sink-early-{tag}", f"sink-other-{tag}", f"sink-late-{tag}"

    async def run() -> None:
        await ensure_topics(kafka.bootstrap_servers, [early, other], 2)
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        try:
            # the worker's broker check refreshes the producer's metadata each second: with no topic added
            # by name yet, that fetches every topic, so the first sends add none
            await producer.client.force_metadata_update()
            sink = KafkaSink(producer)
            sent = await sink.send(early, _records(3)) + await sink.send(other, _records(3))
            await asyncio.wait_for(asyncio.gather(*(f for _, f in sent)), 15)
            await ensure_topics(kafka.bootstrap_servers, [late], 2)
            late_sent = await sink.send(late, _records(2, partition=1))  # explicit, as the changelog writes
            await asyncio.wait_for(asyncio.gather(*(f for _, f in late_sent)), 15)
            await producer.client.force_metadata_update()  # what the sender does for a batch without a leader
            for topic in (early, other, late):
                assert producer.client.cluster.partitions_for_topic(topic) == {0, 1}, topic
            again = await sink.send(early, _records(2)) + await sink.send(other, _records(2))
            await asyncio.wait_for(asyncio.gather(*(f for _, f in again)), 15)
        finally:
            await producer.stop()

    asyncio.run(run())
