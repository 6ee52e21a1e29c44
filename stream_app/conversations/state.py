"""What the worker knows about one conversation, and the message that updates it.

These are plain mutable containers; :class:`~stream_app.conversations.tracker.ConversationTracker` is
the only code that changes them, and :mod:`~stream_app.conversations.codec` turns them into the bytes the
worker keeps in its table. Times are Unix seconds. Two clocks meet here and are never mixed:

* **event time** (``sent_at`` of the messages): windows, decay, the dominant emotion's age, rules;
* **processing time** (the worker's wall clock, injected): ``last_seen_at`` for the TTL and
  ``last_emitted_at`` for the emission interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["ClassifiedMessage", "ConversationState", "Episode", "RecentMessage"]


class ClassifiedMessage(NamedTuple):
    """One classified chat message, as the worker hands it over after inference.

    A named tuple rather than a frozen dataclass: one is built per message, and a frozen dataclass's
    ``__init__`` (``object.__setattr__`` per field) cost three times as much.

    Attributes:
        conversation_id: The conversation (the input's key).
        message_id: The chat service's message id (evidence in alerts; repeats are ignored).
        sent_at: Event time, Unix seconds (the input's ``sent_at``).
        label_index: Index of the predicted label in the tracker's label list.
        scores: One probability per label, in the tracker's label order.
        topic: Source topic (only used to derive stable alert ids).
        partition: Source partition.
        offset: Source offset; updates are idempotent against re-processing an offset.
    """

    conversation_id: str
    message_id: str
    sent_at: float
    label_index: int
    scores: Sequence[float]
    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class RecentMessage:
    """One of the last messages of a conversation: the evidence alerts cite.

    ``score`` is the probability of ``label``, rounded to float32 when the message is applied, so the value
    held in memory and the one read back from the table are the same number. Treated as immutable once
    built: ``view`` caches the message's JSON form for the records (``recent`` and alert evidence), built
    once by the tracker that shows it; it is not part of the state (not compared, not encoded).
    """

    message_id: str
    sent_at: float
    label: int
    score: float
    view: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def sort_key(self) -> tuple[float, str]:
        """Order of the recent list: event time, then message id (so any arrival order sorts alike)."""
        return (self.sent_at, self.message_id)


@dataclass(slots=True)
class Episode:
    """One rule's episode state in one conversation (survives restarts with the state).

    Attributes:
        key: 32-bit fingerprint of the rule (name, kind and the parameters that shape ``history``); a
            stored episode whose key matches no current rule is dropped, a new rule starts armed.
        active: The rule fired and the conversation has not recovered yet (the rule is disarmed).
        streak: While active, consecutive messages that met the rule's recovery condition.
        fired: Episodes so far (alerts fired by this rule in this conversation).
        recover_level: For ``rise`` rules, the mood share at or below which a message counts as recovering
            (set when the rule fires); unused by other kinds.
        history: For ``rise`` rules, ``[(bucket_index, lowest mood share seen in that bucket)]``, oldest
            first, at most the rule's lookback in buckets; empty for other kinds.
    """

    key: int
    active: bool = False
    streak: int = 0
    fired: int = 0
    recover_level: float = 0.0
    history: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class ConversationState:
    """The live emotional picture of one conversation.

    Attributes:
        conversation_id: The conversation.
        message_count: Messages applied (late, duplicate and replayed ones excluded).
        late_ignored: Messages that arrived later than the allowance and were ignored.
        duplicates_ignored: Messages whose id was already among the recent ones (producer retries).
        future_clamped: Messages whose ``sent_at`` lay beyond the tolerated clock skew in the future and
            were taken as sent at the processing time instead.
        started_at: Event time of the first applied message.
        latest_at: Latest event time applied (the end of the window; the mood's reference time).
        last_seen_at: Processing time of the last message taken (TTL).
        last_emitted_at: Processing time of the last conversation_state.v1 emitted (``-inf``: never).
        source_partition: Partition of the last message taken (-1: none).
        source_offset: Offset of the last message taken (-1: none).
        mood: Decayed score sums per label at ``latest_at`` (sum of ``score * 2^(-age/half_life)``).
        mood_weight: Decayed message count at ``latest_at`` (the same sum over 1 per message); the mood
            shares are ``mood[i] / mood_weight``.
        dominant: Index of the dominant label (-1: none yet).
        dominant_since: Event time at which the dominant label took over.
        dominant_messages: Messages applied since the dominant label took over, that one included.
        panes: Window panes, ``{pane_index: [count per label]}``, only non-empty ones inside the window.
        recent: The last messages by event time (then message id), oldest first.
        episodes: One per rule, in the tracker's rule order.
        window_counts: Label counts summed over ``panes``, kept up to date by the tracker as it changes
            the panes (None: not known yet, summed when first needed); derived, so neither compared nor
            encoded. The panes, like the rest of the state, are the tracker's to change.
    """

    conversation_id: str
    message_count: int = 0
    late_ignored: int = 0
    duplicates_ignored: int = 0
    future_clamped: int = 0
    started_at: float = 0.0
    latest_at: float = 0.0
    last_seen_at: float = 0.0
    last_emitted_at: float = -math.inf
    source_partition: int = -1
    source_offset: int = -1
    mood: list[float] = field(default_factory=list)
    mood_weight: float = 0.0
    dominant: int = -1
    dominant_since: float = 0.0
    dominant_messages: int = 0
    panes: dict[int, list[int]] = field(default_factory=dict)
    recent: list[RecentMessage] = field(default_factory=list)
    episodes: list[Episode] = field(default_factory=list)
    window_counts: list[int] | None = field(default=None, compare=False, repr=False)

    def mood_shares(self) -> list[float]:
        """The decayed mood as shares of the decayed message count (each in [0, 1]; zeros when empty)."""
        w = self.mood_weight
        if w <= 0:
            return [0.0] * len(self.mood)
        return [m / w for m in self.mood]
