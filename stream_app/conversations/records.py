"""Python mirrors of ``schemas/conversation_state.v1.json`` and ``schemas/escalation.v1.json``.

Like the other output records they forbid extra fields, so they cannot drift from their schema;
``tests/unit/conversations/test_conversations_records.py`` proves that the examples validate and that
the documents the tracker builds validate against both the schemas and these models. Times are RFC 3339
UTC strings with milliseconds; event times (``sent_at`` of the messages) and processing times (the
worker's clock) are named apart.

On the hot path the tracker builds the documents as plain dicts (:class:`StateOutput`,
:class:`AlertOutput`) and serialises them with orjson: validating a nested pydantic model per emitted
record cost about ten times as much as building the dict (``benchmarks/conversations.py``). Their
``record()`` gives the validated model when a caller wants one.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from stream_app.records import rfc3339

__all__ = [
    "AlertEvidence",
    "AlertOutput",
    "AlertRule",
    "AlertSource",
    "AlertTrigger",
    "ConversationStateRecord",
    "EscalationRecord",
    "StateCounters",
    "StateDominant",
    "StateEpisode",
    "StateMessage",
    "StateMood",
    "StateOutput",
    "StateSource",
    "StateWindow",
    "alert_id_for",
    "format_time",
    "round6",
]

StateReason = Literal["dominant_changed", "interval", "snapshot", "alert"]


def alert_id_for(topic: str, partition: int, offset: int, rule: str) -> str:
    """Stable id of the alert that ``rule`` fired at the message at these source coordinates (32 hex).

    A replay that fires the same rule at the same message again (at-least-once) gives the same id.
    """
    return hashlib.blake2b(f"{topic}\x00{partition}\x00{offset}\x00{rule}".encode(), digest_size=16).hexdigest()


@functools.lru_cache(maxsize=4096)
def _day_prefix(day: int) -> str:
    """``YYYY-MM-DDT`` of the UTC day ``day`` days after the epoch (from :func:`rfc3339` itself)."""
    return rfc3339(day * 86_400.0)[:11]


# "HH:MM:" of each minute of a day, "SS" and ".mmm": format specs in an f-string cost 0.1 µs each
_MINUTES = tuple(f"{m // 60:02d}:{m % 60:02d}:" for m in range(1440))
_SECONDS = tuple(f"{s:02d}" for s in range(60))
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


def format_time(ts: float) -> str:
    """:func:`stream_app.records.rfc3339` (``2026-11-18T10:00:00.123Z``), at a fraction of its cost.

    The same result for every finite ``ts`` (a hypothesis test walks the whole range): the microseconds
    are rounded half to even as ``datetime.fromtimestamp`` rounds them, then cut to milliseconds as
    ``isoformat(timespec="milliseconds")`` cuts them; only the date comes from ``datetime`` (once per day).

    Raises:
        ValueError: A time outside years 1 to 9999 (as ``rfc3339``).
        OverflowError: An infinite ``ts``.
    """
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    sec = int(whole)
    if us >= 1_000_000:
        sec += 1
        us -= 1_000_000
    elif us < 0:
        sec -= 1
        us += 1_000_000
    day, rem = divmod(sec, 86_400)
    minute, second = divmod(rem, 60)
    return f"{_day_prefix(day)}{_MINUTES[minute]}{_SECONDS[second]}{_MILLIS[us // 1000]}"


def round6(x: float) -> float:
    """``round(x, 6)``, exactly, at a fraction of its cost for the shares and scores of the records.

    ``round(x, 6)`` finds the correctly rounded decimal through a string conversion (about 0.4 µs); the
    records round a dozen numbers each. For ``0 < x < 4294`` the scaled value ``x * 1e6`` is off the exact
    one by at most 2**-21, so when its fraction is not within 1e-6 of one half the integer it rounds to is
    the one ``round`` finds, and ``r / 1e6`` (a correctly rounded division) is the double ``round`` returns.
    Zeros come back as they are (``round`` keeps their sign); near halves, negatives, large and
    non-finite values go to ``round`` itself.
    """
    if 0.0 < x < 4294.0:
        y = x * 1e6
        r = int(y)
        f = y - r
        if f < 0.499999:
            return r / 1e6
        if f > 0.500001:
            return (r + 1) / 1e6
    elif x == 0.0:
        return x  # round keeps the zero's sign
    return round(x, 6)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", by_alias=True))


class StateMessage(_Out):
    """One recent message: the evidence of the state and of alerts."""

    message_id: str
    label: str
    score: float = Field(ge=0, le=1)
    sent_at: str


class StateCounters(_Out):
    late_ignored: int = Field(ge=0)
    duplicates_ignored: int = Field(ge=0)
    future_clamped: int = Field(ge=0)


class StateWindow(_Out):
    length_s: float = Field(gt=0)
    pane_s: float = Field(gt=0)
    start: str
    end: str
    message_count: int = Field(ge=0)
    counts: dict[str, int]
    distribution: dict[str, float]


class StateMood(_Out):
    half_life_s: float = Field(gt=0)
    at: str
    scores: dict[str, float]
    weight: float = Field(ge=0)


class StateDominant(_Out):
    label: str
    since: str
    held_s: float = Field(ge=0)
    messages: int = Field(ge=1)


class StateEpisode(_Out):
    rule: str
    active: bool
    fired: int = Field(ge=0)


class StateSource(_Out):
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class ConversationStateRecord(_Out):
    """conversation_state.v1: the live emotional picture of one conversation (key = conversation_id)."""

    schema_: Literal["conversation_state.v1"] = Field("conversation_state.v1", alias="schema")
    conversation_id: str = Field(min_length=1)
    reason: StateReason
    message_count: int = Field(ge=1)
    counters: StateCounters
    started_at: str
    last_message_at: str
    window: StateWindow
    mood: StateMood
    dominant: StateDominant
    recent: list[StateMessage]
    episodes: list[StateEpisode]
    source: StateSource
    updated_at: str
    emitted_at: str


class AlertRule(_Out):
    name: str
    kind: Literal["share", "consecutive", "rise"]
    severity: Literal["info", "warning", "critical"]
    description: str


class AlertEvidence(_Out):
    value: float
    threshold: float
    details: dict[str, float]
    messages: list[StateMessage]


class AlertSource(_Out):
    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class AlertTrigger(_Out):
    message_id: str
    sent_at: str
    source: AlertSource


class EscalationRecord(_Out):
    """escalation.v1: a rule fired for a conversation (key = conversation_id); once per episode."""

    schema_: Literal["escalation.v1"] = Field("escalation.v1", alias="schema")
    alert_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    conversation_id: str = Field(min_length=1)
    rule: AlertRule
    episode: int = Field(ge=1)
    evidence: AlertEvidence
    triggered_by: AlertTrigger
    state: ConversationStateRecord
    fired_at: str


@dataclass(frozen=True, slots=True)
class StateOutput:
    """A ``conversation_state.v1`` document built by the tracker (valid by construction; tests prove it).

    Read-only: the entries of ``recent`` are shared with the conversation's later records (each message's
    JSON form is built once); copy the document before changing it.
    """

    doc: dict[str, Any]

    @property
    def conversation_id(self) -> str:
        return str(self.doc["conversation_id"])

    @property
    def reason(self) -> StateReason:
        reason: StateReason = self.doc["reason"]
        return reason

    def to_json(self) -> bytes:
        """The record's value bytes (key: ``conversation_id``)."""
        return orjson.dumps(self.doc)

    def record(self) -> ConversationStateRecord:
        """The validated pydantic mirror (about 10x the cost of building the document)."""
        return ConversationStateRecord.model_validate(self.doc)


@dataclass(frozen=True, slots=True)
class AlertOutput:
    """An ``escalation.v1`` document built by the tracker (valid by construction; tests prove it; read-only
    as :class:`StateOutput`)."""

    doc: dict[str, Any]

    @property
    def conversation_id(self) -> str:
        return str(self.doc["conversation_id"])

    @property
    def alert_id(self) -> str:
        return str(self.doc["alert_id"])

    @property
    def rule(self) -> str:
        """The rule's name (the ``rule`` label of ``emotion_conversation_alerts_total``)."""
        return str(self.doc["rule"]["name"])

    @property
    def episode(self) -> int:
        return int(self.doc["episode"])

    def to_json(self) -> bytes:
        """The record's value bytes (key: ``conversation_id``)."""
        return orjson.dumps(self.doc)

    def record(self) -> EscalationRecord:
        """The validated pydantic mirror."""
        return EscalationRecord.model_validate(self.doc)
