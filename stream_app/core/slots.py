"""The unit of work (a :class:`Slot` per input record) and the per-partition :class:`Lane` it belongs to.

A chunk of records fetched from Kafka becomes a list of slots. Each stage writes its own fields and no
other, in this order:

============  ======================================================================================
intake        ``message``, ``text``, ``cache_key``, ``trace`` (W3C trace context), or ``dead``
cache         ``result`` and ``level`` on a hit
classifier    ``encoded``, ``result``, ``level`` (``none`` or ``batch``), ``batch``, or ``dead``
emitter       ``out`` (the encoded output record), ``done``; releases slots per lane in delivery order
============  ======================================================================================

Times are per chunk or per batch (one clock reading shared by many slots), never per message.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from stream_app.core.headers import TraceContext
    from stream_app.inference.tokenize import Encoded
    from stream_app.records import ChatMessage

__all__ = [
    "ChunkInfo",
    "DeadInfo",
    "Lane",
    "OutRecord",
    "RecordLike",
    "Result",
    "Slot",
]


class RecordLike(Protocol):
    """What the core reads of a fetched Kafka record (aiokafka's ``ConsumerRecord`` has these)."""

    @property
    def offset(self) -> int: ...

    @property
    def timestamp(self) -> int:
        """Milliseconds since the epoch (the record's CreateTime or LogAppendTime)."""
        ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> tuple[tuple[str, bytes], ...] | list[tuple[str, bytes]]: ...


class Result(NamedTuple):
    """One classification: the predicted label, every label's probability, and whether the text was cut.

    ``scores`` are Python floats holding float32 values, so an answer served from the cache (stored as
    float32) is bit-identical to the one computed for the message that filled it.
    """

    label_index: int
    scores: tuple[float, ...]
    truncated: bool


class DeadInfo(NamedTuple):
    """Why a slot becomes a dead letter: the fixed ``reason`` code, the ``stage`` and the error."""

    reason: str
    stage: str
    error: BaseException


class OutRecord(NamedTuple):
    """An encoded output record: Kafka key, value (None: a tombstone), headers, and an explicit partition
    (None: the default partitioner's, murmur2 of the key, as every Kafka client does)."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    partition: int | None = None


@dataclass(slots=True, eq=False)
class ChunkInfo:
    """What the slots of one fetched chunk share: when it arrived and what intake and cache cost."""

    topic: str
    received_wall: float
    received_mono: float
    received_at: str
    decode_s: float = 0.0
    cache_s: float = 0.0
    tokenize_s: float = 0.0
    enqueued_mono: float = 0.0


@dataclass(slots=True, eq=False)
class Lane:
    """One input partition while it is assigned to this worker (a new lane per assignment).

    ``window`` holds every slot read and not yet acknowledged, in delivery order; its first ``released``
    slots have been handed to the producer. The emitter releases done slots from the front of the rest,
    and once the broker acknowledged a released slot's output it leaves the window and its offset + 1
    becomes committable. Committing the last acknowledged offset in *delivery* order (not the highest
    offset seen) is what makes an offset reset safe: records delivered after a rewind are committed only
    as they are processed, so nothing between the old and the new position is ever skipped.

    Attributes:
        partition: The input partition.
        window: Slots read and not yet acknowledged, in delivery order.
        released: How many slots at the front of ``window`` were handed to the producer.
        acked_offset: Offset to commit: one past the last slot whose output the broker acknowledged.
        committed_offset: What was last committed (or found committed at assignment).
        expected_offset: The offset the next delivered record should have (None until known).
        lowest_seen: The lowest offset delivered in this assignment (tells a re-delivery from a reset).
        caught_up_since: Monotonic time since when the lane had nothing in flight (lag in seconds).
        revoking: The partition is being revoked: its in-flight work may finish, but a transaction that
            fails now is abandoned to the next owner instead of stopping the worker.
        dead: The partition was revoked; its remaining slots are dropped, never committed.
    """

    partition: int
    window: deque[Slot] = field(default_factory=deque)
    released: int = 0
    acked_offset: int | None = None
    committed_offset: int | None = None
    expected_offset: int | None = None
    lowest_seen: int | None = None
    caught_up_since: float | None = None
    revoking: bool = False
    dead: bool = False


@dataclass(slots=True, eq=False)
class Slot:
    """One input record on its way through the core (see the module docstring for who writes what)."""

    lane: Lane
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] | list[tuple[str, bytes]]
    chunk: ChunkInfo
    message: ChatMessage | None = None
    text: str = ""
    cache_key: bytes | None = None
    trace: TraceContext | None = None
    dead: DeadInfo | None = None
    result: Result | None = None
    level: str = "none"
    encoded: Encoded | None = None
    leader: Slot | None = None
    batch: object | None = None
    isolate: bool = False
    out_topic: str = ""
    out: OutRecord | None = None
    done: bool = False
