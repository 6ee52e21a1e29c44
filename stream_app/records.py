"""Python mirrors of the contracts in ``schemas/*.v1.json``.

Input (:class:`ChatMessage`) is parsed leniently about extra fields and strictly about types; outputs
(:class:`EmotionEvent`, :class:`StageMetrics`, :class:`DeadLetter`) forbid extra fields so they cannot
drift from their schema. ``tests/unit/test_records.py`` proves that every example validates and every
record serialises to a valid document; ``tests/unit/test_contract_fidelity.py`` proves, over generated
documents, that :func:`decode_chat_message` accepts exactly what ``chat_message.v1`` (plus the wire rules
in its description) accepts, and that everything built from an accepted message encodes to a valid record.

Three promises the pipeline relies on:

* **Fidelity.** What the contract accepts is decoded; what it rejects raises an
  :class:`~stream_app.errors.InputError` whose ``reason`` names why. The worker keeps no rule the schema
  does not state (the whitespace rule and the RFC 3339 grammar are patterns in the schema, mirrored here).
* **Totality after validation.** For an accepted message, :func:`event_inputs`,
  :meth:`EmotionEvent.build` (with scores in [0, 1]) and every ``to_json`` cannot raise.
* **Bounded dead letters.** :meth:`DeadLetter.build` caps the raw key and value so the record, with its
  own Kafka key and headers, fits the producer's ``max_request_size``; :meth:`DeadLetter.reduced` drops the
  raw bytes for a send that is still refused.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final, Literal, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from stream_app.errors import DecodeError, EmptyTextError, SchemaError

__all__ = [
    "DEAD_LETTER_HEADERS_RESERVE_BYTES",
    "DEFAULT_MAX_RECORD_BYTES",
    "MAX_ORIGINAL_KEY_BYTES",
    "MIN_MAX_RECORD_BYTES",
    "NON_WHITESPACE_PATTERN",
    "RFC3339_PATTERN",
    "TRACEPARENT_PATTERN",
    "CacheInfo",
    "ChatMessage",
    "DeadLetter",
    "DeadLetterReason",
    "DeadLetterStage",
    "EmotionEvent",
    "EventInputs",
    "EventTimings",
    "ModelInfo",
    "SourceRef",
    "StageMetrics",
    "decode_chat_message",
    "event_id_for",
    "event_inputs",
    "has_non_whitespace",
    "parse_rfc3339",
    "parse_sent_at",
    "render_sent_at",
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

# ---------------------------------------------------------------------------------------------- patterns
# The schema's patterns, character for character (a test compares them with schemas/chat_message.v1.json).

#: A character that is not whitespace, whitespace being Python's ``str.isspace()`` plus ECMA-262's U+FEFF.
NON_WHITESPACE_PATTERN: Final = (
    r"[^\t\n\u000b\f\r\u001c-\u001f \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
)
_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)"
)
#: RFC 3339 date-time as chat_message.v1 accepts it (no leap seconds; years 0001-9999; real calendar days).
RFC3339_PATTERN: Final = (
    f"^{_DATE}"
    r"[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
    r"(?![\s\S])"
)
#: W3C traceparent, version 00 layout (the schema adds minLength = maxLength = 55).
TRACEPARENT_PATTERN: Final = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"

_NON_WHITESPACE = re.compile(NON_WHITESPACE_PATTERN)
_SURROGATE = re.compile("[\ud800-\udfff]")
# Same language as RFC3339_PATTERN, split into fields; day validity is left to datetime() (proleptic
# Gregorian, as the pattern), which a test checks against the pattern for every date of years 0000-9999.
_RFC3339_FIELDS = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)


def has_non_whitespace(text: str) -> bool:
    """Whether ``text`` satisfies chat_message.v1's text pattern (one character that is not whitespace)."""
    return _NON_WHITESPACE.search(text) is not None


# ---------------------------------------------------------------------------------------------- time
def rfc3339(ts: float) -> str:
    """Unix seconds (a wall clock reading) as an RFC 3339 UTC timestamp with milliseconds."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_sent_at(value: str) -> datetime:
    """An aware datetime from an RFC 3339 date-time exactly as chat_message.v1 accepts it.

    The offset is kept (``-00:00`` becomes UTC); fractional seconds beyond microseconds are truncated, never
    rounded (rounding 23:59:59.9999999 up could leave year 9999).

    Raises:
        ValueError: ``value`` is not in the contract's grammar, names a leap second or a day that does not
            exist (the message says which).
    """
    m = _RFC3339_FIELDS.fullmatch(value)
    if m is None:
        raise ValueError("not an RFC 3339 date-time: YYYY-MM-DDTHH:MM:SS[.fraction] then Z or +hh:mm/-hh:mm")
    if value[10] == "T" and value[-1] == "Z":
        # The common form: the grammar is checked above, and datetime.fromisoformat (C, a third of the time)
        # reads it the same way, fractions beyond microseconds truncated; anything it refuses (a leap second,
        # February 30) falls through to the field-by-field path, which says why.
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value)
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    fraction, sign, off_h, off_m = m.group(7, 8, 9, 10)
    if hour > 23 or minute > 59:
        raise ValueError("hour over 23 or minute over 59")
    if second > 59:
        raise ValueError("leap seconds (:60) and seconds over 59 are not accepted")
    tz = UTC
    if sign is not None:
        oh, om = int(off_h), int(off_m)
        if oh > 23 or om > 59:
            raise ValueError("offset hour over 23 or minute over 59")
        minutes = oh * 60 + om
        if minutes:
            tz = timezone(timedelta(minutes=-minutes if sign == "-" else minutes))
    micro = int(fraction[:6].ljust(6, "0")) if fraction else 0
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError as exc:  # year 0000, February 30, ...
        raise ValueError(f"no such date ({exc})") from None


def render_sent_at(moment: datetime) -> str:
    """``moment`` as RFC 3339 with milliseconds (truncated), in UTC (``Z``) whenever that is representable.

    Total for every aware datetime: when the UTC instant falls outside years 0001-9999 (an input within a
    day of 0001-01-01 or 9999-12-31 whose offset crosses the edge), the moment's own offset is kept; the
    instant is the same either way. A naive datetime is taken as UTC.
    """
    if moment.tzinfo is UTC:  # the common case, without the conversion
        return moment.isoformat(timespec="milliseconds")[:-6] + "Z"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # outside years 0001-9999 in UTC: keep the offset (documented in emotion_event.v1, sent_at)
    with contextlib.suppress(OverflowError):
        moment = moment.astimezone(UTC)
    text = moment.isoformat(timespec="milliseconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def parse_rfc3339(value: object) -> float | None:
    """Unix seconds from an RFC 3339 string as chat_message.v1 accepts it, or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return parse_sent_at(value).timestamp()
    except ValueError:
        return None


def event_id_for(topic: str, partition: int, offset: int) -> str:
    """The stable event id of the message at these source coordinates (32 hex characters)."""
    key = f"{topic}\x00{partition}\x00{offset}".encode(errors="surrogatepass")
    return hashlib.blake2b(key, digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------- encoding
def _scrub(text: str) -> str:
    """``text`` with every surrogate code point replaced by U+FFFD, so UTF-8 (and orjson) can encode it."""
    if text.isascii():
        return text
    return _SURROGATE.sub("\ufffd", text)


def _scrub_doc(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub(value)
    if isinstance(value, dict):
        return {_scrub(k) if isinstance(k, str) else k: _scrub_doc(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_doc(v) for v in value]
    return value


def _dumps(doc: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:
        # Only a lone surrogate gets here (every other value of these records is JSON-native and in range):
        # replace it rather than fail the record.
        return orjson.dumps(_scrub_doc(doc))


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def to_json(self) -> bytes:
        """The record as compact UTF-8 JSON; never raises (a lone surrogate would become U+FFFD)."""
        return _dumps(self.model_dump(mode="json", by_alias=True))


# ---------------------------------------------------------------------------------------------- input
class ChatMessage(BaseModel):
    """chat_message.v1: what chat services produce (key = conversation_id)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    message_id: str = Field(min_length=1, max_length=256)
    conversation_id: str = Field(min_length=1, max_length=256)
    user_id: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1)
    sent_at: datetime
    traceparent: str | None = Field(None, min_length=55, max_length=55, pattern=TRACEPARENT_PATTERN)

    @field_validator("sent_at", mode="before")
    @classmethod
    def _parse_time(cls, value: object) -> datetime:
        if not isinstance(value, str):
            raise ValueError("sent_at must be an RFC 3339 string")
        return parse_sent_at(value)

    def to_json(self) -> bytes:
        """A chat_message.v1 document of this message (sent_at re-rendered by :func:`render_sent_at`)."""
        doc = self.model_dump(mode="json", exclude_none=True)
        doc["sent_at"] = render_sent_at(self.sent_at)
        return _dumps(doc)


def decode_chat_message(raw: bytes | None) -> ChatMessage:
    """Decode and validate one raw Kafka value, raising the :class:`~stream_app.errors.InputError` that fits.

    Accepts exactly the documents that satisfy chat_message.v1 and the wire rules in its description
    (UTF-8 I-JSON, no byte order mark, nesting up to 1024, last duplicate member wins).

    Raises:
        DecodeError: a tombstone, or bytes that break the wire rules (reason ``undecodable``).
        SchemaError: JSON that breaks the schema (reason ``schema``).
        EmptyTextError: a text with no character that is not whitespace (reason ``empty_text``).
    """
    if raw is None:
        raise DecodeError("message has no value (tombstone)")
    try:
        # orjson enforces the wire rules: strict UTF-8 (no BOM, no encoded or escaped lone surrogate),
        # finite doubles, depth <= 1024; duplicate members: last wins.
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not UTF-8 I-JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SchemaError(f"expected a JSON object, got {type(doc).__name__}")
    try:
        message = ChatMessage.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise SchemaError(f"{where}: {first['msg']} ({exc.error_count()} error(s))") from exc
    if not has_non_whitespace(message.text):
        raise EmptyTextError("text is empty or whitespace only")
    return message


# ---------------------------------------------------------------------------------------------- outputs
_INT64_MAX: Final = 2**63 - 1


class SourceRef(_Out):
    topic: str
    partition: int = Field(ge=0, le=_INT64_MAX)
    offset: int = Field(ge=0, le=_INT64_MAX)


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


@dataclass(frozen=True, slots=True)
class EventInputs:
    """The fields of an emotion event that come from its input message and source coordinates.

    Built once per message by :func:`event_inputs` (cheap, total), so nothing input-derived can fail later
    while the event is assembled.
    """

    event_id: str
    message_id: str
    conversation_id: str
    user_id: str
    sent_at: str
    traceparent: str | None
    source: SourceRef
    key: bytes
    """The event's Kafka key: conversation_id in UTF-8 (at most 1024 bytes)."""


def event_inputs(message: ChatMessage, source: SourceRef) -> EventInputs:
    """The input-derived fields of the event for ``message`` read at ``source``; never raises."""
    return EventInputs(
        event_id=event_id_for(source.topic, source.partition, source.offset),
        message_id=message.message_id,
        conversation_id=message.conversation_id,
        user_id=message.user_id,
        sent_at=render_sent_at(message.sent_at),
        traceparent=message.traceparent,
        source=source,
        key=message.conversation_id.encode(),
    )


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

    @classmethod
    def build(
        cls,
        inputs: EventInputs,
        *,
        label: str,
        scores: Mapping[str, float],
        model: ModelInfo,
        cache: CacheInfo,
        truncated: bool,
        timings_ms: EventTimings,
        received_at: float,
        emitted_at: float,
    ) -> EmotionEvent:
        """Assemble an event without re-validation (hot path); the engine-derived part is checked.

        Args:
            inputs: from :func:`event_inputs`.
            label: the top label; must be a key of ``scores``.
            scores: probability (0..1) of every label.
            received_at: wall clock (Unix seconds) when the worker read the message.
            emitted_at: wall clock (Unix seconds) now.

        Raises:
            ValueError: ``label`` is not in ``scores`` or a score is not a number in [0, 1] (NaN included):
                an engine fault, which the pipeline dead-letters as ``output_failed``. Nothing input-derived
                can raise here.
        """
        plain = {str(k): float(v) for k, v in scores.items()}
        if not plain or label not in plain or not all(0.0 <= v <= 1.0 for v in plain.values()):
            raise ValueError(f"scores must hold the label {label!r} and only numbers in [0, 1]: {plain!r}")
        return cls.model_construct(
            schema_="emotion_event.v1",
            event_id=inputs.event_id,
            message_id=inputs.message_id,
            conversation_id=inputs.conversation_id,
            user_id=inputs.user_id,
            label=label,
            score=plain[label],
            scores=plain,
            model=model,
            cache=cache,
            truncated=truncated,
            timings_ms=timings_ms,
            source=inputs.source,
            sent_at=inputs.sent_at,
            received_at=rfc3339(received_at),
            emitted_at=rfc3339(emitted_at),
            traceparent=inputs.traceparent,
        )


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


# ---------------------------------------------------------------------------------------------- dead letters
#: aiokafka's and the Java client's default ``max_request_size`` (faust's default is 1,000,000: pass the real one).
DEFAULT_MAX_RECORD_BYTES: Final = 1024 * 1024
#: The smallest ``max_record_bytes`` :meth:`DeadLetter.build` accepts: every bounded field fits with room.
MIN_MAX_RECORD_BYTES: Final = 32 * 1024
#: A raw key up to this size is the dead letter's own Kafka key; a longer one is replaced by its hash.
MAX_ORIGINAL_KEY_BYTES: Final = 1024
#: Room kept for the dead letter's headers (``stream_app.core.headers.dead_letter_headers`` stays under half).
DEAD_LETTER_HEADERS_RESERVE_BYTES: Final = 4096
# Kafka's record batch header (61 bytes) + the largest per-record overhead (21) + varints of key and value
# lengths and header count (5 each), rounded up; then a margin for what this estimate may miss.
_RECORD_OVERHEAD_BYTES: Final = 128
_SAFETY_MARGIN_BYTES: Final = 1024
_MAX_ERROR_MESSAGE_CHARS: Final = 1000
_MAX_NAME_CHARS: Final = 256


def _b64_chars(n: int) -> int:
    """Characters of the base64 encoding of ``n`` bytes."""
    return 4 * ((n + 2) // 3)


def _bytes_fitting(chars: int) -> int:
    """The most bytes whose base64 encoding fits in ``chars`` characters."""
    return max(0, chars // 4) * 3


def _error_text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ must not stop the dead letter that reports it
        return f"<unprintable {type(error).__name__}>"


def _split(avail: int, need_key: int, need_value: int) -> tuple[int, int]:
    """Base64 characters for key and value within ``avail``: all of both if they fit, else a fair share."""
    if need_key + need_value <= avail:
        return need_key, need_value
    half = avail // 2
    if need_key <= half:
        return need_key, avail - need_key
    if need_value <= half:
        return avail - need_value, need_value
    return half, avail - half


class DeadLetter(_Out):
    """dead_letter.v1: a message that could not be processed, with why and where it came from.

    Build it with :meth:`build`: the encoded record, its Kafka key (:attr:`kafka_key`) and headers fit the
    producer's ``max_request_size`` whatever the raw key and value were.
    """

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
    raw_key_size_bytes: int | None = Field(None, ge=0)
    raw_key_truncated: bool = False
    key_hashed: bool = False
    raw_omitted: bool = False

    _kafka_key: bytes | None = PrivateAttr(None)
    _encoded: bytes | None = PrivateAttr(None)

    @property
    def kafka_key(self) -> bytes | None:
        """The dead letter's own Kafka key: the original key when at most 1024 bytes, else ``sha256:<hex>``."""
        return self._kafka_key

    def to_json(self) -> bytes:
        """The record as compact UTF-8 JSON (the bytes :meth:`build` measured); never raises."""
        return self._encoded if self._encoded is not None else super().to_json()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy (pydantic's), without the encoding cached for the original: it may differ."""
        copy = super().model_copy(update=update, deep=deep)
        copy._encoded = None
        return copy

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
        received_at: float,
        worker_id: str,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        max_raw_bytes: int | None = None,
    ) -> DeadLetter:
        """A dead letter whose Kafka record fits ``max_record_bytes``, raw bytes capped to make it so.

        The encoded value plus :attr:`kafka_key` plus headers of up to
        :data:`DEAD_LETTER_HEADERS_RESERVE_BYTES` stay under ``max_record_bytes`` as Kafka counts a record
        (batch header and record overhead included, with a margin). Key and value are kept whole when they
        fit, else the first bytes of each (fair shares), flagged ``raw_truncated`` / ``raw_key_truncated``
        with the original sizes. Free-text fields are capped (error message 1000 characters, names 256) and
        lone surrogates replaced, so nothing here raises for any input.

        Args:
            max_record_bytes: the producer's ``max_request_size`` (at least :data:`MIN_MAX_RECORD_BYTES`).
            max_raw_bytes: an optional extra cap on the raw value kept (e.g. ``max_message_bytes``).

        Raises:
            ValueError: ``max_record_bytes`` is below :data:`MIN_MAX_RECORD_BYTES` (a configuration error:
                check it at start-up).
        """
        if max_record_bytes < MIN_MAX_RECORD_BYTES:
            raise ValueError(f"max_record_bytes must be at least {MIN_MAX_RECORD_BYTES}, got {max_record_bytes}")
        key_size = len(raw_key) if raw_key is not None else None
        value_size = len(raw_value) if raw_value is not None else 0
        key_hashed = raw_key is not None and len(raw_key) > MAX_ORIGINAL_KEY_BYTES
        kafka_key = raw_key
        if raw_key is not None and key_hashed:
            kafka_key = b"sha256:" + hashlib.sha256(raw_key).hexdigest().encode()
        fields: dict[str, Any] = {
            "schema_": "dead_letter.v1",
            "reason": reason,
            "stage": stage,
            "error_class": _scrub(type(error).__name__[:_MAX_NAME_CHARS]),
            "error_message": _scrub(_error_text(error)[:_MAX_ERROR_MESSAGE_CHARS]),
            "source": SourceRef.model_construct(
                topic=_scrub(source.topic[:_MAX_NAME_CHARS]), partition=source.partition, offset=source.offset
            ),
            "raw_key_b64": None if raw_key is None else "",
            "raw_value_b64": None if raw_value is None else "",
            "raw_size_bytes": value_size,
            "raw_truncated": value_size > 0,
            "received_at": rfc3339(received_at),
            "worker_id": _scrub(worker_id[:_MAX_NAME_CHARS]),
            "raw_key_size_bytes": key_size,
            "raw_key_truncated": bool(key_size),
            "key_hashed": key_hashed,
            "raw_omitted": False,
        }
        skeleton = cls.model_construct(**fields)
        base = skeleton.to_json()
        budget = (
            max_record_bytes
            - _RECORD_OVERHEAD_BYTES
            - _SAFETY_MARGIN_BYTES
            - DEAD_LETTER_HEADERS_RESERVE_BYTES
            - len(kafka_key or b"")
        )
        value_cap = value_size if max_raw_bytes is None else min(value_size, max(0, max_raw_bytes))
        # base64 is ASCII that orjson writes as is: each kept character costs exactly one byte
        key_chars, value_chars = _split(budget - len(base), _b64_chars(key_size or 0), _b64_chars(value_cap))
        kept_key = raw_key[: _bytes_fitting(key_chars)] if raw_key is not None else None
        kept_value = raw_value[: min(value_cap, _bytes_fitting(value_chars))] if raw_value is not None else None
        fields.update(
            raw_key_b64=base64.b64encode(kept_key).decode() if kept_key is not None else None,
            raw_value_b64=base64.b64encode(kept_value).decode() if kept_value is not None else None,
            raw_truncated=kept_value is not None and len(kept_value) < value_size,
            raw_key_truncated=kept_key is not None and len(kept_key) < (key_size or 0),
        )
        record = cls.model_construct(**fields)
        encoded = record.to_json()
        if len(encoded) > budget:  # cannot happen by the arithmetic above; never send an oversized record
            record = skeleton.model_copy(update={"raw_omitted": True})
            encoded = record.to_json()
        record._kafka_key = kafka_key
        record._encoded = encoded
        return record

    def reduced(self) -> DeadLetter:
        """This dead letter without raw bytes, for a send the broker still refused as too large.

        Raw fields become ``""`` (``null`` stays ``null``: there were no bytes), marked truncated where there
        were bytes, and ``raw_omitted`` is true; sizes, reason and source are kept, and so is the Kafka key
        (at most 1024 bytes, or a hash).
        """
        copy = self.model_copy(
            update={
                "raw_key_b64": None if self.raw_key_b64 is None else "",
                "raw_value_b64": None if self.raw_value_b64 is None else "",
                "raw_truncated": self.raw_size_bytes > 0,
                "raw_key_truncated": bool(self.raw_key_size_bytes),
                "raw_omitted": True,
            }
        )
        copy._kafka_key = self._kafka_key
        return copy
