"""The table value of a conversation: a versioned, compact binary encoding of its state.

Little-endian ``struct`` layout, version 1. The fixed header comes first so a TTL sweep can read
``last_seen_at`` at offset 6 without decoding the rest (:meth:`StateCodec.last_seen_at`)::

    header (93 bytes)      B version, B n_labels, I labels fingerprint,
                           d last_seen_at, d last_emitted_at, d started_at, d latest_at, d dominant_since,
                           d mood_weight, I message_count, I late_ignored, I duplicates_ignored,
                           I future_clamped, I dominant_messages, i source_partition, q source_offset,
                           h dominant, H conversation_id bytes, B panes p, B recent r, B episodes e
    mood                   n_labels x d
    conversation_id        UTF-8
    panes (if p)           q newest pane index, p x (H panes back from the newest, B non-zero labels k),
                           then for all panes in order, sum(k) x (B label, I count)
    recent (if r)          r x H message_id bytes, the r message_ids (UTF-8, concatenated),
                           r x d sent_at, r x B label, r x f score
    episodes, each         I rule key, B flags (bit 0: active), H streak, I fired, d recover_level,
                           B history entries h, then if h: q newest bucket, h x (H buckets back, d value)

Each variable section is packed and unpacked with one ``struct`` call (formats cached by count): per
entry calls made decoding cost about twice as much.

Floats that decisions depend on are float64 and scores are float32 rounded on the way in, so a state read
back from the table decides exactly as the one in memory would have (a restart changes nothing). Counters
saturate at their field's maximum (4.29e9 messages). The labels fingerprint ties a value to the model's
label list: a value written for other labels is refused, not misread. Not JSON: a typical support chat
(10 recent messages with 20-byte ids, 3 rules) takes about 600 bytes; the worst case is bounded by the
limits on panes, recent messages, rules and id lengths (see ``benchmarks/conversations.py``).
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from itertools import compress

from stream_app.conversations.state import ConversationState, Episode, RecentMessage

__all__ = ["CODEC_VERSION", "StateCodec", "labels_fingerprint"]

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


class StateCodec:
    """Encodes and decodes :class:`ConversationState` for one label list and rule set.

    Args:
        labels: The model's labels, in score order.
        rule_keys: Fingerprints of the current rules, in order; decoded episodes are matched to them.
    """

    __slots__ = ("_fp", "_keys", "_labels", "_mood", "_n")

    def __init__(self, labels: Sequence[str], rule_keys: Sequence[int]) -> None:
        self._n = len(labels)
        self._fp = labels_fingerprint(labels)
        self._keys = tuple(rule_keys)
        self._mood = struct.Struct(f"<{self._n}d")
        self._labels = range(self._n)

    def encode(self, s: ConversationState) -> bytes:
        """Pack ``s`` into the layout above.

        Raises:
            ValueError: More panes, recent messages or episodes than the layout holds (255 each), an id
                longer than 65,535 UTF-8 bytes, or a mood vector of the wrong length.
        """
        n = self._n
        mood = s.mood
        panes = s.panes
        recent = s.recent
        episodes = s.episodes
        if len(mood) != n:
            raise ValueError(f"mood has {len(mood)} values for {n} labels")
        if len(panes) > 255 or len(recent) > 255 or len(episodes) > 255:
            raise ValueError("at most 255 panes, recent messages and episodes")
        # Counters are packed as they are; one past its field's maximum (4.29e9 messages) makes struct
        # refuse it, and the careful path below saturates it. The same bytes either way.
        cid = s.conversation_id.encode()
        try:
            parts = [
                _HEAD.pack(
                    CODEC_VERSION,
                    n,
                    self._fp,
                    s.last_seen_at,
                    s.last_emitted_at,
                    s.started_at,
                    s.latest_at,
                    s.dominant_since,
                    s.mood_weight,
                    s.message_count,
                    s.late_ignored,
                    s.duplicates_ignored,
                    s.future_clamped,
                    s.dominant_messages,
                    s.source_partition,
                    s.source_offset,
                    s.dominant,
                    len(cid),
                    len(panes),
                    len(recent),
                    len(episodes),
                ),
                self._mood.pack(*mood),
                cid,
            ]
            if panes:
                newest = max(panes)
                heads: list[int] = []
                entries: list[int] = []
                labels = self._labels
                for pane, counts in panes.items():
                    k = 0
                    for i in compress(labels, counts):  # the labels with a non-zero count
                        entries += (i, counts[i])
                        k += 1
                    heads += (newest - pane, k)
                parts.append(_Q.pack(newest))
                parts.append(_fmt("HB", len(panes)).pack(*heads))
                parts.append(_fmt("BI", len(entries) // 2).pack(*entries))
            if recent:
                ids = [m.message_id.encode() for m in recent]
                parts.append(_fmt("H", len(ids)).pack(*map(len, ids)))
                parts += ids
                parts.append(
                    _recent_fmt(len(ids)).pack(
                        *[m.sent_at for m in recent], *[m.label for m in recent], *[m.score for m in recent]
                    )
                )
            for e in episodes:
                h = e.history
                parts.append(
                    _EPISODE.pack(e.key, _FLAG_ACTIVE if e.active else 0, e.streak, e.fired, e.recover_level, len(h))
                )
                if h:
                    newest = h[-1][0]
                    flat: list[float] = []
                    for bucket, v in h:
                        flat += (newest - bucket, v)
                    parts.append(_Q.pack(newest))
                    parts.append(_fmt("Hd", len(h)).pack(*flat))
        except struct.error:
            return self._encode_saturating(s)
        return b"".join(parts)

    def _encode_saturating(self, s: ConversationState) -> bytes:
        """:meth:`encode` with every counter saturated at its field's maximum (and any other error raised)."""
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
