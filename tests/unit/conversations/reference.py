"""A frozen copy of the conversation state code as it was before the performance work (commit 2034951).

The independent oracle of ``test_conversations_equivalence.py``: the optimised tracker, rules and codec
must give exactly what this straightforward implementation gives (the same states, bytes, records and
alerts) for any message sequence. Not used by the product; do not optimise it.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from stream_app.conversations.records import AlertOutput, StateOutput, StateReason, alert_id_for
from stream_app.conversations.rules import (
    RISE_BUCKETS,
    ConsecutiveRule,
    RiseRule,
    Rule,
    RuleFileError,
    ShareRule,
)
from stream_app.conversations.state import ClassifiedMessage, ConversationState, Episode, RecentMessage
from stream_app.records import rfc3339

_EPS = 1e-9

# -- windows.py -------------------------------------------------------------------------------------------


def decay_factor(dt_s: float, half_life_s: float) -> float:
    """Weight of something ``dt_s`` seconds old under exponential decay with this half-life.

    ``decay_factor(h, h) == 0.5`` and ``decay_factor(0, h) == 1`` exactly; negative ``dt_s`` (a reference
    time before the event) gives a weight above 1, which the callers never ask for.
    """
    return math.exp2(-dt_s / half_life_s)


class PaneWindow:
    """A sliding event-time window of label counts, built from fixed panes.

    The panes live in the caller's state as ``{pane_index: [count per label]}`` (only non-empty panes);
    this class holds the geometry and the operations on such a mapping.

    Args:
        window_s: Length of the window in seconds of event time.
        pane_s: Width of one pane in seconds; ``window_s`` must be a whole multiple of it (1 to 255 panes).
    """

    __slots__ = ("n_panes", "pane_s", "window_s")

    def __init__(self, *, window_s: float, pane_s: float) -> None:
        if not (pane_s > 0 and math.isfinite(pane_s)):
            raise ValueError(f"pane_s must be a positive number of seconds, got {pane_s}")
        if not (window_s >= pane_s and math.isfinite(window_s)):
            raise ValueError(f"window_s must be at least pane_s ({pane_s}), got {window_s}")
        n = round(window_s / pane_s)
        if not math.isclose(n * pane_s, window_s, rel_tol=1e-9) or not 1 <= n <= 255:
            raise ValueError(f"window_s ({window_s}) must be 1 to 255 whole panes of pane_s ({pane_s})")
        self.window_s = float(window_s)
        self.pane_s = float(pane_s)
        self.n_panes = n

    def pane_of(self, t: float) -> int:
        """Index of the pane holding event time ``t`` (Unix seconds)."""
        return math.floor(t / self.pane_s)

    def first_pane(self, latest_t: float) -> int:
        """Index of the oldest pane inside the window that ends with the pane of ``latest_t``."""
        return self.pane_of(latest_t) - self.n_panes + 1

    def bounds(self, latest_t: float) -> tuple[float, float]:
        """Event-time span ``[start, end)`` of the window ending with the pane of ``latest_t``."""
        last = self.pane_of(latest_t)
        return (last - self.n_panes + 1) * self.pane_s, (last + 1) * self.pane_s

    def add(self, panes: dict[int, list[int]], t: float, label: int, latest_t: float, n_labels: int) -> bool:
        """Count one message with ``label`` sent at ``t``; ``latest_t`` is the conversation's latest event time.

        Returns False (and counts nothing) when the message's pane is already older than the window: its
        window has passed. The caller decides beforehand whether a message is too late to apply at all.
        """
        pane = self.pane_of(t)
        if pane < self.first_pane(latest_t):
            return False
        counts = panes.get(pane)
        if counts is None:
            counts = panes[pane] = [0] * n_labels
        counts[label] += 1
        return True

    def prune(self, panes: dict[int, list[int]], latest_t: float) -> None:
        """Drop the panes that slid out of the window ending with the pane of ``latest_t``."""
        first = self.first_pane(latest_t)
        for pane in [p for p in panes if p < first]:
            del panes[pane]

    @staticmethod
    def counts(panes: dict[int, list[int]], n_labels: int) -> list[int]:
        """Label counts over the window (the panes held are exactly the window's, once pruned)."""
        total = [0] * n_labels
        for counts in panes.values():
            for i, c in enumerate(counts):
                total[i] += c
        return total


# -- rules.py (evaluation) ----------------------------------------------------------------------------


class Observation(NamedTuple):
    """What a check saw after one applied message.

    Attributes:
        met: The fire condition holds.
        recovering: The message counts toward re-arming (only consulted while the episode is active).
        value: The measured quantity (share, run length, rise).
        threshold: What ``value`` is compared with.
        recover_level: For ``rise``, the level an episode fired now would have to fall back to.
    """

    met: bool
    recovering: bool
    value: float
    threshold: float
    recover_level: float = 0.0


class Check:
    """A rule bound to a label list: evaluates the rule on a conversation's state.

    Attributes:
        rule: The rule.
        key: 32-bit fingerprint matching the rule's episode in stored states.
        members: Indices of the rule's labels in the tracker's label list.
    """

    __slots__ = ("key", "members", "rule")

    def __init__(self, rule: Rule, label_list: Sequence[str]) -> None:
        unknown = [label for label in rule.labels if label not in label_list]
        if unknown:
            raise RuleFileError(
                "<rules>",
                f"'{rule.name}'",
                "labels",
                f"unknown label {unknown[0]!r}; the model's labels are {', '.join(label_list)}",
            )
        self.rule = rule
        self.members = frozenset(label_list.index(label) for label in rule.labels)
        self.key = _fingerprint(rule)

    def observe(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> Observation:
        """Evaluate the rule after a message was applied to ``state`` (may update ``episode.history``)."""
        raise NotImplementedError

    def evidence(self, state: ConversationState) -> list[RecentMessage]:
        """The recent messages that support a firing now."""
        raise NotImplementedError

    def details(self, state: ConversationState, episode: Episode, obs: Observation) -> dict[str, float]:
        """Named numbers that explain ``obs`` (for the alert)."""
        return {}


def _fingerprint(rule: Rule) -> int:
    # Name and kind identify an episode; rise's lookback shapes its stored history, so a new lookback
    # starts afresh. Thresholds are left out on purpose: tuning one must not re-fire every open episode.
    shape = f"{rule.name}\x00{rule.kind}"
    if isinstance(rule, RiseRule):
        shape += f"\x00{rule.within_s!r}"
    return int.from_bytes(hashlib.blake2b(shape.encode(), digest_size=4).digest(), "little")


class _ShareCheck(Check):
    __slots__ = ()
    rule: ShareRule

    def observe(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> Observation:
        r = self.rule
        window = state.recent[-r.last_messages :]
        n = len(window)
        members = self.members
        floor = r.min_score
        if floor > 0.0:
            hits = sum([m.label in members and m.score >= floor for m in window])
        else:
            hits = sum([m.label in members for m in window])
        share = hits / n if n else 0.0
        met = n >= r.min_messages and share >= r.min_share - _EPS
        return Observation(met, not met, share, r.min_share)

    def evidence(self, state: ConversationState) -> list[RecentMessage]:
        return state.recent[-self.rule.last_messages :]

    def details(self, state: ConversationState, episode: Episode, obs: Observation) -> dict[str, float]:
        return {"messages": float(len(self.evidence(state))), "min_messages": float(self.rule.min_messages)}


class _ConsecutiveCheck(Check):
    __slots__ = ()
    rule: ConsecutiveRule

    def _run(self, state: ConversationState) -> int:
        members = self.members
        floor = self.rule.min_score
        run = 0
        for m in reversed(state.recent):
            if m.label not in members or m.score < floor:
                break
            run += 1
        return run

    def observe(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> Observation:
        run = self._run(state)
        met = run >= self.rule.count
        return Observation(met, not met, float(run), float(self.rule.count))

    def evidence(self, state: ConversationState) -> list[RecentMessage]:
        return state.recent[-self._run(state) :]


class _RiseCheck(Check):
    __slots__ = ("_bucket_s", "_order")
    rule: RiseRule

    def __init__(self, rule: Rule, label_list: Sequence[str]) -> None:
        super().__init__(rule, label_list)
        assert isinstance(rule, RiseRule)
        self._bucket_s = rule.within_s / RISE_BUCKETS
        self._order = tuple(sorted(self.members))  # a fixed summation order: the same level bit for bit

    def observe(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> Observation:
        r = self.rule
        order = self._order
        level = shares[order[0]] if len(order) == 1 else math.fsum(shares[i] for i in order)
        bucket = math.floor(state.latest_at / self._bucket_s)
        history = episode.history
        if history and history[-1][0] == bucket:
            if level < history[-1][1]:
                history[-1] = (bucket, level)
        else:
            history.append((bucket, level))
        oldest = bucket - RISE_BUCKETS + 1
        while history[0][0] < oldest:
            del history[0]
        baseline = min([v for _, v in history])
        rise = level - baseline
        met = rise >= r.min_rise - _EPS and level >= r.min_level - _EPS
        recovering = level <= episode.recover_level + _EPS
        return Observation(met, recovering, rise, r.min_rise, baseline + r.min_rise / 2)

    def evidence(self, state: ConversationState) -> list[RecentMessage]:
        since = state.latest_at - self.rule.within_s
        return [m for m in state.recent if m.sent_at >= since]

    def details(self, state: ConversationState, episode: Episode, obs: Observation) -> dict[str, float]:
        shares = state.mood_shares()
        return {
            "baseline": min(v for _, v in episode.history),
            "level": math.fsum(shares[i] for i in self._order),
            "within_s": self.rule.within_s,
        }


def compile_rules(rules: Sequence[Rule], labels: Sequence[str]) -> tuple[Check, ...]:
    """Bind rules to the model's label list.

    Raises:
        RuleFileError: A rule names a label the model does not have, or two rules share a fingerprint.
    """
    checks: list[Check] = []
    for rule in rules:
        check: Check
        if isinstance(rule, ShareRule):
            check = _ShareCheck(rule, labels)
        elif isinstance(rule, ConsecutiveRule):
            check = _ConsecutiveCheck(rule, labels)
        elif isinstance(rule, RiseRule):
            check = _RiseCheck(rule, labels)
        else:
            raise TypeError(f"unknown rule type {type(rule).__name__}")
        if any(c.key == check.key for c in checks):
            raise RuleFileError("<rules>", f"'{rule.name}'", "name", "collides with another rule's fingerprint")
        checks.append(check)
    return tuple(checks)


# -- codec.py ---------------------------------------------------------------------------------------------

CODEC_VERSION = 1
_HEAD = struct.Struct("<BBIddddddIIIIIiqhHBBB")
_LAST_SEEN = struct.Struct("<d")
_LAST_SEEN_OFFSET = 6
_Q = struct.Struct("<q")
_EPISODE = struct.Struct("<IBHIdB")


@functools.lru_cache(maxsize=1024)
def _fmt(spec: str, count: int) -> struct.Struct:
    """``count`` repetitions of ``spec`` (e.g. ``"HB"``), little-endian, compiled once."""
    return struct.Struct("<" + spec * count)


@functools.lru_cache(maxsize=256)
def _recent_fmt(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}d{count}B{count}f")


_U32 = 0xFFFFFFFF
_FLAG_ACTIVE = 0x01


def labels_fingerprint(labels: Sequence[str]) -> int:
    """32-bit fingerprint of an ordered label list."""
    return int.from_bytes(hashlib.blake2b("\x00".join(labels).encode(), digest_size=4).digest(), "little")


def _u32(x: int) -> int:
    return x if x <= _U32 else _U32


class ReferenceCodec:
    """Encodes and decodes :class:`ConversationState` for one label list and rule set.

    Args:
        labels: The model's labels, in score order.
        rule_keys: Fingerprints of the current rules, in order; decoded episodes are matched to them.
    """

    __slots__ = ("_fp", "_keys", "_mood", "_n")

    def __init__(self, labels: Sequence[str], rule_keys: Sequence[int]) -> None:
        self._n = len(labels)
        self._fp = labels_fingerprint(labels)
        self._keys = tuple(rule_keys)
        self._mood = struct.Struct(f"<{self._n}d")

    def encode(self, s: ConversationState) -> bytes:
        """Pack ``s`` into the layout above.

        Raises:
            ValueError: More panes, recent messages or episodes than the layout holds (255 each), an id
                longer than 65,535 UTF-8 bytes, or a mood vector of the wrong length.
        """
        if len(s.mood) != self._n:
            raise ValueError(f"mood has {len(s.mood)} values for {self._n} labels")
        if len(s.panes) > 255 or len(s.recent) > 255 or len(s.episodes) > 255:
            raise ValueError("at most 255 panes, recent messages and episodes")
        cid = s.conversation_id.encode()
        parts = [
            _HEAD.pack(
                CODEC_VERSION,
                self._n,
                self._fp,
                s.last_seen_at,
                s.last_emitted_at,
                s.started_at,
                s.latest_at,
                s.dominant_since,
                s.mood_weight,
                _u32(s.message_count),
                _u32(s.late_ignored),
                _u32(s.duplicates_ignored),
                _u32(s.future_clamped),
                _u32(s.dominant_messages),
                s.source_partition,
                s.source_offset,
                s.dominant,
                len(cid),
                len(s.panes),
                len(s.recent),
                len(s.episodes),
            ),
            self._mood.pack(*s.mood),
            cid,
        ]
        if s.panes:
            newest = max(s.panes)
            heads: list[int] = []
            entries: list[int] = []
            for pane, counts in s.panes.items():
                k = 0
                for i, c in enumerate(counts):
                    if c:
                        entries.append(i)
                        entries.append(_u32(c))
                        k += 1
                heads.append(newest - pane)
                heads.append(k)
            parts.append(_Q.pack(newest))
            parts.append(_fmt("HB", len(s.panes)).pack(*heads))
            parts.append(_fmt("BI", len(entries) // 2).pack(*entries))
        if s.recent:
            ids = [m.message_id.encode() for m in s.recent]
            parts.append(_fmt("H", len(ids)).pack(*map(len, ids)))
            parts.extend(ids)
            parts.append(
                _recent_fmt(len(ids)).pack(
                    *[m.sent_at for m in s.recent], *[m.label for m in s.recent], *[m.score for m in s.recent]
                )
            )
        for e in s.episodes:
            h = e.history
            parts.append(
                _EPISODE.pack(
                    e.key,
                    _FLAG_ACTIVE if e.active else 0,
                    min(e.streak, 0xFFFF),
                    _u32(e.fired),
                    e.recover_level,
                    len(h),
                )
            )
            if h:
                newest = h[-1][0]
                parts.append(_Q.pack(newest))
                flat: list[float] = []
                for bucket, v in h:
                    flat.append(newest - bucket)
                    flat.append(v)
                parts.append(_fmt("Hd", len(h)).pack(*flat))
        return b"".join(parts)

    def decode(self, b: bytes) -> ConversationState:
        """Unpack a value written by :meth:`encode`, matching its episodes to the current rules.

        Raises:
            ValueError: Truncated or trailing bytes, another version, another label list, or an index out
                of range: a value this code did not write for this model.
        """
        try:
            return self._decode(b)
        except struct.error as exc:
            raise ValueError(f"conversation state truncated or malformed: {exc}") from exc

    def _decode(self, b: bytes) -> ConversationState:
        if len(b) < _HEAD.size:
            raise ValueError(f"conversation state too short: {len(b)} bytes")
        (
            version,
            n,
            fp,
            last_seen_at,
            last_emitted_at,
            started_at,
            latest_at,
            dominant_since,
            mood_weight,
            message_count,
            late_ignored,
            duplicates_ignored,
            future_clamped,
            dominant_messages,
            source_partition,
            source_offset,
            dominant,
            id_len,
            n_panes,
            n_recent,
            n_episodes,
        ) = _HEAD.unpack_from(b)
        if version != CODEC_VERSION:
            raise ValueError(f"conversation state version {version}, expected {CODEC_VERSION}")
        if n != self._n or fp != self._fp:
            raise ValueError("conversation state was written for another label list")
        if not -1 <= dominant < n:
            raise ValueError(f"conversation state has dominant label {dominant} of {n}")
        pos = _HEAD.size
        mood = list(self._mood.unpack_from(b, pos))
        pos += self._mood.size
        cid = b[pos : pos + id_len].decode()
        pos += id_len
        panes: dict[int, list[int]] = {}
        if n_panes:
            (newest,) = _Q.unpack_from(b, pos)
            pos += _Q.size
            fmt = _fmt("HB", n_panes)
            heads = fmt.unpack_from(b, pos)
            pos += fmt.size
            total = sum(heads[1::2])
            fmt = _fmt("BI", total)
            entries = fmt.unpack_from(b, pos)
            pos += fmt.size
            j = 0
            for back, k in zip(heads[0::2], heads[1::2], strict=True):
                counts = [0] * n
                for _ in range(k):
                    i = entries[j]
                    if i >= n:
                        raise ValueError(f"conversation state has a count for label {i} of {n}")
                    counts[i] = entries[j + 1]
                    j += 2
                panes[newest - back] = counts
        recent: list[RecentMessage] = []
        if n_recent:
            fmt = _fmt("H", n_recent)
            lengths = fmt.unpack_from(b, pos)
            pos += fmt.size
            ids = []
            for length in lengths:
                ids.append(b[pos : pos + length].decode())
                pos += length
            fmt = _recent_fmt(n_recent)
            fields = fmt.unpack_from(b, pos)
            pos += fmt.size
            labels = fields[n_recent : 2 * n_recent]
            if max(labels) >= n:
                raise ValueError(f"conversation state has a recent label {max(labels)} of {n}")
            recent = list(map(RecentMessage, ids, fields[:n_recent], labels, fields[2 * n_recent :]))
        episodes: list[Episode] = []
        for _ in range(n_episodes):
            key, flags, streak, fired, recover_level, h = _EPISODE.unpack_from(b, pos)
            pos += _EPISODE.size
            history: list[tuple[int, float]] = []
            if h:
                (newest,) = _Q.unpack_from(b, pos)
                pos += _Q.size
                fmt = _fmt("Hd", h)
                flat = fmt.unpack_from(b, pos)
                pos += fmt.size
                history = [(newest - back, v) for back, v in zip(flat[0::2], flat[1::2], strict=True)]
            episodes.append(Episode(key, bool(flags & _FLAG_ACTIVE), streak, fired, recover_level, history))
        if pos != len(b):
            raise ValueError(f"conversation state has {len(b) - pos} trailing bytes")
        state = ConversationState(
            conversation_id=cid,
            message_count=message_count,
            late_ignored=late_ignored,
            duplicates_ignored=duplicates_ignored,
            future_clamped=future_clamped,
            started_at=started_at,
            latest_at=latest_at,
            last_seen_at=last_seen_at,
            last_emitted_at=last_emitted_at,
            source_partition=source_partition,
            source_offset=source_offset,
            mood=mood,
            mood_weight=mood_weight,
            dominant=dominant,
            dominant_since=dominant_since,
            dominant_messages=dominant_messages,
            panes=panes,
            recent=recent,
            episodes=episodes,
        )
        self.align(state)
        return state

    def align(self, state: ConversationState) -> None:
        """Match ``state.episodes`` to the current rules: keep known ones, drop stale, add new (armed)."""
        if len(state.episodes) == len(self._keys) and all(
            e.key == k for e, k in zip(state.episodes, self._keys, strict=True)
        ):
            return
        by_key = {e.key: e for e in state.episodes}
        state.episodes = [by_key.get(k) or Episode(k) for k in self._keys]

    def last_seen_at(self, b: bytes) -> float:
        """``last_seen_at`` (processing time, Unix seconds) of an encoded state, read from its header only.

        Raises:
            ValueError: Too short, or another version.
        """
        if len(b) < _HEAD.size or b[0] != CODEC_VERSION:
            raise ValueError("not a conversation state of this version")
        return float(_LAST_SEEN.unpack_from(b, _LAST_SEEN_OFFSET)[0])


# -- tracker.py -------------------------------------------------------------------------------------------

Outcome = Literal["applied", "replay", "late", "duplicate"]
_F32 = struct.Struct("<f")
_ROUND = 6  # decimals of shares and scores in the JSON records (the state itself keeps full precision)
# The same event times are formatted again and again (a conversation's recent messages appear in every
# record of it); datetime formatting is the largest single cost of building a record.
_ts = functools.lru_cache(maxsize=16_384)(rfc3339)


def is_expired(state: ConversationState, now: float, ttl_s: float) -> bool:
    """Whether ``state`` has been idle for ``ttl_s`` seconds of processing time at ``now``."""
    return now - state.last_seen_at >= ttl_s


@dataclass(frozen=True, slots=True)
class ReferenceUpdate:
    """What applying one message did.

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


class ReferenceTracker:
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
        self.codec = ReferenceCodec(self.labels, self._keys)

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

    def apply(
        self, state: ConversationState | None, msg: ClassifiedMessage, now: float | None = None
    ) -> ReferenceUpdate:
        """Apply one classified message to its conversation's state (``None``: a new conversation).

        Args:
            state: The conversation's current state, changed in place; None when there is none.
            msg: The message, in source order for its conversation.
            now: Processing time, Unix seconds; defaults to the injected clock.

        Raises:
            ValueError: ``msg`` is malformed (scores of the wrong length or outside [0, 1], a label index
                out of range, a non-finite ``sent_at``) or belongs to another conversation.
        """
        if now is None:
            now = self._clock()
        n = self._n
        scores = [float(s) for s in msg.scores]
        label = msg.label_index
        if len(scores) != n or not 0 <= label < n:
            raise ValueError(f"message {msg.message_id!r}: {len(scores)} scores / label {label} for {n} labels")
        if not (min(scores) >= 0.0 and max(scores) <= 1.0) or any(map(math.isnan, scores)):
            raise ValueError(f"message {msg.message_id!r}: scores must be in [0, 1], got {scores}")
        sent_at = float(msg.sent_at)
        if not math.isfinite(sent_at):
            raise ValueError(f"message {msg.message_id!r}: sent_at must be finite, got {sent_at}")
        if state is None:
            state = self.new_state(msg.conversation_id)
        elif state.conversation_id != msg.conversation_id:
            raise ValueError(f"message of {msg.conversation_id!r} applied to the state of {state.conversation_id!r}")
        elif [e.key for e in state.episodes] != self._key_list:
            self.codec.align(state)  # a state built for other rules (decode aligns already)

        if msg.partition == state.source_partition and msg.offset <= state.source_offset:
            return ReferenceUpdate(state, "replay", changed=False)
        state.source_partition = msg.partition
        state.source_offset = msg.offset
        state.last_seen_at = now

        if sent_at > now + self.max_future_skew_s:
            sent_at = now
            state.future_clamped += 1
        first = state.message_count == 0
        latest = state.latest_at
        if not first and sent_at < latest - self.allowed_lateness_s:
            state.late_ignored += 1
            return ReferenceUpdate(state, "late", changed=True)
        message_id = msg.message_id
        for m in state.recent:
            if m.message_id == message_id:
                state.duplicates_ignored += 1
                return ReferenceUpdate(state, "duplicate", changed=True)

        # count and mood
        state.message_count += 1
        half_life = self.mood_half_life_s
        if first:
            state.started_at = latest = sent_at
            state.mood = scores
            state.mood_weight = 1.0
        elif sent_at >= latest:
            d = decay_factor(sent_at - latest, half_life) if sent_at > latest else 1.0
            state.mood = [m * d + s for m, s in zip(state.mood, scores, strict=True)]
            state.mood_weight = state.mood_weight * d + 1.0
            latest = sent_at
        else:  # late, within the allowance: its weight is what it would have now had it come in order
            d = decay_factor(latest - sent_at, half_life)
            state.mood = [m + s * d for m, s in zip(state.mood, scores, strict=True)]
            state.mood_weight += d
            state.started_at = min(state.started_at, sent_at)
        advanced = latest != state.latest_at or first
        state.latest_at = latest

        # window
        self.window.add(state.panes, sent_at, label, latest, n)
        if advanced:
            self.window.prune(state.panes, latest)

        # recent messages, by event time then message id
        rec = RecentMessage(message_id, sent_at, label, _F32.unpack(_F32.pack(scores[label]))[0])
        recent = state.recent
        if not recent or rec.sort_key() >= recent[-1].sort_key():
            recent.append(rec)
        else:
            bisect.insort(recent, rec, key=RecentMessage.sort_key)
        if len(recent) > self.history_messages:
            del recent[0]

        # dominant emotion
        shares = state.mood_shares()
        best = max(range(n), key=shares.__getitem__)
        dominant = state.dominant
        dominant_changed = dominant < 0 or (
            best != dominant and shares[best] > shares[dominant] + self.dominant_min_margin
        )
        if dominant_changed:
            state.dominant = best
            state.dominant_since = latest
            state.dominant_messages = 1
        else:
            state.dominant_messages += 1

        # rules
        fired: list[tuple[Check, Episode, Observation]] = []
        for check, episode in zip(self.checks, state.episodes, strict=True):
            obs = check.observe(state, episode, shares)
            if episode.active:
                if obs.recovering:
                    episode.streak += 1
                    if episode.streak >= check.rule.rearm_after_messages:
                        episode.active = False
                        episode.streak = 0
                else:
                    episode.streak = 0
            elif obs.met:
                episode.active = True
                episode.streak = 0
                episode.fired += 1
                episode.recover_level = obs.recover_level
                fired.append((check, episode, obs))

        # emission
        reason: StateReason | None = None
        if dominant_changed:
            reason = "dominant_changed"
        elif now - state.last_emitted_at >= self.emit_interval_s:
            reason = "interval"
        emit = None
        if reason is not None:
            state.last_emitted_at = now
            emit = self.snapshot(state, reason=reason, now=now)
        alerts = tuple(self._alert(state, msg, check, episode, obs, now) for check, episode, obs in fired)
        return ReferenceUpdate(
            state, "applied", changed=True, dominant_changed=dominant_changed, emit=emit, alerts=alerts
        )

    # -- records --------------------------------------------------------------------------------------------

    def window_counts(self, state: ConversationState) -> list[int]:
        """Label counts over the conversation's current window (ending with its latest message's pane)."""
        return PaneWindow.counts(state.panes, self._n)

    def _message(self, m: RecentMessage) -> dict[str, Any]:
        return {
            "message_id": m.message_id,
            "label": self.labels[m.label],
            "score": round(m.score, _ROUND),
            "sent_at": _ts(m.sent_at),
        }

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
        counts = self.window_counts(state)
        total = sum(counts)
        start, end = self.window.bounds(state.latest_at)
        w = state.mood_weight
        latest = _ts(state.latest_at)
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
                "pane_s": self.window.pane_s,
                "start": _ts(start),
                "end": _ts(end),
                "message_count": total,
                "counts": dict(zip(labels, counts, strict=True)),
                "distribution": {
                    label: (round(c / total, _ROUND) if total else 0.0) for label, c in zip(labels, counts, strict=True)
                },
            },
            "mood": {
                "half_life_s": self.mood_half_life_s,
                "at": latest,
                "scores": {label: round(m / w, _ROUND) for label, m in zip(labels, state.mood, strict=True)},
                "weight": round(w, _ROUND),
            },
            "dominant": {
                "label": labels[state.dominant],
                "since": _ts(state.dominant_since),
                "held_s": max(0.0, state.latest_at - state.dominant_since),
                "messages": state.dominant_messages,
            },
            "recent": [self._message(m) for m in state.recent[-self.recent_messages :]],
            "episodes": [
                {"rule": c.rule.name, "active": e.active, "fired": e.fired}
                for c, e in zip(self.checks, state.episodes, strict=True)
            ],
            "source": {"partition": state.source_partition, "offset": state.source_offset},
            "updated_at": _ts(state.last_seen_at),
            "emitted_at": rfc3339(now),
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
        emitted_at = rfc3339(now)
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
                    "value": round(obs.value, _ROUND),
                    "threshold": obs.threshold,
                    "details": {k: round(v, _ROUND) for k, v in check.details(state, episode, obs).items()},
                    "messages": [self._message(m) for m in check.evidence(state)],
                },
                "triggered_by": {
                    "message_id": msg.message_id,
                    "sent_at": rfc3339(msg.sent_at),
                    "source": {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
                },
                "state": self._state_doc(state, "alert", now),
                "fired_at": emitted_at,
            }
        )


def _check(name: str, value: float, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> None:
    if not math.isfinite(value) or value < lo or (open_lo and value == lo) or value > hi:
        upper = f" and <= {hi:g}" if hi < math.inf else ""
        raise ValueError(f"{name} must be {'>' if open_lo else '>='} {lo:g}{upper}, got {value}")
