"""The table value of a conversation: a versioned, compact binary encoding of its state.

Little-endian ``struct`` layout, version 1. The fixed header comes first so a TTL sweep can read
``last_seen_at`` at offset 6 without decoding the rest (:meth:`StateCodec.last_seen_at`)::

    header (93 bytes)      B version, B n_labels, I labels fingerprint,
                           d last_seen_at, d last_emitted_at, d started_at, d latest_at, d dominant_since,
                           d mood_weight, I message_count, I late_ignored, I duplicates_ignored,
                           I future_clamped, I dominant_messages, i source_partition, q source_offset,
                           h dominant, H conversation_id bytes, B panes, B recent, B episodes
    mood                   n_labels x d
    conversation_id        UTF-8
    panes (if any)         q newest pane index, then per pane: H panes back from the newest,
                           B non-zero labels k, k x (B label, I count)
    recent, each           H message_id bytes, message_id UTF-8, d sent_at, B label, f score
    episodes, each         I rule key, B flags (bit 0: active), H streak, I fired, d recover_level,
                           B history entries h, then if h: q newest bucket, h x (H buckets back, d value)

Floats that decisions depend on are float64 and scores are float32 rounded on the way in, so a state read
back from the table decides exactly as the one in memory would have (a restart changes nothing). Counters
saturate at their field's maximum (4.29e9 messages). The labels fingerprint ties a value to the model's
label list: a value written for other labels is refused, not misread. Not JSON: a typical support chat
(10 recent messages with 20-byte ids, 3 rules) takes about 600 bytes; the worst case is bounded by the
limits on panes, recent messages, rules and id lengths (see ``benchmarks/conversations.py``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from stream_app.conversations.state import ConversationState, Episode, RecentMessage

__all__ = ["CODEC_VERSION", "StateCodec", "labels_fingerprint"]

CODEC_VERSION = 1
_HEAD = struct.Struct("<BBIddddddIIIIIiqhHBBB")
_LAST_SEEN = struct.Struct("<d")
_LAST_SEEN_OFFSET = 6
_Q = struct.Struct("<q")
_PANE = struct.Struct("<HB")
_COUNT = struct.Struct("<BI")
_ID = struct.Struct("<H")
_RECENT = struct.Struct("<dBf")
_EPISODE = struct.Struct("<IBHIdB")
_HIST = struct.Struct("<Hd")
_U32 = 0xFFFFFFFF
_FLAG_ACTIVE = 0x01


def labels_fingerprint(labels: Sequence[str]) -> int:
    """32-bit fingerprint of an ordered label list."""
    return int.from_bytes(hashlib.blake2b("\x00".join(labels).encode(), digest_size=4).digest(), "little")


def _u32(x: int) -> int:
    return x if x <= _U32 else _U32


class StateCodec:
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
            parts.append(_Q.pack(newest))
            for pane, counts in s.panes.items():
                nonzero = [(i, c) for i, c in enumerate(counts) if c]
                parts.append(_PANE.pack(newest - pane, len(nonzero)))
                parts.extend(_COUNT.pack(i, _u32(c)) for i, c in nonzero)
        for m in s.recent:
            mid = m.message_id.encode()
            parts.append(_ID.pack(len(mid)))
            parts.append(mid)
            parts.append(_RECENT.pack(m.sent_at, m.label, m.score))
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
                parts.extend(_HIST.pack(newest - b, v) for b, v in h)
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
            for _ in range(n_panes):
                back, k = _PANE.unpack_from(b, pos)
                pos += _PANE.size
                counts = [0] * n
                for _ in range(k):
                    i, c = _COUNT.unpack_from(b, pos)
                    pos += _COUNT.size
                    if i >= n:
                        raise ValueError(f"conversation state has a count for label {i} of {n}")
                    counts[i] = c
                panes[newest - back] = counts
        recent: list[RecentMessage] = []
        for _ in range(n_recent):
            (mid_len,) = _ID.unpack_from(b, pos)
            pos += _ID.size
            mid = b[pos : pos + mid_len].decode()
            pos += mid_len
            sent_at, label, score = _RECENT.unpack_from(b, pos)
            pos += _RECENT.size
            if label >= n:
                raise ValueError(f"conversation state has a recent label {label} of {n}")
            recent.append(RecentMessage(mid, sent_at, label, score))
        episodes: list[Episode] = []
        for _ in range(n_episodes):
            key, flags, streak, fired, recover_level, h = _EPISODE.unpack_from(b, pos)
            pos += _EPISODE.size
            history: list[tuple[int, float]] = []
            if h:
                (newest,) = _Q.unpack_from(b, pos)
                pos += _Q.size
                for _ in range(h):
                    back, v = _HIST.unpack_from(b, pos)
                    pos += _HIST.size
                    history.append((newest - back, v))
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
