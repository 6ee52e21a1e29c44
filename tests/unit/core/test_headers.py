"""Kafka headers: W3C trace context read as the spec says; CloudEvents binary mode read back by the SDK."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import cloudevents.v1.kafka as ce_v1_kafka
import jsonschema
import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.core.headers import (
    EVENT_DATASCHEMA,
    EVENT_TYPE,
    MAX_DEAD_LETTER_HEADERS_BYTES,
    MAX_TRACESTATE_CHARS,
    EventHeaders,
    TraceContext,
    dead_letter_headers,
    event_source,
    headers_size,
    parse_traceparent,
    parse_tracestate,
    read_trace_context,
)
from stream_app.errors import DecodeError
from stream_app.records import (
    DEAD_LETTER_HEADERS_RESERVE_BYTES,
    CacheInfo,
    DeadLetter,
    EmotionEvent,
    EventTimings,
    ModelInfo,
    SourceRef,
    decode_chat_message,
    event_inputs,
)

pytestmark = pytest.mark.unit

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"


# ------------------------------------------------------------------------------------------- traceparent
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (VALID, VALID),
        (VALID.encode(), VALID),
        (f" {VALID}\t", VALID),  # optional whitespace around a header value
        (f"00-{TRACE_ID}-{PARENT_ID}-00", f"00-{TRACE_ID}-{PARENT_ID}-00"),
        (f"00-{TRACE_ID}-{PARENT_ID}-ff", f"00-{TRACE_ID}-{PARENT_ID}-ff"),
        (f"cc-{TRACE_ID}-{PARENT_ID}-01", VALID),  # a future version, read by its version-00 prefix
        (f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-adds", VALID),
        (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),  # version ff is invalid
        (f"00-{'0' * 32}-{PARENT_ID}-01", None),  # all-zero trace-id
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),  # all-zero parent-id
        (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", None),  # upper-case hex
        (f"0A-{TRACE_ID}-{PARENT_ID}-01", None),
        (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", None),  # version 00 is exactly 55 characters
        (f"cc-{TRACE_ID}-{PARENT_ID}-01x", None),  # a future version's prefix must end or be followed by '-'
        (f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01", None),
        (f"00-{TRACE_ID}-{PARENT_ID}-1", None),
        (f"00_{TRACE_ID}_{PARENT_ID}_01", None),
        (f"00-{TRACE_ID[:-1]}g-{PARENT_ID}-01", None),
        (VALID.replace("4", "٤", 1), None),  # a non-ASCII digit
        (VALID.encode().replace(b"4", b"\xd9", 1), None),  # not ASCII
        ("", None),
        (None, None),
    ],
)
def test_traceparent_is_validated_as_w3c_says(value: str | bytes | None, expected: str | None) -> None:
    ctx = parse_traceparent(value)
    assert (ctx.traceparent if ctx else None) == expected


def test_trace_context_fields_and_sampled_flag() -> None:
    ctx = parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-03")
    assert ctx is not None
    assert (ctx.trace_id, ctx.parent_id, ctx.flags, ctx.sampled) == (TRACE_ID, PARENT_ID, "03", True)
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-02").sampled is False  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------- tracestate
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["congo=t61rcWkgMzE"], "congo=t61rcWkgMzE"),
        (["rojo=00f067aa0ba902b7, congo=t61rcWkgMzE"], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        (["rojo=1", "congo=2"], "rojo=1,congo=2"),  # repeated headers are one list
        ([b"rojo=1,,  ,\tcongo=2"], "rojo=1,congo=2"),  # empty members are allowed and dropped
        (["fw529a3039@dt=abc"], "fw529a3039@dt=abc"),  # multi-tenant key
        (["a*b/c_d-e=v a l"], "a*b/c_d-e=v a l"),
        ([""], None),
        (["Rojo=1"], None),  # upper-case key
        (["1rojo=1"], None),  # a simple key starts with a letter
        (["rojo=1,rojo=2"], None),  # duplicate key
        (["rojo=1 "], "rojo=1"),  # trailing optional whitespace is not the value's
        (["rojo=a,b"], None),
        (["rojo"], None),
        (["rojo=a=b"], None),
        (["rojo=" + "x" * 256], "rojo=" + "x" * 256),
        (["rojo=" + "x" * 257], None),
        ([",".join(f"k{i}=v" for i in range(32))], ",".join(f"k{i}=v" for i in range(32))),
        ([",".join(f"k{i}=v" for i in range(33))], None),  # more than 32 members
        (["rojo=caf\u00e9"], None),
        ([None], None),
    ],
)
def test_tracestate_is_validated_as_w3c_says(values: list[str | bytes | None], expected: str | None) -> None:
    assert parse_tracestate(values) == expected


def test_tracestate_over_512_characters_drops_long_members_first_then_from_the_end() -> None:
    members = [f"k{i}=" + "v" * 100 for i in range(4)] + ["big=" + "x" * 200] + [f"z{i}=" + "v" * 50 for i in range(3)]
    ctx = TraceContext(TRACE_ID, PARENT_ID, "01", ",".join(members))
    state = dict(ctx.headers())["tracestate"].decode()
    assert len(state) <= MAX_TRACESTATE_CHARS
    assert "big=" not in state and state.startswith("k0=")
    kept = state.split(",")
    assert kept == [m for m in members if m in kept]  # order kept, members whole


# ------------------------------------------------------------------------------------------- reading
BODY = f"00-{'a' * 32}-{'b' * 16}-00"


@pytest.mark.parametrize(
    ("headers", "body", "expected", "state"),
    [
        ([("traceparent", VALID.encode())], BODY, VALID, None),  # the header wins
        ([("TraceParent", VALID.encode()), ("TRACESTATE", b"rojo=1")], None, VALID, "rojo=1"),
        ({"traceparent": VALID.encode(), "tracestate": b"rojo=1"}, None, VALID, "rojo=1"),  # a mapping
        ([("traceparent", b"garbage"), ("tracestate", b"rojo=1")], BODY, BODY, None),  # invalid header: body
        ([("traceparent", VALID.encode()), ("traceparent", VALID.encode())], BODY, BODY, None),  # two: invalid
        ([("traceparent", None)], BODY, BODY, None),
        ([("tracestate", b"rojo=1")], BODY, BODY, None),  # tracestate goes with a header traceparent only
        ([("traceparent", VALID.encode()), ("tracestate", b"Bad=1")], None, VALID, None),  # bad state dropped
        ([], f"ff-{'a' * 32}-{'b' * 16}-00", None, None),  # an invalid body traceparent is not propagated
        ([("other", b"x")], None, None, None),
        (None, None, None, None),
    ],
)
def test_trace_context_comes_from_headers_then_body(
    headers: object, body: str | None, expected: str | None, state: str | None
) -> None:
    ctx = read_trace_context(headers, body)  # type: ignore[arg-type]
    assert (ctx.traceparent if ctx else None) == expected
    assert (ctx.tracestate if ctx else None) == state


# ------------------------------------------------------------------------------------------- CloudEvents
def _event(traceparent: str | None = None) -> tuple[EmotionEvent, bytes]:
    doc = {
        "message_id": "m-1",
        "conversation_id": "c-42",
        "user_id": "u-7",
        "text": "thank you so much",
        "sent_at": "2026-11-30t10:00:00z",
        "traceparent": traceparent,
    }
    msg = decode_chat_message(orjson.dumps(doc))
    inputs = event_inputs(msg, SourceRef(topic="chat.messages.v1", partition=2, offset=1186))
    event = EmotionEvent.build(
        inputs,
        label="joy",
        scores={"joy": 0.9, "neutral": 0.1},
        model=ModelInfo(
            name="emotion-minilm", version="v", runtime="onnxruntime-1.31.1", precision="int8", device="cpu"
        ),
        cache=CacheInfo(hit=False, level="none"),
        truncated=False,
        timings_ms=EventTimings(decode=0, cache=0, queue_wait=0, tokenize=0, infer=0, postprocess=0, total=0),
        received_at=1_764_496_800.0,
        emitted_at=1_764_496_800.25,
    )
    return event, inputs.key


def test_an_event_record_reads_back_as_a_cloudevent_with_the_sdk() -> None:
    event, key = _event(VALID)
    trace = read_trace_context([("tracestate", b"rojo=1")], event.traceparent)
    headers = EventHeaders(event_source("chat.messages.v1")).build(event.event_id, event.emitted_at, trace)
    names = [n for n, _ in headers]
    assert len(names) == len(set(names))  # a dict of them loses nothing
    value = event.to_json()

    ce = from_binary(KafkaMessage(headers=dict(headers), key=key, value=value), JSONFormat())
    assert ce.get_specversion() == "1.0"
    assert ce.get_id() == event.event_id
    assert ce.get_type() == EVENT_TYPE == "io.emotion-stream.emotion_event.v1"
    assert ce.get_source() == "/emotion-stream/chat.messages.v1"
    assert ce.get_time() == datetime(2025, 11, 30, 10, 0, 0, 250000, tzinfo=UTC)
    assert ce.get_datacontenttype() == "application/json"
    assert ce.get_dataschema() == EVENT_DATASCHEMA
    assert ce.get_extension("partitionkey") == "c-42"
    assert ce.get_data() == orjson.loads(value)  # the body is the event, unchanged
    schema = json.loads((SCHEMAS / "emotion_event.v1.json").read_text())
    assert schema["$id"] == EVENT_DATASCHEMA
    jsonschema.Draft202012Validator(schema).validate(ce.get_data())
    assert dict(headers)["traceparent"] == VALID.encode()  # no tracestate: it did not come with a header
    assert "tracestate" not in dict(headers)


def test_the_legacy_sdk_api_reads_it_too() -> None:
    event, key = _event()
    headers = EventHeaders(event_source("chat.messages.v1")).build(event.event_id, event.emitted_at)
    ce = ce_v1_kafka.from_binary(ce_v1_kafka.KafkaMessage(dict(headers), key, event.to_json()))
    assert (ce["id"], ce["type"], ce["specversion"], ce["time"]) == (
        event.event_id,
        EVENT_TYPE,
        "1.0",
        event.emitted_at,
    )
    assert ce.get_data() == orjson.loads(event.to_json())
    assert "traceparent" not in dict(headers)


def test_event_source_is_a_percent_encoded_uri_reference() -> None:
    assert event_source("chat.messages.v1") == "/emotion-stream/chat.messages.v1"
    assert event_source("a b/c", app="my app") == "/my%20app/a%20b%2Fc"


# ------------------------------------------------------------------------------------------- dead letters
def _dead(topic: str = "chat.messages.v1", error: BaseException | None = None) -> DeadLetter:
    return DeadLetter.build(
        reason="undecodable",
        stage="decode",
        error=error or DecodeError("x"),
        source=SourceRef(topic=topic, partition=3, offset=2**63 - 1),
        raw_key=b"k",
        raw_value=b"v",
        received_at=1.0,
        worker_id="w",
    )


def test_dead_letter_headers_are_diagnostics_and_trace_context_without_cloudevents() -> None:
    headers = dict(dead_letter_headers(_dead(), parse_traceparent(VALID)))
    assert not any(name.startswith("ce_") for name in headers)
    assert headers["dlq_reason"] == b"undecodable" and headers["dlq_stage"] == b"decode"
    assert headers["dlq_topic"] == b"chat.messages.v1" and headers["dlq_partition"] == b"3"
    assert headers["dlq_offset"] == str(2**63 - 1).encode() and headers["dlq_error_class"] == b"DecodeError"
    assert headers["traceparent"] == VALID.encode() and headers["content-type"] == b"application/json"


class _HugeNamedError(Exception):
    pass


_HugeNamedError.__name__ = "E" * 5000


@settings(max_examples=60, deadline=None)
@given(topic=st.text(max_size=400), state_members=st.integers(0, 32))
def test_dead_letter_headers_stay_under_their_bound(topic: str, state_members: int) -> None:
    state = ",".join(f"k{i}=" + "v" * 256 for i in range(state_members)) or None
    trace = TraceContext(TRACE_ID, PARENT_ID, "01", state)
    headers = dead_letter_headers(_dead(topic, _HugeNamedError("x")), trace)
    size = headers_size(headers)
    aiokafka_size = DefaultRecordBatchBuilder.size_of(None, None, list(headers)) - 2  # minus null key and value
    assert size == aiokafka_size
    assert size <= MAX_DEAD_LETTER_HEADERS_BYTES <= DEAD_LETTER_HEADERS_RESERVE_BYTES
