"""Events read back from the real topic by a plain consumer and the CloudEvents SDK; trace context carried
from an input's Kafka headers (or body) to its event's and its dead letter's headers."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat

from stream_app.core.headers import EVENT_DATASCHEMA, EVENT_TYPE, event_source
from stream_app.devtools.clients import chat_message
from tests.integration.conftest import make_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _traceparent(n: int) -> str:
    return f"00-{n + 1:032x}-{n + 1:016x}-01"


Record = tuple[bytes | None, bytes, list[tuple[str, bytes]]]


async def _produce(bootstrap: str, topic: str, records: list[Record]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topic, value=value, key=key, headers=headers)
    finally:
        await producer.stop()


async def _read(bootstrap: str, counts: dict[str, int], timeout_s: float) -> list[Any]:
    """Records of the topics in ``counts`` (headers included) until each has that many, or the timeout."""
    consumer = AIOKafkaConsumer(*counts, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(records)
            if all(sum(r.topic == t for r in got) >= n for t, n in counts.items()):
                break
    finally:
        await consumer.stop()
    return got


def test_events_read_back_as_cloudevents_and_trace_context_reaches_events_and_dead_letters(
    kafka: Any, spawn_worker: Any
) -> None:
    topics = make_topics(kafka, partitions=2)
    worker = spawn_worker(topics)
    worker.wait_ready()
    sent: list[Record] = []
    expected_trace: dict[str, tuple[str | None, str | None]] = {}  # message_id -> (traceparent, tracestate)
    body_trace: dict[str, str | None] = {}  # message_id -> the input body's traceparent (the event keeps it)
    for n in range(24):
        mid = f"m-{n}"
        if n % 4 == 0:  # no trace context at all
            key, value = chat_message(mid, f"c-{n % 5}", f"message number {n}, quite happy about it")
            sent.append((key, value, []))
            expected_trace[mid] = (None, None)
            body_trace[mid] = None
        elif n % 4 == 1:  # in the body only (a client that cannot set headers)
            key, value = chat_message(mid, f"c-{n % 5}", f"message number {n}", traceparent=_traceparent(n))
            sent.append((key, value, []))
            expected_trace[mid] = (_traceparent(n), None)
            body_trace[mid] = _traceparent(n)
        elif n % 4 == 2:  # a header, with its tracestate; a different body traceparent loses to the header
            key, value = chat_message(mid, f"c-{n % 5}", f"message number {n}", traceparent=_traceparent(900 + n))
            headers = [("traceparent", _traceparent(n).encode()), ("tracestate", b"rojo=00f067aa0ba902b7")]
            sent.append((key, value, headers))
            expected_trace[mid] = (_traceparent(n), "rojo=00f067aa0ba902b7")
            body_trace[mid] = _traceparent(900 + n)
        else:  # a header only
            key, value = chat_message(mid, f"c-{n % 5}", f"message number {n}")
            sent.append((key, value, [("traceparent", _traceparent(n).encode())]))
            expected_trace[mid] = (_traceparent(n), None)
            body_trace[mid] = None
    bad_trace = [_traceparent(500), _traceparent(501)]
    sent.append((b"c-bad", b"{not json", [("traceparent", bad_trace[0].encode())]))
    sent.append((b"c-bad", orjson.dumps({"text": 3}), [("traceparent", bad_trace[1].encode())]))
    asyncio.run(_produce(kafka.bootstrap_servers, topics.input, sent))

    got = asyncio.run(_read(kafka.bootstrap_servers, {topics.events: 24, topics.dead_letters: 2}, 120))
    events = [r for r in got if r.topic == topics.events]
    dead = [r for r in got if r.topic == topics.dead_letters]
    assert len(events) == 24 and len(dead) == 2, worker.log_tail()

    fmt = JSONFormat()
    for record in events:
        headers = dict(record.headers)
        assert len(headers) == len(record.headers)  # no header name twice
        ce = from_binary(KafkaMessage(headers=headers, key=record.key, value=record.value), fmt)
        body = orjson.loads(record.value)
        assert ce.get_specversion() == "1.0"
        assert ce.get_id() == body["event_id"]
        assert ce.get_type() == EVENT_TYPE
        assert ce.get_source() == event_source(topics.input)
        assert ce.get_time() == datetime.fromisoformat(body["emitted_at"])
        assert ce.get_datacontenttype() == "application/json"
        assert ce.get_dataschema() == EVENT_DATASCHEMA
        assert ce.get_data() == body  # the JSON body is the event, unchanged
        traceparent, tracestate = expected_trace[body["message_id"]]
        assert headers.get("traceparent") == (traceparent.encode() if traceparent else None), body["message_id"]
        assert headers.get("tracestate") == (tracestate.encode() if tracestate else None), body["message_id"]
        assert body["traceparent"] == body_trace[body["message_id"]]  # the input body's, unchanged
    assert len({e.key for e in events}) == 5
    assert {orjson.loads(e.value)["message_id"] for e in events} == set(expected_trace)

    for record in dead:
        headers = dict(record.headers)
        assert not any(name.startswith("ce_") for name in headers)  # a dead letter is not an event
        assert headers["traceparent"].decode() in bad_trace
        assert headers["dlq_topic"] == topics.input.encode()
    assert {dict(r.headers)["traceparent"].decode() for r in dead} == set(bad_trace)
