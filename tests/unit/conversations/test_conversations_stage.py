"""The conversation stage: what the worker calls per flush, against the tracker it drives.

Released slots in, ``conversation_state.v1`` / ``escalation.v1`` records out with the events (``now``) and
the new state bytes after them (``after``), the local store written only once those are acknowledged.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import pytest

from stream_app.conversations.stage import ConversationStage
from stream_app.conversations.state import ClassifiedMessage, ConversationState
from stream_app.conversations.tracker import ConversationTracker
from stream_app.core.slots import ChunkInfo, Lane, OutRecord, Result, Slot
from stream_app.devtools.stores import MemoryStateStore
from stream_app.metrics import Metrics
from stream_app.records import ChatMessage
from tests.unit.conversations.helpers import LABELS, T0, TOPIC, scores_for, tracker

pytestmark = pytest.mark.unit

CHANGELOG = "emotion-conversations-v1-changelog"
STATES = "emotion.conversations.v1"
ALERTS = "emotion.alerts.v1"
RULES = """
[[rule]]
name = "distress"
kind = "consecutive"
labels = ["sadness", "fear"]
count = 3
rearm_after_messages = 1
"""


class DictStore(MemoryStateStore):
    """The in-memory store holding partitions 0 and 1; counts ``holds`` calls."""

    def __init__(self, partitions: Iterable[int] = (0, 1)) -> None:
        super().__init__(CHANGELOG, partitions)
        self.holds_calls = 0

    def holds(self, partition: int) -> bool:
        self.holds_calls += 1
        return super().holds(partition)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


LANES = {0: Lane(0), 1: Lane(1)}
CHUNK = ChunkInfo(topic=TOPIC, received_wall=0.0, received_mono=0.0, received_at="")


def slot(
    offset: int, conversation: str, label: str, sent_at: float, *, partition: int = 0, key: bytes | None = b""
) -> Slot:
    """A classified slot keyed by its conversation_id, as the contract says (``key``: another key)."""
    sent = datetime.fromtimestamp(sent_at, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    message = ChatMessage.model_validate(
        {
            "message_id": f"{conversation}-{offset}",
            "conversation_id": conversation,
            "user_id": "u",
            "text": "x",
            "sent_at": sent,
        }
    )
    result = Result(LABELS.index(label), tuple(scores_for(label)), False)
    record_key = conversation.encode() if key == b"" else key
    return Slot(LANES[partition], offset, 0, record_key, None, (), CHUNK, message=message, result=result)


def classified(s: Slot) -> ClassifiedMessage:
    assert s.message is not None and s.result is not None
    return ClassifiedMessage(
        s.message.conversation_id,
        s.message.message_id,
        s.message.sent_at.timestamp(),
        s.result.label_index,
        s.result.scores,
        TOPIC,
        s.lane.partition,
        s.offset,
    )


def stage_for(store: DictStore, clock: Clock, t: ConversationTracker | None = None) -> ConversationStage:
    return ConversationStage(
        t or tracker(RULES),
        store,
        states_topic=STATES,
        alerts_topic=ALERTS,
        metrics=Metrics(),
        wall_clock=clock,
    )


def ack(stage: ConversationStage, after: list[tuple[str, OutRecord]]) -> None:
    by_partition: dict[int, list[OutRecord]] = {}
    for topic, record in after:
        assert topic == CHANGELOG and record.partition is not None
        by_partition.setdefault(record.partition, []).append(record)
    for partition, records in by_partition.items():
        stage.on_after_acked(CHANGELOG, partition, records, 100 + len(records))


NAMES = {"n": "neutral", "j": "joy", "s": "sadness", "f": "fear", "a": "anger"}


def script() -> list[Slot]:
    """Two conversations per partition, interleaved; ``c-a`` and ``c-d`` slide into distress (the rule fires)."""
    labels = {"c-a": "nnjsssfnnjss", "c-b": "jjnnajnnjnnn", "c-c": "nsnsnsnsnsns", "c-d": "ffsnnnnjjjjj"}
    out = []
    offsets = {0: 0, 1: 0}
    for i in range(12):
        for conversation, partition in [("c-a", 0), ("c-b", 0), ("c-c", 1), ("c-d", 1)]:
            label = NAMES[labels[conversation][i]]
            out.append(slot(offsets[partition], conversation, label, T0 + 20.0 * i + partition, partition=partition))
            offsets[partition] += 1
    return out


def alerts_seen(stage: ConversationStage) -> float:
    return sum(
        sample.value
        for metric in stage.metrics.conversation_alerts_total.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def test_records_go_with_the_events_and_state_bytes_after_them_as_the_tracker_makes_them() -> None:
    store, clock = DictStore(), Clock(T0 + 1000.0)
    stage = stage_for(store, clock)
    direct = tracker(RULES)
    states: dict[str, ConversationState | None] = {}
    slots = script()
    for start in range(0, len(slots), 5):  # flushes of 5 released slots, acknowledged before the next
        flush = slots[start : start + 5]
        clock.now += 30.0
        out = stage.on_release(flush)
        expected_now: list[tuple[str, bytes]] = []
        touched: dict[str, ConversationState] = {}
        for s in flush:
            msg = classified(s)
            u = direct.apply(states.get(msg.conversation_id), msg, clock.now)
            states[msg.conversation_id] = touched[msg.conversation_id] = u.state
            if u.emit is not None:
                expected_now.append((STATES, u.emit.to_json()))
            expected_now += [(ALERTS, a.to_json()) for a in u.alerts]
        assert [(topic, r.value) for topic, r in out.now] == expected_now
        assert all(r.key is not None and r.partition is None for _, r in out.now)
        assert {(r.key, r.value, r.partition) for _, r in out.after} == {
            (c.encode(), direct.encode(st), st.source_partition) for c, st in touched.items()
        }
        written = {p: dict(d) for p, d in store.data.items()}
        ack(stage, out.after)
        assert all(store.data[r.partition][r.key] == r.value for _, r in out.after if r.partition is not None and r.key)
        assert written != store.data, "the store is written only once the changelog records are acknowledged"
    assert alerts_seen(stage) == 2  # c-a (s s s, at its 4th message) and c-d (f f s, at its 3rd)
    for conversation, st in states.items():
        assert st is not None
        assert store.get(st.source_partition, conversation.encode()) == direct.encode(st)


def test_the_store_is_asked_once_per_partition_and_flush_and_unheld_partitions_are_skipped() -> None:
    store, clock = DictStore(partitions=[0]), Clock(T0 + 1000.0)
    stage = stage_for(store, clock)
    slots = script()
    out = stage.on_release(slots)
    assert store.holds_calls == 2
    assert stage.skipped == sum(1 for s in slots if s.lane.partition == 1)
    assert {r.partition for _, r in out.after} == {0}


def test_a_rewind_before_the_ack_changes_nothing_and_sends_nothing() -> None:
    store, clock = DictStore(), Clock(T0 + 1000.0)
    stage = stage_for(store, clock)
    slots = script()
    first = stage.on_release(slots[:20])
    again = stage.on_release(slots[:20])  # re-delivered: the pending (unacknowledged) state already has them
    assert first.now and not again.now and not again.after


def test_a_restarted_stage_resumes_from_the_store_without_repeating_records() -> None:
    store, clock = DictStore(), Clock(T0 + 1000.0)
    slots = script()
    whole = stage_for(store, clock)
    out_whole = [whole.on_release(slots[i : i + 8]) for i in range(0, len(slots), 8)]
    alerts_whole = [r.value for o in out_whole for topic, r in o.now if topic == ALERTS]

    store2, clock2 = DictStore(), Clock(T0 + 1000.0)
    before = stage_for(store2, clock2)
    out1 = before.on_release(slots[:24])
    ack(before, out1.after)
    restarted = stage_for(store2, clock2)  # a new process over the same store; replays from offset 16
    out2 = restarted.on_release(slots[16:])
    alerts = [r.value for o in (out1, out2) for topic, r in o.now if topic == ALERTS]
    assert alerts == alerts_whole
    assert {r.value for _, r in out2.after} == {r.value for o in out_whole for _, r in o.after} & {
        r.value for _, r in out2.after
    }, "the resumed states end where the uninterrupted ones did"


def test_tombstones_of_every_partition_go_out_with_the_next_flush() -> None:
    store, clock = DictStore(), Clock(T0 + 1000.0)
    t = tracker(RULES, ttl_s=60.0, clock=clock)
    stage = stage_for(store, clock, t)
    slots = script()
    ack(stage, stage.on_release(slots).after)
    clock.now += 3600.0
    assert stage.sweep() == 4
    out = stage.on_release([slot(100, "c-new", "joy", T0 + 5000.0, partition=1)])
    tombstones = [(r.partition, r.key) for _, r in out.after if r.value is None]
    assert sorted(tombstones) == [(0, b"c-a"), (0, b"c-b"), (1, b"c-c"), (1, b"c-d")]


def test_one_partitions_transaction_takes_only_its_own_tombstones() -> None:
    store, clock = DictStore(), Clock(T0 + 1000.0)
    t = tracker(RULES, ttl_s=60.0, clock=clock)
    stage = stage_for(store, clock, t)
    ack(stage, stage.on_release(script()).after)
    clock.now += 3600.0
    stage.sweep()
    out = stage.on_release([], partition=1)
    assert sorted(r.key for _, r in out.after if r.value is None) == [b"c-c", b"c-d"]
    out = stage.on_release([], partition=0)
    assert sorted(r.key for _, r in out.after if r.value is None) == [b"c-a", b"c-b"]


def test_records_not_keyed_by_their_conversation_id_are_counted() -> None:
    """Keyed otherwise (by user, or null), a conversation's messages spread over partitions and its state
    splits: the worker cannot repair that, but it says so."""
    store, clock = DictStore(partitions=[0]), Clock(T0 + 1000.0)
    stage = stage_for(store, clock)
    slots = [
        slot(0, "c-1", "joy", T0),
        slot(1, "c-1", "joy", T0 + 1, key=b"user-7"),
        slot(2, "c-1", "joy", T0 + 2, key=None),
    ]
    stage.on_release(slots)
    assert stage.metrics.conversation_key_mismatches_total._value.get() == 2
