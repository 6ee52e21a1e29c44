"""Per-conversation state updated from each classified message, rules, and when to emit.

:class:`ConversationTracker` is transport-free: the worker decodes a conversation's bytes from its table
(:meth:`~ConversationTracker.decode`), calls :meth:`~ConversationTracker.apply` for each classified
message of that conversation in source order, writes :meth:`~ConversationTracker.encode`'s bytes back
when ``Update.changed``, produces ``Update.emit`` (``conversation_state.v1``) and ``Update.alerts``
(``escalation.v1``), and deletes conversations for which :meth:`~ConversationTracker.is_expired` holds.

What one message does, in order:

1. **Replay guard.** A message at or below the last offset taken from the same partition is ignored
   (``outcome="replay"``, nothing changes): re-processing after a restart can neither double-count nor
   double-fire. A message from another partition (the input's partition count changed) starts the
   offset sequence afresh.
2. **Clock skew.** A ``sent_at`` more than ``max_future_skew_s`` ahead of the processing time is taken as
   the processing time (``future_clamped``), so one bad client clock cannot push the conversation's
   event time into the future and make every later message "late". One before 1970 (the contract
   allows year 1) is taken as 1970-01-01: the window's panes would otherwise reach before year 1.
3. **Lateness.** A message sent more than ``allowed_lateness_s`` before the conversation's latest event
   time is counted (``late_ignored``) and otherwise ignored (``outcome="late"``).
4. **Duplicates.** A message id already among the recent messages (a producer retry) is counted
   (``duplicates_ignored``) and ignored.
5. **Apply.** Count; add to the pane of its ``sent_at`` (if that pane is still in the window); fold its
   scores into the decayed mood at the conversation's latest event time (a late message's scores decayed
   by its age, so arrival order does not matter); insert into the recent messages by event time; update
   the dominant emotion (the largest mood share; a challenger takes over only when it leads by more than
   ``dominant_min_margin``, so near ties do not flap); evaluate every rule (see
   :mod:`~stream_app.conversations.rules`).
6. **Emit.** A ``conversation_state.v1`` when the dominant emotion changed, or when ``emit_interval_s`` of
   processing time passed since this conversation's last one.

``apply`` changes the state it is given in place (and returns it, or a new one for a new conversation);
several messages of one conversation can be applied before encoding once.
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

from stream_app.conversations.codec import StateCodec
from stream_app.conversations.records import (
    AlertOutput,
    StateOutput,
    StateReason,
    alert_id_for,
    format_time,
    round6,
)
from stream_app.conversations.rules import Check, Observation, Rule, compile_rules
from stream_app.conversations.state import ClassifiedMessage, ConversationState, Episode, RecentMessage
from stream_app.conversations.windows import PaneWindow

__all__ = ["ConversationTracker", "Outcome", "Update", "is_expired"]

Outcome = Literal["applied", "replay", "late", "duplicate"]
_F32 = struct.Struct("<f")
# The same times are formatted again and again (a conversation's start, latest message and window bounds
# appear in every record of it, the processing time in every record of a flush).
_ts = functools.lru_cache(maxsize=16_384)(format_time)
_key = operator.attrgetter("key")
_exp2 = math.exp2
_floor = math.floor


def is_expired(state: ConversationState, now: float, ttl_s: float) -> bool:
    """Whether ``state`` has been idle for ``ttl_s`` seconds of processing time at ``now``."""
    return now - state.last_seen_at >= ttl_s


class Update(NamedTuple):
    """What applying one message did (a named tuple: one is built per message).

    Attributes:
        state: The conversation's state (the same object that was passed in, or a new one).
        outcome: ``applied``, or why the message was ignored (``replay``, ``late``, ``duplicate``).
        changed: The state differs from before: the worker must write it (False only for replays).
        dominant_changed: The dominant emotion changed with this message.
        emit: The ``conversation_state.v1`` record to produce now, if any.
        alerts: ``escalation.v1`` records fired by this message (at most one per rule).
    """

    state: ConversationState
    outcome: Outcome
    changed: bool
    dominant_changed: bool = False
    emit: StateOutput | None = None
    alerts: tuple[AlertOutput, ...] = ()


class ConversationTracker:
    """Keeps conversations' state and evaluates escalation rules on it.

    Args:
        labels: The model's labels, in score order.
        rules: Escalation rules (:func:`~stream_app.conversations.rules.load_rules`).
        window_s: Length of the label-distribution window, seconds of event time.
        window_pane_s: Width of one window pane (the window slides by panes), seconds.
        allowed_lateness_s: How far behind the conversation's latest event time a message may be sent and
            still be applied, seconds.
        mood_half_life_s: Half-life of the decayed mood, seconds of event time.
        recent_messages: Recent messages kept as evidence and shown in the state (rules needing more
            history raise the number kept).
        dominant_min_margin: Lead (in mood share) a label needs over the current dominant one to take over.
        emit_interval_s: At most one interval-driven ``conversation_state.v1`` per conversation per this
            many seconds of processing time (dominant changes are emitted at once); 0 emits on every
            applied message.
        ttl_s: Processing-time idle period after which a conversation expires.
        max_future_skew_s: Largest ``sent_at`` lead over the processing time taken at face value.
        clock: Processing-time clock, Unix seconds (injected in tests).

    Raises:
        ValueError: A parameter out of range.
        RuleFileError: A rule names a label the model does not have.
    """

    def __init__(
        self,
        *,
        labels: Sequence[str],
        rules: Sequence[Rule],
        window_s: float = 300.0,
        window_pane_s: float = 30.0,
        allowed_lateness_s: float = 60.0,
        mood_half_life_s: float = 120.0,
        recent_messages: int = 10,
        dominant_min_margin: float = 0.1,
        emit_interval_s: float = 60.0,
        ttl_s: float = 86_400.0,
        max_future_skew_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= len(labels) <= 255 or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be 1 to 255 distinct names, got {list(labels)}")
        _check("allowed_lateness_s", allowed_lateness_s, 0.0)
        _check("mood_half_life_s", mood_half_life_s, 0.0, open_lo=True)
        _check("dominant_min_margin", dominant_min_margin, 0.0, 1.0)
        _check("emit_interval_s", emit_interval_s, 0.0)
        _check("ttl_s", ttl_s, 0.0, open_lo=True)
        _check("max_future_skew_s", max_future_skew_s, 0.0)
        if not 1 <= recent_messages <= 255:
            raise ValueError(f"recent_messages must be 1 to 255, got {recent_messages}")
        self.labels: tuple[str, ...] = tuple(labels)
        self.window = PaneWindow(window_s=window_s, pane_s=window_pane_s)
        self.checks: tuple[Check, ...] = compile_rules(rules, self.labels)
        self.allowed_lateness_s = float(allowed_lateness_s)
        self.mood_half_life_s = float(mood_half_life_s)
        self.recent_messages = recent_messages
        self.history_messages = max([recent_messages, *(c.rule.history_messages() for c in self.checks)])
        self.dominant_min_margin = float(dominant_min_margin)
        self.emit_interval_s = float(emit_interval_s)
        self.ttl_s = float(ttl_s)
        self.max_future_skew_s = float(max_future_skew_s)
        self._clock = clock
        self._n = len(self.labels)
        self._keys = tuple(c.key for c in self.checks)
        self._key_list = list(self._keys)
        self.codec = StateCodec(self.labels, self._keys)
        # hot-path copies (attribute lookups through self.window and self.checks add up per message)
        self._pane_s = self.window.pane_s
        self._n_panes = self.window.n_panes
        self._rules = tuple((c, c.rule.rearm_after_messages) for c in self.checks)
        self._rule_names = tuple(c.rule.name for c in self.checks)
        self._now_memo = (math.nan, "")  # one attribute, replaced whole: safe to read from any thread

    # -- state ----------------------------------------------------------------------------------------------

    def new_state(self, conversation_id: str) -> ConversationState:
        """An empty state for a conversation not seen before (or expired)."""
        return ConversationState(
            conversation_id=conversation_id,
            mood=[0.0] * self._n,
            episodes=[Episode(key) for key in self._keys],
        )

    def encode(self, state: ConversationState) -> bytes:
        """The table value of ``state`` (see :mod:`~stream_app.conversations.codec`)."""
        return self.codec.encode(state)

    def decode(self, raw: bytes) -> ConversationState:
        """The state a table value holds, with its episodes matched to the current rules.

        Raises:
            ValueError: Not a value this version wrote for this label list (the worker should drop it).
        """
        return self.codec.decode(raw)

    def is_expired(self, state: ConversationState, now: float | None = None) -> bool:
        """Whether the conversation has been idle for ``ttl_s`` of processing time (the sweep deletes it)."""
        return is_expired(state, self._clock() if now is None else now, self.ttl_s)

    def is_expired_raw(self, raw: bytes, now: float | None = None) -> bool:
        """:meth:`is_expired` on a table value, reading only its fixed header (for a cheap sweep)."""
        return (self._clock() if now is None else now) - self.codec.last_seen_at(raw) >= self.ttl_s

    # -- the update -----------------------------------------------------------------------------------------

    def apply(self, state: ConversationState | None, msg: ClassifiedMessage, now: float | None = None) -> Update:
        """Apply one classified message to its conversation's state (``None``: a new conversation).

        Args:
            state: The conversation's current state, changed in place; None when there is none.
            msg: The message, in source order for its conversation.
            now: Processing time, Unix seconds; defaults to the injected clock.

        Raises:
            ValueError: ``msg`` is malformed (scores of the wrong length or outside [0, 1], a label index
                out of range, a non-finite ``sent_at``) or belongs to another conversation.
        """
        # Every step updates the state in place from the one message: nothing here walks the window, the
        # whole recent list or the label vector more than once. tests/unit/conversations/reference.py is
        # the straightforward version; test_conversations_equivalence.py proves they agree.
        if now is None:
            now = self._clock()
        conversation_id, message_id, sent_at, label, raw_scores, _, partition, offset = msg
        n = self._n
        scores = list(map(float, raw_scores))
        if len(scores) != n or not 0 <= label < n:
            raise ValueError(f"message {message_id!r}: {len(scores)} scores / label {label} for {n} labels")
        # a NaN anywhere makes the sum NaN (min and max may step over it)
        if not (min(scores) >= 0.0 and max(scores) <= 1.0) or math.isnan(sum(scores)):
            raise ValueError(f"message {message_id!r}: scores must be in [0, 1], got {scores}")
        sent_at = float(sent_at)
        if not math.isfinite(sent_at):
            raise ValueError(f"message {message_id!r}: sent_at must be finite, got {sent_at}")
        if state is None:
            state = self.new_state(conversation_id)
        elif state.conversation_id != conversation_id:
            raise ValueError(f"message of {conversation_id!r} applied to the state of {state.conversation_id!r}")
        elif list(map(_key, state.episodes)) != self._key_list:
            self.codec.align(state)  # a state built for other rules (decode aligns already)

        if partition == state.source_partition and offset <= state.source_offset:
            return Update(state, "replay", False)
        state.source_partition = partition
        state.source_offset = offset
        state.last_seen_at = now

        if sent_at > now + self.max_future_skew_s:
            sent_at = now
            state.future_clamped += 1
        elif sent_at < 0.0:  # before 1970 (the contract allows year 1): windows reach before year 1 from there
            sent_at = 0.0
        first = state.message_count == 0
        latest = state.latest_at
        if not first and sent_at < latest - self.allowed_lateness_s:
            state.late_ignored += 1
            return Update(state, "late", True)
        recent = state.recent
        for m in recent:
            if m.message_id == message_id:
                state.duplicates_ignored += 1
                return Update(state, "duplicate", True)

        # count and mood (a late message's weight is what it would have now had it come in order)
        state.message_count += 1
        if first:
            state.started_at = latest = sent_at
            state.mood = mood = scores
            state.mood_weight = w = 1.0
        elif sent_at > latest:
            d = _exp2(-(sent_at - latest) / self.mood_half_life_s)
            state.mood = mood = [m * d + s for m, s in zip(state.mood, scores, strict=True)]
            state.mood_weight = w = state.mood_weight * d + 1.0
            latest = sent_at
        elif sent_at == latest:  # decay by 1.0 (m * 1.0 + s is m + s)
            state.mood = mood = [m + s for m, s in zip(state.mood, scores, strict=True)]
            state.mood_weight = w = state.mood_weight + 1.0
        else:
            d = _exp2(-(latest - sent_at) / self.mood_half_life_s)
            state.mood = mood = [m + s * d for m, s in zip(state.mood, scores, strict=True)]
            state.mood_weight = w = state.mood_weight + d
            if sent_at < state.started_at:
                state.started_at = sent_at
        advanced = first or latest != state.latest_at
        state.latest_at = latest

        # window: the message's own pane, if still inside; the panes that slid out go (and their counts
        # leave the window's sum)
        panes = state.panes
        window = state.window_counts
        pane_s = self._pane_s
        oldest = _floor(latest / pane_s) - self._n_panes + 1
        pane = _floor(sent_at / pane_s)
        if pane >= oldest:
            counts = panes.get(pane)
            if counts is None:
                counts = panes[pane] = [0] * n
            counts[label] += 1
            if window is not None:
                window[label] += 1
        if advanced and min(panes) < oldest:
            for p in [p for p in panes if p < oldest]:
                gone = panes.pop(p)
                if window is not None:
                    state.window_counts = window = [w - g for w, g in zip(window, gone, strict=True)]

        # recent messages, by event time then message id
        rec = RecentMessage(message_id, sent_at, label, _F32.unpack(_F32.pack(scores[label]))[0])
        if recent:
            last = recent[-1]
            if sent_at > last.sent_at or (sent_at == last.sent_at and message_id >= last.message_id):
                recent.append(rec)
            else:
                bisect.insort(recent, rec, key=RecentMessage.sort_key)
            if len(recent) > self.history_messages:
                del recent[0]
        else:
            recent.append(rec)

        # dominant emotion
        shares = [m / w for m in mood] if w > 0 else [0.0] * n
        top = max(shares)
        best = shares.index(top)  # the first of equal shares, as max(range(n), key=...) picks
        dominant = state.dominant
        dominant_changed = dominant < 0 or (best != dominant and top > shares[dominant] + self.dominant_min_margin)
        if dominant_changed:
            state.dominant = best
            state.dominant_since = latest
            state.dominant_messages = 1
        else:
            state.dominant_messages += 1

        # rules: a cheap probe each; the full observation only when one fires
        fired: list[tuple[Check, Episode, Observation]] | None = None
        for (check, rearm), episode in zip(self._rules, state.episodes, strict=True):
            met, recovering = check.probe(state, episode, shares)
            if episode.active:
                if recovering:
                    episode.streak += 1
                    if episode.streak >= rearm:
                        episode.active = False
                        episode.streak = 0
                else:
                    episode.streak = 0
            elif met:
                obs = check.observation(state, episode, shares)
                episode.active = True
                episode.streak = 0
                episode.fired += 1
                episode.recover_level = obs.recover_level
                if fired is None:
                    fired = []
                fired.append((check, episode, obs))

        # emission
        emit = None
        if dominant_changed:
            state.last_emitted_at = now
            emit = StateOutput(self._state_doc(state, "dominant_changed", now))
        elif now - state.last_emitted_at >= self.emit_interval_s:
            state.last_emitted_at = now
            emit = StateOutput(self._state_doc(state, "interval", now))
        if fired is None:
            return Update(state, "applied", True, dominant_changed, emit)
        alerts = tuple(self._alert(state, msg, check, episode, obs, now) for check, episode, obs in fired)
        return Update(state, "applied", True, dominant_changed, emit, alerts)

    # -- records --------------------------------------------------------------------------------------------

    def window_counts(self, state: ConversationState) -> list[int]:
        """Label counts over the conversation's current window (ending with its latest message's pane)."""
        return list(self._window_counts(state))

    def _window_counts(self, state: ConversationState) -> list[int]:
        """``state.window_counts``, summed from the panes the first time (then :meth:`apply` keeps it)."""
        window = state.window_counts
        if window is None:
            panes = state.panes
            window = state.window_counts = (
                [sum(column) for column in zip(*panes.values(), strict=True)] if panes else [0] * self._n
            )
        return window

    def _message(self, m: RecentMessage) -> dict[str, Any]:
        """The JSON form of a recent message, built once per message and kept on it (``view``)."""
        label = self.labels[m.label]
        view = m.view
        if view is None or view["label"] is not label:  # none yet, or built by a tracker with other labels
            view = m.view = {
                "message_id": m.message_id,
                "label": label,
                "score": round6(m.score),
                "sent_at": format_time(m.sent_at),  # once per message: not worth a place in _ts
            }
        return view

    def _views(self, messages: list[RecentMessage]) -> list[dict[str, Any]]:
        labels = self.labels
        out = []
        for m in messages:
            view = m.view
            if view is None or view["label"] is not labels[m.label]:
                view = self._message(m)
            out.append(view)
        return out

    def _now(self, now: float) -> str:
        """``now`` formatted; every record of a flush (and a record's two processing times) share it."""
        at, text = self._now_memo
        if now != at:
            text = format_time(now)
            self._now_memo = (now, text)
        return text

    def snapshot(
        self, state: ConversationState, *, reason: StateReason = "snapshot", now: float | None = None
    ) -> StateOutput:
        """The ``conversation_state.v1`` record of ``state`` (for the read API: ``reason="snapshot"``).

        Raises:
            ValueError: ``state`` has no applied message yet.
        """
        return StateOutput(self._state_doc(state, reason, self._clock() if now is None else now))

    def _state_doc(self, state: ConversationState, reason: StateReason, now: float) -> dict[str, Any]:
        if state.message_count < 1 or state.dominant < 0:
            raise ValueError(f"conversation {state.conversation_id!r} has no applied message")
        labels = self.labels
        counts = self._window_counts(state)
        total = sum(counts)
        latest_at = state.latest_at
        last_pane = _floor(latest_at / self._pane_s)
        w = state.mood_weight
        recent = self._views(state.recent[-self.recent_messages :])
        last = state.recent[-1] if state.recent else None
        # the latest event time is the newest recent message's (formatted already) but for odd states
        latest = (
            last.view["sent_at"] if last is not None and last.sent_at == latest_at and last.view else _ts(latest_at)
        )
        seen_at = state.last_seen_at
        return {
            "schema": "conversation_state.v1",
            "conversation_id": state.conversation_id,
            "reason": reason,
            "message_count": state.message_count,
            "counters": {
                "late_ignored": state.late_ignored,
                "duplicates_ignored": state.duplicates_ignored,
                "future_clamped": state.future_clamped,
            },
            "started_at": _ts(state.started_at),
            "last_message_at": latest,
            "window": {
                "length_s": self.window.window_s,
                "pane_s": self._pane_s,
                "start": _ts((last_pane - self._n_panes + 1) * self._pane_s),
                "end": _ts((last_pane + 1) * self._pane_s),
                "message_count": total,
                "counts": dict(zip(labels, counts, strict=True)),
                "distribution": dict(
                    zip(labels, [round6(c / total) for c in counts] if total else [0.0] * len(labels), strict=True)
                ),
            },
            "mood": {
                "half_life_s": self.mood_half_life_s,
                "at": latest,
                "scores": dict(zip(labels, [round6(m / w) for m in state.mood], strict=True)),
                "weight": round6(w),
            },
            "dominant": {
                "label": labels[state.dominant],
                "since": _ts(state.dominant_since),
                "held_s": max(0.0, latest_at - state.dominant_since),
                "messages": state.dominant_messages,
            },
            "recent": recent,
            "episodes": [
                {"rule": name, "active": e.active, "fired": e.fired}
                for name, e in zip(self._rule_names, state.episodes, strict=True)
            ],
            "source": {"partition": state.source_partition, "offset": state.source_offset},
            "updated_at": self._now(now) if seen_at == now else _ts(seen_at),
            "emitted_at": self._now(now),
        }

    def _alert(
        self,
        state: ConversationState,
        msg: ClassifiedMessage,
        check: Check,
        episode: Episode,
        obs: Observation,
        now: float,
    ) -> AlertOutput:
        rule = check.rule
        return AlertOutput(
            {
                "schema": "escalation.v1",
                "alert_id": alert_id_for(msg.topic, msg.partition, msg.offset, rule.name),
                "conversation_id": state.conversation_id,
                "rule": {
                    "name": rule.name,
                    "kind": rule.kind,
                    "severity": rule.severity,
                    "description": rule.description,
                },
                "episode": episode.fired,
                "evidence": {
                    "value": round6(obs.value),
                    "threshold": obs.threshold,
                    "details": {k: round6(v) for k, v in check.details(state, episode, obs).items()},
                    "messages": self._views(check.evidence(state)),
                },
                "triggered_by": {
                    "message_id": msg.message_id,
                    "sent_at": format_time(msg.sent_at),
                    "source": {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
                },
                "state": self._state_doc(state, "alert", now),
                "fired_at": self._now(now),
            }
        )


def _check(name: str, value: float, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> None:
    if not math.isfinite(value) or value < lo or (open_lo and value == lo) or value > hi:
        upper = f" and <= {hi:g}" if hi < math.inf else ""
        raise ValueError(f"{name} must be {'>' if open_lo else '>='} {lo:g}{upper}, got {value}")
