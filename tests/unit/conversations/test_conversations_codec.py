"""The conversation state's table value: exact round trip, refusal of foreign bytes, bounded size."""

from __future__ import annotations

import math
import struct

import orjson
import pytest

from stream_app.conversations.codec import CODEC_VERSION, StateCodec, labels_fingerprint
from stream_app.conversations.state import ClassifiedMessage, ConversationState, Episode
from stream_app.conversations.tracker import ConversationTracker
from stream_app.records import rfc3339
from tests.unit.conversations.helpers import LABELS, T0, message, tracker

pytestmark = pytest.mark.unit

RULES = """
[[rule]]
name = "hostile"
kind = "share"
labels = ["anger", "disgust"]
min_share = 0.5
last_messages = 6
min_messages = 4

[[rule]]
name = "distress"
kind = "consecutive"
labels = ["sadness", "fear"]
count = 3

[[rule]]
name = "spike"
kind = "rise"
labels = ["anger"]
min_rise = 0.3
within_s = 300
"""

SCRIPT = "nnjnaadanasnsfsssnnjanaa"
NAMES = {"a": "anger", "d": "disgust", "f": "fear", "j": "joy", "n": "neutral", "s": "sadness"}


def scripted() -> list[ClassifiedMessage]:
    """A support chat with late messages, a duplicate, rising anger and distress (every field in use)."""
    msgs = [
        message(i, NAMES[c], T0 + 17.0 * i, score=0.5 + 0.02 * (i % 20), message_id=f"msg-{i:05d}-x")
        for i, c in enumerate(SCRIPT)
    ]
    msgs.insert(8, message(100, "fear", T0 + 17.0 * 5 - 3, message_id="late-1"))  # late, within the allowance
    msgs.insert(12, message(101, "joy", T0 - 500, message_id="late-2"))  # beyond the allowance
    msgs.insert(15, message(102, "anger", T0 + 17.0 * 9, message_id="msg-00009-x"))  # a duplicate id
    return [
        ClassifiedMessage(m.conversation_id, m.message_id, m.sent_at, m.label_index, m.scores, m.topic, 0, offset)
        for offset, m in enumerate(msgs)
    ]


def final_state(t: ConversationTracker) -> ConversationState:
    state = None
    for i, m in enumerate(scripted()):
        state = t.apply(state, m, now=T0 + 10_000 + i).state
    assert state is not None
    return state


def test_round_trip_is_exact_and_stable() -> None:
    t = tracker(RULES)
    state = final_state(t)
    assert state.late_ignored == 1 and state.duplicates_ignored == 1 and any(e.history for e in state.episodes)
    assert any(e.active for e in state.episodes) and state.panes
    raw = t.encode(state)
    back = t.decode(raw)
    assert back == state
    assert t.encode(back) == raw
    assert raw[0] == CODEC_VERSION


def test_decisions_after_a_round_trip_equal_those_in_memory() -> None:
    """Encoding and decoding between every message (a restart each time) changes no output."""
    msgs = scripted()
    t = tracker(RULES, emit_interval_s=20.0)
    outputs_memory, outputs_table = [], []
    state_m: ConversationState | None = None
    raw: bytes | None = None
    for i, m in enumerate(msgs):
        now = T0 + 10_000 + 7 * i
        u = t.apply(state_m, m, now=now)
        state_m = u.state
        outputs_memory.append((u.outcome, u.emit and u.emit.to_json(), [a.to_json() for a in u.alerts]))
        v = t.apply(None if raw is None else t.decode(raw), m, now=now)
        raw = t.encode(v.state)
        outputs_table.append((v.outcome, v.emit and v.emit.to_json(), [a.to_json() for a in v.alerts]))
    assert outputs_table == outputs_memory
    assert any(alerts for _, _, alerts in outputs_memory)
    assert state_m is not None and raw == t.encode(state_m)


def test_last_seen_at_is_read_from_the_header() -> None:
    t = tracker(RULES)
    state = final_state(t)
    raw = t.encode(state)
    assert t.codec.last_seen_at(raw) == state.last_seen_at == T0 + 10_000 + len(scripted()) - 1
    with pytest.raises(ValueError):
        t.codec.last_seen_at(raw[:20])


def test_foreign_bytes_are_refused() -> None:
    t = tracker(RULES)
    raw = t.encode(final_state(t))
    with pytest.raises(ValueError, match="version"):
        t.decode(bytes([CODEC_VERSION + 1]) + raw[1:])
    with pytest.raises(ValueError, match="another label list"):
        ConversationTracker(labels=tuple(reversed(LABELS)), rules=()).decode(raw)
    with pytest.raises(ValueError, match="another label list"):
        ConversationTracker(labels=LABELS[:6], rules=()).decode(raw)
    with pytest.raises(ValueError, match="trailing"):
        t.decode(raw + b"\x00")
    for cut in range(len(raw)):
        with pytest.raises(ValueError):
            t.decode(raw[:cut])
    with pytest.raises(ValueError):
        t.decode(orjson.dumps({"conversation_id": "c"}))


def test_a_label_index_out_of_range_is_refused() -> None:
    t = tracker()
    state = t.apply(None, message(0, "joy", T0), now=T0 + 1).state
    raw = bytearray(t.encode(state))
    # the last recent message's label byte sits 5 bytes before the end (B label, f score)
    raw[-5] = len(LABELS)
    with pytest.raises(ValueError, match="recent label"):
        t.decode(bytes(raw))


def test_stale_episodes_are_dropped_and_new_rules_start_armed() -> None:
    codec = StateCodec(LABELS, [11, 22])
    state = ConversationState(conversation_id="c", mood=[0.0] * len(LABELS))
    state.episodes = [Episode(22, active=True, fired=3), Episode(33, active=True)]
    back = codec.decode(codec.encode(state))
    assert [(e.key, e.active, e.fired) for e in back.episodes] == [(11, False, 0), (22, True, 3)]


def test_labels_fingerprint_depends_on_order_and_names() -> None:
    assert labels_fingerprint(LABELS) == labels_fingerprint(list(LABELS))
    assert labels_fingerprint(LABELS) != labels_fingerprint(tuple(reversed(LABELS)))
    assert labels_fingerprint(["ab", "c"]) != labels_fingerprint(["a", "bc"])


def test_counters_saturate_instead_of_failing() -> None:
    t = tracker()
    state = t.apply(None, message(0, "joy", T0), now=T0 + 1).state
    state.message_count = 2**40
    assert t.decode(t.encode(state)).message_count == 2**32 - 1


def test_size_of_a_typical_support_chat_and_its_growth() -> None:
    """Sizes follow the layout: header + mood + id, panes, recent messages, episodes (codec docstring)."""
    t = tracker(RULES)
    state = final_state(t)
    raw = t.encode(state)
    n = len(LABELS)
    recent = sum(2 + len(m.message_id.encode()) + 13 for m in state.recent)
    panes = 8 + sum(3 + 5 * sum(1 for c in counts if c) for counts in state.panes.values())
    episodes = sum(20 + (8 + 10 * len(e.history) if e.history else 0) for e in state.episodes)
    assert len(raw) == 93 + 8 * n + len(b"c-1") + panes + recent + episodes
    assert len(raw) < 1024, "a support chat with 3 rules stays under 1 KiB"


def test_rfc3339_of_stored_times_round_trips_to_the_millisecond() -> None:
    t = tracker()
    state = t.apply(None, message(0, "joy", T0 + 0.123), now=T0 + 1).state
    back = t.decode(t.encode(state))
    assert rfc3339(back.latest_at) == "2026-11-18T11:10:00.123Z"
    assert back.last_emitted_at == T0 + 1 and math.isinf(t.new_state("x").last_emitted_at)
    assert struct.unpack_from("<d", t.encode(t.new_state("x")), 14)[0] == -math.inf
