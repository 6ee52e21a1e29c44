"""Where the worker's consumer is put back after a rebalance, over the real broker: every partition at its
committed offset, and one without a committed offset at the log start, even when records were fetched (and
dropped by Faust) meanwhile. aiokafka's own ``seek_to_committed`` leaves a partition without a committed
offset, or at 0, past those records: a whole input partition went without outcomes that way. And no
partition is ever left without a position meanwhile (Faust's livelock detector crashed the worker on one)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from stream_app.topics import ensure_topics
from stream_app.worker.faust_glue import seek_to_committed_or_reset

pytestmark = pytest.mark.integration

PER_PARTITION = 10


async def _fetched_everything(bootstrap: str, topic: str, group: str, reset: str) -> AIOKafkaConsumer:
    """A consumer of ``group`` assigned all 3 partitions of ``topic`` and the changelog's one, positioned
    past all their records, as after a fetch whose records were dropped. Committed: partition 1 at 0,
    partition 2 at 4."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, auto_offset_reset=reset
    )
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(3)]
    consumer.assign([*tps, TopicPartition(f"{topic}-changelog", 0)])
    await consumer.commit({tps[1]: OffsetAndMetadata(0, ""), tps[2]: OffsetAndMetadata(4, "")})
    for tp in consumer.assignment():
        consumer.seek(tp, PER_PARTITION)
    return consumer


async def _read(consumer: AIOKafkaConsumer, expected: int, timeout_s: float = 20) -> dict[TopicPartition, list[int]]:
    offsets: dict[TopicPartition, list[int]] = {}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while sum(map(len, offsets.values())) < expected and asyncio.get_running_loop().time() < deadline:
        for tp, records in (await consumer.getmany(timeout_ms=500)).items():
            offsets.setdefault(tp, []).extend(r.offset for r in records)
    return offsets


async def _watch_positions(consumer: AIOKafkaConsumer, task: asyncio.Future[Any]) -> set[TopicPartition]:
    """The partitions seen without a position (aiokafka's ``has_valid_position``) until ``task`` is done."""
    missing: set[TopicPartition] = set()
    assignment = consumer._subscription.subscription.assignment
    while not task.done():
        missing.update(tp for tp in assignment.tps if not assignment.state_value(tp).has_valid_position)
        await asyncio.sleep(0)
    return missing


def test_partitions_without_a_committed_offset_or_at_0_go_back_to_their_start(kafka: Any) -> None:
    topic = f"seek-{uuid.uuid4().hex[:8]}"
    bootstrap = kafka.bootstrap_servers

    async def run() -> None:
        await ensure_topics(bootstrap, [topic], 3)
        await ensure_topics(bootstrap, [f"{topic}-changelog"], 1)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for p in range(3):
                for i in range(PER_PARTITION):
                    await producer.send(topic, f"{p}-{i}".encode(), partition=p)
            for i in range(PER_PARTITION):
                await producer.send(f"{topic}-changelog", f"{i}".encode(), partition=0)
            await producer.flush()
        finally:
            await producer.stop()
        tps = [TopicPartition(topic, p) for p in range(3)]
        changelog = TopicPartition(f"{topic}-changelog", 0)

        # aiokafka's seek moves only partition 2: the records of 0 and 1 would never be read
        plain = await _fetched_everything(bootstrap, topic, f"g-{uuid.uuid4().hex[:8]}", "earliest")
        try:
            await plain.seek_to_committed()
            assert [await plain.position(tp) for tp in tps] == [PER_PARTITION, PER_PARTITION, 4]
        finally:
            await plain.stop()

        for reset, unset_at in (("earliest", 0), ("latest", PER_PARTITION)):
            consumer = await _fetched_everything(bootstrap, topic, f"g-{uuid.uuid4().hex[:8]}", reset)
            try:
                # the fetcher long-polls the broker in the background meanwhile (a reset waits for it), while
                # another task watches every position throughout the seek
                await asyncio.sleep(0.2)
                seeking = asyncio.ensure_future(seek_to_committed_or_reset(consumer, frozenset({topic})))
                without_position = await _watch_positions(consumer, seeking)
                committed = seeking.result()
                # Faust's livelock detector reads these positions from another thread at any moment; one that
                # is missing (a reset pending in the fetcher) crashed the worker on aiokafka's assertion
                assert without_position == set(), reset
                assert committed == {tps[0]: None, tps[1]: 0, tps[2]: 4, changelog: None}
                assert [await consumer.position(tp) for tp in tps] == [unset_at, 0, 4], reset
                assert await consumer.position(changelog) == PER_PARTITION  # not a topic the group commits
                if reset == "earliest":  # and the records are read again, each once
                    offsets = await _read(consumer, expected=3 * PER_PARTITION - 4)
                    assert offsets == {tps[0]: list(range(PER_PARTITION)), tps[1]: list(range(PER_PARTITION)),
                                       tps[2]: list(range(4, PER_PARTITION))}  # fmt: skip
            finally:
                await consumer.stop()

    asyncio.run(run())
