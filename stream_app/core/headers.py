"""Kafka record headers: W3C Trace Context in; CloudEvents (binary mode) and trace context out.

Headers are what every Kafka client exchanges, ``list[tuple[str, bytes]]`` (aiokafka and confluent-kafka
give and take that shape); no Kafka client is imported here.

In: :func:`read_trace_context` takes the ``traceparent``/``tracestate`` headers of a consumed record
(W3C Trace Context, https://www.w3.org/TR/trace-context/, validated as the spec says: version ``ff``, all-zero
ids, upper-case hex, wrong lengths are invalid; a future version is read by its version-00 prefix), falling
back to the body's ``traceparent`` when the headers carry no valid one. An invalid trace context is
ignored, never a reason to reject the message.

Out: :class:`EventHeaders` builds the headers of an ``emotion_event.v1`` record, the CloudEvents 1.0 Kafka
protocol binding in binary mode (``ce_specversion``, ``ce_id`` = event_id, ``ce_type``, ``ce_source``,
``ce_time``, ``ce_dataschema``, ``content-type``) plus ``traceparent``/``tracestate``, so any CloudEvents SDK
reads the record while the JSON body stays as it was. :func:`dead_letter_headers` builds the headers of a
dead letter: the trace context and a few ``dlq_*`` diagnostic headers, under
:data:`MAX_DEAD_LETTER_HEADERS_BYTES` whatever the input (the dead letter's size bound counts on it).
Constant header values are encoded once; an event costs a list of a dozen tuples and two ``encode`` calls.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from stream_app.records import DeadLetter

__all__ = [
    "EVENT_DATASCHEMA",
    "EVENT_TYPE",
    "MAX_DEAD_LETTER_HEADERS_BYTES",
    "MAX_TRACESTATE_CHARS",
    "EventHeaders",
    "Headers",
    "HeadersIn",
    "TraceContext",
    "dead_letter_headers",
    "event_source",
    "headers_size",
    "parse_traceparent",
    "parse_tracestate",
    "read_trace_context",
]

Headers = list[tuple[str, bytes]]
#: What a consumed record may carry: aiokafka gives a tuple of (str, bytes) pairs; values may be None.
HeadersIn = Iterable[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None

EVENT_TYPE: Final = "io.emotion-stream.emotion_event.v1"
EVENT_DATASCHEMA: Final = "https://emotion-stream.local/schemas/emotion_event.v1.json"
#: tracestate is cut to this many characters on output (W3C: propagate at least 512, drop members to fit).
MAX_TRACESTATE_CHARS: Final = 512
#: Upper bound of :func:`headers_size` for what :func:`dead_letter_headers` returns; at most
#: ``records.DEAD_LETTER_HEADERS_RESERVE_BYTES``, the room :meth:`DeadLetter.build` keeps for them.
MAX_DEAD_LETTER_HEADERS_BYTES: Final = 2048
_MAX_TRACESTATE_MEMBERS: Final = 32
_MAX_DLQ_VALUE_BYTES: Final = 256

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.ASCII | re.DOTALL)
_ZERO_TRACE_ID: Final = "0" * 32
_ZERO_PARENT_ID: Final = "0" * 16
_OWS = " \t"
# W3C Trace Context, tracestate list-member key and value (Level 1 grammar; Level 2 is the same here).
_TS_KEY = re.compile(
    r"[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}",
    re.ASCII,
)
_TS_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]", re.ASCII)


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A valid W3C trace context, normalised to version 00 for propagation."""

    trace_id: str
    """32 lower-case hex digits, not all zero."""
    parent_id: str
    """16 lower-case hex digits, not all zero."""
    flags: str
    """2 lower-case hex digits (bit 0: sampled)."""
    tracestate: str | None = None
    """The vendor list, validated and normalised (members trimmed, empty ones dropped), or None."""

    @property
    def traceparent(self) -> str:
        """The ``traceparent`` value to propagate (version 00)."""
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"

    @property
    def sampled(self) -> bool:
        return bool(int(self.flags, 16) & 1)

    def headers(self) -> Headers:
        """``traceparent`` (and ``tracestate``, cut to :data:`MAX_TRACESTATE_CHARS`) as output headers."""
        out: Headers = [("traceparent", self.traceparent.encode())]
        state = _bounded_tracestate(self.tracestate) if self.tracestate else None
        if state:
            out.append(("tracestate", state.encode()))
        return out


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.isascii() else None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def parse_traceparent(value: bytes | str | None) -> TraceContext | None:
    """The trace context of a ``traceparent`` value, or None when it is not valid per W3C Trace Context.

    Version 00 must be exactly ``00-<32 hex>-<16 hex>-<2 hex>`` in lower case; a higher version (not ``ff``)
    is read by that prefix, which must end the value or be followed by ``-``. All-zero trace or parent ids
    are invalid. Leading and trailing spaces/tabs are ignored (HTTP's optional whitespace).
    """
    text = _text(value)
    if text is None:
        return None
    m = _TRACEPARENT.fullmatch(text.strip(_OWS))
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_PARENT_ID:
        return None
    return TraceContext(trace_id, parent_id, flags)


def parse_tracestate(values: Iterable[bytes | str | None]) -> str | None:
    """The combined ``tracestate`` of one or more header values, or None when absent or invalid.

    Several values are one comma-separated list, as HTTP combines repeated headers. Invalid per W3C (a bad
    key or value, a repeated key, more than 32 members, non-ASCII): the whole tracestate is dropped.
    """
    members: list[str] = []
    seen: set[str] = set()
    for raw in values:
        text = _text(raw)
        if text is None:
            return None
        for part in text.split(","):
            member = part.strip(_OWS)
            if not member:
                continue
            key, eq, val = member.partition("=")
            if not eq or _TS_KEY.fullmatch(key) is None or _TS_VALUE.fullmatch(val) is None or key in seen:
                return None
            seen.add(key)
            members.append(member)
            if len(members) > _MAX_TRACESTATE_MEMBERS:
                return None
    return ",".join(members) if members else None


def _bounded_tracestate(state: str, limit: int = MAX_TRACESTATE_CHARS) -> str:
    """``state`` cut to ``limit`` characters as W3C says: members over 128 first, then from the end."""
    if len(state) <= limit:
        return state
    members = state.split(",")
    while len(",".join(members)) > limit:
        long = [i for i, m in enumerate(members) if len(m) > 128]
        members.pop(long[-1] if long else -1)
    return ",".join(members)


def _pairs(headers: HeadersIn) -> Iterable[tuple[str, bytes | str | None]]:
    if headers is None:
        return ()
    if isinstance(headers, Mapping):
        return headers.items()
    return headers


def read_trace_context(headers: HeadersIn, body_traceparent: str | None = None) -> TraceContext | None:
    """The trace context of a consumed record: its headers first, else the body's ``traceparent``.

    The ``traceparent`` header counts when there is exactly one and it is valid (header names match
    case-insensitively); ``tracestate`` headers go with it only (a body traceparent has no tracestate).
    """
    parents: list[bytes | str | None] = []
    states: list[bytes | str | None] = []
    for name, value in _pairs(headers):
        lower = name.lower()
        if lower == "traceparent":
            parents.append(value)
        elif lower == "tracestate":
            states.append(value)
    if len(parents) == 1:
        ctx = parse_traceparent(parents[0])
        if ctx is not None:
            state = parse_tracestate(states) if states else None
            return TraceContext(ctx.trace_id, ctx.parent_id, ctx.flags, state) if state else ctx
    return parse_traceparent(body_traceparent) if body_traceparent is not None else None


def event_source(input_topic: str, app: str = "emotion-stream") -> str:
    """The CloudEvents ``source`` of events made from ``input_topic``: ``/<app>/<topic>`` (URI reference).

    It names the input, not the worker, so source + id (the event_id, unique per input record) stays the
    same when another worker replays the record: CloudEvents consumers de-duplicate on exactly that pair.
    """
    return f"/{quote(app, safe='')}/{quote(input_topic, safe='')}"


class EventHeaders:
    """Builds the headers of ``emotion_event.v1`` records made from one input topic.

    Args:
        source: the CloudEvents ``source`` (see :func:`event_source`).
        event_type: the CloudEvents ``type``.
        dataschema: the CloudEvents ``dataschema``, or None to leave it out.
    """

    __slots__ = ("_constant",)

    def __init__(self, source: str, *, event_type: str = EVENT_TYPE, dataschema: str | None = EVENT_DATASCHEMA) -> None:
        constant: Headers = [
            ("ce_specversion", b"1.0"),
            ("ce_type", event_type.encode()),
            ("ce_source", source.encode()),
            ("content-type", b"application/json"),
        ]
        if dataschema is not None:
            constant.append(("ce_dataschema", dataschema.encode()))
        self._constant = tuple(constant)

    def build(self, event_id: str, time: str, trace: TraceContext | None = None) -> Headers:
        """The headers of one event.

        Args:
            event_id: the event's ``event_id`` (``ce_id``).
            time: the event's ``emitted_at`` (``ce_time``), RFC 3339.
            trace: the trace context to propagate (from :func:`read_trace_context`), or None.
        """
        out = [*self._constant, ("ce_id", event_id.encode()), ("ce_time", time.encode())]
        if trace is not None:
            out += trace.headers()
        return out


def _capped(text: str) -> bytes:
    """UTF-8 of ``text`` (lone surrogates replaced), at most ``_MAX_DLQ_VALUE_BYTES`` bytes, whole characters."""
    data = text.encode(errors="replace")
    if len(data) <= _MAX_DLQ_VALUE_BYTES:
        return data
    return data[:_MAX_DLQ_VALUE_BYTES].decode(errors="ignore").encode()


def dead_letter_headers(dead: DeadLetter, trace: TraceContext | None = None) -> Headers:
    """The headers of a dead letter: diagnostics (no ``ce_*``: a dead letter is not an event) and trace context.

    ``content-type``, ``dlq_reason``, ``dlq_stage``, ``dlq_topic``, ``dlq_partition``, ``dlq_offset``,
    ``dlq_error_class`` (values capped at 256 bytes), then ``traceparent``/``tracestate``. Their size, as
    Kafka counts headers, is at most :data:`MAX_DEAD_LETTER_HEADERS_BYTES`.
    """
    out: Headers = [
        ("content-type", b"application/json"),
        ("dlq_reason", dead.reason.encode()),
        ("dlq_stage", dead.stage.encode()),
        ("dlq_topic", _capped(dead.source.topic)),
        ("dlq_partition", str(dead.source.partition).encode()),
        ("dlq_offset", str(dead.source.offset).encode()),
        ("dlq_error_class", _capped(dead.error_class)),
    ]
    if trace is not None:
        out += trace.headers()
    return out


def _varint_size(n: int) -> int:
    """Bytes of Kafka's zig-zag varint of ``n``."""
    z = (n << 1) ^ (n >> 63)
    size = 1
    while z >= 0x80:
        z >>= 7
        size += 1
    return size


def headers_size(headers: Iterable[tuple[str, bytes | None]]) -> int:
    """Bytes the headers add to a Kafka record (v2 record format: count, then each name and value)."""
    items = list(headers)
    total = _varint_size(len(items))
    for name, value in items:
        raw = name.encode()
        total += _varint_size(len(raw)) + len(raw)
        total += _varint_size(len(value)) + len(value) if value is not None else _varint_size(-1)
    return total
