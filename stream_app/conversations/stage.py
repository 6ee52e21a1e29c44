"""Conversation state as a release stage of the emitter: applied in source order, written after its alerts.

The emitter releases slots per input partition in delivery order; conversations are keyed by
conversation_id, which is the input's key, so a conversation's messages arrive here in source order and in
the partition that owns its state (co-partitioned: no extra topic hop). For each released event:

1. the conversation's state comes from this stage's memory (written but not yet durable, or recently used)
   or the store (the worker's RocksDB table partition), and :meth:`ConversationTracker.apply` updates it;
2. ``conversation_state.v1`` and ``escalation.v1`` records go out *with* the events (phase 1 of the ack
   group), the new state bytes to the state changelog only *after* those are acknowledged (phase 2);
3. only when the changelog write is acknowledged does the state reach the local store (and the store's
   persisted changelog offset move), and only then is the group's input offset committable.

Why this order: the tracker ignores a message at or below the last offset it applied (the replay guard).
Were the state durable before its alerts, a crash in between would re-process the message, find it already
applied and never send the alert. This way a crash re-sends at worst (the same ``alert_id``), never loses.

Expiry: :meth:`sweep` (a worker timer) deletes conversations idle for the TTL with tombstones that go out in
the next flush's second phase, so memory and disk stay bounded whatever the number of conversations.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from stream_app.conversations.state import ClassifiedMessage, ConversationState
from stream_app.conversations.tracker import ConversationTracker
from stream_app.core.emitter import StageOutput
from stream_app.core.slots import OutRecord, Slot
from stream_app.metrics import Metrics

__all__ = ["ConversationStage", "StateStore"]

_log = logging.getLogger(__name__)


class StateStore(Protocol):
    """A partitioned byte store whose changelog the stage writes itself (the worker's Faust table)."""

    changelog_topic: str

    def holds(self, partition: int) -> bool:
        """Whether this worker holds ``partition`` (an active, recovered table partition)."""
        ...

    def get(self, partition: int, key: bytes) -> bytes | None: ...

    def put_local(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Write (None: delete) the local copy only; the changelog record was already acknowledged."""
        ...

    def set_persisted_offset(self, partition: int, offset: int) -> None:
        """The changelog of ``partition`` is applied locally up to ``offset`` (recovery resumes after it)."""
        ...

    def items(self, partition: int) -> Iterable[tuple[bytes, bytes]]: ...

    def partitions(self) -> list[int]: ...


class ConversationStage:
    """Apply released events to their conversations; emit state and escalation records.

    Args:
        tracker: The transport-free state and rules.
        store: The state table.
        states_topic: Where ``conversation_state.v1`` records go (key conversation_id).
        alerts_topic: Where ``escalation.v1`` records go (key conversation_id).
        metrics: Alert counter and active-conversations gauge.
        cache_size: Decoded states kept in memory per partition (beyond those not yet durable).
        wall_clock: Unix seconds (injected in tests).
    """

    name = "conversations"

    def __init__(
        self,
        tracker: ConversationTracker,
        store: StateStore,
        *,
        states_topic: str,
        alerts_topic: str,
        metrics: Metrics,
        cache_size: int = 10_000,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.tracker = tracker
        self.store = store
        self.states_topic = states_topic
        self.alerts_topic = alerts_topic
        self.metrics = metrics
        self.cache_size = cache_size
        self.wall_clock = wall_clock
        # (partition, key) -> (state, bytes written whose ack is awaited); authoritative over the store
        self._pending: dict[tuple[int, bytes], tuple[ConversationState | None, bytes | None]] = {}
        self._cache: dict[int, OrderedDict[bytes, ConversationState]] = {}
        self._tombstones: list[tuple[str, OutRecord]] = []
        self.skipped = 0
        self._alerts = metrics.conversation_alerts_total
        self._mismatch_warned_at = -math.inf

    # ------------------------------------------------------------------ state access
    def _load(self, partition: int, key: bytes, conversation_id: str) -> ConversationState | None:
        pending = self._pending.get((partition, key))
        if pending is not None:
            return pending[0]
        cache = self._cache.setdefault(partition, OrderedDict())
        state = cache.get(key)
        if state is not None:
            cache.move_to_end(key)
            return state
        raw = self.store.get(partition, key)
        if raw is None:
            return None
        try:
            state = self.tracker.decode(raw)
        except ValueError as exc:  # another version or label list: start the conversation afresh
            _log.warning("dropping unreadable state of conversation %r: %r", conversation_id, exc)
            return None
        self._remember(partition, key, state)
        return state

    def _remember(self, partition: int, key: bytes, state: ConversationState) -> None:
        cache = self._cache.setdefault(partition, OrderedDict())
        cache[key] = state
        cache.move_to_end(key)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)

    def snapshot(self, partition: int, key: bytes) -> bytes | None:
        """The ``conversation_state.v1`` JSON of a conversation now, or None when there is none."""
        state = self._load(partition, key, key.decode(errors="replace"))
        if state is None or state.message_count == 0:
            return None
        return self.tracker.snapshot(state).to_json()

    def forget(self, partitions: Iterable[int]) -> None:
        """Revoked partitions: their states now live elsewhere."""
        for p in partitions:
            self._cache.pop(p, None)
            for key in [k for k in self._pending if k[0] == p]:
                del self._pending[key]

    def _key_mismatch(self, record_key: bytes | None, conversation_id: str) -> None:
        """A record not keyed by its conversation_id: counted; warned about once a minute at most."""
        self.metrics.conversation_key_mismatches_total.inc()
        now = time.monotonic()
        if now - self._mismatch_warned_at >= 60.0:
            self._mismatch_warned_at = now
            _log.warning(
                "input records must be keyed by their conversation_id (record key %r, conversation_id %r): "
                "their conversation's state splits across partitions (emotion_conversation_key_mismatches_total)",
                record_key[:64] if record_key is not None else None,
                conversation_id[:64],
            )

    # ------------------------------------------------------------------ the release stage
    def on_release(self, slots: Sequence[Slot], partition: int | None = None) -> StageOutput:
        out = StageOutput()
        now_records = out.now
        touched: dict[tuple[int, bytes], ConversationState] = {}
        # whether the store holds a partition cannot change during this call (no await): asked once each
        held: dict[int, bool] = {}
        now = self.wall_clock()
        apply = self.tracker.apply
        states_topic = self.states_topic
        for s in slots:
            m = s.message
            r = s.result
            lane = s.lane
            if s.dead is not None or m is None or r is None or lane.dead:
                continue
            p = lane.partition  # not `partition`: that one says which transaction this is
            holds = held.get(p)
            if holds is None:
                holds = held[p] = self.store.holds(p)
            if not holds:
                self.skipped += 1
                continue
            cid = m.conversation_id
            key = cid.encode()
            if s.key != key:
                self._key_mismatch(s.key, cid)
            ident = (p, key)
            state = touched.get(ident) or self._load(p, key, cid)
            msg = ClassifiedMessage(
                cid, m.message_id, m.sent_at.timestamp(), r.label_index, r.scores, s.chunk.topic, p, s.offset
            )
            try:
                update = apply(state, msg, now)
            except ValueError as exc:  # a message the tracker cannot take is that message's problem only
                self.metrics.errors_total.labels("conversations").inc()
                _log.warning("conversation %r: message %r not applied: %r", cid, m.message_id, exc)
                continue
            if update.changed:
                touched[ident] = update.state
            if update.emit is not None:
                now_records.append((states_topic, OutRecord(key, update.emit.to_json(), [])))
            for alert in update.alerts:
                now_records.append((self.alerts_topic, OutRecord(key, alert.to_json(), [])))
                self._alerts.labels(alert.rule).inc()
        changelog = self.store.changelog_topic
        encode = self.tracker.encode
        pending = self._pending
        after = out.after
        for ident, state in touched.items():
            raw = encode(state)
            pending[ident] = (state, raw)
            after.append((changelog, OutRecord(ident[1], raw, [], ident[0])))
        if self._tombstones:
            if partition is None:
                after.extend(self._tombstones)
                self._tombstones = []
            else:  # one partition's transaction: only its own tombstones
                mine = [t for t in self._tombstones if t[1].partition == partition]
                if mine:
                    after.extend(mine)
                    self._tombstones = [t for t in self._tombstones if t[1].partition != partition]
        return out

    def on_after_acked(self, topic: str, partition: int, records: Sequence[OutRecord], last_offset: int) -> None:
        if topic != self.store.changelog_topic:
            return
        for record in records:
            key = record.key
            if key is None:
                continue
            ident = (partition, key)
            pending = self._pending.get(ident)
            if pending is not None and pending[1] == record.value:
                del self._pending[ident]  # the newest write for this key is durable
                if pending[0] is not None:
                    self._remember(partition, key, pending[0])
                else:
                    self._cache.get(partition, OrderedDict()).pop(key, None)
            self.store.put_local(partition, key, record.value)
        self.store.set_persisted_offset(partition, last_offset)

    # ------------------------------------------------------------------ expiry
    def sweep(self, now: float | None = None) -> int:
        """Queue tombstones for conversations idle past the TTL (sent with the next flush); returns how many.

        Also sets ``emotion_conversations_active`` to the conversations held.
        """
        now = self.wall_clock() if now is None else now
        expired = 0
        active = 0
        changelog = self.store.changelog_topic
        for partition in self.store.partitions():
            for key, raw in self.store.items(partition):
                if key.startswith(b"__faust"):
                    continue
                if (partition, key) in self._pending:
                    active += 1
                    continue
                try:
                    dead = self.tracker.is_expired_raw(raw, now)
                except ValueError:
                    dead = True
                if not dead:
                    active += 1
                    continue
                self._pending[(partition, key)] = (None, None)
                self._tombstones.append((changelog, OutRecord(key, None, [], partition)))
                expired += 1
        self.metrics.conversations_active.set(active)
        return expired
