"""Small aiokafka clients used by the demo, the replay tool and the integration tests.

These are the chat service's side (producing ``chat_message.v1``) and a downstream consumer's side
(reading events, dead letters and stage metrics); the worker itself uses Faust.

Each takes a :data:`~stream_app.kafka_config.KafkaTarget`: the :class:`~stream_app.settings.KafkaSettings`
of the cluster (TLS and SASL applied through :mod:`stream_app.kafka_config`), or a bare ``host:port``
string for a PLAINTEXT cluster such as the local broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream_app.kafka_config import KafkaTarget, aiokafka_client_kwargs, as_kafka_settings

__all__ = ["Received", "chat_message", "consume", "open_producer", "produce_all"]


def chat_message(
    message_id: str, conversation_id: str, text: str, *, user_id: str = "u-1", traceparent: str | None = None
) -> tuple[bytes, bytes]:
    """A valid chat_message.v1 as a Kafka (key, value) pair."""
    doc: dict[str, object] = {
        "message_id": message_id,
        "conversation_id": conversation_id,
        "user_id": user_id,
        "text": text,
        "sent_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if traceparent is not None:
        doc["traceparent"] = traceparent
    return conversation_id.encode(), orjson.dumps(doc)


async def open_producer(kafka: KafkaTarget, *, linger_ms: int = 5) -> AIOKafkaProducer:
    """A started producer (acks=all) for ``kafka``; the caller stops it."""
    producer = AIOKafkaProducer(
        **aiokafka_client_kwargs(as_kafka_settings(kafka), client_id="emotion-stream-producer"),
        acks="all",
        linger_ms=linger_ms,
        max_request_size=4 * 1024 * 1024,
    )
    await producer.start()
    return producer


async def produce_all(
    kafka: KafkaTarget,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    *,
    rate_per_s: float | None = None,
    on_sent: Callable[[int, float], None] | None = None,
) -> int:
    """Produce every (key, value), optionally paced; waits for all acks. Returns the count."""
    producer = await open_producer(kafka)
    futures: list[asyncio.Future[object]] = []
    try:
        start = time.monotonic()
        for n, (key, value) in enumerate(records):
            if rate_per_s:
                delay = start + n / rate_per_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            futures.append(await producer.send(topic, value=value, key=key))
            if on_sent is not None:
                on_sent(n, time.time())
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


@dataclass(frozen=True)
class Received:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    received_at: float

    def json(self) -> dict[str, object]:
        doc = orjson.loads(self.value or b"null")
        assert isinstance(doc, dict)
        return doc


async def consume(
    kafka: KafkaTarget,
    topics: Sequence[str],
    *,
    from_beginning: bool = True,
    idle_timeout_s: float | None = None,
) -> AsyncGenerator[Received, None]:
    """Yield records of ``topics`` (no consumer group, all partitions) until cancelled or idle."""
    # no group: aiokafka assigns every partition of the subscribed topics to this consumer
    consumer = AIOKafkaConsumer(
        *topics,
        **aiokafka_client_kwargs(as_kafka_settings(kafka), client_id="emotion-stream-consumer"),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    try:
        last = time.monotonic()
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=2000)
            now = time.time()
            if not batch:
                if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                    return
                continue
            last = time.monotonic()
            for tp, records in batch.items():
                for r in records:
                    yield Received(tp.topic, tp.partition, r.offset, r.key, r.value, r.timestamp, now)
    finally:
        await consumer.stop()
