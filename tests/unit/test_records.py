"""The Python records agree with the JSON Schema contracts in schemas/."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import orjson
import pytest

from stream_app.errors import DecodeError, EmptyTextError, SchemaError
from stream_app.records import (
    CacheInfo,
    ChatMessage,
    DeadLetter,
    EmotionEvent,
    EventTimings,
    ModelInfo,
    SourceRef,
    StageMetrics,
    decode_chat_message,
    event_id_for,
    event_inputs,
    parse_rfc3339,
)

pytestmark = pytest.mark.unit

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
NAMES = ["chat_message.v1", "emotion_event.v1", "stage_metrics.v1", "dead_letter.v1"]


def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.mark.parametrize("name", NAMES)
def test_example_validates_against_its_schema(name: str) -> None:
    example = json.loads((SCHEMAS / "examples" / f"{name}.json").read_text())
    _validator(name).validate(example)


@pytest.mark.parametrize(
    ("name", "model"),
    [("emotion_event.v1", EmotionEvent), ("stage_metrics.v1", StageMetrics), ("dead_letter.v1", DeadLetter)],
)
def test_example_round_trips_through_the_record(name: str, model: type[EmotionEvent]) -> None:
    example = json.loads((SCHEMAS / "examples" / f"{name}.json").read_text())
    record = model.model_validate(example)
    out = orjson.loads(record.to_json())
    assert out == example
    _validator(name).validate(out)


def test_chat_message_example_parses_and_reserialises_valid() -> None:
    raw = (SCHEMAS / "examples" / "chat_message.v1.json").read_bytes()
    msg = decode_chat_message(raw)
    _validator("chat_message.v1").validate(orjson.loads(msg.to_json()))


def test_built_records_serialise_to_valid_documents() -> None:
    src = SourceRef(topic="chat.messages.v1", partition=1, offset=5)
    event = EmotionEvent(
        event_id=event_id_for(src.topic, src.partition, src.offset),
        message_id="m",
        conversation_id="c",
        user_id="u",
        label="joy",
        score=0.9,
        scores={"joy": 0.9, "neutral": 0.1},
        model=ModelInfo(name="n", version="v", runtime="pytorch-2.15.0", precision="fp32", device="cpu"),
        cache=CacheInfo(hit=True, level="l2"),
        truncated=False,
        timings_ms=EventTimings(decode=0, cache=0, queue_wait=0, tokenize=0, infer=0, postprocess=0, total=0),
        source=src,
        sent_at="2026-11-26T14:03:07.123Z",
        received_at="2026-11-26T14:03:07.123Z",
        emitted_at="2026-11-26T14:03:07.123Z",
        traceparent=None,
    )
    _validator("emotion_event.v1").validate(orjson.loads(event.to_json()))
    dead = DeadLetter.build(
        reason="undecodable",
        stage="decode",
        error=DecodeError("bad"),
        source=src,
        raw_key=None,
        raw_value=b"\xff" * 100,
        max_raw_bytes=10,
        received_at=1.0,
        worker_id="w",
    )
    doc = orjson.loads(dead.to_json())
    _validator("dead_letter.v1").validate(doc)
    assert doc["raw_truncated"] is True and doc["raw_size_bytes"] == 100


def test_event_id_is_stable_and_distinct() -> None:
    assert event_id_for("t", 0, 1) == event_id_for("t", 0, 1)
    assert len({event_id_for("t", p, o) for p in range(3) for o in range(100)}) == 300


GOOD = {"message_id": "m", "conversation_id": "c", "user_id": "u", "text": "hi", "sent_at": "2026-01-01T00:00:00Z"}


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\xff\xfe not utf8", DecodeError),
        (b"{not json", DecodeError),
        (None, DecodeError),
        (b"[1, 2]", SchemaError),
        (orjson.dumps({**GOOD, "text": 5}), SchemaError),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "user_id"}), SchemaError),
        (orjson.dumps({**GOOD, "sent_at": "yesterday"}), SchemaError),
        (orjson.dumps({**GOOD, "sent_at": "2026-01-01T00:00:00"}), SchemaError),
        (orjson.dumps({**GOOD, "text": ""}), SchemaError),
        (orjson.dumps({**GOOD, "text": " \n\t "}), EmptyTextError),
    ],
)
def test_bad_input_raises_the_matching_error(raw: bytes | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_chat_message(raw)


@pytest.mark.parametrize(
    "doc",
    [
        {**GOOD, "text": 5},
        {k: v for k, v in GOOD.items() if k != "user_id"},
        {**GOOD, "sent_at": "yesterday"},
        {**GOOD, "text": ""},
        {**GOOD, "traceparent": "not-a-trace"},
    ],
)
def test_python_and_json_schema_reject_the_same_documents(doc: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        _validator("chat_message.v1").validate(doc)
    with pytest.raises(SchemaError):
        decode_chat_message(orjson.dumps(doc))


def test_extra_input_fields_are_ignored() -> None:
    msg = decode_chat_message(orjson.dumps({**GOOD, "lang": "en"}))
    assert isinstance(msg, ChatMessage) and msg.text == "hi"


def test_dead_letters_written_before_the_additions_still_validate() -> None:
    """The fields, reasons and stages added within v1 are optional: an earlier record stays valid."""
    example = json.loads((SCHEMAS / "examples" / "dead_letter.v1.json").read_text())
    earlier = {
        k: v
        for k, v in example.items()
        if k not in {"raw_key_size_bytes", "raw_key_truncated", "key_hashed", "raw_omitted"}
    }
    _validator("dead_letter.v1").validate(earlier)
    assert DeadLetter.model_validate(earlier).raw_key_size_bytes is None


@pytest.mark.parametrize(
    ("reason", "stage"), [("output_failed", "output"), ("crash_loop", "infer"), ("inference_failed", "cache")]
)
def test_new_reasons_and_stages_are_in_the_contract(reason: str, stage: str) -> None:
    dead = DeadLetter.build(
        reason=reason,  # type: ignore[arg-type]
        stage=stage,  # type: ignore[arg-type]
        error=RuntimeError("boom"),
        source=SourceRef(topic="t", partition=0, offset=1),
        raw_key=b"c-1",
        raw_value=b"{}",
        received_at=1.0,
        worker_id="w",
    )
    _validator("dead_letter.v1").validate(orjson.loads(dead.to_json()))


def test_a_small_key_is_the_dead_letters_own_key_and_reduced_drops_the_raw_bytes() -> None:
    dead = DeadLetter.build(
        reason="schema",
        stage="validate",
        error=SchemaError("text: missing"),
        source=SourceRef(topic="t", partition=0, offset=1),
        raw_key=b"c-42",
        raw_value=b'{"x": 1}',
        received_at=1.0,
        worker_id="w",
    )
    assert dead.kafka_key == b"c-42" and not dead.key_hashed and not dead.raw_truncated
    reduced = dead.reduced()
    doc = orjson.loads(reduced.to_json())
    _validator("dead_letter.v1").validate(doc)
    assert (doc["raw_key_b64"], doc["raw_value_b64"], doc["raw_omitted"]) == ("", "", True)
    assert doc["raw_truncated"] and doc["raw_key_truncated"] and doc["raw_size_bytes"] == 8
    assert reduced.kafka_key == b"c-42"


def test_event_build_matches_the_example_event() -> None:
    example = json.loads((SCHEMAS / "examples" / "emotion_event.v1.json").read_text())
    chat = decode_chat_message((SCHEMAS / "examples" / "chat_message.v1.json").read_bytes())
    src = SourceRef.model_validate(example["source"])
    built = EmotionEvent.build(
        event_inputs(chat, src),
        label=example["label"],
        scores=example["scores"],
        model=ModelInfo.model_validate(example["model"]),
        cache=CacheInfo.model_validate(example["cache"]),
        truncated=example["truncated"],
        timings_ms=EventTimings.model_validate(example["timings_ms"]),
        received_at=parse_rfc3339(example["received_at"]) or 0.0,
        emitted_at=parse_rfc3339(example["emitted_at"]) or 0.0,
    )
    out = orjson.loads(built.to_json())
    _validator("emotion_event.v1").validate(out)
    assert out == {**example, "event_id": event_id_for(src.topic, src.partition, src.offset)}
