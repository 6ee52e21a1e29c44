"""The conversation tracker: windows, lateness, decay, dominant emotion, emission, idempotence, TTL."""

from __future__ import annotations

import math
from typing import Any

import pytest

from stream_app.conversations.state import ConversationState
from stream_app.conversations.tracker import ConversationTracker, is_expired
from tests.unit.conversations.helpers import LABELS, T0, FakeClock, message, tracker

pytestmark = pytest.mark.unit

ONE_HOT = {name: [1.0 if n == name else 0.0 for n in LABELS] for name in LABELS}


def run(t: ConversationTracker, msgs: list, now: float | None = None) -> ConversationState:  # type: ignore[type-arg]
    state = None
    for m in msgs:
        state = t.apply(state, m, now=now).state
    assert state is not None
    return state


def counts_of(t: ConversationTracker, state: ConversationState) -> dict[str, int]:
    return {label: c for label, c in zip(LABELS, t.window_counts(state), strict=True) if c}


# -- window ---------------------------------------------------------------------------------------------------


def test_window_counts_distribution_and_slide() -> None:
    t = tracker(window_s=300.0, window_pane_s=30.0)
    s = run(t, [message(0, "neutral", T0), message(1, "anger", T0 + 10), message(2, "anger", T0 + 40)])
    assert counts_of(t, s) == {"neutral": 1, "anger": 2}
    record = t.snapshot(s, now=T0 + 50).record()
    assert record.window.message_count == 3
    assert record.window.distribution["anger"] == pytest.approx(2 / 3, abs=1e-6)
    assert sum(record.window.distribution.values()) == pytest.approx(1.0, abs=1e-5)
    assert (record.window.start, record.window.end) == ("2026-11-18T11:06:00.000Z", "2026-11-18T11:11:00.000Z")

    # The window is [T0-240, T0+60); a message at T0+300 moves it to [T0+30, T0+330): the pane of T0 and T0+10
    # slides out, the one of T0+40 stays.
    s = t.apply(s, message(3, "joy", T0 + 300), now=T0 + 300).state
    assert counts_of(t, s) == {"anger": 1, "joy": 1}
    assert s.message_count == 4, "the count is of all messages, not the window's"


def test_late_message_within_the_allowance_updates_its_own_pane() -> None:
    t = tracker(window_s=300.0, window_pane_s=30.0, allowed_lateness_s=60.0)
    s = run(t, [message(0, "anger", T0 + 100), message(1, "joy", T0 + 160)])
    u = t.apply(s, message(2, "sadness", T0 + 115), now=T0 + 170)
    assert u.outcome == "applied" and u.changed
    anger, sadness, joy = LABELS.index("anger"), LABELS.index("sadness"), LABELS.index("joy")
    pane_90 = t.window.pane_of(T0 + 90)
    assert s.panes[pane_90][anger] == 1 and s.panes[pane_90][sadness] == 1
    assert s.panes[t.window.pane_of(T0 + 160)][joy] == 1
    assert s.latest_at == T0 + 160, "a late message does not move the window"
    assert [m.message_id for m in s.recent] == ["m-0", "m-2", "m-1"], "recent messages are in event-time order"

    # exactly at the allowance: still applied
    assert t.apply(s, message(3, "fear", T0 + 100), now=T0 + 170).outcome == "applied"


def test_message_beyond_the_allowance_is_counted_and_ignored() -> None:
    t = tracker(allowed_lateness_s=60.0)
    s = run(t, [message(0, "anger", T0 + 100), message(1, "joy", T0 + 160)])
    before = (t.window_counts(s), s.message_count, list(s.mood), [m.message_id for m in s.recent])
    u = t.apply(s, message(2, "sadness", T0 + 99.999), now=T0 + 170)
    assert u.outcome == "late" and u.changed, "the counter and the offset changed: the worker must write"
    assert not u.alerts and u.emit is None
    assert s.late_ignored == 1
    assert (t.window_counts(s), s.message_count, list(s.mood), [m.message_id for m in s.recent]) == before
    assert t.snapshot(s).record().counters.late_ignored == 1
    assert t.apply(s, message(2, "sadness", T0 + 99.999), now=T0 + 171).outcome == "replay", "and counted once"
    assert s.late_ignored == 1


def test_late_message_whose_window_passed_counts_but_not_in_the_window() -> None:
    t = tracker(window_s=60.0, window_pane_s=30.0, allowed_lateness_s=60.0)
    s = run(t, [message(0, "anger", T0 + 150), message(1, "joy", T0 + 200)])  # window [T0+150, T0+210)
    u = t.apply(s, message(2, "fear", T0 + 145), now=T0 + 210)
    assert u.outcome == "applied"
    assert counts_of(t, s) == {"anger": 1, "joy": 1}
    assert s.message_count == 3 and s.started_at == T0 + 145
    assert s.mood[LABELS.index("fear")] > 0.9 * 2 ** (-55 / 120)


def test_out_of_order_within_the_allowance_gives_the_same_state_as_in_order() -> None:
    times = [0.0, 12.0, 31.0, 45.0, 61.0, 95.0, 100.0, 119.0]
    labels = ["neutral", "anger", "anger", "joy", "sadness", "anger", "fear", "neutral"]
    in_order = [(tt, lab) for tt, lab in zip(times, labels, strict=True)]
    shuffled = [in_order[i] for i in (1, 0, 3, 2, 5, 4, 7, 6)]
    t = tracker(allowed_lateness_s=40.0)  # the largest step back in the shuffle is 34 s
    a = run(t, [message(i, lab, T0 + tt, message_id=f"m{tt}") for i, (tt, lab) in enumerate(in_order)])
    b = run(t, [message(i, lab, T0 + tt, message_id=f"m{tt}") for i, (tt, lab) in enumerate(shuffled)])
    assert b.late_ignored == 0
    assert t.window_counts(a) == t.window_counts(b)
    assert a.mood == pytest.approx(b.mood, rel=1e-12) and a.mood_weight == pytest.approx(b.mood_weight, rel=1e-12)
    assert [m.message_id for m in a.recent] == [m.message_id for m in b.recent]
    assert (a.latest_at, a.started_at, a.message_count) == (b.latest_at, b.started_at, b.message_count)


# -- mood ------------------------------------------------------------------------------------------------------


def test_mood_decays_with_the_half_life_exactly() -> None:
    t = tracker(mood_half_life_s=120.0, allowed_lateness_s=300.0)
    s = run(
        t,
        [message(0, "anger", T0, scores=ONE_HOT["anger"]), message(1, "neutral", T0 + 120, scores=ONE_HOT["neutral"])],
    )
    anger, neutral = LABELS.index("anger"), LABELS.index("neutral")
    assert s.mood[anger] == 0.5 and s.mood[neutral] == 1.0 and s.mood_weight == 1.5
    assert s.mood_shares()[anger] == 1 / 3
    s = t.apply(s, message(2, "neutral", T0 + 360, scores=ONE_HOT["neutral"]), now=T0 + 360).state
    assert s.mood[anger] == 0.5**3 and s.mood[neutral] == 0.25 + 1.0 and s.mood_weight == 1.5 * 0.25 + 1

    # the same messages, the first one late: the same mood (it is decayed by its age on arrival)
    late = run(
        t,
        [message(1, "neutral", T0 + 120, scores=ONE_HOT["neutral"]), message(2, "anger", T0, scores=ONE_HOT["anger"])],
    )
    assert late.mood[anger] == 0.5 and late.mood[neutral] == 1.0 and late.mood_weight == 1.5


def test_mood_shares_are_a_recency_weighted_average_of_scores() -> None:
    t = tracker(mood_half_life_s=60.0)
    s = run(t, [message(0, "joy", T0, score=0.8), message(1, "joy", T0 + 60, score=0.6)])
    joy = LABELS.index("joy")
    assert s.mood_shares()[joy] == pytest.approx((0.8 * 0.5 + 0.6) / 1.5, rel=1e-12)
    assert sum(s.mood_shares()) == pytest.approx(1.0, rel=1e-12)
    record = t.snapshot(s).record()
    assert record.mood.scores["joy"] == pytest.approx((0.8 * 0.5 + 0.6) / 1.5, abs=1e-6)
    assert record.mood.weight == 1.5 and record.mood.half_life_s == 60.0


# -- dominant emotion and emission ---------------------------------------------------------------------------


def test_dominant_needs_a_margin_to_change_and_reports_how_long_it_held() -> None:
    clock = FakeClock()
    t = tracker(dominant_min_margin=0.05, emit_interval_s=1e9, clock=clock, mood_half_life_s=1e9)
    u = t.apply(None, message(0, "neutral", T0, scores=ONE_HOT["neutral"]))
    assert u.dominant_changed and u.emit is not None and u.emit.reason == "dominant_changed"
    assert u.emit.record().dominant.label == "neutral" and u.emit.record().dominant.messages == 1
    s = u.state
    u = t.apply(s, message(1, "anger", T0 + 10, scores=ONE_HOT["anger"]))
    assert not u.dominant_changed and u.emit is None, "a tie does not take over"
    joy_with_some_anger = [0.12 if n == "anger" else 0.88 if n == "joy" else 0.0 for n in LABELS]
    u = t.apply(s, message(2, "joy", T0 + 20, scores=joy_with_some_anger))
    assert not u.dominant_changed, "anger leads neutral by 0.04, less than the margin"
    u = t.apply(s, message(3, "anger", T0 + 30, scores=ONE_HOT["anger"]))
    assert u.dominant_changed and u.emit is not None and u.emit.record().dominant.label == "anger"
    u = t.apply(s, message(4, "anger", T0 + 90, scores=ONE_HOT["anger"]))
    record = t.snapshot(u.state).record()
    assert record.dominant.label == "anger" and record.dominant.held_s == 60.0 and record.dominant.messages == 2
    assert record.dominant.since == "2026-11-18T11:10:30.000Z"


def test_state_is_emitted_at_most_once_per_interval_besides_dominant_changes() -> None:
    clock = FakeClock(T0)
    t = tracker(emit_interval_s=30.0, clock=clock)
    s = t.apply(None, message(0, "neutral", T0)).state  # emitted: the dominant emotion appeared
    reasons = []
    for i in range(1, 8):
        clock.now = T0 + 10 * i
        u = t.apply(s, message(i, "neutral", T0 + 10 * i))
        reasons.append(u.emit.reason if u.emit else None)
    assert reasons == [None, None, "interval", None, None, "interval", None]
    assert s.last_emitted_at == T0 + 60


def test_interval_zero_emits_on_every_applied_message_but_not_on_ignored_ones() -> None:
    t = tracker(emit_interval_s=0.0)
    s = t.apply(None, message(0, "neutral", T0 + 100), now=T0 + 100).state
    assert t.apply(s, message(1, "neutral", T0 + 101), now=T0 + 101).emit is not None
    assert t.apply(s, message(2, "neutral", T0), now=T0 + 102).emit is None  # late
    assert t.apply(s, message(2, "neutral", T0 + 102), now=T0 + 102).emit is None  # replay


# -- idempotence, duplicates, clock skew -----------------------------------------------------------------------


def test_reprocessing_an_offset_changes_nothing() -> None:
    t = tracker('[[rule]]\nname = "r"\nkind = "consecutive"\nlabels = ["anger"]\ncount = 2\n', emit_interval_s=0.0)
    msgs = [message(i, "anger", T0 + i) for i in range(5)]
    s = None
    fired = 0
    for m in msgs:
        u = t.apply(s, m, now=T0 + 10)
        s = u.state
        fired += len(u.alerts)
    assert s is not None and fired == 1
    before = t.encode(s)
    for m in msgs:
        u = t.apply(s, m, now=T0 + 99)
        assert (u.outcome, u.changed, u.alerts, u.emit) == ("replay", False, (), None)
    assert t.encode(s) == before, "not even last_seen_at moves"


def test_a_new_partition_starts_the_offset_sequence_afresh() -> None:
    t = tracker()
    s = run(t, [message(100, "joy", T0)])
    u = t.apply(s, message(3, "joy", T0 + 1, partition=5), now=T0 + 1)
    assert u.outcome == "applied" and (s.source_partition, s.source_offset) == (5, 3)


def test_a_repeated_message_id_is_a_duplicate() -> None:
    t = tracker()
    s = run(t, [message(0, "joy", T0, message_id="x"), message(1, "anger", T0 + 1)])
    u = t.apply(s, message(2, "joy", T0, message_id="x"), now=T0 + 2)
    assert u.outcome == "duplicate" and u.changed and s.duplicates_ignored == 1 and s.message_count == 2


def test_a_sent_at_far_in_the_future_is_taken_as_now() -> None:
    t = tracker(max_future_skew_s=60.0)
    s = run(t, [message(0, "joy", T0)], now=T0)
    s = t.apply(s, message(1, "joy", T0 + 59), now=T0).state
    assert s.future_clamped == 0 and s.latest_at == T0 + 59
    s = t.apply(s, message(2, "joy", T0 + 10 * 86_400), now=T0 + 5).state
    assert s.future_clamped == 1 and s.latest_at == T0 + 59, "taken as sent at T0+5"
    assert t.apply(s, message(3, "joy", T0 + 6), now=T0 + 6).outcome == "applied", "the next message is not late"


# -- TTL -----------------------------------------------------------------------------------------------------


def test_expiry_counts_processing_time_since_the_last_message() -> None:
    clock = FakeClock(T0 + 1000)
    t = tracker(ttl_s=3600.0, clock=clock)
    s = run(t, [message(0, "joy", T0)], now=T0 + 1000)  # an old event time does not matter
    raw = t.encode(s)
    assert not t.is_expired(s) and not t.is_expired_raw(raw)
    clock.now = T0 + 1000 + 3599.9
    assert not t.is_expired(s) and not t.is_expired_raw(raw)
    clock.now = T0 + 1000 + 3600
    assert t.is_expired(s) and t.is_expired_raw(raw)
    assert is_expired(s, T0 + 1000 + 3600, 3600.0) and not is_expired(s, T0 + 1000, 3600.0)
    s = t.apply(s, message(1, "joy", T0 + 1), now=T0 + 4000).state
    assert not t.is_expired(s, now=T0 + 4600), "a new message renews it"


def test_replays_do_not_renew_the_ttl() -> None:
    t = tracker(ttl_s=100.0)
    s = run(t, [message(0, "joy", T0)], now=T0)
    t.apply(s, message(0, "joy", T0), now=T0 + 99)
    assert t.is_expired(s, now=T0 + 100)


# -- bad input --------------------------------------------------------------------------------------------------


def test_malformed_messages_are_refused() -> None:
    t = tracker()
    with pytest.raises(ValueError, match="scores"):
        t.apply(None, message(0, "joy", T0, scores=[0.5, 0.5]), now=T0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        t.apply(None, message(0, "joy", T0, scores=[math.nan] * 7), now=T0)
    with pytest.raises(ValueError, match="finite"):
        t.apply(None, message(0, "joy", math.inf), now=T0)
    s = run(t, [message(0, "joy", T0)], now=T0)
    with pytest.raises(ValueError, match="applied to the state of"):
        t.apply(s, message(1, "joy", T0, conversation_id="other"), now=T0)


def test_an_empty_state_has_no_snapshot() -> None:
    t = tracker()
    with pytest.raises(ValueError, match="no applied message"):
        t.snapshot(t.new_state("c"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mood_half_life_s": 0.0},
        {"ttl_s": 0.0},
        {"allowed_lateness_s": -1.0},
        {"dominant_min_margin": 1.5},
        {"emit_interval_s": math.nan},
        {"recent_messages": 0},
        {"window_s": 100.0, "window_pane_s": 30.0},
        {"labels": ("a", "a")},
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        tracker(**kwargs)


def test_a_sent_at_in_year_one_is_applied_and_its_records_serialise() -> None:
    """The contract allows year 1; the window's panes reach before it. Such a message counts like any other
    (taken as 1970-01-01), and fires rules, instead of being refused."""
    year_one = -62_135_596_800.0  # 0001-01-01T00:00:00Z
    t = tracker(
        """
[[rule]]
name = "distress"
kind = "consecutive"
labels = ["sadness"]
count = 2
""",
        emit_interval_s=0.0,
    )
    state = None
    fired = []
    for i in range(3):
        update = t.apply(state, message(i, "sadness", year_one + i))
        state = update.state
        fired += update.alerts
        assert update.emit is not None
        assert update.emit.to_json()  # serialises: no time before year 1 anywhere in it
    assert state is not None and state.message_count == 3
    assert [a.rule for a in fired] == ["distress"]
    assert t.snapshot(state).to_json()
