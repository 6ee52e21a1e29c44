"""Python mirrors of the contracts in ``schemas/*.v1.json``.

Input (:class:`ChatMessage`) is parsed leniently about extra fields and strictly about types; outputs
(:class:`EmotionEvent`, :class:`StageMetrics`, :class:`DeadLetter`) forbid extra fields so they cannot
drift from their schema. ``tests/unit/test_records.py`` proves that every example validates and every
record serialises to a valid document.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stream_app.errors import DecodeError, EmptyTextError, SchemaError

__all__ = [
    "CacheInfo",
    "ChatMessage",
    "DeadLetter",
    "EmotionEvent",
    "EventTimings",
    "ModelInfo",
    "SourceRef",
    "StageMetrics",
    "decode_chat_message",
    "event_id_for",
    "parse_rfc3339",
    "rfc3339",
]

CacheLevel = Literal["l1", "l2", "batch", "none"]
DeadLetterReason = Literal[
    "undecodable",
    "too_large",
    "schema",
    "empty_text",
    "text_too_long",
    "inference_failed",
    "output_failed",
    "crash_loop",
]
DeadLetterStage = Literal["decode", "validate", "cache", "tokenize", "infer", "output"]


def rfc3339(ts: float) -> str:
    """Unix seconds as an RFC 3339 UTC timestamp with milliseconds."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(value: object) -> float | None:
    """Unix seconds from an RFC 3339 string (``Z`` or an offset), or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def event_id_for(topic: str, partition: int, offset: int) -> str:
    """The stable event id of the message at these source coordinates (32 hex characters)."""
    return hashlib.blake2b(f"{topic}\x00{partition}\x00{offset}".encode(), digest_size=16).hexdigest()


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", by_alias=True))


class ChatMessage(BaseModel):
    """chat_message.v1: what chat services produce (key = conversation_id)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    message_id: str = Field(min_length=1, max_length=256)
    conversation_id: str = Field(min_length=1, max_length=256)
    user_id: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1)
    sent_at: datetime
    traceparent: str | None = Field(None, pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")

    @field_validator("sent_at", mode="before")
    @classmethod
    def _parse_time(cls, value: object) -> datetime:
        if not isinstance(value, str):
            raise ValueError("sent_at must be an RFC 3339 string")
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError("sent_at needs a time zone")
        return parsed

    def to_json(self) -> bytes:
        doc = self.model_dump(mode="json", exclude_none=True)
        doc["sent_at"] = rfc3339(self.sent_at.timestamp())
        return orjson.dumps(doc)


def decode_chat_message(raw: bytes | None) -> ChatMessage:
    """Decode and validate one raw Kafka value, raising the :class:`~stream_app.errors.InputError` that fits."""
    if raw is None:
        raise DecodeError("message has no value (tombstone)")
    try:
        doc = orjson.loads(raw)  # rejects invalid UTF-8 as well as invalid JSON
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SchemaError(f"expected a JSON object, got {type(doc).__name__}")
    try:
        message = ChatMessage.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise SchemaError(f"{where}: {first['msg']} ({exc.error_count()} error(s))") from exc
    if not message.text.strip():
        raise EmptyTextError("text is empty or whitespace only")
    return message


class SourceRef(_Out):
    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class ModelInfo(_Out):
    name: str
    version: str
    runtime: str
    precision: Literal["fp32", "fp16", "bf16", "int8"]
    device: str


class CacheInfo(_Out):
    hit: bool
    level: CacheLevel


class EventTimings(_Out):
    decode: float = Field(ge=0)
    cache: float = Field(ge=0)
    queue_wait: float = Field(ge=0)
    tokenize: float = Field(ge=0)
    infer: float = Field(ge=0)
    postprocess: float = Field(ge=0)
    total: float = Field(ge=0)


class EmotionEvent(_Out):
    """emotion_event.v1: the emotion of one message (key = conversation_id)."""

    schema_: Literal["emotion_event.v1"] = Field("emotion_event.v1", alias="schema")
    event_id: str
    message_id: str
    conversation_id: str
    user_id: str
    label: str
    score: float = Field(ge=0, le=1)
    scores: dict[str, float]
    model: ModelInfo
    cache: CacheInfo
    truncated: bool
    timings_ms: EventTimings
    source: SourceRef
    sent_at: str
    received_at: str
    emitted_at: str
    traceparent: str | None


class StageMs(_Out):
    queue_wait: float = Field(ge=0)
    tokenize: float = Field(ge=0)
    infer: float = Field(ge=0)
    postprocess: float = Field(ge=0)
    produce: float = Field(ge=0)


class CacheCounts(_Out):
    l1_hits: int = Field(ge=0)
    l2_hits: int = Field(ge=0)
    batch_hits: int = Field(ge=0)
    misses: int = Field(ge=0)


class StageMetrics(_Out):
    """stage_metrics.v1: one record per inference batch (key = worker_id)."""

    schema_: Literal["stage_metrics.v1"] = Field("stage_metrics.v1", alias="schema")
    batch_id: int = Field(ge=0)
    worker_id: str
    engine: str
    device: str
    size: int = Field(ge=0)
    real_tokens: int = Field(ge=0)
    padded_tokens: int = Field(ge=0)
    token_budget: int = Field(ge=1)
    closed_reason: Literal["size", "tokens", "age", "drain"]
    stage_ms: StageMs
    cache: CacheCounts
    emitted_at: str


class DeadLetter(_Out):
    """dead_letter.v1: a message that could not be processed, with why and where it came from."""

    schema_: Literal["dead_letter.v1"] = Field("dead_letter.v1", alias="schema")
    reason: DeadLetterReason
    stage: DeadLetterStage
    error_class: str
    error_message: str
    source: SourceRef
    raw_key_b64: str | None
    raw_value_b64: str | None
    raw_size_bytes: int = Field(ge=0)
    raw_truncated: bool
    received_at: str
    worker_id: str

    @classmethod
    def build(
        cls,
        *,
        reason: DeadLetterReason,
        stage: DeadLetterStage,
        error: BaseException,
        source: SourceRef,
        raw_key: bytes | None,
        raw_value: bytes | None,
        max_raw_bytes: int,
        received_at: float,
        worker_id: str,
    ) -> DeadLetter:
        size = len(raw_value) if raw_value is not None else 0
        kept = raw_value[:max_raw_bytes] if raw_value is not None else None
        return cls(
            reason=reason,
            stage=stage,
            error_class=type(error).__name__,
            error_message=str(error)[:1000],
            source=source,
            raw_key_b64=base64.b64encode(raw_key).decode() if raw_key is not None else None,
            raw_value_b64=base64.b64encode(kept).decode() if kept is not None else None,
            raw_size_bytes=size,
            raw_truncated=kept is not None and len(kept) < size,
            received_at=rfc3339(received_at),
            worker_id=worker_id,
        )
