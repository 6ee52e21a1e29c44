"""Invariants of the conversation state over arbitrary message sequences (hypothesis)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_app.conversations.state import ClassifiedMessage, ConversationState
from stream_app.conversations.tracker import ConversationTracker
from tests.unit.conversations.helpers import LABELS, T0, TOPIC, scores_for, tracker

pytestmark = pytest.mark.unit

LATENESS = 60.0
RULES = """
[[rule]]
name = "hostile"
kind = "share"
labels = ["anger", "disgust"]
min_share = 0.5
last_messages = 6
min_messages = 4
rearm_after_messages = 2

[[rule]]
name = "distress"
kind = "consecutive"
labels = ["sadness", "fear"]
count = 3
rearm_after_messages = 1

[[rule]]
name = "spike"
kind = "rise"
labels = ["anger"]
min_rise = 0.25
within_s = 120
rearm_after_messages = 1
"""
# Skewed toward the rules' labels so that episodes open and close often.
LABEL_CHOICE = st.sampled_from(["anger", "anger", "disgust", "sadness", "fear", "neutral", "neutral", "joy"])
SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Sent:
    """A message as sent: its event time and classification (arrival order is decided separately)."""

    sent_at: float
    label: str
    score: float
    message_id: str


@st.composite
def conversations(draw: st.DrawFn, max_size: int = 40) -> list[Sent]:
    n = draw(st.integers(1, max_size))
    t = T0
    out = []
    for i in range(n):
        t += draw(st.sampled_from([0.0, 0.5, 3.0, 10.0, 29.0, 31.0, 75.0, 400.0]))
        out.append(Sent(t, draw(LABEL_CHOICE), draw(st.floats(0.3, 1.0)), f"m-{i:03d}"))
    return out


def as_messages(sent: list[Sent], *, partition: int = 0) -> list[ClassifiedMessage]:
    """Arrival order = list order; offsets follow arrival."""
    return [
        ClassifiedMessage(
            "c-1", s.message_id, s.sent_at, LABELS.index(s.label), scores_for(s.label, s.score), TOPIC, partition, i
        )
        for i, s in enumerate(sent)
    ]


def now_of(i: int) -> float:
    """Processing time of the i-th arrival: after every event time, 7 s apart."""
    return T0 + 1_000_000.0 + 7.0 * i


def run(
    t: ConversationTracker, msgs: list[ClassifiedMessage], state: ConversationState | None = None
) -> tuple[ConversationState, list[bytes]]:
    alerts: list[bytes] = []
    for m in msgs:
        u = t.apply(state, m, now=now_of(m.offset))
        state = u.state
        alerts += [a.to_json() for a in u.alerts]
    assert state is not None
    return state, alerts


@SETTINGS
@given(sent=conversations())
def test_window_counts_match_an_oracle_and_the_distribution_sums_to_them(sent: list[Sent]) -> None:
    t = tracker(RULES, allowed_lateness_s=LATENESS)
    state, _ = run(t, as_messages(sent))
    counts = t.window_counts(state)
    first = t.window.first_pane(state.latest_at)
    oracle = [0] * len(LABELS)
    for s in sent:
        if t.window.pane_of(s.sent_at) >= first:
            oracle[LABELS.index(s.label)] += 1
    assert counts == oracle
    record = t.snapshot(state).record()
    assert record.window.message_count == sum(record.window.counts.values()) == sum(counts)
    if counts:
        assert math.isclose(sum(record.window.distribution.values()), 1.0 if sum(counts) else 0.0, abs_tol=1e-5)
    assert state.message_count == len(sent)
    assert math.isclose(sum(state.mood_shares()), 1.0, rel_tol=1e-9)
    assert all(-1e-12 <= x <= 1 + 1e-12 for x in state.mood_shares())
    assert len(state.recent) <= t.history_messages
    assert [m.sort_key() for m in state.recent] == sorted(m.sort_key() for m in state.recent)


@SETTINGS
@given(sent=conversations(), data=st.data())
def test_any_arrival_order_within_the_allowance_gives_the_same_window_and_mood(
    sent: list[Sent], data: st.DataObject
) -> None:
    # Arrival by sent_at + jitter with jitter in [0, allowance - 1): a message never arrives after one sent
    # `allowance` seconds or more after it, so every message is within the allowance when it arrives.
    jitter = data.draw(st.lists(st.floats(0.0, LATENESS - 1.0), min_size=len(sent), max_size=len(sent)))
    shuffled = [
        s for _, s in sorted(zip(jitter, sent, strict=True), key=lambda js: (js[1].sent_at + js[0], js[1].message_id))
    ]
    t = tracker(RULES, allowed_lateness_s=LATENESS)
    a, _ = run(t, as_messages(sent))
    b, _ = run(t, as_messages(shuffled))
    assert b.late_ignored == 0
    assert t.window_counts(a) == t.window_counts(b)
    assert (a.message_count, a.latest_at, a.started_at) == (b.message_count, b.latest_at, b.started_at)
    assert a.mood == pytest.approx(b.mood, rel=1e-9, abs=1e-12)
    assert a.mood_weight == pytest.approx(b.mood_weight, rel=1e-9)
    assert [m.message_id for m in a.recent] == [m.message_id for m in b.recent]


@SETTINGS
@given(sent=conversations(), data=st.data())
def test_a_crash_and_replay_repeats_no_alert_and_ends_in_the_same_state(sent: list[Sent], data: st.DataObject) -> None:
    """The worker stores the state after message k, commits offset c <= k, crashes, and resumes from c."""
    msgs = as_messages(sent)
    t = tracker(RULES, allowed_lateness_s=LATENESS)
    whole, alerts = run(t, msgs)

    k = data.draw(st.integers(0, len(msgs) - 1), label="stored through")
    c = data.draw(st.integers(0, k), label="committed")
    before, alerts_before = run(t, msgs[: k + 1])
    restarted = tracker(RULES, allowed_lateness_s=LATENESS)
    resumed, alerts_after = run(restarted, msgs[c:], restarted.decode(t.encode(before)))
    assert alerts_before + alerts_after == alerts, "each alert exactly once"
    assert restarted.encode(resumed) == t.encode(whole)

    # and a second identical run (a full replay from scratch) gives identical alerts
    again, alerts_again = run(tracker(RULES, allowed_lateness_s=LATENESS), msgs)
    assert alerts_again == alerts and t.encode(again) == t.encode(whole)


def oracle_alerts(sent: list[Sent]) -> dict[str, list[int]]:
    """Where the share and consecutive rules of RULES must fire, computed from the list alone.

    In-order arrival with increasing ids: the recent messages are simply the last ones of the list.
    """
    conditions: dict[str, list[bool]] = {"hostile": [], "distress": []}
    for i in range(len(sent)):
        last6 = sent[max(0, i - 5) : i + 1]
        share = sum(s.label in ("anger", "disgust") for s in last6) / len(last6)
        conditions["hostile"].append(len(last6) >= 4 and share >= 0.5)
        run = 0
        for s in reversed(sent[: i + 1]):
            if s.label not in ("sadness", "fear"):
                break
            run += 1
        conditions["distress"].append(run >= 3)
    rearm = {"hostile": 2, "distress": 1}
    out: dict[str, list[int]] = {}
    for name, met in conditions.items():
        fired, active, streak = [], False, 0
        for i, m in enumerate(met):
            if not active:
                if m:
                    fired.append(i)
                    active, streak = True, 0
            elif m:
                streak = 0
            else:
                streak += 1
                if streak >= rearm[name]:
                    active, streak = False, 0
        out[name] = fired
    return out


@SETTINGS
@given(sent=conversations())
def test_rules_fire_once_per_episode_at_the_messages_an_oracle_expects(sent: list[Sent]) -> None:
    t = tracker(RULES, allowed_lateness_s=LATENESS)
    state: ConversationState | None = None
    fired: dict[str, list[int]] = {c.rule.name: [] for c in t.checks}
    for i, m in enumerate(as_messages(sent)):
        u = t.apply(state, m, now=now_of(m.offset))
        state = u.state
        for a in u.alerts:
            fired[a.rule].append(i)
            assert a.episode == len(fired[a.rule])
            assert a.doc["triggered_by"]["message_id"] == m.message_id
    assert state is not None
    expected = oracle_alerts(sent)
    assert fired["hostile"] == expected["hostile"]
    assert fired["distress"] == expected["distress"]
    assert [e.fired for e in state.episodes] == [len(fired[c.rule.name]) for c in t.checks]


@SETTINGS
@given(sent=conversations(max_size=25))
def test_round_trip_after_any_sequence(sent: list[Sent]) -> None:
    t = tracker(RULES, allowed_lateness_s=LATENESS)
    state, _ = run(t, as_messages(sent))
    raw = t.encode(state)
    assert t.decode(raw) == state and t.encode(t.decode(raw)) == raw
