"""The reference: a plain, well-made aiokafka consumer doing the worker's job with nothing else around it.

What a strong engineer would write without a framework: ``getmany`` a chunk, decode and validate with the
product's own contract (orjson + pydantic), tokenise the chunk in one executor call with the same
tokenizer, "infer" with the same zero-cost engine (or the real one), build events with orjson, produce
with aiokafka's batch API per output partition, and commit a chunk's offsets once the broker acknowledged
its outputs, while the next chunk is already being processed (at most two chunks in flight). No cache, no
ordering across chunks beyond Kafka's own, no dead-letter topic (an invalid message is counted and
committed), no metrics. The host-ceiling benchmark runs it against the worker in alternating rounds.

Usage: ``python benchmarks/host/reference_consumer.py --bootstrap H:P --topic T --events E --group G
--expect N [--real-engine]``; prints one JSON line of counters when it has processed ``--expect`` records.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path

import click
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from stream_app.errors import InputError
from stream_app.inference.base import labels_from_config, read_model_config
from stream_app.inference.tokenize import TextEncoder
from stream_app.records import decode_chat_message, render_sent_at, rfc3339
from stream_app.service import resolve_model_path
from stream_app.settings import load_settings


def _engine(real: bool, labels: tuple[str, ...], model_path: str) -> object:
    if real:
        from stream_app.inference.select import load_engine

        engine, _ = load_engine(
            model_path, engine="auto", device="cpu", num_threads=1, cache_dir=load_settings().data.cache_dir
        )
        return engine
    from benchmarks.host.free_engine_worker import FreeEngine

    return FreeEngine(labels)


async def run(bootstrap: str, topic: str, events: str, group: str, expect: int, real: bool) -> dict[str, object]:
    settings = load_settings()
    model_path = resolve_model_path(settings)
    encoder = TextEncoder.from_pretrained(model_path, max_length=settings.model.max_length_tokens)
    labels = labels_from_config(read_model_config(model_path))
    engine = _engine(real, labels, model_path)
    loop = asyncio.get_running_loop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=2048,
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=2, max_batch_size=512 * 1024, enable_idempotence=True
    )
    await consumer.start()
    await producer.start()
    partitions = sorted(await producer.partitions_for(events))
    part_of: dict[bytes, int] = {}
    pending: list[asyncio.Task[None]] = []
    processed = invalid = 0
    t_first = t_last = 0.0

    def infer(texts: list[str]) -> list[list[float]]:
        batch = encoder(texts)
        probs = engine.predict(batch)  # type: ignore[attr-defined]
        return np.asarray(probs).tolist()  # type: ignore[no-any-return]

    async def finish(futures: list[asyncio.Future[object]], offsets: dict[TopicPartition, int]) -> None:
        await asyncio.gather(*futures)
        await consumer.commit(offsets)

    try:
        while processed < expect:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=2048)
            if not fetched:
                continue
            if not t_first:
                t_first = time.monotonic()
            received = rfc3339(time.time())
            items = []
            offsets: dict[TopicPartition, int] = {}
            for tp, records in fetched.items():
                offsets[tp] = records[-1].offset + 1
                for r in records:
                    try:
                        items.append((tp, r, decode_chat_message(r.value)))
                    except InputError:
                        invalid += 1
            rows = await loop.run_in_executor(None, infer, [m.text for _, _, m in items])
            emitted = rfc3339(time.time())
            by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
            for (tp, r, m), scores in zip(items, rows, strict=True):
                li = max(range(len(scores)), key=scores.__getitem__)
                doc = {
                    "schema": "emotion_event.v1",
                    "event_id": hashlib.blake2b(
                        f"{tp.topic}\x00{tp.partition}\x00{r.offset}".encode(), digest_size=16
                    ).hexdigest(),
                    "message_id": m.message_id,
                    "conversation_id": m.conversation_id,
                    "user_id": m.user_id,
                    "label": labels[li],
                    "score": scores[li],
                    "scores": dict(zip(labels, scores, strict=True)),
                    "source": {"topic": tp.topic, "partition": tp.partition, "offset": r.offset},
                    "sent_at": render_sent_at(m.sent_at),
                    "received_at": received,
                    "emitted_at": emitted,
                    "traceparent": m.traceparent,
                }
                key = m.conversation_id.encode()
                p = part_of.get(key)
                if p is None:
                    p = part_of[key] = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
                by_partition.setdefault(p, []).append((key, orjson.dumps(doc)))
            futures: list[asyncio.Future[object]] = []
            for p, recs in by_partition.items():
                batch = producer.create_batch()
                for key, value in recs:
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        futures.append(await producer.send_batch(batch, events, partition=p))
                        batch = producer.create_batch()
                        batch.append(key=key, value=value, timestamp=None)
                futures.append(await producer.send_batch(batch, events, partition=p))
            pending.append(asyncio.create_task(finish(futures, offsets)))
            if len(pending) > 1:  # at most two chunks in flight
                await pending.pop(0)
            processed += sum(len(r) for r in fetched.values())
        for task in pending:
            await task
        t_last = time.monotonic()
    finally:
        await producer.stop()
        await consumer.stop()
    return {"processed": processed, "invalid": invalid, "seconds": t_last - t_first}


@click.command()
@click.option("--bootstrap", required=True)
@click.option("--topic", required=True)
@click.option("--events", required=True)
@click.option("--group", required=True)
@click.option("--expect", type=int, required=True)
@click.option("--real-engine", is_flag=True)
def main(bootstrap: str, topic: str, events: str, group: str, expect: int, real_engine: bool) -> None:
    print(json.dumps(asyncio.run(run(bootstrap, topic, events, group, expect, real_engine))), flush=True)


if __name__ == "__main__":
    main()
